"""Same-host results: a client's sessions with the server's pooled segments.

See `tensorslice.server._shm` for the protocol. The client keeps its sessions per data
plane, named by port and instance id (at most `MAX_SESSIONS` open, the idle ones reused
last-in first-out, so a sequential caller always uses the same one and its segments stay
mapped and warm), maps each segment once, shared, and builds every result on a view of the
mapping. A session is used only where the server's greeting names the instance id the
client was told (by the server it calls, over gRPC, or in its ticket): a socket at the
port's name that belongs to another server, or to anything else, never gets a request.

Guarantees:

- A segment holds at most one live result: a result's view releases its segment, by id
  and the generation it was lent at, when the view and every tensor built on it are gone
  (`weakref.finalize`). The finalizer only puts the release in the session's queue
  (reentrant, never blocks, takes no lock); the next request on that session carries it.
  The server writes a segment only after that release, so a live tensor never changes.
- A reply is checked before any tensor is built on it: a descriptor must be a segment of
  the announced size sealed against resizing (no mapping can fault past its end); a
  segment named without one must be mapped already, free on this side, and lent at a newer
  generation; the file's size must be the ticket's. Anything else raises
  `TensorSliceError` and the session is closed (the server then frees its pool): never
  wrong data.
- A result asked for in shared memory (`Assembler.share_memory`: a DataLoader worker's
  batch, which goes on to the main process) asks for a kept segment: the server writes it
  once and never again, and the result's tensors are built on a torch shared storage of
  that segment's descriptor (`UntypedStorage._new_shared_fd_cpu`), which torch passes to
  another process by descriptor, as it is. Its memory goes back to the system when the
  last process unmaps it; once the storage is gone in this process, its release (which
  only gives back the server's count) goes with the next request.
- Segments lent when the process forks are never released (neither parent nor child
  could know when the other is done with them): they stay the session's until it closes.
  A forked child starts with no sessions.
- A session that breaks (the server restarted or closed it as idle) is dropped, and the
  request made again once on a new session where it was not sent yet; a session that
  cannot be opened (no socket at the name: another host, another network namespace;
  another instance's greeting; or refused) answers None, and the caller goes over TCP.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import queue
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

from tensorslice.client._receive import Assembler, recv_exact
from tensorslice.core.codec import (
    INSTANCE_BYTES,
    SEGMENT_SEALS,
    SESSION_MAGIC,
    SHM_BYTES,
    SHM_ERROR,
    SHM_HELLO,
    SHM_KEPT,
    SHM_RELEASE,
    SHM_REPLY,
    SHM_REQUEST,
    SHM_SEGMENT,
    same_host_socket,
)
from tensorslice.core.errors import (
    DeadlineExceeded,
    ServerUnavailable,
    Status,
    TensorSliceError,
    error_from_status,
)

__all__ = ["MAX_SESSIONS", "RETRY_SECONDS", "Session", "Sessions"]

MAX_SESSIONS = 8
"""Sessions a client keeps open with one data plane at most (one per thread calling at
once; a thread that finds them all busy makes its call over TCP)."""
RETRY_SECONDS = 1.0
"""How long a client waits before it tries again a plane that refused it a session."""
_T = TypeVar("_T")
_clock = time.monotonic  # when a refusing plane is tried again (tests drive a clock of their own)
_MAX_FORGOTTEN = 1 << 16
_OP_REDEEM, _OP_CALL = 1, 2
_FIRST_READ = 64 << 10  # bytes of a call's answer its reply's read takes at most
_KEEP = 0x80  # in an op: the answer in a kept segment
_fork_epoch = [0]  # bumped before every fork: releases of older loans are dropped


def _bump_epoch() -> None:
    _fork_epoch[0] += 1


os.register_at_fork(before=_bump_epoch)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """One segment mapped shared, read-write; unmapped once neither the session's cache
    nor a result holds it."""

    def __init__(self, fd: int, size: int) -> None:
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                          fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.addr: int = addr
        self.size = size
        self.gen = 0  # the generation of its latest loan
        weakref.finalize(self, _libc.munmap, addr, size).atexit = False


def _released(returned: queue.SimpleQueue[tuple[int, int]], seg_id: int, gen: int,
              epoch: int) -> None:
    if epoch == _fork_epoch[0]:
        returned.put((seg_id, gen))


class Session:
    """One session with the data plane on `port` (see the module's guarantees). Used by
    one thread at a time (`Sessions` hands it out)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.maps: dict[int, _Mapping] = {}
        self.lent: set[int] = set()  # segment ids with a live result on them
        self.returned: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self.broken = False

    @classmethod
    def open(cls, port: int, instance: bytes, timeout: float | None) -> Session | str:
        """A new session with the server of `instance` at `port`, or why there is none:
        "absent" (no socket at the name: another host, another network namespace),
        "foreign" (the greeting is not this version's, or names another instance: another
        server holds the name) or "refused" (closed or silent before its greeting: the
        server's bound on sessions, or a peer of another user)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(same_host_socket(port))
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return "absent"
        except OSError:
            sock.close()
            return "refused"
        try:
            sock.sendall(SESSION_MAGIC)
            hello = _recv_upto(sock, len(SHM_HELLO))
            if hello == SHM_HELLO:
                hello += _recv_upto(sock, INSTANCE_BYTES)
        except OSError:
            hello = b""
        if hello == SHM_HELLO + instance:
            return cls(sock)
        sock.close()
        return "foreign" if hello else "refused"

    def _alive(self) -> bool:
        """Whether the session is open: between requests nothing may be readable on it
        (end of file, an error or stray bytes: closed or broken)."""
        try:
            self.sock.setblocking(False)
            try:
                self.sock.recv(1, socket.MSG_PEEK)
            finally:
                self.sock.setblocking(True)
        except BlockingIOError:
            return True
        except OSError:
            pass
        return False

    def close(self) -> None:
        self.broken = True
        self.maps.clear()
        self.sock.close()

    def _releases(self) -> bytes:
        out = bytearray()
        while True:
            try:
                seg_id, gen = self.returned.get_nowait()
            except queue.Empty:
                return bytes(out)
            m = self.maps.get(seg_id)
            if m is None or m.gen == gen:
                self.lent.discard(seg_id)
            out += SHM_RELEASE.pack(seg_id, gen)

    def redeem(self, token: bytes, nbytes: int, sink: Assembler, deadline: float | None
               ) -> bool | None:
        """Redeem a ticket: True where its file came in a segment, False where it came on
        the socket; None where the session was found closed before the request was sent
        (the ticket is untouched). Raises on a bad reply, or a session that closes once
        the request is sent (the ticket may be spent): the session is then closed."""
        got = self._exchange(_OP_REDEEM | _keep(sink), token, nbytes, sink, deadline)
        return None if got is None else got[0]

    def call(self, auth: bytes, method: str, request: bytes, sink: Assembler | None,
             deadline: float | None) -> tuple[bool, bytes] | None:
        """A whole call (see `tensorslice.server._shm.ShmSession`): whether the answer
        came in a segment (else on the socket), and the response's bytes, or b"" where the
        result file went into `sink`; None where the session was found closed before the
        request was sent."""
        name = method.encode()
        body = (struct.pack("<H", len(auth)) + auth + struct.pack("<H", len(name)) + name
                + struct.pack("<Q", len(request)) + request)
        return self._exchange(_OP_CALL | _keep(sink), body, None, sink, deadline)

    def _exchange(self, op: int, body: bytes, nbytes: int | None, sink: Assembler | None,
                  deadline: float | None) -> tuple[bool, bytes] | None:
        sock = self.sock
        if not self._alive():
            self.close()
            return None
        releases = self._releases()
        request = (SHM_REQUEST.pack(op, len(releases) // SHM_RELEASE.size)
                   + releases + body)
        try:
            _settle(sock, deadline)
            sock.sendall(request)
            _settle(sock, deadline)
            # A call's small answer comes whole with its reply in one read; a ticket's file
            # (large) is read straight into its buffer after the reply.
            first = SHM_REPLY.size + (_FIRST_READ if op & ~_KEEP == _OP_CALL else 0)
            msg, fds, _, _ = socket.recv_fds(sock, first, 1)
        except TimeoutError:
            self.close()
            raise DeadlineExceeded("same-host transfer did not finish in time") from None
        except OSError as exc:
            self.close()
            raise ServerUnavailable(f"same-host session failed: {exc}") from None
        if not msg and not fds:
            self.close()
            raise ServerUnavailable("same-host session closed by the server during the "
                                    "transfer")
        fd = fds[0] if fds else None
        try:
            got = self._answer(msg, fd, nbytes, sink, deadline)
        except TimeoutError:
            self.close()
            raise DeadlineExceeded("same-host transfer did not finish in time") from None
        except OSError as exc:
            self.close()
            raise ServerUnavailable(f"same-host transfer failed: {exc}") from None
        except BaseException:
            self.close()
            raise
        finally:
            if fd is not None:
                os.close(fd)
        if isinstance(got, TensorSliceError):  # the server's answer: the session goes on
            raise got
        return got

    def _answer(self, msg: bytes, fd: int | None, nbytes: int | None,
                sink: Assembler | None, deadline: float | None
                ) -> tuple[bool, bytes] | TensorSliceError:
        sock = self.sock
        reader = _Reader(sock, msg, deadline)
        kind, a, gen, size, length, nforget = SHM_REPLY.unpack(reader.take(SHM_REPLY.size))
        if nforget > _MAX_FORGOTTEN:
            raise TensorSliceError(f"same-host reply forgets {nforget} segments: refused")
        for seg_id in struct.unpack(f"<{nforget}I", reader.take(4 * nforget)):
            self.maps.pop(seg_id, None)
            self.lent.discard(seg_id)
        if kind == SHM_ERROR:
            if fd is not None or length > 1 << 16 or size > length:
                raise TensorSliceError("same-host error reply malformed: refused")
            body = reader.take(length)
            name = body[:size].decode("ascii", "replace")  # the error's class, where refined
            text = body[size:].decode("utf-8", "replace")
            known = {s.value for s in Status}
            return error_from_status(Status(a) if a in known else Status.UNKNOWN, text,
                                     name or None)
        if nbytes is not None and length != nbytes:
            raise TensorSliceError(
                f"same-host reply announces {length} bytes, the ticket {nbytes}: refused")
        nbytes = length
        if kind == SHM_BYTES:
            if fd is not None:
                raise TensorSliceError("same-host reply passes a descriptor it does not "
                                       "use: refused")
            if sink is None:
                return False, reader.take(nbytes)
            if reader.pos == len(reader.buf):  # nothing read yet: straight into the buffer
                sink.receive(sock, nbytes, deadline)
                return False, b""
            got = 0
            while got < nbytes:  # a large file after a small read: copied in as it comes
                part = reader.take(min(nbytes - got, 1 << 20)) if got else reader.rest()[:nbytes]
                sink.feed(part)
                got += len(part)
            return False, b""
        if kind == SHM_KEPT:
            return self._kept(a, gen, size, nbytes, fd, sink)
        if kind != SHM_SEGMENT:
            raise TensorSliceError(f"same-host reply of unknown kind {kind}: refused")
        if nbytes > size:
            raise TensorSliceError(
                f"same-host segment {a} of {size} bytes cannot hold a {nbytes}-byte file: "
                f"refused")
        if fd is not None:
            if a in self.maps:
                raise TensorSliceError(f"same-host segment {a} passed again: refused")
            _check_segment(a, fd, size)
            self.maps[a] = _Mapping(fd, size)
        m = self.maps.get(a)
        if m is None:
            raise TensorSliceError(f"same-host segment {a} unknown to this session (stale "
                                   f"or foreign): refused")
        if m.size != size or a in self.lent or gen <= m.gen:
            raise TensorSliceError(
                f"same-host segment {a} (generation {gen}, {size} bytes) is still in use or "
                f"stale here (generation {m.gen}, {m.size} bytes): refused")
        m.gen = gen
        self.lent.add(a)
        view = _result_view(m, a, gen, nbytes, self.returned)
        if sink is None:
            return True, bytes(view)  # the view goes: the segment is released
        sink.adopt(view)
        return True, b""

    def _kept(self, a: int, gen: int, size: int, nbytes: int, fd: int | None,
              sink: Assembler | None) -> tuple[bool, bytes]:
        """A kept segment: the result's tensors on a torch shared storage of it."""
        if fd is None or sink is None or not sink.share_memory:
            raise TensorSliceError(f"same-host kept segment {a} "
                                   f"{'without a descriptor' if fd is None else 'not asked for'}"
                                   f": refused")
        if a in self.maps:
            raise TensorSliceError(f"same-host kept segment {a} is a pooled one: refused")
        _check_segment(a, fd, size)
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, size)  # type: ignore[attr-defined]
        # The storage's own object lives as long as any tensor on it (torch keeps it).
        weakref.finalize(storage, _released, self.returned, a, gen,
                         _fork_epoch[0]).atexit = False
        sink.adopt_shared(storage, nbytes)
        return True, b""


def _keep(sink: Assembler | None) -> int:
    return _KEEP if sink is not None and sink.share_memory else 0


def _check_segment(seg_id: int, fd: int, size: int) -> None:
    """A passed descriptor must be a segment of the announced size, sealed against
    resizing (no mapping of it can fault past its end)."""
    real = os.fstat(fd).st_size
    if real != size:
        raise TensorSliceError(
            f"same-host segment {seg_id} of {real} bytes announced as {size}: refused")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd (a file, a pipe): it cannot carry seals
        raise TensorSliceError(
            f"same-host segment {seg_id} is not a sealable memory file: refused") from None
    if seals & SEGMENT_SEALS != SEGMENT_SEALS:
        raise TensorSliceError(
            f"same-host segment {seg_id} not sealed against resizing (seals {seals:#x}): "
            f"refused")


def _result_view(m: _Mapping, seg_id: int, gen: int, nbytes: int,
                 returned: queue.SimpleQueue[tuple[int, int]]) -> memoryview:
    """A view of the first `nbytes` of mapping `m` that keeps it mapped and releases
    (`seg_id`, `gen`) once it and everything built on it are gone."""
    storage = (ctypes.c_char * nbytes).from_address(m.addr)
    storage._mapping = m  # type: ignore[attr-defined]
    weakref.finalize(storage, _released, returned, seg_id, gen, _fork_epoch[0]).atexit = False
    return memoryview(storage).cast("B")


class Sessions:
    """A client's same-host sessions, per data plane (port and instance id): at most
    `MAX_SESSIONS` open per plane, each used by one thread at a time, the idle ones kept
    (reused last-in first-out). A plane whose name has no socket (another host, another
    network namespace) or another server's (a greeting of another version or instance) is
    never tried again; one that refused a session (the server's bound, another user) is
    tried again after `RETRY_SECONDS`."""

    def __init__(self) -> None:
        self._dead: set[tuple[int, bytes]] = set()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: dict[tuple[int, bytes], list[Session]] = {}
        self._open: dict[tuple[int, bytes], int] = {}
        self._retry_at: dict[tuple[int, bytes], float] = {}
        self._closed = False

    @property
    def available(self) -> bool:
        """False once a plane proved to have no session for this client (see the class)."""
        return not self._dead

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's sessions are not ours
            self._reset()

    def __getstate__(self) -> dict[str, object]:
        return {"_dead": set(self._dead)}

    def __setstate__(self, state: dict[str, object]) -> None:
        dead = state["_dead"]
        assert isinstance(dead, set)
        self._dead = dead
        self._reset()

    def usable(self, port: int, instance: bytes) -> bool:
        """Whether a session with the plane of `instance` at `port` may be tried."""
        if not instance:
            return False  # a server that names no instance: never a session
        key = (port, instance)
        if key in self._dead:
            return False
        at = self._retry_at.get(key)
        return at is None or _clock() >= at

    def _take(self, key: tuple[int, bytes], timeout: float) -> Session | None:
        """An idle session, or a new one where the plane's bound leaves room; None where
        every session is busy or none can be opened (the caller then uses TCP)."""
        self._check_pid()
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
            if self._open.get(key, 0) >= MAX_SESSIONS or self._closed:
                return None
            self._open[key] = self._open.get(key, 0) + 1
        opened = Session.open(key[0], key[1], timeout)
        if isinstance(opened, Session):
            return opened
        with self._lock:
            self._open[key] -= 1
            if opened == "refused":
                self._retry_at[key] = _clock() + RETRY_SECONDS
            else:
                self._dead.add(key)
        return None

    def _put(self, key: tuple[int, bytes], session: Session) -> None:
        with self._lock:
            if not session.broken and not self._closed and self._pid == os.getpid():
                self._idle.setdefault(key, []).append(session)
                return
            if self._pid == os.getpid():
                self._open[key] -= 1
        session.close()

    def receive(self, port: int, instance: bytes, token: bytes, nbytes: int, sink: Assembler,
                timeout: float | None, connect_timeout: float) -> bool | None:
        """Redeem a ticket of the plane of `instance` on `port` over a session: True (in a
        segment), False (on the socket), or None where no session is possible (ticket
        untouched)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._run(port, instance, connect_timeout,
                         lambda s: s.redeem(token, nbytes, sink, deadline))

    def call(self, port: int, instance: bytes, auth: bytes, method: str, request: bytes,
             sink: Assembler | None, timeout: float | None, connect_timeout: float
             ) -> tuple[bool, bytes] | None:
        """A whole call over a session with the plane of `instance` on `port`: as
        `Session.call`; None where no session is possible (nothing was sent)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._run(port, instance, connect_timeout,
                         lambda s: s.call(auth, method, request, sink, deadline))

    def _run(self, port: int, instance: bytes, connect_timeout: float,
             act: Callable[[Session], _T | None]) -> _T | None:
        """`act` on a session of the plane; once more on a new one where the session was
        found closed before anything was sent (a restarted server, an idle one)."""
        if not self.usable(port, instance):
            return None
        key = (port, instance)
        for _ in range(2):
            session = self._take(key, connect_timeout)
            if session is None:
                return None
            try:
                got = act(session)
            finally:
                self._put(key, session)
            if got is not None:
                return got
        return None

    def close(self) -> None:
        """Close every idle session (the server frees their segments; results built on
        them stay valid); sessions in use are closed when their call ends."""
        self._check_pid()
        with self._lock:
            self._closed = True
            idle = [s for group in self._idle.values() for s in group]
            for key, group in self._idle.items():
                self._open[key] -= len(group)
            self._idle.clear()
        for s in idle:
            s.close()


def _settle(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(left)


class _Reader:
    """A reply's bytes: those its first read brought, then the socket's."""

    __slots__ = ("buf", "deadline", "pos", "sock")

    def __init__(self, sock: socket.socket, first: bytes, deadline: float | None) -> None:
        self.sock = sock
        self.buf = first
        self.pos = 0
        self.deadline = deadline

    def rest(self) -> bytes:
        """What the first read brought and nobody took yet."""
        out = self.buf[self.pos :]
        self.pos = len(self.buf)
        return out

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end <= len(self.buf):
            out = self.buf[self.pos : end]
            self.pos = end
            return out
        out = self.rest()
        return out + recv_exact(self.sock, n - len(out), self.deadline)


def _recv_upto(sock: socket.socket, n: int) -> bytes:
    """Up to `n` bytes: fewer only where the peer closed first."""
    out = b""
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            break
        out += part
    return out


