"""The same semantic tests for `Client` and `AsyncClient`, and for `SliceMany`.

The `api` fixture yields a client of either kind and `run`, which returns a value as is
(sync) or runs a coroutine to completion on the fixture's event loop (async): every test
reads ``run(c.describe("demo"))`` and ``run(remote[0:3])`` for both kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch

from tensorslice.client import (
    AsyncClient,
    AsyncRemoteTensor,
    Client,
    Combine,
    DeadlineExceeded,
    Full,
    Index,
    Indices,
    InvalidSelection,
    Mask,
    Range,
    RemoteTensor,
    ResultTooLarge,
    Selection,
    SelectionOutOfRange,
    ServerUnavailable,
    TensorNotFound,
    Threshold,
)
from tensorslice.client._base import bulk_host
from tensorslice.v1 import tensorslice_pb2 as pb

pytestmark = pytest.mark.e2e


@dataclass
class Api:
    kind: str
    client: Any  # Client | AsyncClient
    run: Callable[[Any], Any]


def _api(kind: str, address: str, **kw: Any) -> Iterator[Api]:
    if kind == "sync":
        with Client(address, **kw) as c:
            yield Api(kind, c, lambda value: value)
        return
    loop = asyncio.new_event_loop()
    ac = AsyncClient(address, **kw)

    def run(value: Any) -> Any:
        assert asyncio.iscoroutine(value), "an async method must return a coroutine"
        return loop.run_until_complete(value)

    try:
        yield Api(kind, ac, run)
    finally:
        loop.run_until_complete(ac.close())
        loop.close()


@pytest.fixture(params=["sync", "async"])
def api(request: pytest.FixtureRequest, server: str) -> Iterator[Api]:
    yield from _api(request.param, server, timeout=30)


def test_metadata(api: Api) -> None:
    c, run = api.client, api.run
    names = [t.name for t in run(c.list_tensors())]
    assert "demo" in names
    info = run(c.describe("demo"))
    assert info.shape == (16, 12, 6, 5) and info.dim_names == ("N", "C", "H", "W")
    remote = run(c.tensor("demo"))
    assert isinstance(remote, RemoteTensor if api.kind == "sync" else AsyncRemoteTensor)
    assert remote.shape == torch.Size([16, 12, 6, 5]) and len(remote) == 16
    with pytest.raises(TensorNotFound, match="no tensor named 'nope'"):
        run(c.describe("nope"))


INDEXES: list[Any] = [
    (slice(0, 4), slice(2, 5)),
    (3,),
    ([0, 2, 5], slice(None), [1, 3, 1]),
    (Ellipsis, None, 2),
    (slice(None), torch.tensor([True] * 6 + [False] * 6)),
]


@pytest.mark.parametrize("index", INDEXES)
def test_getitem_matches_torch(api: Api, demo: torch.Tensor, index: Any) -> None:
    remote = api.run(api.client.tensor("demo"))
    assert torch.equal(api.run(remote[index]), demo[index])


def test_oindex_select_fetch_astype(api: Api, demo: torch.Tensor) -> None:
    run = api.run
    remote = run(api.client.tensor("demo"))
    assert torch.equal(run(remote.oindex[[0, 2, 5], [1, 3]]), demo[[0, 2, 5]][:, [1, 3]])
    assert torch.equal(run(remote.select(C=[4, 1], H=slice(0, 2))), demo[:, [4, 1], 0:2])
    assert torch.equal(run(remote.fetch()), demo)
    half = run(remote.astype("float16")[0:2])
    assert half.dtype == torch.float16 and torch.equal(half, demo[0:2].half())


def test_where_and_explain(api: Api, demo: torch.Tensor) -> None:
    run = api.run
    remote = run(api.client.tensor("demo"))
    r = run(remote.where(dim="C", stat="mean", op=">", value=0.0, scope="any"))
    keep = (demo.mean((2, 3)) > 0).any(0)
    assert torch.equal(r.indices, keep.nonzero().reshape(-1))
    assert torch.equal(r.values, demo[:, keep])
    plan = run(remote.explain[0:4, [1, 3]])
    assert plan.result_shape == (4, 2, 6, 5)
    plan2 = run(api.client.explain("demo", Selection((Range(0, 2),))))
    assert plan2.zero_copy and plan2.result_shape == (2, 12, 6, 5)


def test_slice_and_slice_bytes(api: Api, demo: torch.Tensor) -> None:
    run, c = api.run, api.client
    out = run(c.slice("demo", Selection((Index(1), Range(0, 3)), Combine.OUTER)))
    assert torch.equal(out["values"], demo[1, 0:3])
    raw = run(c.slice_bytes("demo", (slice(2, 4),), dtype="float64"))
    assert isinstance(raw, bytes)
    assert torch.equal(safetensors.torch.load(raw)["values"], demo[2:4].double())


def test_errors(api: Api) -> None:
    run = api.run
    remote = run(api.client.tensor("demo"))
    with pytest.raises(SelectionOutOfRange, match="index 20 is out of bounds for dimension 1"):
        run(remote[:, 20])
    with pytest.raises(InvalidSelection, match="step cannot be zero"):
        run(remote[::0])
    with pytest.raises(IndexError, match="too many indices"):  # an InvalidIndex
        run(remote[0, 0, 0, 0, 0])
    with pytest.raises(ResultTooLarge):
        run(remote.astype("float32", max_bytes=100)[0:4])


def test_per_call_timeout_overrides_the_clients(api: Api) -> None:
    with pytest.raises(DeadlineExceeded):
        api.run(api.client.slice("demo", Selection(), timeout=-1.0))
    assert api.run(api.client.describe("demo", timeout=10)).name == "demo"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unreachable_server_fails_fast(kind: str) -> None:
    with grpc_free_port() as address:
        for api in _api(kind, address, timeout=5, retries=2):
            with pytest.raises(ServerUnavailable):
                api.run(api.client.list_tensors())


@contextlib.contextmanager
def grpc_free_port() -> Iterator[str]:
    """An address nothing listens on (bound by a socket held open but never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# ---------------------------------------------------------------------------- SliceMany


def test_slice_many(api: Api, demo: torch.Tensor) -> None:
    out = api.run(api.client.slice_many({
        "a": ("demo", (slice(0, 4),)),
        "b": ("demo", Selection((Range(0, 2), Index(3)), Combine.OUTER, "float16")),
        "c": ("demo", ([1, 0, 1], [2, 2, 3])),
    }))
    assert set(out) == {"a", "b", "c"}
    assert torch.equal(out["a"], demo[0:4])
    assert torch.equal(out["b"], demo[0:2, 3].half())
    assert torch.equal(out["c"], demo[[1, 0, 1], [2, 2, 3]])


def test_slice_many_threshold_items_name_their_extras(api: Api, demo: torch.Tensor) -> None:
    remote = api.run(api.client.tensor("demo"))
    sel = Selection((Full(), Threshold("mean", ">", 0.0, "per_sample")), Combine.OUTER)
    out = api.run(api.client.slice_many({"t": ("demo", sel), "n": ("demo", (0,))}))
    assert set(out) == {"t", "t.indices", "t.offsets", "n"}
    want = api.run(remote.where(dim="C", stat="mean", value=0.0, scope="per_sample"))
    assert torch.equal(out["t"], want.values) and torch.equal(out["t.offsets"], want.offsets)
    assert torch.equal(out["t.indices"], want.indices)


def test_slice_many_validates_everything_first(api: Api) -> None:
    run, c = api.run, api.client
    with pytest.raises(SelectionOutOfRange):
        run(c.slice_many({"ok": ("demo", (0,)), "bad": ("demo", (99,))}))
    with pytest.raises(TensorNotFound):
        run(c.slice_many({"ok": ("demo", (0,)), "bad": ("missing", ())}))
    with pytest.raises(ResultTooLarge, match="in all exceed the limit of 2000 bytes"):
        # each result alone is under the limit, the two together are not
        run(c.slice_many({"a": ("demo", (slice(0, 1),)), "b": ("demo", (slice(0, 1),))},
                         max_bytes=2000))
    with pytest.raises(InvalidSelection):
        run(c.slice_many({}))
    with pytest.raises(InvalidSelection):
        run(c.slice_many({"": ("demo", ())}))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["x", "x"], "'x' is not unique"),
        (["x", ""], "empty key"),
        (["t", "t.indices"], "'t.indices' is not unique"),
    ],
)
def test_server_refuses_bad_keys(server: str, keys: list[str], message: str) -> None:
    """Keys that a dict cannot express, sent as a raw request."""
    threshold = pb.Selector(threshold=pb.Threshold(stat=pb.Threshold.MEAN, op=pb.Threshold.GT,
                                                   scope=pb.Threshold.ANY))
    items = [
        pb.NamedSlice(key=k, request=pb.SliceRequest(
            tensor="demo", selectors=[pb.Selector(full=pb.Full()), threshold] if k == "t"
            else []))
        for k in keys
    ]
    with grpc.insecure_channel(server) as channel:
        call = channel.unary_stream(
            "/tensorslice.v1.TensorSlice/SliceMany",
            request_serializer=pb.SliceManyRequest.SerializeToString,
            response_deserializer=pb.SliceChunk.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(pb.SliceManyRequest(items=items), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


def test_async_client_survives_a_new_event_loop_per_call(server: str) -> None:
    """``asyncio.run`` per call: the channel belongs to a loop, so a new loop gets a new one."""
    ac = AsyncClient(server, timeout=30)
    assert asyncio.run(ac.describe("demo")).name == "demo"
    assert asyncio.run(ac.describe("demo")).name == "demo"
    asyncio.run(ac.close())


def test_clients_pickle_without_their_channel(server: str) -> None:
    c = Client(server)
    c.list_tensors()
    copy = pickle.loads(pickle.dumps(c))
    assert copy._channel is None and copy.list_tensors()
    c.close()
    copy.close()
    ac = AsyncClient(server)
    assert asyncio.run(ac.describe("demo")).name == "demo"
    acopy = pickle.loads(pickle.dumps(ac))
    assert acopy._channel is None and acopy._loop is None


def test_a_closed_client_refuses_calls(api: Api) -> None:
    assert api.run(api.client.describe("demo")).name == "demo"
    if api.kind == "async":
        api.run(api.client.close())
    else:
        api.client.close()
    with pytest.raises(RuntimeError, match="is closed; a closed client makes no more calls"):
        api.run(api.client.describe("demo"))
    assert api.client._channel is None  # nothing was reopened


# ---------------------------------------------------------------------------- explain, where


def test_explain_every_access(api: Api, demo: torch.Tensor) -> None:
    run, c = api.run, api.client
    remote = run(c.tensor("demo"))
    cases = [
        (remote.explain.oindex[[0, 2, 5], [1, 3]], remote.oindex[[0, 2, 5], [1, 3]]),
        (remote.explain.select(C=[4, 1], H=slice(0, 2)), remote.select(C=[4, 1], H=slice(0, 2))),
        (c.explain("demo", Selection(([0, 2], [1, 3]), Combine.OUTER)),
         c.slice("demo", Selection(([0, 2], [1, 3]), Combine.OUTER))),
    ]
    for plan, result in cases:
        got = run(result)
        got = got["values"] if isinstance(got, dict) else got
        assert run(plan).result_shape == tuple(got.shape)
    assert torch.equal(run(c.slice("demo", Selection(([0, 2], [1, 3]), "outer")))["values"],
                       demo[[0, 2]][:, [1, 3]])
    plan = run(remote.explain.where("C", "mean", scope="topk", k=3))
    assert [s.kind for s in plan.steps][-2:] == ["reduce", "gather"]
    assert "mean over dims [2, 3] > 0" in plan.steps[-2].detail
    r = run(remote.where("C", "mean", scope="topk", k=3))
    assert r.values.shape == (16, 3, 6, 5)


def test_explain_of_a_reversal_says_what_runs(api: Api, demo: torch.Tensor) -> None:
    run = api.run
    remote = run(api.client.tensor("demo"))
    plan = run(remote.explain[::-1])
    assert [(s.kind, s.dim) for s in plan.steps] == [("view", 0), ("copy", 0)]
    assert "reversed copy (flip) of dims 0" in plan.steps[1].detail
    assert plan.steps[1].bytes_moved == 2 * demo.nbytes and not plan.zero_copy
    half = run(remote.explain[:, ::-2])  # the shape is the reversed slice's, not the tensor's
    assert half.result_shape == (16, 6, 6, 5) == tuple(run(remote[:, ::-2]).shape)
    mixed = run(remote.explain[::-1, [3, 1, 4]])  # flip, then PyTorch's advanced indexing
    assert [s.kind for s in mixed.steps] == ["view", "copy", "gather"]
    assert torch.equal(run(remote[::-1, [3, 1, 4]]), demo.flip(0)[:, [3, 1, 4]])
    stepped = run(remote.explain[::-1, [1, 3]])  # [1, 3] is the view 1:4:2, not a gather
    assert [s.kind for s in stepped.steps] == ["view", "view", "copy", "copy"]
    assert torch.equal(run(remote[::-1, [1, 3]]), demo.flip(0)[:, [1, 3]])


def test_where_refuses_precisely(api: Api, demo: torch.Tensor) -> None:
    run = api.run
    remote = run(api.client.tensor("demo"))
    last = run(remote.where(-1, "mean", value=0.0))
    assert torch.equal(last.indices, run(remote.where(3, "mean", value=0.0)).indices)
    with pytest.raises(SelectionOutOfRange, match=re.escape(
            "dimension 4 is out of range for tensor 'demo' of 4 dimensions (expected -4 to 3)")):
        run(remote.where(4, "mean"))
    with pytest.raises(InvalidSelection, match=re.escape(
            "where: index entry 1 selects along dimension 1 (C), the threshold's own "
            "dimension; the threshold chooses its positions (leave that entry ':')")):
        run(remote.where(1, "mean", index=(slice(None), [1, 2])))
    with pytest.raises(InvalidSelection, match=re.escape(
            "scope topk needs k, how many positions of dimension 1 (C) to keep per sample "
            "(1 to 12)")):
        run(remote.where(1, "mean", scope="topk"))


# ---------------------------------------------------------------------------- pickling


def test_remote_tensors_pickle(api: Api, demo: torch.Tensor) -> None:
    remote = api.run(api.client.tensor("demo"))
    api.run(remote[0:1])  # the channel is open before pickling
    again = pickle.loads(pickle.dumps(remote.astype("float64")))
    assert type(again) is type(remote) and again.info == remote.info
    assert torch.equal(api.run(again[2:4]), demo[2:4].double())
    assert torch.equal(api.run(again.oindex[[1], [0, 2]]), demo[[1]][:, [0, 2]].double())


# ---------------------------------------------------------------------------- small ones


def test_selectors_take_python_lists(api: Api, demo: torch.Tensor) -> None:
    sel = Selection((Indices([1, 2]), Full(), Mask([True, False] * 3)), Combine.OUTER)
    got = api.run(api.client.slice("demo", sel))["values"]
    assert torch.equal(got, demo[[1, 2]][:, :, [0, 2, 4]])
    with pytest.raises(InvalidSelection,
                       match=re.escape("Indices takes integer positions; use Mask")):
        Indices([True, False])
    with pytest.raises(InvalidSelection, match=re.escape("Mask takes bools; got torch.int64")):
        Mask([1, 0])


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_retries_beyond_grpcs_limit_are_refused(cls: type[Client] | type[AsyncClient]) -> None:
    assert cls("127.0.0.1:1", retries=4).retries == 4
    with pytest.raises(ValueError, match=re.escape(
            "retries must be between 0 and 4 (gRPC makes at most 5 attempts); got 5")):
        cls("127.0.0.1:1", retries=5)


@pytest.mark.parametrize(
    ("target", "host"),
    [("127.0.0.1:50051", "127.0.0.1"), ("ipv4:127.0.0.1:50051", "127.0.0.1"),
     ("ipv4:10.0.0.1:1,10.0.0.2:1", "10.0.0.1"), ("ipv6:[::1]:50051", "::1"),
     ("[::1]:50051", "::1"), ("dns:///example.org:50051", "example.org"),
     ("dns:example.org:50051", "example.org"), ("dns://8.8.8.8/example.org:1", "example.org"),
     ("localhost:50051", "localhost"), ("unix:/tmp/ts.sock", "127.0.0.1"),
     ("unix-abstract:ts", "127.0.0.1"), ("vsock:2:50051", None)],
)
def test_bulk_host_of_every_target_form(target: str, host: str | None) -> None:
    assert bulk_host(target) == host
    assert Client(target)._bulk_ok is (host is not None)


def test_ipv4_target_keeps_the_bulk_plane(server: str) -> None:
    with Client(f"ipv4:{server}", timeout=30) as c:
        assert c.describe("demo").name == "demo" and c._bulk_ok


def test_to_nested_is_quiet() -> None:
    code = ("import torch; from tensorslice.core.results import WhereResult;"
            "r = WhereResult(torch.ones(5, 2), torch.arange(5), torch.tensor([0, 2, 5]));"
            "print(r.to_nested().size(0))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "2" and "is_fx_tracing" not in proc.stderr, proc.stderr
