"""The three ways a result travels: inline in one `Fetch` response, over the bulk data
plane, and as a gRPC stream (`Slice`, and the client's fallback without a bulk listener)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch

from tensorslice.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    ServerUnavailable,
    TensorSliceError,
)
from tensorslice.client._receive import Assembler, recv_exact
from tensorslice.core.codec import decode_chunk
from tensorslice.server import ServerConfig, TensorStore, create_server
from tensorslice.server._bulk import TOKEN_BYTES, BulkServer
from tensorslice.v1 import tensorslice_pb2 as pb

X = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(7))  # 2 MiB

CASES: list[tuple[tuple[object, ...], torch.Tensor]] = [
    ((slice(0, 40),), X[0:40]),  # contiguous view
    ((slice(None), slice(3, 20)), X[:, 3:20]),  # strided copy
    (([5, 1, 9, 9], slice(None), 3), X[[5, 1, 9, 9], :, 3]),  # gather
    ((slice(None, None, -3), [0, 31]), X.flip(0)[::3][:, [0, 31]]),  # NumPy's negative step
    ((0, 0, 0, 0), X[0, 0, 0, 0]),  # scalar
    ((slice(5, 5),), X[5:5]),  # empty
]


def _server(**config: object) -> tuple[object, str]:
    store = TensorStore(device="cuda" if torch.cuda.is_available() else "cpu")
    store.add("x", X)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(**config))  # type: ignore[arg-type]
    srv.start()
    return srv, f"127.0.0.1:{port}"


@pytest.fixture(scope="module", params=["inline", "bulk", "stream"])
def transport(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, object]]:
    configs = {
        "inline": {"unary_max_bytes": 64 << 20},
        "bulk": {"unary_max_bytes": 1024},
        "stream": {"unary_max_bytes": 1024, "bulk": False, "chunk_bytes": 4096},
    }
    srv, address = _server(**configs[request.param])
    yield request.param, address, srv
    srv.stop(grace=None)  # type: ignore[attr-defined]


@pytest.mark.e2e
@pytest.mark.parametrize(("index", "local"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_results_identical_over_every_transport(
    transport: tuple[str, str, object], index: tuple[object, ...], local: torch.Tensor
) -> None:
    _, address, _ = transport
    with Client(address, timeout=30) as c:
        got = c.tensor("x")[index].cpu()
        assert got.shape == local.shape and torch.equal(got, local)


@pytest.mark.e2e
def test_slice_bytes_and_threshold_over_every_transport(
    transport: tuple[str, str, object],
) -> None:
    _, address, _ = transport
    with Client(address, timeout=30) as c:
        data = c.slice_bytes("x", (slice(2, 50),))
        assert isinstance(data, bytes)
        assert torch.equal(safetensors.torch.load(data)["values"], X[2:50])
        w = c.tensor("x").where(1, "mean", op=">", value=0.0, scope="per_sample")
        m = X.mean(dim=(2, 3)) > 0
        assert torch.equal(w.values.cpu(), X.movedim(1, 1)[m.nonzero(as_tuple=True)])


@pytest.mark.e2e
def test_bulk_transfers_counted(transport: tuple[str, str, object]) -> None:
    kind, address, srv = transport
    bulk: BulkServer | None = srv.bulk  # type: ignore[attr-defined]
    if kind == "stream":
        assert bulk is None
        return
    assert bulk is not None
    before = bulk.sent
    with Client(address, timeout=30, same_host=False) as c:  # TCP: one bulk transfer
        c.tensor("x")[0:40]
    want = before + (1 if kind == "bulk" else 0)
    deadline = time.monotonic() + 5  # the server counts after its last sendall returns
    while bulk.sent != want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bulk.sent == want
    assert bulk.pending == 0


@pytest.mark.e2e
def test_async_client_over_bulk() -> None:
    srv, address = _server(unary_max_bytes=1024)
    try:
        async def go() -> torch.Tensor:
            async with AsyncClient(address, timeout=30) as c:
                r = await c.tensor("x")
                return await r[3:30, [4, 2]]

        assert torch.equal(asyncio.run(go()).cpu(), X[3:30, [4, 2]])
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_fetch_too_large_without_bulk_is_failed_precondition() -> None:
    srv, address = _server(unary_max_bytes=1024, bulk=False)
    try:
        with grpc.insecure_channel(address) as ch:
            fetch = ch.unary_unary("/tensorslice.v1.TensorSlice/Fetch",
                                   request_serializer=pb.SliceRequest.SerializeToString,
                                   response_deserializer=pb.SliceChunk.FromString)
            req = pb.SliceRequest(tensor="x", bulk=True)
            with pytest.raises(grpc.RpcError) as info:
                fetch(req, timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            size = int(re.match(r"result of (\d+) bytes", info.value.details()).group(1))
            assert 2097152 < size < 2097152 + 512  # the data plus the header
            assert info.value.details() == (
                f"result of {size} bytes is larger than the 1024-byte limit of a single "
                "response and the server has no bulk listener; use Slice (streaming)"
            )
            # The generated stub reads a Slice stream: the chunks concatenate to the file.
            stream = ch.unary_stream("/tensorslice.v1.TensorSlice/Slice",
                                     request_serializer=pb.SliceRequest.SerializeToString,
                                     response_deserializer=pb.SliceChunk.FromString)
            data = b"".join(chunk.data for chunk in stream(req, timeout=10))
            assert torch.equal(safetensors.torch.load(data)["values"], X)
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]


def _redeem(port: int, token: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(token)
        out = b""
        while True:
            part = s.recv(1 << 16)
            if not part:
                return out
            out += part


@pytest.mark.e2e
def test_bulk_server_tokens_are_one_time_and_expire() -> None:
    bulk = BulkServer("127.0.0.1", 0, ticket_timeout=0.3).start()
    try:
        token = bulk.offer([b"hello ", memoryview(b"world")], 11)
        assert _redeem(bulk.port, token) == b"hello world"
        assert _redeem(bulk.port, token) == b""  # used: the connection is dropped
        assert _redeem(bulk.port, b"\0" * TOKEN_BYTES) == b""  # unknown
        late = bulk.offer([b"never"], 5)
        deadline = time.monotonic() + 5
        while bulk.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bulk.pending == 0
        assert _redeem(bulk.port, late) == b""  # expired
        assert bulk.sent == 1
    finally:
        bulk.stop()


@pytest.mark.e2e
def test_truncated_bulk_transfer_raises() -> None:
    bulk = BulkServer("127.0.0.1", 0).start()
    try:
        header = b'{"values":{"dtype":"U8","shape":[100],"data_offsets":[0,100]}}'
        header += b" " * (-len(header) % 8)
        head = len(header).to_bytes(8, "little") + header
        token = bulk.offer([head, b"x" * 10], len(head) + 100)  # sends 90 bytes short
        asm = Assembler()
        with socket.create_connection(("127.0.0.1", bulk.port), timeout=10) as s:
            s.sendall(token)
            with pytest.raises(ServerUnavailable, match=re.escape(
                    f"connection closed by the server after {len(head) + 10} of "
                    f"{len(head) + 100} bytes")):
                asm.receive(s, len(head) + 100)
    finally:
        bulk.stop()


@pytest.mark.e2e
def test_inline_fetch_frame_is_a_slice_chunk() -> None:
    srv, address = _server()
    try:
        with grpc.insecure_channel(address) as ch:
            fetch = ch.unary_unary("/tensorslice.v1.TensorSlice/Fetch",
                                   request_serializer=pb.SliceRequest.SerializeToString,
                                   response_deserializer=None)
            req = pb.SliceRequest(tensor="x", selectors=[pb.Selector(index=pb.Index(index=3))])
            frame = fetch(req, timeout=10)
            parsed = pb.SliceChunk.FromString(frame)
            assert not parsed.HasField("ticket")
            assert parsed.data == bytes(decode_chunk(frame))
            assert torch.equal(safetensors.torch.load(parsed.data)["values"], X[3])
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]


@pytest.mark.unit
def test_receive_buffers_are_recycled_only_once_their_tensors_are_gone() -> None:
    import gc

    from tensorslice.client._receive import BufferPool
    from tensorslice.core.codec import safetensors_header

    n = 2 << 20
    header, _ = safetensors_header([("values", torch.uint8, (n,))])
    pool = BufferPool()  # this test's own: nothing another test left matters

    def receive(fill: int) -> torch.Tensor:
        asm = Assembler(pool=pool)
        asm.feed(header)
        asm.feed(bytes([fill]) * n)
        return asm.tensors()["values"]

    first = receive(1)
    view = first[10:20]  # a view keeps the buffer too
    del first
    gc.collect()
    assert pool.free_count == 0
    second = receive(2)  # must not reuse the buffer `view` lives on
    assert int(view.sum()) == 10 and int(second[:10].sum()) == 20
    address = second.data_ptr()
    del second
    gc.collect()
    assert pool.free_count == 1
    third = receive(3)  # reuses the freed buffer: no fresh pages to fault in
    assert third.data_ptr() == address and pool.handed_out == 1
    assert int(third.sum()) == 3 * n and int(view.sum()) == 10


def _address(piece: bytes | memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(piece, dtype=np.uint8).ctypes.data)


@pytest.mark.unit
def test_contiguous_slice_reaches_the_wire_from_the_source_memory() -> None:
    """No copy of the source before the wire: every data piece the bulk plane writes with
    `sendall` is a view of the tensor's own memory."""
    from tensorslice.core.selection import Range, Selection
    from tensorslice.server import TensorMeta, execute, plan
    from tensorslice.server._stream import pieces

    x = X.clone()
    p = plan(TensorMeta("x", tuple(x.shape), x.dtype), Selection((Range(3, 40),)))
    body = pieces(execute(p, x), {}, chunk_bytes=1 << 16)
    next(body)  # the header
    start, end = x[3].data_ptr(), x[40].data_ptr()
    seen = 0
    for piece in body:
        assert isinstance(piece, memoryview)
        assert start <= _address(piece) and _address(piece) + len(piece) <= end
        assert _address(piece) == start + seen  # in order, contiguous
        seen += len(piece)
    assert seen == end - start


@pytest.mark.unit
def test_gather_makes_exactly_one_copy() -> None:
    """A row gather writes each slab once, into a reused buffer, and the wire reads it from
    there: every data piece is a view of that one buffer."""
    from tensorslice.core.selection import Combine, Indices, Selection
    from tensorslice.server import TensorMeta, execute, plan
    from tensorslice.server._payload import BufferPool
    from tensorslice.server._stream import pieces

    pool = BufferPool()
    b, c = torch.tensor([5, 1, 9, 30]), torch.tensor([2, 7, 3])
    p = plan(TensorMeta("x", tuple(X.shape), X.dtype),
             Selection((Indices(b), Indices(c)), Combine.OUTER))
    body = pieces(execute(p, X), {}, chunk_bytes=1 << 20, slab_bytes=4096, pool=pool)
    next(body)
    got = bytearray()
    addresses = set()
    for piece in body:
        assert isinstance(piece, memoryview)
        addresses.add(_address(piece))
        got += piece
    assert pool.allocations == 1  # one buffer, written once per slab
    assert len(addresses) == 1  # every slab went through that same buffer
    want = X[b][:, c].contiguous()
    assert bytes(got) == want.numpy().tobytes()


@pytest.mark.e2e
def test_plan_cache_follows_a_reloaded_tensor() -> None:
    store = TensorStore()
    store.add("t", torch.arange(24.0).reshape(4, 6))
    srv, port = create_server(store, "127.0.0.1:0")
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            assert torch.equal(c.slice("t", (slice(1, 3),))["values"],
                               torch.arange(24.0).reshape(4, 6)[1:3])
            store.add("t", torch.arange(30.0).reshape(3, 10))  # same name, new shape
            got = c.slice("t", (slice(1, 3),))["values"]  # the same request again
            assert torch.equal(got, torch.arange(30.0).reshape(3, 10)[1:3])
            assert c.explain("t", (slice(1, 3),)).result_shape == (2, 10)
    finally:
        srv.stop(grace=None)


@pytest.mark.e2e
def test_slice_many_into_shared_memory() -> None:
    srv, address = _server(unary_max_bytes=1024)  # over the bulk plane
    try:
        with Client(address, timeout=30) as c:
            out = c.slice_many({"a": ("x", ([3, 1],)), "b": ("x", (0, 0))}, share_memory=True)
            assert out["a"].is_shared() and out["b"].is_shared()
            assert torch.equal(out["a"].cpu(), X[[3, 1]]) and torch.equal(out["b"], X[0, 0])
            plain = c.slice_many({"a": ("x", ([3, 1],))})
            assert not plain["a"].is_shared() and torch.equal(plain["a"], out["a"])
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_a_bulk_result_honours_the_calls_deadline() -> None:
    """One deadline per call, whatever carries it: 1 ms cannot fetch a ticket and receive
    its file (the socket's per-read timeout once let such a call succeed)."""
    srv, address = _server(unary_max_bytes=1024)
    try:
        with Client(address, timeout=30) as c:
            assert c.slice("x", (slice(0, 40),))["values"].shape[0] == 40  # bulk works
            with pytest.raises(DeadlineExceeded):
                c.slice("x", (), timeout=0.001)

        async def go() -> None:
            async with AsyncClient(address, timeout=30) as ac:
                await ac.slice("x", (), timeout=0.001)

        with pytest.raises(DeadlineExceeded):
            asyncio.run(go())
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_unreachable_bulk_port_falls_back_to_streaming() -> None:
    srv, address = _server(unary_max_bytes=1024)
    try:
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        srv.bulk.port = dead  # type: ignore[attr-defined]  # tickets name the closed port
        with Client(address, timeout=30) as c:
            assert torch.equal(c.tensor("x")[0:40].cpu(), X[0:40])  # streamed instead
            assert c._bulk_ok is False
            assert torch.equal(c.tensor("x")[5:9].cpu(), X[5:9])  # no bulk asked any more

        async def go() -> torch.Tensor:
            async with AsyncClient(address, timeout=30) as ac:
                return await (await ac.tensor("x"))[1:30]

        assert torch.equal(asyncio.run(go()).cpu(), X[1:30])
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]


@pytest.mark.unit
def test_fetch_refuses_from_the_plan_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """A result too large for one message on a server without bulk listener is refused from
    its plan's size: nothing is executed (the client then streams it, computed once)."""
    import tensorslice.server._orchestrate as orchestrate
    from tensorslice.core.errors import FailedPrecondition as Refused
    from tensorslice.core.selection import Index, Indices, Selection, selection_to_proto
    from tensorslice.server._model import Plan
    from tensorslice.server._payload import Payload

    store = TensorStore()
    store.add("x", X)
    calls = orchestrate.Calls(store, ServerConfig(unary_max_bytes=1024, bulk=False), None)
    executed: list[object] = []
    real = orchestrate.execute

    def counting(p: Plan, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> list[Payload]:
        executed.append(p)
        return real(p, tensor, *args, **kwargs)

    monkeypatch.setattr(orchestrate, "execute", counting)
    request = pb.SliceRequest(tensor="x", bulk=True)
    with pytest.raises(Refused, match=r"limit of a single response and the server has no bulk"):
        calls.one_message(calls.planned(request), True)
    assert executed == []
    # A small view is framed from the tensor's memory: nothing executed either.
    small = selection_to_proto("x", Selection((Index(0), Index(1), Index(2))))
    frame = calls.one_message(calls.planned(small), True)
    assert executed == []
    assert torch.equal(safetensors.torch.load(pb.SliceChunk.FromString(frame).data)["values"],
                       X[0, 1, 2])
    gather = selection_to_proto("x", Selection((Index(0), Indices([1, 0]), Index(2))))
    frame = calls.one_message(calls.planned(gather), True)
    assert len(executed) == 1  # computed once
    assert torch.equal(safetensors.torch.load(pb.SliceChunk.FromString(frame).data)["values"],
                       X[0, [1, 0], 2])


# ------------------------------------------------------------------ direct requests (no gRPC)


def _direct(port: int, method: str, request: bytes, auth: bytes = b"") -> tuple[int, bytes]:
    import struct

    from tensorslice.core.codec import DIRECT_MAGIC

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(DIRECT_MAGIC + struct.pack("<H", len(auth)) + auth
                  + struct.pack("<H", len(method)) + method.encode()
                  + struct.pack("<Q", len(request)) + request)
        code, n = struct.unpack("<BQ", recv_exact(s, 9))
        return code, recv_exact(s, n)


@pytest.mark.e2e
def test_direct_requests_answer_with_statuses() -> None:
    srv, _ = _server(unary_max_bytes=1024)
    port = srv.bulk.port  # type: ignore[attr-defined]
    try:
        code, body = _direct(port, "Slice", pb.SliceRequest(tensor="x").SerializeToString())
        assert code == 0 and torch.equal(safetensors.torch.load(body)["values"].cpu(), X)
        code, body = _direct(port, "DescribeTensor",
                             pb.DescribeTensorRequest(name="x").SerializeToString())
        assert code == 0 and list(pb.TensorInfo.FromString(body).shape) == [64, 32, 16, 16]
        code, body = _direct(port, "Slice", pb.SliceRequest(tensor="nope").SerializeToString())
        assert (code, body) == (5, b"no tensor named 'nope'; the server holds: x")
        code, body = _direct(port, "Slice", b"\xff\xff\xff")
        assert code == 3 and body.startswith(b"malformed tensorslice.v1.SliceRequest (3 bytes)")
        code, body = _direct(port, "Drop", b"")
        assert (code, body) == (3, b"'Drop' is a write: writes go over gRPC only, not as direct or "
                                b"same-host session calls")
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_a_direct_connection_carries_call_after_call() -> None:
    from tensorslice.client._base import CallDirect
    from tensorslice.client._client import DirectLines, call_direct

    srv, _ = _server(unary_max_bytes=1024)
    bulk = srv.bulk  # type: ignore[attr-defined]
    lines = DirectLines()
    where = ("127.0.0.1", bulk.port)

    def call(name: str) -> bytes:
        step = CallDirect(socket.AF_INET, where, "DescribeTensor",
                          pb.DescribeTensorRequest(name=name), None, 10)
        return call_direct(step, lines=lines)

    try:
        assert pb.TensorInfo.FromString(call("x")).name == "x"
        kept = lines.take(where)
        assert kept is not None
        lines.give(where, kept)
        with pytest.raises(TensorSliceError, match="no tensor named 'nope'"):
            call("nope")  # an error answered whole: the connection stays
        assert pb.TensorInfo.FromString(call("x")).name == "x"
        assert lines.take(where) is kept  # every call on the one connection
        lines.give(where, kept)
        kept.shutdown(socket.SHUT_RDWR)  # as a server that closed it while kept
        assert pb.TensorInfo.FromString(call("x")).name == "x"  # sent again, afresh
        last = lines.take(where)
        assert last is not None and last is not kept
        deadline = time.monotonic() + 10
        while bulk.connections > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bulk.connections == 1  # the cut one is gone on the server too
        assert srv.stop(grace=None).wait(30)  # type: ignore[attr-defined]
        last.settimeout(10)
        assert last.recv(1) == b""  # closed by the stopping server, though idle
        assert bulk.connections == 0
        last.close()
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]
        lines.close()


def _in_forked_child(address: str, port: int | None, out: object) -> None:
    from tensorslice.client._fork import forked_from_grpc

    torch.set_num_threads(1)  # as DataLoader workers do: the parent's OpenMP pool is gone
    client = Client(address, timeout=10)
    client._data_addr = None if port is None else (socket.AF_INET, ("127.0.0.1", port))
    results: list[object] = [forked_from_grpc()]
    try:
        results.append([t.name for t in client.list_tensors()])
        results.append(torch.equal(client.tensor("x")[0:40].cpu(), X[0:40]))  # large
        results.append(torch.equal(client.tensor("x")[[3, 1], 2].cpu(), X[[3, 1], 2]))
        results.append(client.explain("x", (slice(0, 2),)).result_shape)
        results.append(safetensors.torch.load(client.slice_bytes("x", 5))["values"].shape)
        client.describe("nope")
    except TensorSliceError as exc:
        results.append(f"{type(exc).__name__}: {exc}")
    out.put(results)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_direct_requests_check_the_token_as_grpc_does() -> None:
    srv, _ = _server(token="s3cret")
    port = srv.bulk.port  # type: ignore[attr-defined]
    request = pb.DescribeTensorRequest(name="x").SerializeToString()
    try:
        code, body = _direct(port, "DescribeTensor", request)
        assert code == 16 and body.startswith(b"no credentials")  # UNAUTHENTICATED
        code, _ = _direct(port, "DescribeTensor", request, b"Bearer wrong")
        assert code == 16
        code, body = _direct(port, "DescribeTensor", request, b"Bearer s3cret")
        assert code == 0 and pb.TensorInfo.FromString(body).name == "x"
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_a_forked_client_calls_over_the_data_plane_only() -> None:
    import multiprocessing

    srv, address = _server(unary_max_bytes=1024)
    try:
        with Client(address, timeout=10) as parent:
            parent.list_tensors()  # announces the data plane's port
            port = parent._data_port
            assert port == srv.bulk.port  # type: ignore[attr-defined]
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        for known in (port, None):
            child = ctx.Process(target=_in_forked_child, args=(address, known, out))
            child.start()
            got = out.get(timeout=60)
            child.join(timeout=30)
            if known is None:
                assert got[0] is True and got[1].startswith(
                    "FailedPrecondition: this process was forked from one that uses gRPC")
            else:
                assert got == [True, ["x"], True, True, (2, 32, 16, 16),
                               torch.Size([32, 16, 16]),
                               "TensorNotFound: no tensor named 'nope'; the server holds: x"]
    finally:
        srv.stop(grace=None)  # type: ignore[attr-defined]
