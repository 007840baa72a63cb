"""Same-host sessions under faults and at their bounds: what keeps a segment lent, the
per-session, per-server and byte bounds (each a fallback to bytes on the socket, never a
refusal), hostile session clients, tampered segments and replies, killed clients, killed
and restarted servers, and clients that cannot reach the session socket."""

from __future__ import annotations

import fcntl
import gc
import hashlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from _output import OutputLines
from samehost import X, child, exact, session, start, until

from tensorslice.client import Client, ServerUnavailable, TensorSliceError
from tensorslice.core.codec import (
    DIRECT_MAGIC,
    SEGMENT_SEALS,
    SESSION_MAGIC,
    SHM_BYTES,
    SHM_ERROR,
    SHM_HELLO,
    SHM_RELEASE,
    SHM_REPLY,
    SHM_REQUEST,
    SHM_SEGMENT,
    same_host_socket,
)
from tensorslice.core.errors import Status
from tensorslice.server import ServerConfig, TensorStore, create_server
from tensorslice.server._shm import MAX_CALL_BYTES, MAX_RELEASES

ROWS = [3, 2, 1] * 12  # 36 rows of 32 KiB


def _server(port: int = 0, **config: object) -> tuple[object, str]:
    return start(port, **({"unary_max_bytes": 1024} | config))


def _stop(srv: object) -> None:
    srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


@pytest.fixture()
def served() -> Iterator[tuple[object, str]]:
    srv, address = _server(handshake_timeout=0.5, send_timeout=0.5)
    yield srv, address
    _stop(srv)


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


@pytest.mark.e2e
def test_a_session_closed_as_idle_leaves_held_results_and_is_replaced(
    served: tuple[object, str],
) -> None:
    srv, address = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    bulk.shm.idle_timeout = 0.3  # 300 s by default
    with Client(address, timeout=30) as c:
        held = c.tensor("x")[0:40]
        assert c.last_transport == "shared_memory"
        # the server closes the idle session and drops its pool, the lent segment too
        assert until(lambda: bulk.sessions == 0 and bulk.shm.segments == 0)
        assert held.equal(X[0:40])  # the client's mapping keeps the memory
        assert c.tensor("x")[1:41].equal(X[1:41]) and c.last_transport == "shared_memory"
        assert held.equal(X[0:40]) and bulk.shm.lent == 2 and bulk.shm.broken == 0


# ------------------------------------------------------------------------ bounds


@pytest.mark.e2e
def test_a_session_holds_16_segments_then_results_come_on_its_socket(
    served: tuple[object, str],
) -> None:
    srv, address = served
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    with Client(address, timeout=30) as c:
        held = [c.tensor("x")[i : i + 8] for i in range(16)]
        assert c.transports["shared_memory"] == 16 and shm.segments == 16
        more = [c.tensor("x")[i : i + 9] for i in range(3)]  # no segment free, none new
        assert c.transports["shared_memory"] == 16 and c.last_transport != "shared_memory"
        assert shm.fallbacks == 3 and shm.segments == 16
        assert srv.bulk.sessions == 1  # type: ignore[attr-defined]  # still the same one
        assert all(t.equal(X[i : i + 8]) for i, t in enumerate(held))
        assert all(t.equal(X[i : i + 9]) for i, t in enumerate(more))
        del held[0]
        gc.collect()
        assert c.tensor("x")[40:48].equal(X[40:48])  # the released one is lent again
        assert c.last_transport == "shared_memory" and shm.segments == 16


@pytest.mark.e2e
def test_the_byte_bound_drops_free_segments_then_falls_back() -> None:
    whole = 64 << 10  # a segment's grain
    srv, address = _server(shm_max_bytes=X.nbytes + whole)  # room for one whole X
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    try:
        with Client(address, timeout=30) as c, Client(address, timeout=30) as other:
            assert c.tensor("x")[:].equal(X)  # one segment of the whole budget, then free
            (idle,) = c._shm._idle.values()  # type: ignore[union-attr]
            session = idle[0]
            (big,) = session.maps
            small = c.tensor("x")[0:8]  # too small for the free big one: it is dropped
            assert c.transports["shared_memory"] == 2 and shm.fallbacks == 0
            assert shm.segments == 1 and shm.bytes < X.nbytes
            assert big not in session.maps  # the reply said the server forgot it
            assert c.tensor("x")[:].equal(X)  # `small` is lent: no room for a whole X
            assert c.last_transport != "shared_memory" and shm.fallbacks == 1
            # the bound is the server's: another session finds no room either
            assert other.tensor("x")[0:60].equal(X[0:60])
            assert other.last_transport != "shared_memory" and shm.fallbacks == 2
            assert small.equal(X[0:8])
            del small
            gc.collect()
            assert c.tensor("x")[:].equal(X)  # the free small one is dropped for it
            assert c.last_transport == "shared_memory" and shm.segments == 1
        assert until(lambda: shm.sessions == 0 and shm.bytes == 0)
    finally:
        _stop(srv)


@pytest.mark.e2e
def test_beyond_64_sessions_a_client_falls_back_to_tcp(served: tuple[object, str]) -> None:
    srv, address = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    assert bulk.shm.max_sessions == 64  # max_bulk_connections' default
    socks = [session(bulk.port) for _ in range(64)]
    try:
        assert until(lambda: bulk.sessions == 64)
        with Client(address, timeout=30) as c:
            assert c.tensor("x")[0:40].equal(X[0:40])
            assert c.transports["shared_memory"] == 0
        assert bulk.sessions == 64 and bulk.shm.lent == 0
    finally:
        for s in socks:
            s.close()
    assert until(lambda: bulk.sessions == 0)
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
        with session(bulk.port) as bad:
            assert until(lambda: bulk.sessions == 2)
            bad.sendall(HOSTILE[sent])
            # meanwhile the good session is served, on a thread of its own
            assert c.tensor("x")[1:9].equal(X[1:9]) and c.last_transport == "shared_memory"
            answer = _closed_by_server(bad)  # closed: at once, or at the request's deadline
        if answer:  # an error reply, never INTERNAL
            kind, status, *_ = SHM_REPLY.unpack(answer[: SHM_REPLY.size])
            assert kind == SHM_ERROR and status == Status.INVALID_ARGUMENT.value
            assert b"exceeds the limit of 268435456 bytes" in answer[SHM_REPLY.size :]
        assert until(lambda: bulk.sessions == 1)
        assert bulk.shm.broken == broken + 1  # counted
        assert "same-host session closed" in caplog.text  # and logged
        assert c.tensor("x")[2:10].equal(X[2:10]) and c.transports["shared_memory"] == 3
    assert until(lambda: bulk.sessions == 0 and bulk.shm.segments == 0)


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
    with session(bulk.port) as sock:
        for _ in range(3):  # the most one request may carry, each stale: counted, ignored
            releases = b"".join(SHM_RELEASE.pack(i, 7) for i in range(MAX_RELEASES))
            sock.sendall(_head(1, MAX_RELEASES) + releases + b"\0" * 16)
            kind, status, _, _, length, forgotten = SHM_REPLY.unpack(
                exact(sock, SHM_REPLY.size))
            assert (kind, status, forgotten) == (SHM_ERROR, Status.UNAVAILABLE.value, 0)
            assert b"unknown or expired" in exact(sock, length)
        assert bulk.shm.stale == 3 * MAX_RELEASES
        for method, request, why in [
                (b"NoSuchMethod", b"", "unknown method 'NoSuchMethod'"),
                (b"\xff\xfe", b"", "unknown method"),
                (b"Put", b"", "'Put' is a write: writes go over gRPC only"),
                (b"Fetch", b"\xff" * 64, "malformed tensorslice.v1.SliceRequest (64 bytes)")]:
            sock.sendall(_call(method, request))
            kind, status, _, _, length, _ = SHM_REPLY.unpack(
                exact(sock, SHM_REPLY.size))
            message = exact(sock, length).decode()
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
    with session(bulk.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(_head(1, 0) + token)
        # the reader never reads: the server gives up on it within its send timeout
        assert until(lambda: bulk.sessions == 0)
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
        with child(_FETCHER, address, 8):  # killed while its threads fetch
            assert bulk.sessions >= 1 and bulk.shm.segments >= 4
        # its sessions close, its segments go, an unredeemed ticket expires (1 s here)
        assert until(lambda: bulk.sessions == 0 and bulk.shm.segments == 0
                      and bulk.pending == 0 and bulk.sending == 0, 30)
        assert bulk.shm.bytes == 0 and bulk.held_bytes == 0
        assert until(lambda: srv.service.calls.budget.used == 0)  # type: ignore[attr-defined]
        assert _rss_shmem() <= shared_before + 1024
        with Client(address, timeout=30) as c:  # and it serves on
            assert c.tensor("x")[0:40].equal(X[0:40]) and c.last_transport == "shared_memory"
    finally:
        _stop(srv)


# ------------------------------------------------------------------------ replies that do not fit


def _reply(conn: socket.socket, kind: int, seg: int, gen: int, size: int, nbytes: int,
           fd: int | None = None, forgotten: int = 0) -> None:
    head = SHM_REPLY.pack(kind, seg, gen, size, nbytes, forgotten)
    if fd is None:
        conn.sendall(head)
    else:
        socket.send_fds(conn, [head], [fd])


def _memfd(data: bytes, size: int) -> int:
    fd = os.memfd_create("impostor", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, data, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEGMENT_SEALS)
    return fd


def _grain(n: int) -> int:
    return -(-n // (64 << 10)) * (64 << 10)


Step = Callable[[socket.socket, bytes], None]


SEGMENT = 4 << 20  # the impostor's segments: larger than any file here


def _good(seg: int, gen: int) -> Step:
    """Lend the file in a new sealed segment `seg` at `gen`, as a server would."""
    def step(conn: socket.socket, data: bytes) -> None:
        fd = _memfd(data, SEGMENT)
        try:
            _reply(conn, SHM_SEGMENT, seg, gen, SEGMENT, len(data), fd)
        finally:
            os.close(fd)
    return step


def _again(seg: int, gen: int) -> Step:
    """Name segment `seg` at `gen` again, with no descriptor (its content rewritten)."""
    return lambda conn, data: _reply(conn, SHM_SEGMENT, seg, gen, SEGMENT, len(data))


def _with_fd(kind: int, make: Callable[[bytes], int], size: Callable[[bytes], int],
             nbytes: Callable[[bytes], int] = len) -> Step:
    def step(conn: socket.socket, data: bytes) -> None:
        fd = make(data)
        try:
            _reply(conn, kind, 1, 1, size(data), nbytes(data), fd)
        finally:
            os.close(fd)
    return step


def _plain_file(data: bytes) -> int:
    fd = os.open("/tmp", os.O_TMPFILE | os.O_RDWR)
    os.ftruncate(fd, _grain(len(data)))
    os.pwrite(fd, data, 0)
    return fd


def _pipe(data: bytes) -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _cut_short(conn: socket.socket, data: bytes) -> None:
    _reply(conn, SHM_BYTES, 0, 0, 0, len(data))
    conn.sendall(data[: len(data) // 2])
    conn.shutdown(socket.SHUT_RDWR)


# name: (the first result is kept, what the impostor answers to each request, the error)
REPLIES: dict[str, tuple[bool, list[Step], str]] = {
    "a segment still lent": (True, [_good(1, 1), _again(1, 2)],
                             r"segment 1 .* is still in use or stale here"),
    "an older generation": (False, [_good(1, 5), _again(1, 5)],
                            r"segment 1 \(generation 5.* stale here \(generation 5"),
    "a segment passed again": (False, [_good(1, 1), _good(1, 2)], r"segment 1 passed again"),
    "another file size": (False, [_with_fd(SHM_SEGMENT, lambda d: _memfd(d, _grain(len(d))),
                                           lambda d: _grain(len(d)), lambda d: len(d) + 1)],
                          r"(same-host reply announces \d+ bytes, the ticket \d+: refused|"
                          r"segment of \d+ bytes, its header announces \d+)"),
    "a file beyond its segment": (False, [_with_fd(SHM_SEGMENT, lambda d: _memfd(b"", 1 << 16),
                                                   lambda d: 1 << 16)],
                                  r"segment 1 of 65536 bytes cannot hold a \d+-byte file"),
    "a plain file": (False, [_with_fd(SHM_SEGMENT, _plain_file, lambda d: _grain(len(d)))],
                     r"segment 1 is not a sealable memory file"),
    "a pipe": (False, [_with_fd(SHM_SEGMENT, _pipe, lambda d: _grain(len(d)))],
               r"segment 1 of 0 bytes announced as"),
    "bytes with a descriptor": (False, [_with_fd(SHM_BYTES, lambda d: _memfd(d, 1 << 16),
                                                 lambda d: 0)],
                                r"reply passes a descriptor it does not use"),
    "an unknown kind": (False, [lambda c, d: _reply(c, 9, 1, 1, 1 << 16, len(d))],
                        r"reply of unknown kind 9"),
    "millions forgotten": (False, [lambda c, d: _reply(c, SHM_SEGMENT, 1, 1, 1 << 16, len(d),
                                                       forgotten=1 << 24)],
                           r"reply forgets 16777216 segments"),
}


class _Impostor:
    """A listener at the same-host name of a server that offers no sessions: it redeems
    each request's ticket over TCP and answers as `script` says, one step a request."""

    def __init__(self, bulk: object, script: list[Step]) -> None:
        self.port: int = bulk.port  # type: ignore[attr-defined]
        # the instance id the server announces, where its greeting carries one
        self.instance: bytes = getattr(bulk, "instance", b"")
        self.script = script
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(same_host_socket(self.port))
        self.listener.listen(4)
        self.listener.settimeout(30)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.listener.accept()
                with conn:
                    conn.settimeout(30)
                    self.session(conn)
        except OSError:
            return

    def session(self, conn: socket.socket) -> None:
        if exact(conn, 16) != SESSION_MAGIC:
            return
        conn.sendall(SHM_HELLO + self.instance)
        script = iter(self.script)
        while True:
            head = exact(conn, SHM_REQUEST.size)
            if len(head) < SHM_REQUEST.size:
                return
            op, count = SHM_REQUEST.unpack(head)
            exact(conn, count * SHM_RELEASE.size)
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as tcp:
                if op == 1:  # a ticket: its file
                    tcp.sendall(exact(conn, 16))
                    data = _recv_all(tcp)
                else:  # a whole call: sent on as a direct request, its answer's file
                    call = b""
                    for size in (2, 2):
                        call += (n := exact(conn, size))
                        call += exact(conn, struct.unpack("<H", n)[0])
                    call += (n := exact(conn, 8))
                    call += exact(conn, struct.unpack("<Q", n)[0])
                    tcp.sendall(DIRECT_MAGIC + call)
                    status, length = struct.unpack("<BQ", exact(tcp, 9))
                    data = exact(tcp, length)
                    assert status == 0, data
                    if _method(call) not in (b"Fetch", b"Slice", b"FetchMany", b"SliceMany"):
                        _reply(conn, SHM_BYTES, 0, 0, 0, len(data))  # no file: as it is
                        conn.sendall(data)
                        continue
            step = next(script, None)
            if step is None:
                return
            step(conn, data)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes its accept (Linux)
        self.listener.close()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def _method(call: bytes) -> bytes:
    (n,) = struct.unpack_from("<H", call)
    (m,) = struct.unpack_from("<H", call, 2 + n)
    return call[4 + n : 4 + n + m]


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while part := sock.recv(1 << 20):
        data += part
    return data


def _impostor_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:impostor")
        except OSError:
            pass
    return count


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(REPLIES), ids=list(REPLIES))
def test_a_reply_that_does_not_fit_is_refused_never_used(case: str) -> None:
    keep, script, why = REPLIES[case]
    srv, address = _server(same_host=False)  # its name is free: the impostor takes it
    impostor = _Impostor(srv.bulk, script)  # type: ignore[attr-defined]
    try:
        with Client(address, timeout=30) as c:
            first = [c.tensor("x")[0:40]] if len(script) == 2 else []
            assert all(t.equal(X[0:40]) for t in first)
            assert c.transports["shared_memory"] == len(first)
            if not keep:
                first.clear()
                gc.collect()
            with pytest.raises(TensorSliceError, match=(
                    why if why.startswith("(") else f"same-host {why}.*: refused")):
                c.tensor("x")[1:41]
            assert all(t.equal(X[0:40]) for t in first)  # its segment never rewritten
            first.clear()
    finally:
        impostor.close()
        _stop(srv)
    gc.collect()
    assert _impostor_fds() == 0  # the client closed every descriptor it was passed


@pytest.mark.e2e
def test_a_reply_cut_short_raises_and_never_gives_a_short_result() -> None:
    srv, address = _server(same_host=False)
    impostor = _Impostor(srv.bulk, [_cut_short])  # type: ignore[attr-defined]
    try:
        with Client(address, timeout=30) as c, pytest.raises(
                ServerUnavailable, match=r"same-host .*closed by the server after \d+ of"):
            c.tensor("x")[0:40]
    finally:
        impostor.close()
        _stop(srv)


# ------------------------------------------------------------------------ a server process


def _serve(path: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorslice.server._cli", "serve", "--tensor", f"x={path}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        return proc, OutputLines(proc).wait_for(r"serving 1 tensor\(s\) on (\S+)", 120)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _first_answer(call: Callable[[], torch.Tensor], seconds: float = 60) -> torch.Tensor:
    """`call`'s answer once the client's channel has reconnected (after a failed call gRPC
    waits a backoff's time before it tries the address again)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except ServerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _segment_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(
                "/memfd:tensorslice-segment")
        except OSError:
            pass
    return count


def _maps(pid: int, name: str) -> list[str]:
    """The mappings of a process whose file's name contains `name`."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if name in line]


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.e2e
def test_a_server_process_killed_and_restarted_under_held_results(tmp_path: object) -> None:
    from safetensors.torch import save_file

    path = f"{tmp_path}/x.safetensors"
    save_file({"x": X}, path)
    named_before = _dev_shm()
    first, address = _serve(path, "--port", "0", "--ticket-timeout", "1")
    procs = [first]
    try:
        shared_before = _rss_shmem(first.pid)
        # a client killed mid-transfer, holding results: the server's pool goes
        with child(_FETCHER, address, 8):
            assert _segment_fds(first.pid) >= 4
        assert until(lambda: _segment_fds(first.pid) == 0, 30)
        assert until(lambda: _rss_shmem(first.pid) <= shared_before + 1024, 30)
        with Client(address, timeout=30) as c:
            held = c.tensor("x")[ROWS]  # over 1 MiB: not inline
            view = c.tensor("x")[10:50][5:9]
            assert c.transports["shared_memory"] == 2 and _segment_fds(first.pid) == 2
            assert len(_maps(first.pid, "/memfd:tensorslice-segment")) == 2
            # anonymous: nothing named in /dev/shm (a deleted semaphore of Python's may be)
            assert not [m for m in _maps(first.pid, "/dev/shm/") if "(deleted)" not in m]
            port = address.rsplit(":", 1)[1]
            bulk_port = c._data_port
            assert bulk_port is not None
            first.kill()  # kill -9 while this client maps two of its segments
            first.wait(timeout=30)
            assert held.equal(X[ROWS]) and view.equal(X[15:19])
            with pytest.raises(ServerUnavailable):
                c.tensor("x")[0:40]
            second, _ = _serve(path, "--port", port, "--bulk-port", str(bulk_port))
            procs.append(second)
            got = _first_answer(lambda: c.tensor("x")[0:40])  # a new session, new server
            assert got.equal(X[0:40]) and c.last_transport == "shared_memory"
            assert c.transports["shared_memory"] == 3 and _segment_fds(second.pid) == 1
            assert held.equal(X[ROWS]) and view.equal(X[15:19])
            del got
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=120) == 0
            assert held.equal(X[ROWS]) and view.equal(X[15:19])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not _dev_shm() - named_before  # the servers named nothing there


# ------------------------------------------------------------------------ other namespaces


_REMOTE_CLIENT = """
import hashlib, sys
from tensorslice.client import Client
with Client(sys.argv[1], timeout=30) as c:
    t = c.tensor("x")[0:40]
    print("result", c.last_transport, c._shm.available,
          hashlib.sha256(t.numpy().tobytes()).hexdigest(), flush=True)
"""


def _namespaced(cmd: list[str], address: str) -> list[str]:
    """Run the client above under `cmd` (an `unshare` command line); its answer."""
    out = subprocess.run([*cmd, sys.executable, "-c", _REMOTE_CLIENT, address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("result ", 1)[1].split()


@pytest.mark.e2e
@pytest.mark.parametrize("off", ["option", "environment"])
def test_a_client_with_same_host_off_never_opens_a_session(
    off: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv, address = _server(same_host=False)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # counts who connects
    probe.bind(same_host_socket(srv.bulk.port))  # type: ignore[attr-defined]
    probe.listen(8)
    probe.setblocking(False)
    try:
        if off == "environment":
            monkeypatch.setenv("TENSORSLICE_SAME_HOST", "0")
        with Client(address, timeout=30, **({"same_host": False} if off == "option"
                                            else {})) as c:  # type: ignore[arg-type]
            assert c.tensor("x")[0:40].equal(X[0:40]) and c.last_transport == "bulk"
            assert [t.name for t in c.list_tensors()] == ["x"]
        with pytest.raises(BlockingIOError):
            probe.accept()  # nobody connected
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as knock:
            knock.connect(same_host_socket(srv.bulk.port))  # type: ignore[attr-defined]
            probe.accept()[0].close()  # where one does, the probe sees it
    finally:
        probe.close()
        _stop(srv)


def _can_unshare(*flags: str) -> bool:
    try:
        return subprocess.run(["unshare", *flags, "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


EXPECTED = hashlib.sha256(X[0:40].numpy().tobytes()).hexdigest()


@pytest.mark.e2e
@pytest.mark.skipif(not _can_unshare("--net"), reason="needs `unshare --net` (root)")
def test_a_client_in_another_network_namespace_falls_back_by_itself(tmp_path: object) -> None:
    path = f"{tmp_path}/grpc.sock"
    srv, _ = _server(unix_socket=path)
    try:  # gRPC reaches it over the Unix socket's path; loopback and abstract names do not
        transport, available, digest = _namespaced(["unshare", "--net"], f"unix:{path}")
        assert (transport, available, digest) == ("stream", "False", EXPECTED)
        assert srv.bulk.shm.lent == 0 and srv.bulk.sessions == 0  # type: ignore[attr-defined]
    finally:
        _stop(srv)


@pytest.mark.e2e
@pytest.mark.skipif(not _can_unshare("--mount"), reason="needs `unshare --mount` (root)")
def test_a_client_without_a_dev_shm_mount_still_gets_segments() -> None:
    srv, address = _server()
    try:  # segments are memfds: no mount is needed, only the same network namespace
        hide = "mount -t tmpfs -o ro,size=4k none /dev/shm && exec \"$@\""
        transport, available, digest = _namespaced(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh"],
            address)
        assert (transport, available, digest) == ("shared_memory", "True", EXPECTED)
        assert srv.bulk.shm.lent == 1  # type: ignore[attr-defined]
    finally:
        _stop(srv)


@pytest.mark.e2e
def test_another_server_at_the_session_name_is_never_used() -> None:
    """Two servers on this host with bulk planes on the same port number (127.0.0.1 and
    127.0.0.2): the name belongs to the first; a client of the second never uses it."""
    first, _ = _server()
    store = TensorStore(device="cpu")
    store.add("x", X * 2)
    second, port = create_server(store, "127.0.0.2:0", ServerConfig(
        unary_max_bytes=1024, bulk_port=first.bulk.port))  # type: ignore[attr-defined]
    second.start()
    try:
        assert second.bulk.shm is None  # the name is taken: it offers no sessions
        with Client(f"127.0.0.2:{port}", timeout=30) as c:
            for i in range(3):
                assert c.tensor("x")[i : i + 40].equal(X[i : i + 40] * 2)
            assert c.transports["shared_memory"] == 0
        shm = first.bulk.shm  # type: ignore[attr-defined]
        assert shm.lent == 0 and until(lambda: shm.sessions == 0)  # greeted, then left
    finally:
        _stop(second)
        _stop(first)
