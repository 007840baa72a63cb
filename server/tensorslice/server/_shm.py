"""Same-host results: pooled shared-memory segments, lent to a client session and reused.

A client on the server's host opens a session on the bulk data plane's abstract Unix
socket (`same_host_socket`): it sends `SESSION_MAGIC`, the server answers `SHM_HELLO` and
its instance id (the client goes on only where that is the id of the server it calls).
Each request then carries the segments the client released since its last request and
either a bulk ticket's token (op 1) or a whole call (op 2). An answer of up to
`INLINE_BYTES` follows the reply on the socket; a larger one is written into a segment of
the session's pool, and the reply carries the segment's id, generation and the file's
size, passing the segment's descriptor (`SCM_RIGHTS`) the first time only. The client maps
each segment once (shared) and builds its tensors on the mapping.

Guarantees:

- A segment is lent to at most one result at a time, and written only while nobody holds
  it: the server writes a segment only when it is free, and it becomes free only when the
  client releases the (id, generation) it was lent at; a release of any other id or
  generation changes nothing (counted as stale). So a tensor a client holds never changes.
- Segments are anonymous (`memfd_create`: nothing is named in `/dev/shm`) and sealed
  against resizing (`SEGMENT_SEALS`): nobody, the client included, can shrink one under a
  mapping of the server's or another process's.
- Bounded: at most `max_segments` per session, and `max_bytes` of segments in all the
  sessions of a server (`ShmBudget`). A request that finds no free segment that fits, and
  no room for a new one once the session's free segments are dropped, is answered with the
  file on the socket instead (counted as a fallback): slower, never refused.
- Kept segments (a request's op with `KEEP` set, what a DataLoader worker asks for: its
  batch goes on to another process, which may hold it for as long as it likes): the file
  is written into a fresh segment, passed with its descriptor and never written again nor
  reused; the server unmaps and closes it at once (answered `SHM_KEPT`), so its memory
  goes back to the system when the last process that maps it unmaps it. A kept segment
  still counts against the session's `max_segments` and the budget's bytes until the
  client releases it (its id and generation, once its results are gone in the client's
  process) or the session closes: that bounds the segments one session has in hand,
  not how long the processes it passes them on to keep them. Where the bounds leave no
  room, the file goes into a pooled segment as for any request (or on the socket).
- A session's pool is freed when its connection closes: the client closes it, exits or is
  killed (`kill -9`), the server stops, or it stays idle for `idle_timeout` seconds. What a
  client still has mapped stays valid (its mappings keep the memory) and goes back to the
  system when it unmaps.
- One thread serves a session, so its pool needs no lock; the budget has its own.

Trust: a session is for a process of the same host; with `peer_uid` set (a server with
authentication tokens), only a peer of that user id (`SO_PEERCRED`) gets a session, other
peers are refused at once (their client then uses TCP). The bulk plane offers no sessions
under TLS.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable

from tensorslice.core.codec import (
    SEGMENT_SEALS,
    SHM_BYTES,
    SHM_ERROR,
    SHM_KEPT,
    SHM_RELEASE,
    SHM_REPLY,
    SHM_REQUEST,
    SHM_SEGMENT,
)
from tensorslice.core.errors import InvalidSelection, Status, TensorSliceError, error_class_name
from tensorslice.server._stream import WholeFile

__all__ = ["INLINE_BYTES", "KEEP", "MAX_CALL_BYTES", "MAX_RELEASES", "Caller",
           "SegmentPool", "ShmBudget", "ShmSession", "default_shm_bytes", "peer_uid",
           "recv_exact"]

log = logging.getLogger("tensorslice.server")

MAX_RELEASES = 4096
INLINE_BYTES = 64 << 10
"""Answers up to this size go on the session's socket, in the reply's own write, not into
a segment: for a small result a segment's bookkeeping (a descriptor's first pass, a
mapping, a release later) costs more than copying the bytes twice."""
"""Most releases one request may carry (a client never has more segments lent)."""
_GRAIN = 64 << 10  # segment sizes are multiples of this
_OP_REDEEM, _OP_CALL = 1, 2
KEEP = 0x80
"""Set in a request's op: the answer goes into a kept segment (see the guarantees)."""
_KEPT_GEN = 1  # the one generation a kept segment is lent at
MAX_CALL_BYTES = 256 << 20
"""Largest serialized request of a call over a session (as a direct request's)."""
_CALL_BYTES_PER_SECOND = 64 << 20  # request bytes a call's deadline grants
_SEND_STEP = 1 << 20
_TOKEN_BYTES = 16
_FIRST_READ = 64 << 10  # bytes a request's first read takes at most

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_POPULATE = 0x8000  # Linux: fault every page in at once

Pieces = Iterable[bytes | memoryview]
Redeemed = tuple[Pieces, int, Callable[[], None]]
"""A redeemed ticket (or a call's answer): its pieces, their size, and what to call once
written (or not)."""
Caller = Callable[[str, bytes, bytes], Redeemed]
"""Runs a whole call: (method, authorization value, serialized request) -> its answer;
raises `TensorSliceError` to answer with its status (the bulk plane's direct handler)."""


def default_shm_bytes(memory: int) -> int:
    """The default bound on all segments of a server: a quarter of the machine's memory."""
    return max(memory // 4, 64 << 20)


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (`SO_PEERCRED`)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


class ShmBudget:
    """The bound on the segments of all sessions of one server, and their counters."""

    def __init__(self, max_bytes: int, max_segments: int = 16, max_sessions: int = 64,
                 idle_timeout: float = 300.0) -> None:
        self.max_bytes = max_bytes
        """Bytes of segments all sessions together may hold (ServerConfig.shm_max_bytes)."""
        self.max_segments = max_segments
        """Segments one session may hold."""
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self.bytes = 0  # of all live segments
        self.segments = 0
        self.sessions = 0
        self.lent = 0  # results delivered in segments
        self.kept = 0  # of which in kept segments
        self.fallbacks = 0  # results sent on the socket: no segment free and no room
        self.inline = 0  # small answers sent on the socket (`INLINE_BYTES`)
        self.stale = 0  # releases of a segment not lent at that generation
        self.broken = 0  # sessions closed for a bad or incomplete request, or a failed send

    def take(self, n: int) -> bool:
        with self._lock:
            if self.bytes + n > self.max_bytes:
                return False
            self.bytes += n
            self.segments += 1
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.bytes -= n
            self.segments -= 1

    def count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def open_session(self) -> bool:
        with self._lock:
            if self.sessions >= self.max_sessions:
                return False
            self.sessions += 1
            return True

    def close_session(self) -> None:
        with self._lock:
            self.sessions -= 1


class _Segment:
    __slots__ = ("addr", "fd", "gen", "id", "lent", "map", "size")

    def __init__(self, seg_id: int, size: int, populate: bool = False) -> None:
        self.id = seg_id
        self.size = size
        self.gen = 0
        self.lent = False
        self.fd = os.memfd_create("tensorslice-segment", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEGMENT_SEALS)
            # libc's mmap, not Python's: that one keeps a duplicate descriptor per mapping
            # A fresh segment to be written whole: its pages faulted in at once (populate).
            addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0), self.fd, 0)
            if addr is None or addr == _MAP_FAILED:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        except BaseException:
            os.close(self.fd)
            raise
        self.addr: int = addr
        self.map = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")

    def close(self) -> None:
        self.map.release()
        _libc.munmap(self.addr, self.size)
        os.close(self.fd)


class SegmentPool:
    """One session's segments (see the module's guarantees). Used by one thread only."""

    def __init__(self, budget: ShmBudget) -> None:
        self.budget = budget
        self._segments: dict[int, _Segment] = {}
        self._next_id = 1
        self._forgotten: list[int] = []
        self._kept: dict[int, int] = {}  # kept segments not released yet: id -> size

    @property
    def nbytes(self) -> int:
        """Bytes of the segments the session holds (kept ones until released)."""
        return sum(s.size for s in self._segments.values()) + sum(self._kept.values())

    def __len__(self) -> int:
        return len(self._segments) + len(self._kept)

    @property
    def kept(self) -> int:
        """Kept segments not released yet."""
        return len(self._kept)

    def release(self, seg_id: int, gen: int) -> bool:
        """Free segment `seg_id` lent at `gen`; False (nothing changes) for any other."""
        size = self._kept.get(seg_id)
        if size is not None and gen == _KEPT_GEN:
            del self._kept[seg_id]
            self.budget.give(size)
            return True
        seg = self._segments.get(seg_id)
        if seg is None or not seg.lent or seg.gen != gen:
            self.budget.count("stale")
            return False
        seg.lent = False
        return True

    def find(self, nbytes: int) -> tuple[_Segment, bool] | None:
        """A free segment for a file of `nbytes` (not lent yet: `lend` does that) and
        whether it is new; None where the bounds leave no room."""
        best: _Segment | None = None
        for seg in self._segments.values():
            if not seg.lent and nbytes <= seg.size <= 2 * nbytes + _GRAIN and (
                    best is None or seg.size < best.size):
                best = seg
        if best is not None:
            return best, False
        new = self._new(nbytes, populate=False)
        if new is None:
            return None
        self._segments[new.id] = new
        return new, True

    def keep(self, nbytes: int) -> _Segment | None:
        """A fresh segment for a file of `nbytes` that is kept (see the module's
        guarantees): the caller writes it, calls `kept_out` and closes it once it is passed on.
        None where the bounds leave no room."""
        return self._new(nbytes, populate=True)

    def kept_out(self, seg: _Segment) -> None:
        """`seg` (from `keep`) is the client's now: counted until released, never written."""
        self._kept[seg.id] = seg.size

    def _new(self, nbytes: int, populate: bool) -> _Segment | None:
        """A new segment (counted in the budget), once free segments are dropped to make
        room if need be; None where the bounds leave none."""
        size = max(-(-nbytes // _GRAIN) * _GRAIN, _GRAIN)
        free = sorted((s for s in self._segments.values() if not s.lent),
                      key=lambda s: -s.size)
        while len(self) >= self.budget.max_segments or not self.budget.take(size):
            if not free:
                return None
            self._drop(free.pop(0))
        try:
            seg = _Segment(self._next_id, size, populate)
        except OSError as exc:
            self.budget.give(size)
            log.warning("cannot create a same-host segment of %d bytes: %s", size, exc)
            return None
        self._next_id += 1
        return seg

    def discard(self, seg: _Segment) -> None:
        """Close a segment from `keep` that was never passed on (its bytes come back)."""
        seg.close()
        self.budget.give(seg.size)

    @staticmethod
    def lend(seg: _Segment) -> int:
        """Mark `seg` lent; the generation it is lent at."""
        seg.gen += 1
        seg.lent = True
        return seg.gen

    def _drop(self, seg: _Segment) -> None:
        del self._segments[seg.id]
        seg.close()
        self.budget.give(seg.size)
        self._forgotten.append(seg.id)

    def take_forgotten(self) -> list[int]:
        out, self._forgotten = self._forgotten, []
        return out

    def close(self) -> None:
        """Drop every segment (lent ones too: the client's mappings keep their memory)."""
        for seg in list(self._segments.values()):
            self._drop(seg)
        self._forgotten.clear()
        for size in self._kept.values():
            self.budget.give(size)
        self._kept.clear()


class ShmSession:
    """One same-host session: reads requests from `sock` until it closes, is idle for the
    budget's `idle_timeout`, or breaks the protocol; redeems each request's token with
    `redeem` (None: unknown or expired), or runs a whole call with `call` (what a client in
    a process forked from a gRPC user sends: op 2, then the ``authorization`` value (``<H``
    length), the method (``<H``, ASCII) and the request (``<Q``, at most `MAX_CALL_BYTES`)),
    and answers (see `tensorslice.core.codec`).
    `busy` is called with True before a request is served and False after; `sent` with the
    file's size and whether it went in a segment."""

    def __init__(self, sock: socket.socket, budget: ShmBudget,
                 redeem: Callable[[bytes], Redeemed | None],
                 busy: Callable[[bool], None], sent: Callable[[int, bool], None],
                 request_timeout: float, send_timeout: float,
                 call: Caller | None = None) -> None:
        self.sock = sock
        self._call = call
        self.pool = SegmentPool(budget)
        self._redeem = redeem
        self._busy = busy
        self._sent = sent
        self._request_timeout = request_timeout
        self._send_timeout = send_timeout

    def run(self) -> None:
        try:
            while self._serve_one():
                pass
        except BaseException:
            self.pool.budget.count("broken")
            raise
        finally:
            self.pool.close()

    def _serve_one(self) -> bool:
        sock = self.sock
        sock.settimeout(self.pool.budget.idle_timeout or None)
        try:
            # A small request comes whole in this one read: a client sends its next request
            # only once it has read the answer to this one, so nothing past it is read.
            first = sock.recv(_FIRST_READ)
        except TimeoutError:
            log.debug("same-host session idle for %ss: closed", self.pool.budget.idle_timeout)
            return False
        if not first:
            return False
        deadline = time.monotonic() + self._request_timeout
        reader = _Reader(sock, first, deadline)
        op, count = SHM_REQUEST.unpack(reader.take(SHM_REQUEST.size))
        keep = bool(op & KEEP)
        op &= ~KEEP
        if op not in (_OP_REDEEM, _OP_CALL) or count > MAX_RELEASES or (
                op == _OP_CALL and self._call is None):
            log.info("same-host session closed: bad request (op %d, %d releases)", op, count)
            self.pool.budget.count("broken")
            return False
        releases = reader.take(count * SHM_RELEASE.size)
        for seg_id, gen in SHM_RELEASE.iter_unpack(releases):
            self.pool.release(seg_id, gen)
        if op == _OP_CALL:
            return self._serve_call(reader, keep)
        token = reader.take(_TOKEN_BYTES)
        self._busy(True)
        try:
            redeemed = self._redeem(token)
            sock.settimeout(self._send_timeout or None)
            if redeemed is None:
                self._reply(SHM_ERROR, Status.UNAVAILABLE.value, 0, 0,
                            b"bulk ticket unknown or expired; retry the call")
                return True
            self._answer(redeemed, keep)
        finally:
            self._busy(False)
        return True

    def _serve_call(self, reader: _Reader, keep: bool) -> bool:
        (n,) = struct.unpack("<H", reader.take(2))
        auth = reader.take(n)
        (n,) = struct.unpack("<H", reader.take(2))
        method = reader.take(n).decode("ascii", "replace")
        (n,) = struct.unpack("<Q", reader.take(8))
        if n > MAX_CALL_BYTES:
            self._error(InvalidSelection(
                f"request of {n} bytes exceeds the limit of {MAX_CALL_BYTES} bytes"))
            log.info("same-host session closed: a call of %d bytes", n)
            self.pool.budget.count("broken")
            return False  # the request's bytes are not read: the session cannot go on
        request = reader.take(n, reader.deadline + n / _CALL_BYTES_PER_SECOND)
        assert self._call is not None
        self._busy(True)
        try:
            try:
                answer = self._call(method, auth, request)
            except TensorSliceError as exc:
                self._error(exc)
                return True
            except Exception:
                log.exception("internal error while serving a call over a same-host session")
                self._error(TensorSliceError("internal error; the server log has the details"),
                            Status.INTERNAL)
                return True
            self._answer(answer, keep)
        finally:
            self._busy(False)
        return True

    def _answer(self, answer: Redeemed, keep: bool) -> None:
        """Deliver a redeemed ticket's or a call's file, then let its source go."""
        pieces, nbytes, done = answer
        try:
            self._deliver(pieces, nbytes, keep)
        finally:
            done()

    def _error(self, exc: TensorSliceError, status: Status | None = None) -> None:
        self.sock.settimeout(self._send_timeout or None)
        name = ((error_class_name(exc) or "") if status is None else "").encode()
        self._reply(SHM_ERROR, (status or exc.status).value, 0, len(name),
                    name + exc.message.encode("utf-8", "replace")[:4096])

    def _deliver(self, pieces: Pieces, nbytes: int, keep: bool = False) -> None:
        if nbytes <= INLINE_BYTES:
            # Each piece copied as it comes (a piece may be a view of a reused buffer).
            body = b"".join([memoryview(p).cast("B") for p in pieces])  # one copy
            if len(body) != nbytes:
                raise RuntimeError(f"made {len(body)} of {nbytes} bytes")
            self.pool.budget.count("inline")
            self._reply(SHM_BYTES, 0, 0, 0, body)
            self._sent(nbytes, False)
            return
        if keep:
            kept = self.pool.keep(nbytes)
            if kept is not None:
                try:
                    _write(kept, pieces, nbytes)
                except BaseException:
                    self.pool.discard(kept)
                    raise
                # Counted as the client's from here: a failed reply closes the session,
                # which gives it back.
                self.pool.kept_out(kept)
                try:
                    self.pool.budget.count("lent")
                    self.pool.budget.count("kept")
                    self._reply(SHM_KEPT, kept.id, _KEPT_GEN, kept.size, b"", nbytes=nbytes,
                                fd=kept.fd)
                finally:
                    kept.close()  # never written again: the client's mappings keep it
                self._sent(nbytes, True)
                return
        found = self.pool.find(nbytes)
        if found is None:
            self.pool.budget.count("fallbacks")
            self._reply(SHM_BYTES, 0, 0, 0, b"", nbytes=nbytes)
            sent = 0
            for piece in pieces:
                view = memoryview(piece).cast("B")
                for at in range(0, len(view), _SEND_STEP):
                    self.sock.sendall(view[at : at + _SEND_STEP])
                sent += len(view)
            if sent != nbytes:
                raise RuntimeError(f"sent {sent} of {nbytes} bytes")
            self._sent(nbytes, False)
            return
        seg, new = found
        _write(seg, pieces, nbytes)
        gen = self.pool.lend(seg)
        self.pool.budget.count("lent")
        self._reply(SHM_SEGMENT, seg.id, gen, seg.size, b"", nbytes=nbytes,
                    fd=seg.fd if new else None)
        self._sent(nbytes, True)

    def _reply(self, kind: int, a: int, gen: int, size: int, body: bytes, *,
               nbytes: int | None = None, fd: int | None = None) -> None:
        forgotten = self.pool.take_forgotten()
        head = (SHM_REPLY.pack(kind, a, gen, size, len(body) if nbytes is None else nbytes,
                               len(forgotten))
                + struct.pack(f"<{len(forgotten)}I", *forgotten) + body)
        if fd is None:
            self.sock.sendall(head)
            return
        done = socket.send_fds(self.sock, [head], [fd])
        if done < len(head):
            self.sock.sendall(head[done:])


class _Reader:
    """One request's bytes: those its first read brought, then the socket's, every read
    before the request's deadline."""

    __slots__ = ("buf", "deadline", "pos", "sock")

    def __init__(self, sock: socket.socket, first: bytes, deadline: float) -> None:
        self.sock = sock
        self.buf = first
        self.pos = 0
        self.deadline = deadline

    def take(self, n: int, deadline: float | None = None) -> bytes:
        end = self.pos + n
        if end <= len(self.buf):
            out = self.buf[self.pos : end]
            self.pos = end
            return out
        out = self.buf[self.pos :]
        self.pos = len(self.buf)
        return out + recv_exact(self.sock, n - len(out),
                                 self.deadline if deadline is None else deadline)


def _write(seg: _Segment, pieces: Pieces, nbytes: int) -> None:
    """The file into `seg`: written in place where it can be (a `WholeFile`: a gather's
    rows land there, no second pass), else piece by piece."""
    if isinstance(pieces, WholeFile):
        pieces.write_into(seg.map[:nbytes])
        return
    written = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        end = written + len(view)
        if end > nbytes:
            raise RuntimeError(f"pieces exceed the {nbytes}-byte file")
        seg.map[written:end] = view
        written = end
    if written != nbytes:
        raise RuntimeError(f"wrote {written} of {nbytes} bytes")


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Exactly n bytes, all before `deadline` (monotonic), not per read; received into one
    buffer of n bytes."""
    out = bytearray(n)
    view = memoryview(out)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionError(f"request incomplete at its deadline ({got} of {n} bytes)")
        sock.settimeout(left)
        part = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if not part:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        got += part
    return bytes(out)
