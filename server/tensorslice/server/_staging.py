"""Slabs to host bytes: CPU tensors are read in place; device tensors cross to the host
through a pool of pinned staging buffers, chunk by chunk, the device-to-host copies of the
next chunks overlapping the sending of the current one.

The pipelining is `Stager`, written against three injected operations (take a buffer, give
it back, start an asynchronous copy that can be waited for), so that its ordering can be
tested without a device. Its guarantees:

- at most `depth` buffers are taken; while the caller holds a chunk, at most `depth - 1`
  copies are in flight;
- a buffer is refilled only after the caller came back for the next chunk, that is, after
  it has finished with the bytes it was given (a chunk is valid until the next call;
  `host_chunks` hands one buffer out as several chunks and comes back only after the last);
- chunks come back in order, each only once its copy has completed;
- on every exit (end, exception, generator closed mid-stream) every copy still in flight is
  waited for before its buffer goes back to the pool, so a buffer never reaches another
  request while a copy can still land in it.

Ordering against the producers (one CUDA stream, no extra synchronization): each chunk's
copy is enqueued on the current stream of the slab's device, so it runs before any later
kernel that a producer enqueues (on that same stream) to refill its own reused device buffer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Protocol

import torch

__all__ = [
    "STAGE_BYTES",
    "PinnedPool",
    "Stager",
    "Waitable",
    "cuda_copy_async",
    "host_bytes",
    "host_chunks",
    "pinned_pool",
    "stage_bytes_for",
]


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a view of its memory (no copy)."""
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1).view(torch.uint8)
    return flat.numpy().data


class Waitable(Protocol):
    """A started copy: `synchronize()` blocks until it has completed (a CUDA event)."""

    def synchronize(self) -> None: ...


CopyAsync = Callable[[torch.Tensor, torch.Tensor], Waitable]
"""`copy_async(dst, src)`: start copying `src` into the host buffer `dst` (same number of
bytes), return something to wait for."""


def cuda_copy_async(dst: torch.Tensor, src: torch.Tensor) -> Waitable:
    """Enqueue `dst.copy_(src)` on the current stream of `src`'s device (where torch runs a
    device-to-host copy) and record an event after it on that same stream."""
    stream = torch.cuda.current_stream(src.device)
    dst.copy_(src, non_blocking=True)
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


class PinnedPool:
    """Page-locked host buffers of one size, reused across requests (pinning is slow)."""

    def __init__(self, nbytes: int, max_cached: int = 16, *, pin: bool | None = None) -> None:
        self.nbytes = nbytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._max = max_cached
        self.allocations = 0  # buffers ever created (for tests and benchmarks)

    def acquire(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.allocations += 1
        return torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self._max and not any(buf is b for b in self._free):
                self._free.append(buf)

    @property
    def cached(self) -> int:
        with self._lock:
            return len(self._free)


_POOLS: dict[int, PinnedPool] = {}
_POOLS_LOCK = threading.Lock()


def pinned_pool(nbytes: int) -> PinnedPool:
    """The process-wide pool of pinned buffers of `nbytes` (one per chunk size)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(nbytes)
        if pool is None:
            pool = _POOLS[nbytes] = PinnedPool(nbytes)
        return pool


class Stager:
    """Host copies of device pieces through at most `depth` reused buffers (see the module's
    docstring for the guarantees). Every call (`put`, `pop`, `close`) means the caller is
    done with the chunk it was given last."""

    def __init__(
        self,
        depth: int,
        acquire: Callable[[], torch.Tensor],
        release: Callable[[torch.Tensor], None],
        copy_async: CopyAsync,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1; got {depth}")
        self.depth = depth
        self._acquire = acquire
        self._release = release
        self._copy_async = copy_async
        self._pending: deque[tuple[torch.Tensor, int, Waitable]] = deque()
        self._free: list[torch.Tensor] = []
        self._taken: list[torch.Tensor] = []
        self._lent: torch.Tensor | None = None
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Copies started and not yet handed to the caller."""
        return len(self._pending)

    @property
    def buffers(self) -> int:
        """Buffers taken from the pool so far (at most `depth`)."""
        return len(self._taken)

    def _back(self) -> None:
        """The caller came back: the buffer it was lent may be refilled."""
        if self._lent is not None:
            self._free.append(self._lent)
            self._lent = None

    def put(self, piece: torch.Tensor) -> memoryview | None:
        """Start copying `piece` (contiguous bytes, no larger than a buffer); return the
        oldest chunk once `depth` copies are pending, else None."""
        if self._closed:
            raise RuntimeError("stager is closed")
        self._back()
        n = piece.numel()
        if self._free:
            buf = self._free.pop()
        else:
            buf = self._acquire()
            self._taken.append(buf)
        if n > buf.numel():
            raise ValueError(f"piece of {n} bytes does not fit a {buf.numel()}-byte buffer")
        self._pending.append((buf, n, self._copy_async(buf[:n], piece)))
        if len(self._pending) >= self.depth:
            return self._next()
        return None

    def pop(self) -> memoryview | None:
        """The oldest pending chunk (waiting for its copy), or None when none is pending."""
        self._back()
        if not self._pending:
            return None
        return self._next()

    def _next(self) -> memoryview:
        buf, n, done = self._pending.popleft()
        try:
            done.synchronize()
        except BaseException:
            self._lent = buf
            raise
        self._lent = buf
        return host_bytes(buf[:n])

    def close(self) -> None:
        """Wait for every copy still in flight, then give every buffer back (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            while self._pending:
                _, _, done = self._pending.popleft()
                done.synchronize()
        finally:
            self._pending.clear()
            self._free.clear()
            self._lent = None
            taken, self._taken = self._taken, []
            for buf in taken:
                self._release(buf)


STAGE_BYTES = 8 << 20
"""Bytes per device-to-host copy: one copy feeds several chunks, so the fixed cost of a copy
(launch, event, wait: tens of microseconds from Python) is paid per 8 MiB, not per chunk."""


def stage_bytes_for(chunk_bytes: int) -> int:
    """The staging buffer size used for chunks of `chunk_bytes`: `STAGE_BYTES` rounded down
    to a whole number of chunks (at least one)."""
    return max(1, STAGE_BYTES // chunk_bytes) * chunk_bytes


def host_chunks(
    slabs: Iterable[torch.Tensor],
    chunk_bytes: int,
    *,
    depth: int = 3,
    pool: PinnedPool | None = None,
    copy_async: CopyAsync | None = None,
) -> Generator[memoryview, None, None]:
    """The bytes of `slabs`, in order, as host memoryviews of at most `chunk_bytes` each.

    A view is valid until the next one is asked for. CPU slabs are not copied. Device
    slabs go through at most `depth` pinned buffers of `pool` (by default the process-wide
    pool of `stage_bytes_for(chunk_bytes)`-byte buffers), one copy filling a buffer, whose
    bytes are then handed out chunk by chunk: up to `depth - 1` copies are in flight while
    the caller works on the current buffer. Passing `copy_async` stages every slab, CPU
    ones included, with that operation (how the pipelining is tested without a device).
    """
    stage_all = copy_async is not None
    stager: Stager | None = None
    stage = 0
    try:
        for slab in slabs:
            if not stage_all and slab.device.type == "cpu":
                if stager is not None:
                    while (mv := stager.pop()) is not None:
                        yield from _split(mv, chunk_bytes)
                whole = host_bytes(slab.contiguous())
                yield from _split(whole, chunk_bytes)
                continue
            if stager is None:
                p = pool if pool is not None else pinned_pool(stage_bytes_for(chunk_bytes))
                if p.nbytes < chunk_bytes:
                    raise ValueError(f"staging buffers of {p.nbytes} bytes are smaller than "
                                     f"chunks of {chunk_bytes}")
                stage = p.nbytes // chunk_bytes * chunk_bytes
                stager = Stager(depth, p.acquire, p.release, copy_async or cuda_copy_async)
            flat = slab.contiguous().reshape(-1).view(torch.uint8)
            for a in range(0, flat.numel(), stage):
                mv = stager.put(flat[a : a + stage])
                if mv is not None:
                    yield from _split(mv, chunk_bytes)
        if stager is not None:
            while (mv := stager.pop()) is not None:
                yield from _split(mv, chunk_bytes)
    finally:
        if stager is not None:
            stager.close()


def _split(mv: memoryview, chunk_bytes: int) -> Iterator[memoryview]:
    if len(mv) <= chunk_bytes:
        yield mv
        return
    for a in range(0, len(mv), chunk_bytes):
        yield mv[a : a + chunk_bytes]
