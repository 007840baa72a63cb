"""Uploads over the bulk data plane (`OpenUpload`): large puts and appends, the fallback to
the gRPC stream, and every way an upload can go wrong (stalled, killed, bad token, lying
sizes, over the budget, over the ticket bound), through real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
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
    ServerUnavailable,
    TensorNotFound,
)
from tensorslice.core.codec import UPLOAD_END, safetensors_header
from tensorslice.server import ServerConfig, TensorStore, create_server
from tensorslice.server._bulk_upload import receive_into
from tensorslice.server._persist import DataDir
from tensorslice.v1 import tensorslice_pb2 as pb

SERVICE = "/tensorslice.v1.TensorSlice/"
MiB = 1 << 20


def _start(device: str, store: TensorStore | None = None, **config: Any
           ) -> tuple[Any, str, TensorStore]:
    store = store if store is not None else TensorStore(device)
    server, port = create_server(store, "127.0.0.1:0", ServerConfig(**config))
    server.start()
    return server, f"127.0.0.1:{port}", store


@pytest.fixture()
def srv(device: str) -> Iterator[tuple[Any, str, TensorStore]]:
    server, address, store = _start(device, send_timeout=2.0)
    yield server, address, store
    server.stop(grace=None)


def _open(address: str, name: str, t: torch.Tensor, *, append: bool = False,
          replace: bool = False, metadata: Any = None) -> pb.BulkTicket:
    """An `OpenUpload` call by hand."""
    header, _ = safetensors_header([("values", t.dtype, tuple(t.shape))])
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(SERVICE + "OpenUpload",
                              request_serializer=pb.OpenUploadRequest.SerializeToString,
                              response_deserializer=pb.BulkTicket.FromString)
        ticket: pb.BulkTicket = call(pb.OpenUploadRequest(
            name=name, append=append, replace=replace, header=header), timeout=30,
            metadata=metadata)
        return ticket


def _data(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(30)
    head = b""
    while len(head) < 9:
        part = sock.recv(9 - len(head))
        if not part:
            raise ConnectionError("closed without an answer")
        head += part
    code, n = struct.unpack("<BQ", head)
    body = b""
    while len(body) < n:
        part = sock.recv(n - len(body))
        assert part
        body += part
    return code, body


def _eventually(cond: Callable[[], bool], what: str) -> None:
    """Wait, bounded, for what a server thread does after the client has its answer."""
    for _ in range(400):
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within 20 s: {what}")


# ------------------------------------------------------------------ correctness
@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_large_put_and_append_over_bulk(srv: tuple[Any, str, TensorStore],
                                        dtype: torch.dtype) -> None:
    server, address, store = srv
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 4096 * 8 // dtype.itemsize, generator=g) * 100).to(dtype)
    rows = [(torch.randn(40, 65536 // dtype.itemsize, generator=g) * 100).to(dtype)
            for _ in range(2)]
    with Client(address, timeout=60) as c:
        info = c.put("x", x, dim_names=["N", "D"])
        assert info.shape == tuple(x.shape) and info.dtype == dtype
        assert c.describe("x").dim_names == ("N", "D")
        assert torch.equal(c.tensor("x").fetch(), x)
        c.put("x", x.flip(0), replace=True)
        assert torch.equal(c.tensor("x").fetch(), x.flip(0))
        for r in rows:
            c.append("a", r)
        assert torch.equal(c.tensor("a").fetch(), torch.cat(rows))
        assert c.uploads == {"bulk": 4, "stream": 0}
    _eventually(lambda: server.bulk.received == 4, "4 uploads received")
    # Only the tensors are left: the appended rows' own storage was given back.
    held = sum(e.storage.capacity * e.tensor[0].numel() * dtype.itemsize
               for e in store.entries() if e.storage is not None)
    assert store.device_memory_used == held


@pytest.mark.e2e
def test_small_uploads_stay_on_grpc_and_async_mirrors(srv: tuple[Any, str, TensorStore]
                                                      ) -> None:
    _, address, _ = srv
    big = torch.arange(MiB, dtype=torch.float32)  # 4 MiB
    with Client(address, timeout=60) as c:
        c.put("small", torch.ones(10))
        assert c.uploads == {"bulk": 0, "stream": 1}

    async def go() -> dict[str, int]:
        async with AsyncClient(address, timeout=60) as ac:
            await ac.put("big", big)
            await ac.append("rows", big.reshape(256, -1))
            assert torch.equal(await (await ac.tensor("big"))[:], big)
            return ac.uploads

    assert asyncio.run(go()) == {"bulk": 2, "stream": 0}


@pytest.mark.e2e
def test_no_bulk_listener_falls_back_to_the_stream(device: str) -> None:
    server, address, _ = _start(device, bulk=False)
    x = torch.randn(3 * MiB // 4)
    try:
        with Client(address, timeout=60) as c:
            c.put("x", x)
            c.append("x", x)
            assert torch.equal(c.tensor("x").fetch(), torch.cat([x, x]))
            assert c.uploads == {"bulk": 0, "stream": 2}  # asked once, then never again
            assert c._bulk_uploads is False
    finally:
        server.stop(grace=None)


@pytest.mark.e2e
def test_unreachable_bulk_port_falls_back_to_the_stream(device: str) -> None:
    """The ticket names a port nothing listens on: the upload goes over gRPC; the ticket's
    reservation comes back when it expires."""
    server, address, store = _start(device, ticket_timeout=0.5)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        server.bulk.port = dead
        x = torch.randn(MiB)
        with Client(address, timeout=60) as c:
            c.put("x", x)
            assert c._bulk_ok is False and c.uploads == {"bulk": 0, "stream": 1}
            c.put("x", x * 2, replace=True)  # no ticket asked any more
            assert c.uploads == {"bulk": 0, "stream": 2}
            assert torch.equal(c.tensor("x").fetch(), x * 2)
        _eventually(lambda: server.bulk.expired == 1 and server.bulk.pending == 0,
                    "the unredeemed ticket expired")
        _eventually(lambda: store.device_memory_used == 4 * MiB, "its reservation back")
    finally:
        server.stop(grace=None)


@pytest.mark.e2e
def test_uploads_persist_across_a_restart(device: str, tmp_path: Path) -> None:
    def start() -> tuple[Any, str, TensorStore]:
        store = TensorStore(device)
        store.persist = DataDir(tmp_path)
        store.restore()
        return _start(device, store)

    x = torch.randn(2 * MiB)
    r = torch.randn(300, 4096)
    server, address, _ = start()
    try:
        with Client(address, timeout=60) as c:
            c.put("x", x)
            c.append("r", r)
            c.append("r", r + 1)
            assert c.uploads["bulk"] == 3
    finally:
        server.stop(grace=None)
    server, address, _ = start()
    try:
        with Client(address, timeout=60) as c:
            assert torch.equal(c.tensor("x").fetch(), x)
            assert torch.equal(c.tensor("r").fetch(), torch.cat([r, r + 1]))
    finally:
        server.stop(grace=None)


# ------------------------------------------------------------------ refusals before any byte
@pytest.mark.e2e
def test_budget_refusal_before_any_byte(device: str) -> None:
    server, address, store = _start(device, store=TensorStore(device, max_memory=6 * MiB,
                                                               max_device_memory=6 * MiB))
    try:
        with Client(address, timeout=60) as c:
            c.put("a", torch.zeros(MiB))  # 4 MiB
            with pytest.raises(ResultTooLarge, match=r"storing 'b' needs 4194304 bytes on "
                                                     r"\S+ but only 2097152 of the 6291456"):
                c.put("b", torch.zeros(MiB))
            with pytest.raises(ResultTooLarge, match="appending to 'a' needs"):
                c.append("a", torch.zeros(MiB))
            assert server.bulk.pending == 0 and store.device_memory_used == 4 * MiB
            assert c.uploads == {"bulk": 1, "stream": 0}
            assert [i.name for i in c.list_tensors()] == ["a"]
    finally:
        server.stop(grace=None)


@pytest.mark.e2e
def test_bad_openings_are_refused(srv: tuple[Any, str, TensorStore]) -> None:
    server, address, store = srv
    with Client(address, timeout=60) as c:
        c.put("a", torch.zeros(MiB, 2))
        with pytest.raises(InvalidSelection, match=r"append to 'a': rows of dtype float64 and "
                                                   r"shape \[1048576, 3\] do not match"):
            c.append("a", torch.zeros(MiB, 3, dtype=torch.float64))
        with pytest.raises(InvalidSelection, match="has 1 dimensions but 2 names"):
            c.put("b", torch.zeros(MiB), dim_names=["N", "C"])
        with pytest.raises(InvalidSelection, match="contains '/'"):
            c.put("a/b", torch.zeros(MiB))
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(SERVICE + "OpenUpload",
                              request_serializer=pb.OpenUploadRequest.SerializeToString,
                              response_deserializer=pb.BulkTicket.FromString)
        for header, message in [
            (b"\x05", "shorter than its 8-byte length"),
            (struct.pack("<Q", 10) + b"{}", "says its JSON is 10 bytes but 2 follow"),
            (struct.pack("<Q", 2) + b"{}", "must hold exactly one tensor"),
        ]:
            with pytest.raises(grpc.RpcError) as exc:
                call(pb.OpenUploadRequest(name="z", header=header), timeout=30)
            err: Any = exc.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details()
    assert server.bulk.pending == 0 and [e.meta.name for e in store.entries()] == ["a"]


@pytest.mark.e2e
def test_write_permission_is_checked_when_opening(device: str) -> None:
    store = TensorStore(device)
    server, address, _ = _start(device, store, token="reader", write_token="writer")
    try:
        with Client(address, timeout=60, token="reader") as c, pytest.raises(
                PermissionDenied, match="may read but not write"):
            c.put("x", torch.zeros(MiB))
        with Client(address, timeout=60, token="writer") as c:
            c.put("x", torch.ones(MiB))
            assert c.uploads["bulk"] == 1
        assert server.bulk.pending == 0 and torch.equal(store.get("x").tensor,
                                                        torch.ones(MiB))
    finally:
        server.stop(grace=None)
    server, address, _ = _start(device, read_only=True)
    try:
        with Client(address, timeout=60) as c, pytest.raises(PermissionDenied,
                                                              match="read-only"):
            c.put("x", torch.zeros(MiB))
    finally:
        server.stop(grace=None)


@pytest.mark.e2e
def test_pending_upload_tickets_are_bounded_and_expire(device: str) -> None:
    server, address, store = _start(device, max_pending_tickets=1, ticket_timeout=0.5)
    try:
        x = torch.zeros(MiB)
        _open(address, "x", x)
        assert store.device_memory_used == 4 * MiB  # reserved by the opening
        with pytest.raises(grpc.RpcError) as exc:
            _open(address, "y", x)
        err: Any = exc.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "bulk tickets" in err.details()
        assert store.device_memory_used == 4 * MiB  # the refused one reserved nothing
        _eventually(lambda: server.bulk.expired == 1, "the ticket expired")
        assert store.device_memory_used == 0 and len(store) == 0
    finally:
        server.stop(grace=None)


# ------------------------------------------------------------------ broken uploads
@pytest.mark.e2e
def test_bad_token_is_dropped(srv: tuple[Any, str, TensorStore]) -> None:
    server, address, store = srv
    x = torch.randn(MiB)
    ticket = _open(address, "x", x)
    refused = server.bulk.refused
    with socket.create_connection(("127.0.0.1", ticket.port), timeout=30) as s:
        s.sendall(secrets.token_bytes(16) + _data(x)[:4096])
        s.settimeout(30)
        with pytest.raises(ConnectionError):
            _answer(s)
    _eventually(lambda: server.bulk.refused == refused + 1, "the bad token refused")
    assert len(store) == 0 and server.bulk.pending == 1  # the real ticket still waits
    with socket.create_connection(("127.0.0.1", ticket.port), timeout=30) as s:
        s.sendall(ticket.token + _data(x) + UPLOAD_END)
        code, body = _answer(s)
    assert code == 0 and pb.TensorInfo.FromString(body).version > 0
    assert torch.equal(store.get("x").tensor.cpu(), x)
    with socket.create_connection(("127.0.0.1", ticket.port), timeout=30) as s:
        s.sendall(ticket.token)  # redeemed once only
        with pytest.raises(ConnectionError):
            _answer(s)


@pytest.mark.e2e
def test_more_bytes_than_announced_store_nothing(srv: tuple[Any, str, TensorStore]) -> None:
    _, address, store = srv
    x = torch.randn(MiB)
    ticket = _open(address, "x", x)
    with socket.create_connection(("127.0.0.1", ticket.port), timeout=30) as s:
        s.sendall(ticket.token + _data(x) + b"\x00" * 100 + UPLOAD_END)
        code, body = _answer(s)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert body.decode() == ("put 'x': the upload runs on beyond the 4194304 data bytes its "
                             "header announced")
    _eventually(lambda: store.device_memory_used == 0, "the reservation back")
    assert len(store) == 0


@pytest.mark.e2e
def test_fewer_bytes_than_announced_store_nothing(srv: tuple[Any, str, TensorStore]) -> None:
    _, address, store = srv
    x = torch.randn(MiB)
    ticket = _open(address, "x", x)
    with socket.create_connection(("127.0.0.1", ticket.port), timeout=30) as s:
        s.sendall(ticket.token + _data(x)[: 3 * MiB] + UPLOAD_END)
        s.shutdown(socket.SHUT_WR)  # the client has nothing more to say
        with pytest.raises(ConnectionError):
            _answer(s)
    _eventually(lambda: store.device_memory_used == 0, "the reservation back")
    assert len(store) == 0
    with Client(address, timeout=60) as c:  # the server goes on serving
        c.put("x", x)
        assert torch.equal(c.tensor("x").fetch(), x)


@pytest.mark.e2e
def test_a_stalled_upload_is_cut_off(device: str) -> None:
    """A sender that stops is cut after send_timeout: nothing stored, reservation back,
    and its connection no longer counts against the bound."""
    server, address, store = _start(device, send_timeout=0.5, max_bulk_connections=1)
    try:
        x = torch.randn(MiB)
        ticket = _open(address, "x", x)
        with socket.create_connection(("127.0.0.1", ticket.port), timeout=30) as s:
            s.sendall(ticket.token + _data(x)[: MiB])
            with pytest.raises(ConnectionError):
                _answer(s)  # the server closes it without an answer
        _eventually(lambda: store.device_memory_used == 0 and server.bulk.connections == 0,
                    "the reservation and the connection back")
        assert len(store) == 0
        with Client(address, timeout=60) as c:
            c.put("y", x)
            assert c.uploads["bulk"] == 1 and torch.equal(c.tensor("y").fetch(), x)
    finally:
        server.stop(grace=None)


_KILLED_CLIENT = """
import socket, sys, time, torch, grpc
from tensorslice.core.codec import safetensors_header
from tensorslice.v1 import tensorslice_pb2 as pb
address = sys.argv[1]
x = torch.randn(4 << 20)  # 16 MiB
header, _ = safetensors_header([("values", x.dtype, tuple(x.shape))])
with grpc.insecure_channel(address) as ch:
    ticket = ch.unary_unary("/tensorslice.v1.TensorSlice/OpenUpload",
                            request_serializer=pb.OpenUploadRequest.SerializeToString,
                            response_deserializer=pb.BulkTicket.FromString)(
        pb.OpenUploadRequest(name="x", header=header), timeout=30)
s = socket.create_connection(("127.0.0.1", ticket.port), timeout=30)
s.sendall(ticket.token + x.numpy().tobytes()[: 8 << 20])
print("half sent", flush=True)
time.sleep(60)
"""


@pytest.mark.e2e
def test_a_client_killed_mid_upload_stores_nothing(device: str) -> None:
    server, address, store = _start(device, send_timeout=30.0)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, address],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ready = threading.Event()
        line: list[str] = []

        def read() -> None:
            assert child.stdout is not None
            line.append(child.stdout.readline())
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(60) and line == ["half sent\n"]
        assert store.device_memory_used == 16 * MiB  # reserved, being filled
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        # Long before send_timeout: the connection's end is seen at once.
        _eventually(lambda: store.device_memory_used == 0 and server.bulk.connections == 0,
                    "the reservation back")
        assert len(store) == 0
        with Client(address, timeout=60) as c:
            c.put("x", torch.ones(MiB))
            assert torch.equal(c.tensor("x").fetch(), torch.ones(MiB))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        server.stop(grace=None)


@pytest.mark.e2e
def test_server_stop_cuts_an_upload_and_stores_nothing(device: str) -> None:
    server, address, store = _start(device, send_timeout=30.0)
    x = torch.randn(MiB)
    ticket = _open(address, "x", x)
    with socket.create_connection(("127.0.0.1", ticket.port), timeout=30) as s:
        s.sendall(ticket.token + _data(x)[:MiB])
        _eventually(lambda: server.bulk.sending == 1, "the upload being received")
        assert server.stop(grace=0.2).wait(30)
        with pytest.raises((ConnectionError, OSError)):
            _answer(s)
    assert len(store) == 0 and store.device_memory_used == 0


@pytest.mark.e2e
def test_the_client_reports_a_server_that_goes_away(device: str) -> None:
    server, address, _ = _start(device)
    try:
        with Client(address, timeout=60) as c:
            c.put("a", torch.zeros(MiB))
            server.bulk.send_timeout = 0.3

            def data_then_stall() -> Iterator[memoryview]:
                yield memoryview(bytearray(MiB))
                time.sleep(5)  # the server cuts the stalled sender meanwhile
                yield memoryview(bytearray(3 * MiB))

            import tensorslice.client._base as base

            real = base.tensor_pieces
            base.tensor_pieces = lambda t, n: data_then_stall()  # type: ignore[assignment]
            try:
                with pytest.raises(ServerUnavailable, match=r"bulk upload to .* failed"):
                    c.put("b", torch.zeros(MiB))
            finally:
                base.tensor_pieces = real  # type: ignore[assignment]
            with pytest.raises(TensorNotFound):
                c.describe("b")
    finally:
        server.stop(grace=None)


# ------------------------------------------------------------------ TLS
@pytest.mark.e2e
def test_uploads_over_tls(device: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from certs import make_certs

    from tensorslice.server._auth import TlsFiles

    certs = make_certs(tmp_path)
    server, address, store = _start(
        device, tls=TlsFiles(str(certs.server_cert), str(certs.server_key)))
    try:
        x = torch.randn(3 * MiB // 2)
        with Client(address, timeout=60, tls=str(certs.ca)) as c:
            c.put("x", x)
            c.append("x", x)
            assert c.uploads == {"bulk": 2, "stream": 0}
            assert torch.equal(c.tensor("x").fetch(), torch.cat([x, x]))
        ticket = _open_tls(address, certs.ca, "y", x)
        with socket.create_connection(("127.0.0.1", ticket.port), timeout=30) as s:
            s.sendall(ticket.token)  # plaintext on a TLS plane: dropped
            s.settimeout(30)
            got = b""
            try:
                while part := s.recv(4096):
                    got += part
            except ConnectionError:
                pass
        assert not got.startswith(b"\x00")  # no answer, at most a TLS alert
        assert "y" not in store
    finally:
        server.stop(grace=None)


def _open_tls(address: str, ca: Path, name: str, t: torch.Tensor) -> pb.BulkTicket:
    header, _ = safetensors_header([("values", t.dtype, tuple(t.shape))])
    creds = grpc.ssl_channel_credentials(ca.read_bytes())
    with grpc.secure_channel(address, creds) as ch:
        call = ch.unary_unary(SERVICE + "OpenUpload",
                              request_serializer=pb.OpenUploadRequest.SerializeToString,
                              response_deserializer=pb.BulkTicket.FromString)
        ticket: pb.BulkTicket = call(pb.OpenUploadRequest(name=name, header=header),
                                     timeout=30)
        return ticket


# ------------------------------------------------------------------ device staging order
class _Copy:
    def __init__(self, log: list[str], name: str, dst: torch.Tensor, src: torch.Tensor
                 ) -> None:
        self.log, self.name = log, name
        self.dst, self.src = dst, src.clone()  # what the slab held when the copy started
        self.done = False

    def synchronize(self) -> None:
        if not self.done:
            self.dst.copy_(self.src)
            self.done = True
            self.log.append(f"sync {self.name}")


def _fake_copies(log: list[str]) -> Callable[[torch.Tensor, torch.Tensor], _Copy]:
    n = 0

    def copy_async(dst: torch.Tensor, src: torch.Tensor) -> _Copy:
        nonlocal n
        n += 1
        log.append(f"copy {n}")
        return _Copy(log, str(n), dst, src)

    return copy_async


def _reader(data: bytes, log: list[str], fail_at: int = -1) -> Callable[[memoryview], None]:
    pos = 0

    def read_into(view: memoryview) -> None:
        nonlocal pos
        if pos == fail_at:
            raise ConnectionError("closed")
        view[:] = data[pos : pos + len(view)]
        log.append(f"read {pos}")
        pos += len(view)

    return read_into


@pytest.mark.unit
def test_device_staging_refills_a_slab_only_after_its_copy() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes through two 4 KiB slabs: 3 copies
    out = torch.empty(2560, dtype=torch.float32)
    slabs = (torch.empty(4096, dtype=torch.uint8), torch.empty(4096, dtype=torch.uint8))
    log: list[str] = []
    receive_into(_reader(data, log), out, slabs=slabs,
                 copy_async=_fake_copies(log))  # type: ignore[arg-type]
    assert out.view(torch.uint8).numpy().tobytes() == data
    assert log == ["read 0", "copy 1", "read 4096", "copy 2",
                   "sync 1", "read 8192", "copy 3",  # slab 0 again: its copy first
                   "sync 2", "sync 3"]  # all landed before returning


@pytest.mark.unit
def test_device_staging_waits_for_copies_when_cut_off() -> None:
    data = bytes(10240)
    out = torch.empty(2560, dtype=torch.float32)
    slabs = (torch.empty(4096, dtype=torch.uint8), torch.empty(4096, dtype=torch.uint8))
    log: list[str] = []
    with pytest.raises(ConnectionError):
        receive_into(_reader(data, log, fail_at=8192), out, slabs=slabs,
                     copy_async=_fake_copies(log))  # type: ignore[arg-type]
    assert log == ["read 0", "copy 1", "read 4096", "copy 2", "sync 1", "sync 2"]


@pytest.mark.unit
def test_host_tensors_are_received_in_place() -> None:
    data = bytes(range(256)) * 16
    out = torch.empty(1024, dtype=torch.int32)
    seen: list[int] = []

    def read_into(view: memoryview) -> None:
        seen.append(len(view))
        view[:] = data

    receive_into(read_into, out)
    assert seen == [4096] and out.view(torch.uint8).numpy().tobytes() == data


# ------------------------------------------------------------------ recycled host memory
@pytest.mark.unit
def test_host_memory_is_reused_only_once_no_tensor_reaches_it() -> None:
    from tensorslice.server._hostmem import HostMemory

    pool = HostMemory(max_kept=8 * MiB)
    a = pool.empty((MiB,), torch.float32)
    a.fill_(1.0)
    view = a[10:20]  # a reader's view keeps the memory
    addr = a.data_ptr()
    del a
    assert pool.kept == 0
    b = pool.empty((MiB,), torch.float32)
    assert b.data_ptr() != addr and pool.reused == 0  # not handed out under the view
    assert torch.equal(view, torch.ones(10))
    del view
    assert pool.kept == 4 * MiB
    c = pool.empty((2 * MiB,), torch.float16)  # the same size, another shape and dtype
    assert c.data_ptr() == addr and pool.reused == 1 and pool.kept == 0
    c.fill_(2)
    assert c.shape == (2 * MiB,) and float(c[-1]) == 2.0
    del b, c
    assert pool.kept == 8 * MiB
    extra = pool.empty((3, MiB), torch.uint8)
    del extra  # beyond max_kept: unmapped, not kept
    assert pool.kept == 8 * MiB
    pool.trim(1)
    assert pool.kept == 4 * MiB
    pool.trim(1 << 40)
    assert pool.kept == 0


@pytest.mark.unit
def test_kept_host_memory_gives_way_to_the_budget() -> None:
    from tensorslice.server._store import Storage

    store = TensorStore("cpu", max_memory=10 * MiB)
    assert store.host_memory is not None
    s: Storage | None = store.allocate("a", torch.float32, (MiB,))
    assert store.device_memory_used == 4 * MiB
    s = None  # noqa: F841  # the tensor is gone: its memory is kept for reuse
    assert store.device_memory_used == 0 and store.host_memory.kept == 4 * MiB
    big = store.allocate("b", torch.float32, (2 * MiB,))  # 8 MiB: the kept 4 must go
    assert store.host_memory.kept == 0 and store.device_memory_used == 8 * MiB
    with pytest.raises(ResultTooLarge, match="only 2097152 of the 10485760-byte"):
        store.allocate("c", torch.float32, (MiB,))
    del big
