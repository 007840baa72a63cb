"""Putting data in: put, append, drop, versions, consistency under writes, the host budget,
write permission and bad uploads, through real servers."""

from __future__ import annotations

import asyncio
import json
import re
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from tensorslice.client import (
    AsyncClient,
    Client,
    InvalidSelection,
    PermissionDenied,
    ResultTooLarge,
    TensorExists,
    TensorNotFound,
    Unauthenticated,
    VersionGone,
)
from tensorslice.core.codec import safetensors_header
from tensorslice.server import ServerConfig, TensorStore, create_server
from tensorslice.server._store import Storage
from tensorslice.v1 import tensorslice_pb2 as pb

SERVICE = "/tensorslice.v1.TensorSlice/"


@pytest.fixture()
def srv(device: str) -> Iterator[tuple[str, TensorStore]]:
    """A fresh server (its own store) per test: writes never leak between tests."""
    store = TensorStore(device)
    server, port = create_server(store, "127.0.0.1:0", ServerConfig(max_result_bytes=64 << 20))
    server.start()
    yield f"127.0.0.1:{port}", store
    server.stop(grace=None)


def _file(t: torch.Tensor, header: dict[str, Any] | None = None) -> bytes:
    if header is None:
        raw, _ = safetensors_header([("values", t.dtype, tuple(t.shape))])
    else:
        body = json.dumps(header).encode()
        raw = struct.pack("<Q", len(body)) + body
    return raw + bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def _raw_upload(address: str, method: str, name: str, data: bytes, *, pieces: int = 3,
                **first: Any) -> pb.TensorInfo:
    """An upload sent as raw messages: the first names the tensor, the file follows."""
    step = max(1, len(data) // pieces)
    msgs = [pb.UploadChunk(name=name, **first)] + [
        pb.UploadChunk(data=data[i : i + step]) for i in range(0, len(data), step)]
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_unary(SERVICE + method,
                               request_serializer=pb.UploadChunk.SerializeToString,
                               response_deserializer=pb.TensorInfo.FromString)
        info: pb.TensorInfo = call(iter(msgs), timeout=30)
        return info


def _status(exc: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    err: Any = exc.value
    return err.code(), err.details()


# ------------------------------------------------------------------ put / append / drop
@pytest.mark.e2e
@pytest.mark.parametrize("t", [
    torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
    torch.arange(10, dtype=torch.int64),
    torch.randn(5, 7).to(torch.bfloat16),
    torch.tensor([True, False, True]),
    torch.tensor(3.5),
    torch.zeros(0, 4),
], ids=["f32-3d", "i64", "bf16", "bool", "scalar", "empty"])
def test_put_round_trips(srv: tuple[str, TensorStore], t: torch.Tensor) -> None:
    address, _ = srv
    with Client(address, timeout=30) as c:
        info = c.put("x", t)
        assert info.shape == tuple(t.shape) and info.dtype == t.dtype and info.version > 0
        got = c.tensor("x").fetch()
        assert got.dtype == t.dtype and torch.equal(got, t)


@pytest.mark.e2e
def test_large_put_crosses_many_messages(srv: tuple[str, TensorStore]) -> None:
    address, _ = srv
    t = torch.randn(5, 1 << 20)  # 20 MiB: many upload messages
    with Client(address, timeout=60) as c:
        c.put("big", t, dim_names=["N", "D"])
        assert c.describe("big").dim_names == ("N", "D")
        assert torch.equal(c.tensor("big")[1:4, 7:9000], t[1:4, 7:9000])


@pytest.mark.e2e
def test_put_replace_and_versions(srv: tuple[str, TensorStore]) -> None:
    address, _ = srv
    with Client(address, timeout=30) as c:
        v1 = c.put("x", torch.zeros(3)).version
        with pytest.raises(TensorExists, match=r"already holds a tensor named 'x'.*replace=True"):
            c.put("x", torch.ones(3))
        assert torch.equal(c.tensor("x").fetch(), torch.zeros(3))
        v2 = c.put("x", torch.ones(4), replace=True).version
        assert v2 > v1
        assert [(i.name, i.version) for i in c.list_tensors()] == [("x", v2)]
        assert c.describe("x").version == v2
        assert torch.equal(c.tensor("x").fetch(), torch.ones(4))


@pytest.mark.e2e
def test_append_creates_grows_and_checks(srv: tuple[str, TensorStore]) -> None:
    address, _store = srv
    with Client(address, timeout=30) as c:
        parts = [torch.randn(n, 3, 2) for n in (4, 1, 7, 0, 30)]
        versions = []
        for p in parts:
            versions.append(c.append("acts", p, dim_names=["N", "C", "T"]).version)
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        whole = torch.cat(parts)
        assert c.describe("acts").shape == tuple(whole.shape)
        assert c.describe("acts").dim_names == ("N", "C", "T")
        assert torch.equal(c.tensor("acts")[:, 1], whole[:, 1])
        msg = ("append to 'acts': rows of dtype float64 and shape [2, 3, 2] do not match the "
               "tensor's dtype float32 and shape [42, 3, 2]")
        with pytest.raises(InvalidSelection, match=f"^{re.escape(msg)}"):
            c.append("acts", torch.zeros(2, 3, 2, dtype=torch.float64))
        with pytest.raises(InvalidSelection, match=r"rows of dtype float32 and shape \[2, 4\] "
                                                   r"do not match .* shape \[42, 3, 2\]"):
            c.append("acts", torch.zeros(2, 4))
        with pytest.raises(InvalidSelection, match="at least one dimension"):
            c.append("new", torch.tensor(1.0))
        assert c.describe("acts").shape == (42, 3, 2)  # nothing of the refused rows stored


@pytest.mark.unit
def test_append_grows_geometrically_and_keeps_old_versions(device: str) -> None:
    store = TensorStore(device)
    storages = set()
    held = []
    for i in range(200):
        e = store.append("x", torch.full((1, 2), float(i)))
        assert e.storage is not None
        storages.add(id(e.storage.tensor))
        held.append(e)
    # amortised O(rows): a new storage (a copy) only when the capacity doubles
    assert len(storages) <= 6
    for i, e in enumerate(held):  # every version still sees exactly its own rows
        assert e.tensor.shape == (i + 1, 2)
        assert torch.equal(e.tensor[:, 0].cpu(), torch.arange(i + 1, dtype=torch.float32))


@pytest.mark.e2e
def test_drop(srv: tuple[str, TensorStore]) -> None:
    address, _ = srv
    with Client(address, timeout=30) as c:
        v = c.put("x", torch.zeros(3)).version
        assert c.drop("x") == v
        with pytest.raises(TensorNotFound, match="no tensor named 'x'"):
            c.describe("x")
        with pytest.raises(TensorNotFound, match="no tensor named 'x'"):
            c.drop("x")
        c.put("x", torch.ones(2))  # the name is free again
        assert torch.equal(c.tensor("x").fetch(), torch.ones(2))


@pytest.mark.e2e
def test_async_client_mirrors_writes(srv: tuple[str, TensorStore]) -> None:
    address, _ = srv

    async def run() -> None:
        async with AsyncClient(address, timeout=30) as c:
            await c.put("a", torch.arange(6.0).reshape(2, 3))
            with pytest.raises(TensorExists):
                await c.put("a", torch.zeros(1))
            await c.put("a", torch.arange(3.0).reshape(1, 3), replace=True)
            info = await c.append("a", torch.ones(2, 3))
            assert info.shape == (3, 3)
            r = await c.tensor("a")
            assert torch.equal(await r.fetch(), torch.cat([torch.arange(3.0)[None],
                                                           torch.ones(2, 3)]))
            pinned = r.at_version()
            await c.append("a", torch.ones(1, 3))
            with pytest.raises(VersionGone):
                await pinned.fetch()
            assert await c.drop("a") > info.version
    asyncio.run(run())


# ------------------------------------------------------------------ consistency
@pytest.mark.e2e
def test_a_running_stream_finishes_on_its_version(srv: tuple[str, TensorStore]) -> None:
    address, _store = srv
    old = torch.randn(64, 1 << 15)  # 8 MiB: several 2 MiB chunks
    with Client(address, timeout=60) as c, grpc.insecure_channel(address) as ch:
        c.put("x", old)
        c.append("y", old[:10])
        for name, write in (("x", lambda: c.put("x", torch.zeros(64, 1 << 15), replace=True)),
                            ("y", lambda: c.append("y", torch.zeros(50, 1 << 15))),
                            ("x", lambda: c.drop("x"))):
            stream = ch.unary_stream(SERVICE + "Slice",
                                     request_serializer=pb.SliceRequest.SerializeToString,
                                     response_deserializer=pb.SliceChunk.FromString)
            want = c.tensor(name).fetch()
            chunks = stream(pb.SliceRequest(tensor=name), timeout=30)
            first = next(chunks)  # the read has started on the old version
            write()
            data = first.data + b"".join(ch_.data for ch_ in chunks)
            (n,) = struct.unpack("<Q", data[:8])
            got = torch.frombuffer(bytearray(data[8 + n :]), dtype=torch.float32)
            assert torch.equal(got.reshape(want.shape), want)


@pytest.mark.e2e
def test_pinned_version(srv: tuple[str, TensorStore]) -> None:
    address, store = srv
    with Client(address, timeout=30) as c:
        c.append("x", torch.arange(4.0)[:, None])
        r = c.tensor("x")
        pinned = r.at_version()
        assert pinned.version == r.info.version
        assert torch.equal(pinned[1:3], torch.tensor([[1.0], [2.0]]))
        held = store.get("x")  # a reader on the server holds this version
        c.append("x", torch.tensor([[9.0]]))
        assert torch.equal(pinned.fetch(), torch.arange(4.0)[:, None])  # not newer data
        half = pinned.astype("float16")  # a cast keeps the pin
        assert half.version == pinned.version
        assert torch.equal(half.fetch(), torch.arange(4.0, dtype=torch.float16)[:, None])
        assert c.tensor("x").fetch().shape == (5, 1)
        del held  # its last reader ends: the version is gone
        with pytest.raises(VersionGone, match=rf"version {pinned.version} of tensor 'x' is "
                                              rf"gone .*; the newest is \d+"):
            pinned.fetch()
        with pytest.raises(VersionGone):
            c.tensor("x").at_version(10_000)[0]


@pytest.mark.unit
def test_slice_many_sees_one_version_of_each_tensor(device: str) -> None:
    from tensorslice.server._orchestrate import Calls

    store = TensorStore(device)
    store.append("x", torch.zeros(2, 2))
    calls = Calls(store, ServerConfig())
    real_get = store.get
    n = 0

    def get_then_append(name: str, version: int = 0) -> Any:
        nonlocal n
        n += 1
        e = real_get(name, version)
        store.append("x", torch.ones(1, 2))  # a write lands between the items
        return e

    store.get = get_then_append  # type: ignore[method-assign]
    req = pb.SliceManyRequest(items=[pb.NamedSlice(key=k, request=pb.SliceRequest(tensor="x"))
                                     for k in ("a", "b", "c")])
    planned = calls.planned_many(req)
    assert n == 1 and len({i.entry.version for i in planned.items}) == 1


# ------------------------------------------------------------------ memory
@pytest.mark.e2e
def test_host_budget_refuses_before_storing(device: str) -> None:
    store = TensorStore(device, max_memory=1000, max_device_memory=1000)
    server, port = create_server(store, "127.0.0.1:0", ServerConfig())
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            c.put("a", torch.zeros(150))  # 600 bytes
            with pytest.raises(ResultTooLarge, match=r"storing 'b' needs 800 bytes on \S+ but "
                                                     r"only 400 of the 1000-byte"):
                c.put("b", torch.zeros(200))
            # an old version still being read counts: replacing needs room for both
            held = store.get("a")
            with pytest.raises(ResultTooLarge, match=r"needs 600 bytes .* only 400"):
                c.put("a", torch.zeros(150), replace=True)
            del held
            c.put("a", torch.ones(50), replace=True)
            assert store.device_memory_used == 200
            with pytest.raises(ResultTooLarge, match="appending to 'a' needs"):
                c.append("a", torch.zeros(300))
            assert [i.name for i in c.list_tensors()] == ["a"]  # still serving
            assert torch.equal(c.tensor("a").fetch(), torch.ones(50))
    finally:
        server.stop(None)


# ------------------------------------------------------------------ permission
@pytest.mark.e2e
def test_read_only_and_write_token(device: str) -> None:
    store = TensorStore(device)
    store.add("x", torch.zeros(2))
    server, port = create_server(store, "127.0.0.1:0", ServerConfig(read_only=True))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            for write in (lambda: c.put("y", torch.zeros(1)), lambda: c.drop("x"),
                          lambda: c.append("x", torch.zeros(1))):
                with pytest.raises(PermissionDenied, match="read-only"):
                    write()
            assert torch.equal(c.tensor("x").fetch(), torch.zeros(2))
    finally:
        server.stop(None)
    server, port = create_server(store, "127.0.0.1:0",
                                 ServerConfig(token="reader", write_token="writer"))
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        with Client(address, timeout=30, token="reader") as c:
            with pytest.raises(PermissionDenied, match="may read but not write"):
                c.put("y", torch.zeros(1))
            with pytest.raises(PermissionDenied):
                c.drop("x")
            assert torch.equal(c.tensor("x").fetch(), torch.zeros(2))
        with Client(address, timeout=30, token="writer") as c:
            c.put("y", torch.ones(1))
            assert torch.equal(c.tensor("y").fetch(), torch.ones(1))
        with Client(address, timeout=30, token="nobody") as c, pytest.raises(Unauthenticated):
            c.put("z", torch.ones(1))
    finally:
        server.stop(None)


# ------------------------------------------------------------------ bad input
@pytest.mark.e2e
@pytest.mark.parametrize(("name", "message"), [
    ("a/b", r"tensor name 'a/b' contains '/' at position 1"),
    ("a\x00b", r"contains '\\x00' at position 1"),
    ("", "a tensor name cannot be empty"),
    ("n" * 2000, "tensor name of 2000 characters is too long"),
])
def test_bad_names(srv: tuple[str, TensorStore], name: str, message: str) -> None:
    address, store = srv
    with Client(address, timeout=30) as c:
        for write in (lambda: c.put(name, torch.zeros(1)),
                      lambda: c.append(name, torch.zeros(1))):
            with pytest.raises(InvalidSelection, match=message):
                write()
    assert len(store) == 0


@pytest.mark.e2e
def test_a_one_mib_name_is_refused(srv: tuple[str, TensorStore]) -> None:
    address, store = srv
    with Client(address, timeout=30) as c:
        with pytest.raises((InvalidSelection, ResultTooLarge)):
            c.put("n" * (1 << 20), torch.zeros(1))
    assert len(store) == 0


_T = torch.arange(6, dtype=torch.float32)


@pytest.mark.e2e
@pytest.mark.parametrize(("data", "message"), [
    (_file(_T)[:-5], "the upload ended after 19 of the 24 data bytes its header declares"),
    (_file(_T)[:20], "the upload ended after 20 bytes, inside the safetensors header"),
    (_file(_T) + b"xx", "the upload runs on beyond the file's end"),
    (_file(_T, {"values": {"dtype": "F32", "shape": [6], "data_offsets": [0, 40]}}),
     r"data_offsets \[0, 40\] do not match shape \[6\] of float32 \(24 bytes"),
    (_file(_T, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                "b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}),
     "the file must hold exactly one tensor; it holds 2"),
    (_file(_T, {"values": {"dtype": "Q9", "shape": [6], "data_offsets": [0, 24]}}),
     "unsupported safetensors dtype 'Q9'"),
    (_file(_T, {"values": {"dtype": "F32", "shape": [-6], "data_offsets": [0, 24]}}),
     r"shape \[-6\] is not a list of sizes >= 0"),
    (struct.pack("<Q", 5) + b"{nope", "the safetensors header is not JSON"),
    (struct.pack("<Q", 1 << 40), "a safetensors header of 1099511627776 bytes is larger"),
    (b"", "the upload ended after 0 bytes"),
], ids=["short-data", "short-header", "long", "lying-offsets", "two-tensors", "dtype",
        "shape", "json", "huge-header", "empty"])
def test_bad_uploads_store_nothing(srv: tuple[str, TensorStore], data: bytes,
                                   message: str) -> None:
    address, store = srv
    for method in ("Put", "Append"):
        with pytest.raises(grpc.RpcError) as exc:
            _raw_upload(address, method, "x", data)
        code, details = _status(exc)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert re.search(message, details), details
    assert len(store) == 0 and store.device_memory_used == 0


@pytest.mark.e2e
def test_a_refused_small_upload_is_read_to_its_end_before_the_refusal(
        srv: tuple[str, TensorStore]) -> None:
    """A put of an existing name is refused after its first message, but the server reads
    the rest of a small upload first: the refusal never races the client's next write (an
    asyncio client would report that lost race as INTERNAL, not ALREADY_EXISTS)."""
    import time

    address, _ = srv
    with Client(address, timeout=30) as c:
        c.put("a", torch.ones(4))
    data = _file(torch.zeros(1 << 10))
    pulled = []

    def messages() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(name="a")  # refused here: the name exists
        for i in range(0, len(data), 1024):
            time.sleep(0.1)  # the refusal, were it sent now, would arrive before this
            pulled.append(i)
            yield pb.UploadChunk(data=data[i : i + 1024])

    with grpc.insecure_channel(address) as ch:
        call = ch.stream_unary(SERVICE + "Put",
                               request_serializer=pb.UploadChunk.SerializeToString,
                               response_deserializer=pb.TensorInfo.FromString)
        with pytest.raises(grpc.RpcError) as exc:
            call(messages(), timeout=30)
    code, details = _status(exc)
    assert code == grpc.StatusCode.ALREADY_EXISTS, details
    assert len(pulled) == len(range(0, len(data), 1024))  # every message was sent


@pytest.mark.e2e
def test_upload_cut_off_mid_stream_stores_nothing(srv: tuple[str, TensorStore]) -> None:
    address, store = srv
    data = _file(torch.randn(1 << 18))

    def messages() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(name="x")
        yield pb.UploadChunk(data=data[: len(data) // 2])
        raise RuntimeError("the client dies")

    with grpc.insecure_channel(address) as ch:
        call = ch.stream_unary(SERVICE + "Put",
                               request_serializer=pb.UploadChunk.SerializeToString,
                               response_deserializer=pb.TensorInfo.FromString)
        with pytest.raises(grpc.RpcError):
            call(messages(), timeout=30)
    with Client(address, timeout=30) as c:
        with pytest.raises(TensorNotFound):
            c.describe("x")
        c.put("x", torch.ones(2))  # the server goes on serving
    assert [e.meta.name for e in store.entries()] == ["x"]


@pytest.mark.e2e
def test_a_stalled_upload_is_cancelled_and_stores_nothing(device: str) -> None:
    """A client that stops sending mid-upload loses its call after send_timeout: its slot
    and its memory reservation come back, nothing is stored, others are served."""
    import threading

    store = TensorStore(device)
    server, port = create_server(store, "127.0.0.1:0",
                                 ServerConfig(send_timeout=0.5, max_calls=1, call_wait=5))
    server.start()
    address = f"127.0.0.1:{port}"
    data = _file(torch.randn(1 << 18))
    release = threading.Event()

    def messages() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(name="x")
        yield pb.UploadChunk(data=data[: len(data) // 2])
        release.wait(30)  # the client stalls, holding the stream open

    try:
        with grpc.insecure_channel(address) as ch:
            call = ch.stream_unary(SERVICE + "Put",
                                   request_serializer=pb.UploadChunk.SerializeToString,
                                   response_deserializer=pb.TensorInfo.FromString)
            with pytest.raises(grpc.RpcError) as exc:
                call(messages(), timeout=20)
            release.set()
            assert exc.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
        # The server's handler unwinds after the client has seen the cancellation: wait
        # (bounded) for it to give its reservation back.
        import time

        for _ in range(200):
            if store.device_memory_used == 0:
                break
            time.sleep(0.05)
        assert len(store) == 0 and store.device_memory_used == 0
        with Client(address, timeout=30) as c:  # the one call slot is free again
            c.put("y", torch.ones(2))
            assert torch.equal(c.tensor("y")[:], torch.ones(2))
    finally:
        release.set()
        server.stop(grace=None)


@pytest.mark.unit
def test_store_rows_never_disturb_an_older_version(device: str) -> None:
    store = TensorStore(device)
    s = store.allocate("x", torch.float32, (8, 2))
    s.tensor.zero_()
    v1 = store.put("x", s)
    v2 = store.append("x", torch.ones(3, 2))
    assert isinstance(v2.storage, Storage)
    assert v1.tensor.shape == (8, 2) and float(v1.tensor.sum()) == 0.0
    assert v2.tensor.shape == (11, 2) and float(v2.tensor.sum()) == 6.0


# ------------------------------------------------------------------ recording activations
@pytest.mark.e2e
def test_activation_recorder_appends_each_batch(srv: tuple[str, TensorStore]) -> None:
    from tensorslice.client import ActivationRecorder

    address, _ = srv
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    data = torch.randn(40, 6)
    with Client(address, timeout=30) as c:
        with ActivationRecorder(c, {"h": model[1], "out": model[2]}, dtype=torch.float16,
                                max_pending=2) as rec:
            for batch in data.split(7):
                model(batch)
        assert rec.batches == 2 * 6
        assert all(not m._forward_hooks for m in model)  # detached cleanly
        with torch.no_grad():
            h = model[1](model[0](data))
            out = model[2](h)
        assert torch.equal(c.tensor("h").fetch(), h.half())
        assert torch.equal(c.tensor("out").fetch(), out.half())
        c.put("bad", torch.zeros(1, 2))
        rec = ActivationRecorder(c, {"bad": model[2]})
        model(data[:2])  # (2, 3) rows do not fit (1, 2): the sender's error comes at close
        with pytest.raises(InvalidSelection, match="do not match"):
            rec.close()
