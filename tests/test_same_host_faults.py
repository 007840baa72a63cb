"""Same-host sessions under faults and at their bounds: what keeps a segment lent, the
per-session, per-server and byte bounds (each a fallback to bytes on the socket, never a
refusal), hostile session clients, tampered segments and replies, killed clients, killed
and restarted servers, and clients that cannot reach the session socket."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from _output import OutputLines

from tensorslice.client import Client
from tensorslice.core.codec import (
    SESSION_MAGIC,
    SHM_ERROR,
    SHM_HELLO,
    SHM_RELEASE,
    SHM_REPLY,
    SHM_REQUEST,
    same_host_socket,
)
from tensorslice.core.errors import Status
from tensorslice.server import ServerConfig, TensorStore, create_server
from tensorslice.server._shm import MAX_CALL_BYTES, MAX_RELEASES

X = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(13))  # 2 MiB
ROW = X[0].numel() * 4  # 32 KiB a row


def _server(port: int = 0, **config: object) -> tuple[object, str]:
    store = TensorStore(device="cpu")
    store.add("x", X)
    srv, port = create_server(store, f"127.0.0.1:{port}",
                              ServerConfig(unary_max_bytes=1024, **config))  # type: ignore[arg-type]
    srv.start()
    return srv, f"127.0.0.1:{port}"


def _stop(srv: object) -> None:
    srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


@pytest.fixture()
def served() -> Iterator[tuple[object, str]]:
    srv, address = _server(handshake_timeout=0.5, send_timeout=0.5)
    yield srv, address
    _stop(srv)


def _until(check: Callable[[], bool], seconds: float = 10) -> bool:
    """Poll `check` (the server's threads notice a closed connection asynchronously)."""
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()


def _session(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(same_host_socket(port))
    sock.sendall(SESSION_MAGIC)
    assert sock.recv(len(SHM_HELLO), socket.MSG_WAITALL) == SHM_HELLO
    return sock


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes `sock` (bounded by the socket's
    timeout: a server that keeps it open fails the test with TimeoutError)."""
    out = b""
    try:
        while part := sock.recv(65536):
            out += part
    except ConnectionResetError:  # closed with our request unread
        pass
    return out


def _rss_shmem(pid: int | str = "self") -> int:
    """Shared memory pages a process has resident, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------ lifetimes


def _built_on(r: torch.Tensor, holder: str) -> object:
    if holder == "view":
        return r[2:5]
    if holder == "slice":
        return r[:, 3, ::2]
    if holder == "numpy":
        return r.numpy()[1]
    return r.view(-1)[5:9000]


@pytest.mark.e2e
@pytest.mark.parametrize("holder", ["view", "slice", "numpy", "reshape"])
def test_anything_built_on_a_result_keeps_its_segment_lent(
    served: tuple[object, str], holder: str,
) -> None:
    srv, address = served
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    with Client(address, timeout=30) as c:
        r = c.tensor("x")[0:8]
        assert c.last_transport == "shared_memory"
        kept = _built_on(r, holder)
        expected = torch.as_tensor(kept).clone()
        del r
        gc.collect()
        for i in range(1, 6):  # each result dropped at once: one segment cycles
            assert c.tensor("x")[i : i + 8].equal(X[i : i + 8])
        assert shm.segments == 2 and shm.fallbacks == 0
        assert torch.as_tensor(kept).equal(expected)  # never rewritten
        # two held at once need a second free segment: a new one, as the kept one is lent
        a, b = c.tensor("x")[10:18], c.tensor("x")[20:28]
        assert shm.segments == 3 and torch.as_tensor(kept).equal(expected)
        del a, b, kept, expected
        gc.collect()
        held = [c.tensor("x")[i : i + 8] for i in range(3)]  # the kept one's is free again
        assert shm.segments == 3 and shm.lent == 11
        assert all(t.equal(X[i : i + 8]) for i, t in enumerate(held))


# ------------------------------------------------------------------------ bounds


@pytest.mark.e2e
def test_a_session_holds_16_segments_then_results_come_on_its_socket(
    served: tuple[object, str],
) -> None:
    srv, address = served
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    with Client(address, timeout=30) as c:
        held = [c.tensor("x")[i : i + 2] for i in range(16)]
        assert c.transports["shared_memory"] == 16 and shm.segments == 16
        more = [c.tensor("x")[i : i + 3] for i in range(3)]  # no segment free, none new
        assert c.transports["bulk"] == 3 and shm.fallbacks == 3 and shm.segments == 16
        assert srv.bulk.sessions == 1  # type: ignore[attr-defined]  # still the same one
        assert all(t.equal(X[i : i + 2]) for i, t in enumerate(held))
        assert all(t.equal(X[i : i + 3]) for i, t in enumerate(more))
        del held[0]
        gc.collect()
        assert c.tensor("x")[40:42].equal(X[40:42])  # the released one is lent again
        assert c.last_transport == "shared_memory" and shm.segments == 16


@pytest.mark.e2e
def test_the_byte_bound_drops_free_segments_then_falls_back() -> None:
    whole = 64 << 10  # a segment's grain
    srv, address = _server(shm_max_bytes=X.nbytes + whole)  # room for one whole X
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    try:
        with Client(address, timeout=30) as c, Client(address, timeout=30) as other:
            assert c.tensor("x")[:].equal(X)  # one segment of the whole budget, then free
            session = c._shm._idle[srv.bulk.port][0]  # type: ignore[attr-defined, union-attr]
            (big,) = session.maps
            small = c.tensor("x")[0:8]  # too small for the free big one: it is dropped
            assert c.transports["shared_memory"] == 2 and shm.fallbacks == 0
            assert shm.segments == 1 and shm.bytes < X.nbytes
            assert big not in session.maps  # the reply said the server forgot it
            assert c.tensor("x")[:].equal(X)  # `small` is lent: no room for a whole X
            assert c.last_transport == "bulk" and shm.fallbacks == 1
            # the bound is the server's: another session finds no room either
            assert other.tensor("x")[0:60].equal(X[0:60])
            assert other.last_transport == "bulk" and shm.fallbacks == 2
            assert small.equal(X[0:8])
            del small
            gc.collect()
            assert c.tensor("x")[:].equal(X)  # the free small one is dropped for it
            assert c.last_transport == "shared_memory" and shm.segments == 1
        assert _until(lambda: shm.sessions == 0 and shm.bytes == 0)
    finally:
        _stop(srv)


@pytest.mark.e2e
def test_beyond_64_sessions_a_client_falls_back_to_tcp(served: tuple[object, str]) -> None:
    srv, address = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    assert bulk.shm.max_sessions == 64  # max_bulk_connections' default
    socks = [_session(bulk.port) for _ in range(64)]
    try:
        assert _until(lambda: bulk.sessions == 64)
        with Client(address, timeout=30) as c:
            assert c.tensor("x")[0:40].equal(X[0:40])
            assert c.transports["bulk"] == 1 and c.transports["shared_memory"] == 0
        assert bulk.sessions == 64 and bulk.shm.lent == 0
    finally:
        for s in socks:
            s.close()
    assert _until(lambda: bulk.sessions == 0)
    with Client(address, timeout=30) as c:  # room again
        assert c.tensor("x")[0:40].equal(X[0:40]) and c.last_transport == "shared_memory"


# ------------------------------------------------------------------------ hostile clients


def _head(op: int, count: int) -> bytes:
    return SHM_REQUEST.pack(op, count)


def _call(method: bytes, request: bytes, length: int | None = None) -> bytes:
    return (_head(2, 0) + struct.pack("<H", 0) + struct.pack("<H", len(method)) + method
            + struct.pack("<Q", len(request) if length is None else length) + request)


HOSTILE = {
    "garbage op": _head(7, 0),
    "garbage bytes": b"\xde\xad\xbe\xef" * 4,
    "huge release count": _head(1, 0xFFFFFFFF),
    "one release too many": _head(1, MAX_RELEASES + 1),
    "half a request": _head(1, 0)[:3],
    "half the releases": _head(1, 10) + SHM_RELEASE.pack(1, 1) * 3,
    "half a token": _head(1, 0) + b"\0" * 8,
    "half a call": _call(b"Fetch", b"\x0a\x01x", 1000),
    "a call beyond 256 MiB": _call(b"Fetch", b"", MAX_CALL_BYTES + 1),
}


@pytest.mark.e2e
@pytest.mark.parametrize("sent", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_session_is_closed_and_others_are_served(
    served: tuple[object, str], sent: str, caplog: pytest.LogCaptureFixture,
) -> None:
    srv, address = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    with Client(address, timeout=30) as c, caplog.at_level(logging.INFO, "tensorslice.server"):
        assert c.tensor("x")[0:8].equal(X[0:8])  # a good session, kept
        broken = bulk.shm.broken
        with _session(bulk.port) as bad:
            assert _until(lambda: bulk.sessions == 2)
            bad.sendall(HOSTILE[sent])
            # meanwhile the good session is served, on a thread of its own
            assert c.tensor("x")[1:9].equal(X[1:9]) and c.last_transport == "shared_memory"
            answer = _closed_by_server(bad)  # closed: at once, or at the request's deadline
        if answer:  # an error reply, never INTERNAL
            kind, status, *_ = SHM_REPLY.unpack(answer[: SHM_REPLY.size])
            assert kind == SHM_ERROR and status == Status.INVALID_ARGUMENT.value
            assert b"exceeds the limit of 268435456 bytes" in answer[SHM_REPLY.size :]
        assert _until(lambda: bulk.sessions == 1)
        assert bulk.shm.broken == broken + 1  # counted
        assert "same-host session closed" in caplog.text  # and logged
        assert c.tensor("x")[2:10].equal(X[2:10]) and c.transports["shared_memory"] == 3
    assert _until(lambda: bulk.sessions == 0 and bulk.shm.segments == 0)


@pytest.mark.e2e
def test_a_session_that_never_greets_or_greets_wrong_is_dropped(
    served: tuple[object, str],
) -> None:
    srv, _ = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    refused = bulk.refused
    for greeting in (b"", b"tensorslice/req\x01", os.urandom(16)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(same_host_socket(bulk.port))
            sock.sendall(greeting)  # nothing (until the handshake timeout), or not a session
            assert _closed_by_server(sock) == b""
    assert bulk.refused == refused + 3 and bulk.sessions == 0


@pytest.mark.e2e
def test_thousands_of_releases_and_bad_calls_leave_a_session_open(
    served: tuple[object, str],
) -> None:
    srv, _ = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    with _session(bulk.port) as sock:
        for _ in range(3):  # the most one request may carry, each stale: counted, ignored
            releases = b"".join(SHM_RELEASE.pack(i, 7) for i in range(MAX_RELEASES))
            sock.sendall(_head(1, MAX_RELEASES) + releases + b"\0" * 16)
            kind, status, _, _, length, forgotten = SHM_REPLY.unpack(
                sock.recv(SHM_REPLY.size, socket.MSG_WAITALL))
            assert (kind, status, forgotten) == (SHM_ERROR, Status.UNAVAILABLE.value, 0)
            assert b"unknown or expired" in sock.recv(length, socket.MSG_WAITALL)
        assert bulk.shm.stale == 3 * MAX_RELEASES
        for method, request, why in [
                (b"NoSuchMethod", b"", "unknown method 'NoSuchMethod'"),
                (b"\xff\xfe", b"", "unknown method"),
                (b"Put", b"", "unknown method 'Put'"),  # writes go over gRPC only
                (b"Fetch", b"\xff" * 64, "malformed tensorslice.v1.SliceRequest (64 bytes)")]:
            sock.sendall(_call(method, request))
            kind, status, _, _, length, _ = SHM_REPLY.unpack(
                sock.recv(SHM_REPLY.size, socket.MSG_WAITALL))
            message = sock.recv(length, socket.MSG_WAITALL).decode()
            assert (kind, Status(status)) == (SHM_ERROR, Status.INVALID_ARGUMENT)
            assert why in message
        assert bulk.sessions == 1 and bulk.shm.broken == 0


@pytest.mark.e2e
def test_a_session_that_stops_reading_is_closed_at_the_send_timeout(
    served: tuple[object, str],
) -> None:
    srv, _ = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    bulk.shm.max_bytes = 0  # every result on the socket
    payload = b"\x5a" * (16 << 20)  # far more than a socket buffer holds
    token = bulk.offer([payload], len(payload))
    with _session(bulk.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(_head(1, 0) + token)
        # the reader never reads: the server gives up on it within its send timeout
        assert _until(lambda: bulk.sessions == 0)
    assert bulk.shm.broken == 1 and bulk.shm.fallbacks == 1
    assert bulk.pending == 0 and bulk.sending == 0 and bulk.shm.segments == 0


# ------------------------------------------------------------------------ tampering


_TRUNCATE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.fstat(fd).st_size
for what, act in [("shrink", lambda: os.ftruncate(fd, 0)),
                  ("grow", lambda: os.ftruncate(fd, size + 4096)),
                  ("seal", lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE))]:
    try:
        act()
        print(what, "done")
    except OSError as exc:
        print(what, "refused", exc.errno)
print("size", os.fstat(fd).st_size)
"""


@pytest.mark.e2e
def test_another_process_cannot_resize_or_reseal_a_segment(
    served: tuple[object, str],
) -> None:
    _, address = served
    with Client(address, timeout=30) as c:
        held = c.tensor("x")[0:8]
        segments = []
        for fd in os.listdir("/proc/self/fd"):  # the server's end (it runs in this process)
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:tensorslice-segment"):
                    segments.append(fd)
            except OSError:
                pass
        assert len(segments) == 1
        path = f"/proc/{os.getpid()}/fd/{segments[0]}"
        size = os.stat(path).st_size
        out = subprocess.run([sys.executable, "-c", _TRUNCATE, path], capture_output=True,
                             text=True, timeout=60, check=True).stdout.split("\n")
        assert out[:4] == ["shrink refused 1", "grow refused 1", "seal refused 1",
                           f"size {size}"]
        assert held.equal(X[0:8])  # nothing the client maps ever faults or changes
        assert c.tensor("x")[8:16].equal(X[8:16]) and c.last_transport == "shared_memory"
        del held
        gc.collect()
        h = hashlib.sha256(c.tensor("x")[0:8].numpy().tobytes()).hexdigest()
        assert h == hashlib.sha256(X[0:8].numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------ killed clients


_FETCHER = """
import sys, threading
from tensorslice.client import Client
c = Client(sys.argv[1], timeout=30)
held = [c.tensor("x")[i : i + 40] for i in range(3)]
def loop(k):
    n = 0
    while True:
        t = c.tensor("x")[(n + k) % 20 :]
        n += 1
        if k == 0 and n == 5:
            print("fetched", c.transports["shared_memory"], flush=True)
threading.Thread(target=loop, args=(1,), daemon=True).start()
loop(0)
"""


@pytest.mark.e2e
def test_a_client_killed_mid_transfer_leaves_nothing_on_the_server() -> None:
    srv, address = _server(ticket_timeout=1.0)
    bulk = srv.bulk  # type: ignore[attr-defined]
    try:
        shared_before = _rss_shmem()
        proc = subprocess.Popen([sys.executable, "-c", _FETCHER, address],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert int(OutputLines(proc).wait_for(r"fetched (\d+)")) >= 8
            assert bulk.sessions >= 1 and bulk.shm.segments >= 4
            proc.send_signal(signal.SIGKILL)  # while its threads fetch
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # its sessions close, its segments go, an unredeemed ticket expires (1 s here)
        assert _until(lambda: bulk.sessions == 0 and bulk.shm.segments == 0
                      and bulk.pending == 0 and bulk.sending == 0, 30)
        assert bulk.shm.bytes == 0 and bulk.held_bytes == 0
        assert _until(lambda: srv.service.calls.budget.used == 0)  # type: ignore[attr-defined]
        assert _rss_shmem() <= shared_before + 1024
        with Client(address, timeout=30) as c:  # and it serves on
            assert c.tensor("x")[0:40].equal(X[0:40]) and c.last_transport == "shared_memory"
    finally:
        _stop(srv)
