"""Receiving a result: the buffers it lands in and the assembler that fills them.

Guarantees:
- A result is copied once, from the network into one buffer whose size the safetensors
  header announces; tensors are built on that buffer with `torch.frombuffer`. A result in
  a same-host segment is not copied: its tensors are built on the segment's mapping
  (`adopt`), or on a torch shared storage of a kept segment (`adopt_shared`).
- A receive buffer has exactly one owner at any time: the `BufferPool` that lists it as
  free, or the one live view it handed out (and the tensors built on that view). Buffers
  are tracked by identity (``id``), never by equality; taking one removes it from the pool
  under the pool's lock, so two results can never be given the same buffer.
- A buffer goes back to its pool exactly once, when its view and every tensor on it are
  gone (`weakref.finalize` calls at most once). The return never blocks and never takes
  the pool's lock, so a finalizer run by the garbage collector in any thread (even one
  inside the pool) cannot deadlock: it lands in a queue the pool drains under its lock.
- Free buffers are bounded in bytes (`max_bytes`); a returned buffer beyond the bound is
  dropped. Between two operations of a pool, buffers freed meanwhile wait in its return
  queue (they are memory the caller held until then).
- A forked child starts with an empty pool and a fresh lock (a lock held by another
  thread of the parent at fork time would never be released in the child).
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import socket
import struct
import threading
import time
import weakref
from typing import Any

import numpy as np
import torch

from tensorslice.core.codec import DTYPE_NAMES, TensorEntry, parse_header
from tensorslice.core.errors import ServerUnavailable, TensorSliceError

__all__ = ["RECYCLE_MAX_BYTES", "Assembler", "BufferPool"]

_RECV_BYTES = 16 << 20

RECYCLE_MAX_BYTES = 1 << 30
"""Receive buffers freed by their tensors are kept, up to this many bytes in all, and
reused: filling fresh memory costs a page fault per 4 KiB, about as much as the transfer."""
_RECYCLE_MIN = 1 << 20


class BufferPool:
    """Receive buffers of at least `min_bytes`, recycled once their results are gone.

    `take(n)` hands out a writable view of n bytes on a buffer that no live view uses; the
    buffer returns to the pool when that view (and every tensor built on it) is collected.
    See the module's guarantees.
    """

    def __init__(self, max_bytes: int = RECYCLE_MAX_BYTES, min_bytes: int = _RECYCLE_MIN
                 ) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._reset()
        ref = weakref.ref(self)

        def _after_fork() -> None:
            pool = ref()
            if pool is not None:
                pool._reset()

        os.register_at_fork(after_in_child=_after_fork)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, bytearray] = {}  # id(buffer) -> buffer; the pool's own
        self._free_bytes = 0
        # Finalizers put returned buffers here: SimpleQueue.put is reentrant and never
        # blocks (safe from a finalizer that runs while this thread holds `_lock`).
        self._returned: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.handed_out = 0  # views handed out on recycled buffers (for tests)

    @property
    def free_bytes(self) -> int:
        """Bytes of the buffers listed as free (after taking in those returned)."""
        with self._lock:
            self._drain()
            return self._free_bytes

    @property
    def free_count(self) -> int:
        with self._lock:
            self._drain()
            return len(self._free)

    def _drain(self) -> None:
        """Move returned buffers into the free list, within the byte bound (lock held)."""
        while True:
            try:
                buf = self._returned.get_nowait()
            except queue.Empty:
                return
            key = id(buf)
            if key in self._free:  # cannot happen: one finalizer per handout
                raise AssertionError("a receive buffer was returned twice")
            if self._free_bytes + len(buf) <= self.max_bytes:
                self._free[key] = buf
                self._free_bytes += len(buf)

    def take(self, n: int) -> memoryview:
        """A writable view of n bytes that no other live view shares. From `min_bytes` up,
        a free buffer of n to 2n bytes is reused when the pool has one, and the buffer goes
        back when the view is collected; below, the view is of a new buffer of its own,
        which never goes back."""
        if n < self.min_bytes:
            return memoryview(bytearray(n))
        buf: bytearray | None = None
        with self._lock:
            self._drain()
            best: int | None = None
            best_size = 0
            for key, cand in self._free.items():
                size = len(cand)
                if n <= size <= 2 * n and (best is None or size < best_size):
                    best, best_size = key, size
            if best is not None:
                buf = self._free.pop(best)
                self._free_bytes -= len(buf)
                self.handed_out += 1
        if buf is None:
            buf = bytearray(n)
        view = memoryview(buf)[:n]
        done = weakref.finalize(view, _give_back, weakref.ref(self), buf)
        done.atexit = False
        return view


def _give_back(pool_ref: weakref.ref[BufferPool], buf: bytearray) -> None:
    """A view's finalizer: hand its buffer back (to the pool's current return queue)."""
    pool = pool_ref()
    if pool is not None:
        pool._returned.put(buf)


@functools.lru_cache(maxsize=256)
def _layout(raw: bytes) -> tuple[tuple[TensorEntry, ...], tuple[tuple[str, str], ...], int]:
    """A safetensors JSON header's entries, metadata and data size (the end of the last
    entry); the same header seen again (the same request, repeated) is read once."""
    entries, metadata = parse_header(raw)
    return entries, metadata, max((e.end for e in entries), default=0)


def _numpy_dtypes() -> dict[torch.dtype, np.dtype[Any]]:
    """The torch dtypes of the wire that NumPy has too (not bfloat16 or float8), with
    NumPy's."""
    out: dict[torch.dtype, np.dtype[Any]] = {}
    for dtype in DTYPE_NAMES.values():
        try:
            out[dtype] = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:
            continue
    return out


_NUMPY_DTYPES = _numpy_dtypes()
_NUMPY_MAX_DIMS = 32  # NumPy 1's limit (2's is 64); torch takes more

DEFAULT_POOL = BufferPool()
"""The pool every `Assembler` uses unless given its own."""


def _settle(sock: socket.socket, deadline: float | None) -> None:
    """Give the next blocking read on `sock` what is left until `deadline` (monotonic)."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(left)


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Exactly n bytes from `sock`; ServerUnavailable if the peer closes first."""
    out = bytearray()
    while len(out) < n:
        _settle(sock, deadline)
        part = sock.recv(n - len(out))
        if not part:
            raise ServerUnavailable(
                f"connection closed by the server after {len(out)} of {n} bytes")
        out += part
    return bytes(out)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def _fresh_bytes(n: int) -> tuple[bytes, memoryview]:
    """A new, not yet shared `bytes` object of n bytes and a writable view of its storage.

    The C API allows filling a bytes object created from NULL before anyone else sees it;
    this lets `slice_bytes` return the assembled file as `bytes` without a second copy.
    """
    obj: bytes = _new_bytes(None, n)
    if n == 0:
        return obj, memoryview(bytearray())
    storage = (ctypes.c_char * n).from_address(_bytes_address(obj))
    return obj, memoryview(storage).cast("B")


class Assembler:
    """Collects the payloads of a stream into one preallocated buffer.

    The total size is read from the safetensors header at the start of the stream; each
    payload is copied once, into its place. `tensors()` builds tensors on that buffer;
    with ``as_bytes=True`` the buffer is a `bytes` object, for `file_bytes()`.
    """

    def __init__(self, *, as_bytes: bool = False, share_memory: bool = False,
                 pool: BufferPool | None = None) -> None:
        self._as_bytes = as_bytes
        self._pool = DEFAULT_POOL if pool is None else pool
        self._shared: torch.Tensor | None = None
        self._own = False  # the buffer is this result's alone: no pool takes it back
        self._share_memory = share_memory
        self._head = bytearray()
        self._buf: memoryview | bytes | None = None
        self._view: memoryview | None = None
        self._pos = 0
        self._data_start = 0
        self.entries: tuple[TensorEntry, ...] = ()
        self._metadata: tuple[tuple[str, str], ...] = ()

    @property
    def share_memory(self) -> bool:
        """Whether the result is asked for in shared memory (a torch shared storage, which
        torch passes to another process as it is)."""
        return self._share_memory

    def feed(self, payload: bytes | memoryview) -> None:
        if self._view is None:
            if self._head:  # the header came split: gathered here until whole
                self._head += payload
                if self._open(self._head):
                    self._head = bytearray()
            elif not self._open(payload):
                self._head += payload
            return
        n = len(payload)
        if self._pos + n > len(self._view):
            raise TensorSliceError(
                f"stream holds more bytes than its header announces ({len(self._view)})"
            )
        self._view[self._pos : self._pos + n] = payload
        self._pos += n

    def _open(self, first: bytes | bytearray | memoryview) -> bool:
        """Read the header from `first` (the file's first bytes), make the buffer and copy
        `first` into it; False where `first` does not hold the whole header yet. A small
        answer comes whole in one payload: it is copied once, straight from the frame."""
        if len(first) < 8:
            return False
        (hlen,) = struct.unpack_from("<Q", first)
        if len(first) < 8 + hlen:
            return False
        self.entries, self._metadata, total_data = _layout(bytes(first[8 : 8 + hlen]))
        self._data_start = 8 + hlen
        total = self._data_start + total_data
        if len(first) > total:
            raise TensorSliceError(f"stream holds more bytes than its header announces ({total})")
        if self._as_bytes:
            self._buf, self._view = _fresh_bytes(total)
        elif self._share_memory:
            # Shared memory from the start: a DataLoader worker hands such tensors to the
            # main process without copying them again.
            storage = torch.UntypedStorage._new_shared(total)  # type: ignore[no-untyped-call]
            self._shared = torch.empty(0, dtype=torch.uint8).set_(storage)
            self._buf = self._view = self._shared.numpy().data.cast("B")
        else:
            self._buf = self._view = self._pool.take(total)
            self._own = total < self._pool.min_bytes
        self._view[: len(first)] = first
        self._pos = len(first)
        return True

    def receive(self, sock: socket.socket, nbytes: int, deadline: float | None = None
                ) -> None:
        """Read a whole file of `nbytes` from `sock`: the header first, then the rest
        straight into the preallocated buffer (`recv_into`, no intermediate copy). Every
        read waits at most until `deadline` (monotonic seconds; TimeoutError after); a
        server gone before the end raises ServerUnavailable, never a short result."""
        head = recv_exact(sock, 8, deadline)
        (hlen,) = struct.unpack_from("<Q", head)
        if 8 + hlen > nbytes:
            raise TensorSliceError(f"bulk header of {hlen} bytes exceeds the {nbytes}-byte file")
        self.feed(head + recv_exact(sock, hlen, deadline))
        view = self._view
        if view is None or len(view) != nbytes:
            raise TensorSliceError(
                f"bulk file announces {0 if view is None else len(view)} bytes, the ticket "
                f"{nbytes}"
            )
        while self._pos < nbytes:
            _settle(sock, deadline)
            n = sock.recv_into(view[self._pos :], min(nbytes - self._pos, _RECV_BYTES))
            if n == 0:
                raise ServerUnavailable(
                    f"connection closed by the server after {self._pos} of {nbytes} bytes"
                )
            self._pos += n

    def adopt(self, file: memoryview) -> None:
        """The whole file, already in memory (a same-host segment): tensors are built on
        `file` itself, no copy (a copy where bytes or shared memory are asked for)."""
        if self._as_bytes or self._share_memory or self._view is not None or self._head:
            self.feed(file)
            return
        self._adopt(file)

    def adopt_shared(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """The whole file, the first `nbytes` of a torch shared storage (a kept same-host
        segment): tensors are built on the storage itself, no copy, and torch passes them
        to another process as they are."""
        if self._view is not None or self._head or nbytes > storage.nbytes():
            raise TensorSliceError(f"a {nbytes}-byte file cannot be adopted here")
        self._shared = torch.empty(0, dtype=torch.uint8).set_(storage)
        self._adopt(self._shared.numpy().data.cast("B")[:nbytes])

    def _adopt(self, file: memoryview) -> None:
        if len(file) < 8:
            raise TensorSliceError(f"a {len(file)}-byte segment holds no safetensors header")
        (hlen,) = struct.unpack_from("<Q", file)
        if 8 + hlen > len(file):
            raise TensorSliceError(
                f"segment header of {hlen} bytes exceeds the {len(file)}-byte segment")
        self.entries, self._metadata, total_data = _layout(bytes(file[8 : 8 + hlen]))
        total = 8 + hlen + total_data
        if total != len(file):
            raise TensorSliceError(
                f"segment of {len(file)} bytes, its header announces {total}")
        self._data_start = 8 + hlen
        self._buf = self._view = file
        self._pos = total

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__``."""
        return dict(self._metadata)

    @property
    def complete(self) -> bool:
        return self._view is not None and self._pos == len(self._view)

    def _check(self) -> tuple[memoryview | bytes, memoryview]:
        if self._buf is None or self._view is None or not self.complete:
            got = self._pos if self._view is not None else len(self._head)
            want = len(self._view) if self._view is not None else "an unknown number of"
            raise TensorSliceError(f"stream ended early: {got} of {want} bytes received")
        return self._buf, self._view

    def file_bytes(self) -> bytes:
        """The whole safetensors file (the buffer itself, not a copy)."""
        buf, view = self._check()
        return buf if isinstance(buf, bytes) else bytes(view)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file, built on the buffer without a copy."""
        _, view = self._check()
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            count = (e.end - e.start) // e.dtype.itemsize
            start = self._data_start + e.start
            if count == 0:
                out[e.name] = torch.empty(e.shape, dtype=e.dtype)
            elif self._shared is not None and start % e.dtype.itemsize == 0:
                nbytes = count * e.dtype.itemsize
                out[e.name] = self._shared[start : start + nbytes].view(e.dtype).view(e.shape)
            elif (self._own and start % e.dtype.itemsize == 0 and e.dtype in _NUMPY_DTYPES
                  and len(e.shape) <= _NUMPY_MAX_DIMS):
                # A buffer of its own (no pool takes it back when a view goes): shaped by
                # NumPy, then one torch call (a small result's cost is the calls). NumPy
                # keeps the buffer alive, not the view.
                array = np.frombuffer(view, _NUMPY_DTYPES[e.dtype], count, start)
                out[e.name] = torch.from_numpy(array.reshape(e.shape))
            else:
                flat = torch.frombuffer(view, dtype=e.dtype, count=count, offset=start)
                out[e.name] = flat.view(e.shape) if start % e.dtype.itemsize == 0 else (
                    flat.clone().view(e.shape))
        return out
