"""The client's call policy, driven by hand: no server, no sockets. A flow yields the steps a
client performs (`CallUnary`, `CallStream`, `ReceiveBulk`) and takes back their outcomes or
errors, so the Fetch -> bulk -> stream fallback is tested once for both clients."""

from __future__ import annotations

from typing import Any

import pytest
import safetensors.torch
import torch

from tensorslice.client import Client, DeadlineExceeded, _base
from tensorslice.client._base import (
    BulkUnreachable,
    CallStream,
    CallUnary,
    Flow,
    ReceiveBulk,
)
from tensorslice.core.codec import encode_chunk
from tensorslice.core.errors import FailedPrecondition, ServerUnavailable
from tensorslice.v1 import tensorslice_pb2 as pb

pytestmark = pytest.mark.unit

X = torch.arange(12, dtype=torch.float32).reshape(3, 4)
FILE = safetensors.torch.save({"values": X})


class Clock:
    """A clock that moves only when told: steps' timeouts are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(_base, "_clock", c)
    return c


def _start(flow: Flow[Any]) -> Any:
    return next(flow)


def _finish(flow: Flow[Any], outcome: Any = None, error: Exception | None = None) -> Any:
    with pytest.raises(StopIteration) as done:
        flow.throw(error) if error is not None else flow.send(outcome)
    return done.value.value


def _slice_flow(client: Client, timeout: float | None = 7.0) -> Flow[Any]:
    return client._flow(client._op_slice("x", (slice(None),)), timeout)


def test_small_result_comes_inline() -> None:
    client = Client("127.0.0.1:1")
    flow = _slice_flow(client)
    step = _start(flow)
    assert isinstance(step, CallUnary)
    assert step.path == "/tensorslice.v1.TensorSlice/Fetch"
    assert step.request.bulk is True and step.timeout == 7.0 and step.response_cls is None
    out = _finish(flow, encode_chunk(FILE))
    assert torch.equal(out["values"], X)


def test_refused_fetch_falls_back_to_the_stream() -> None:
    client = Client("127.0.0.1:1")
    flow = _slice_flow(client)
    _start(flow)
    step = flow.throw(FailedPrecondition("too large for one message"))
    assert isinstance(step, CallStream)
    assert step.path == "/tensorslice.v1.TensorSlice/Slice" and step.timeout == 7.0
    step.sink.feed(memoryview(FILE))
    assert torch.equal(_finish(flow)["values"], X)
    assert client._bulk_ok is True  # a refusal says nothing about the bulk port


def test_ticket_becomes_a_bulk_receive_and_an_unreachable_port_is_remembered() -> None:
    client = Client("[::1]:50051")
    flow = _slice_flow(client, timeout=2.0)
    _start(flow)
    ticket = pb.BulkTicket(port=4242, token=b"t" * 16, nbytes=len(FILE))
    step = flow.send(pb.SliceChunk(ticket=ticket).SerializeToString())
    assert isinstance(step, ReceiveBulk)
    assert (step.host, step.port, step.token, step.nbytes) == ("::1", 4242, b"t" * 16, len(FILE))
    assert step.timeout == 2.0 and step.connect_timeout == 2.0
    step = flow.throw(BulkUnreachable("no route"))
    assert isinstance(step, CallStream)
    step.sink.feed(memoryview(FILE))
    assert torch.equal(_finish(flow)["values"], X)
    assert client._bulk_ok is False
    # The next call asks for no ticket, without touching the operation's own request.
    op = client._op_slice("x", (slice(None),))
    step = _start(client._flow(op, None))
    assert step.request.bulk is False and op.request.bulk is True


def test_other_errors_end_the_call() -> None:
    flow = _slice_flow(Client("127.0.0.1:1"))
    _start(flow)
    with pytest.raises(ServerUnavailable, match="gone"):
        flow.throw(ServerUnavailable("gone"))


def test_unary_flow_is_one_step() -> None:
    client = Client("127.0.0.1:1")
    flow = client._flow(client._op_describe("x"), None)
    step = _start(flow)
    assert isinstance(step, CallUnary) and step.timeout is None
    assert step.path == "/tensorslice.v1.TensorSlice/DescribeTensor"
    info = pb.TensorInfo(name="x", shape=[3, 4], dtype="float32", device="cpu", nbytes=48)
    assert _finish(flow, info).shape == (3, 4)


# ---------------------------------------------------------------------------- one deadline


def test_each_step_gets_what_is_left_of_one_deadline(clock: Clock) -> None:
    client = Client("127.0.0.1:1")
    flow = _slice_flow(client, timeout=10.0)
    assert _start(flow).timeout == 10.0
    clock.now += 4.0  # the Fetch took 4 s and answered with a ticket
    ticket = pb.BulkTicket(port=4242, token=b"t" * 16, nbytes=len(FILE))
    step = flow.send(pb.SliceChunk(ticket=ticket).SerializeToString())
    assert isinstance(step, ReceiveBulk) and step.timeout == 6.0
    assert step.connect_timeout == 5.0
    clock.now += 5.0  # connecting to the bulk port failed after 5 s
    step = flow.throw(BulkUnreachable("no route"))
    assert isinstance(step, CallStream) and step.timeout == 1.0  # the clock never restarts


def test_the_fallback_after_the_deadline_is_not_attempted(clock: Clock) -> None:
    flow = _slice_flow(Client("127.0.0.1:1"), timeout=3.0)
    _start(flow)
    clock.now += 3.0
    with pytest.raises(DeadlineExceeded, match=r"the call's deadline of 3.0 s has passed"):
        flow.throw(FailedPrecondition("too large for one message"))


def test_a_deadline_already_past_makes_no_step(clock: Clock) -> None:
    client = Client("127.0.0.1:1")
    with pytest.raises(DeadlineExceeded):
        _start(_slice_flow(client, timeout=-1.0))
    with pytest.raises(DeadlineExceeded):
        _start(client._flow(client._op_describe("x"), 0.0))


# ---------------------------------------------------------------------------- uploads
BIG = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB: the bulk plane's threshold


def _put_flow(client: Client, t: torch.Tensor, timeout: float | None = 7.0) -> Flow[Any]:
    return client._flow(client._op_put("x", t, ["N"], True), timeout)


def test_large_upload_opens_then_sends_over_the_bulk_plane(clock: Clock) -> None:
    from tensorslice.client._base import SendBulk

    client = Client("[::1]:50051")
    flow = _put_flow(client, BIG)
    step = _start(flow)
    assert isinstance(step, CallUnary)
    assert step.path == "/tensorslice.v1.TensorSlice/OpenUpload" and step.timeout == 7.0
    req = step.request
    assert (req.name, req.replace, list(req.dim_names), req.append) == ("x", True, ["N"], False)
    assert req.header == _header(BIG)
    clock.now += 3
    step = flow.send(pb.BulkTicket(port=4242, token=b"t" * 16, nbytes=1 << 20))
    assert isinstance(step, SendBulk)
    assert (step.host, step.port, step.token, step.nbytes) == ("::1", 4242, b"t" * 16, 1 << 20)
    assert step.timeout == 4.0 and step.connect_timeout == 4.0  # one deadline for the call
    assert b"".join(bytes(p) for p in step.data) == BIG.numpy().tobytes()
    info = _finish(flow, pb.TensorInfo(name="x", shape=[1 << 18], dtype="float32", version=3))
    assert info.version == 3 and client.uploads == {"bulk": 1, "stream": 0}


def _header(t: torch.Tensor) -> bytes:
    from tensorslice.core.codec import safetensors_header

    header, _ = safetensors_header([("values", t.dtype, tuple(t.shape))])
    return header


def test_small_upload_streams_and_a_server_without_bulk_is_remembered() -> None:
    from tensorslice.client._base import CallUpload

    client = Client("127.0.0.1:1")
    step = _start(_put_flow(client, torch.ones(4)))
    assert isinstance(step, CallUpload) and step.path.endswith("/Put")
    flow = _put_flow(client, BIG)
    _start(flow)
    step = flow.throw(FailedPrecondition("no bulk data plane"))
    assert isinstance(step, CallUpload)
    assert client._bulk_uploads is False
    assert isinstance(_start(_put_flow(client, BIG)), CallUpload)  # not asked again


def test_unreachable_bulk_port_streams_the_upload() -> None:
    from tensorslice.client._base import CallUpload

    client = Client("127.0.0.1:1")
    flow = client._flow(client._op_append("r", BIG.reshape(4, -1), None), 7.0)
    assert _start(flow).request.append is True
    flow.send(pb.BulkTicket(port=4242, token=b"t" * 16, nbytes=1 << 20))
    step = flow.throw(BulkUnreachable("no route"))
    assert isinstance(step, CallUpload) and step.path.endswith("/Append")
    assert client._bulk_ok is False
    _finish(flow, pb.TensorInfo(name="r", shape=[4, 1 << 16], dtype="float32"))
    assert client.uploads == {"bulk": 0, "stream": 1}


def test_an_upload_ticket_of_another_size_is_refused() -> None:
    from tensorslice.core.errors import TensorSliceError

    client = Client("127.0.0.1:1")
    flow = _put_flow(client, BIG)
    _start(flow)
    with pytest.raises(TensorSliceError, match="ticket is for 5 bytes, the upload has 1048576"):
        flow.send(pb.BulkTicket(port=4242, token=b"t" * 16, nbytes=5))
