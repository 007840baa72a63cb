"""Slabs to host bytes: CPU tensors are read in place; device tensors cross to the host
through a pool of pinned staging buffers, chunk by chunk, the device-to-host copy of the
next chunks overlapping the sending of the current one.

Ordering argument (one CUDA stream, no extra synchronization needed): each chunk's copy is
enqueued on the current stream, so it runs before any later kernel that a producer enqueues
to refill its own (reused) device buffer; a pinned buffer is refilled only after the caller
has come back for the next chunk, that is, after it has finished with the bytes it was given.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator

import torch

__all__ = ["PinnedPool", "host_bytes", "host_chunks"]


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a view of its memory (no copy)."""
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1).view(torch.uint8)
    return flat.numpy().data


class PinnedPool:
    """Page-locked host buffers of one size, reused across requests (pinning is slow)."""

    def __init__(self, nbytes: int, max_cached: int = 8) -> None:
        self.nbytes = nbytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._max = max_cached
        self.allocations = 0

    def acquire(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.allocations += 1
        pin = torch.cuda.is_available()
        return torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self._max:
                self._free.append(buf)


_POOLS: dict[int, PinnedPool] = {}
_POOLS_LOCK = threading.Lock()


def pinned_pool(nbytes: int) -> PinnedPool:
    with _POOLS_LOCK:
        pool = _POOLS.get(nbytes)
        if pool is None:
            pool = _POOLS[nbytes] = PinnedPool(nbytes)
        return pool


def host_chunks(
    slabs: Iterable[torch.Tensor],
    chunk_bytes: int,
    *,
    depth: int = 3,
    pool: PinnedPool | None = None,
) -> Iterator[memoryview]:
    """The bytes of `slabs`, in order, as host memoryviews of at most `chunk_bytes` each.

    A view is valid until the next one is asked for. CPU slabs are not copied. Device
    slabs go through `depth` pinned buffers: up to `depth - 1` copies are in flight while
    the caller works on the current chunk.
    """
    pending: deque[tuple[torch.Tensor, int, torch.cuda.Event | None]] = deque()
    held: list[torch.Tensor] = []
    free: list[torch.Tensor] = []
    try:
        for slab in slabs:
            if slab.device.type == "cpu":
                while pending:
                    yield _finish(pending, free)
                mv = host_bytes(slab.contiguous())
                for a in range(0, len(mv), chunk_bytes):
                    yield mv[a : a + chunk_bytes]
                continue
            if pool is None:
                pool = pinned_pool(chunk_bytes)
            flat = slab.contiguous().reshape(-1).view(torch.uint8)
            for a in range(0, flat.numel(), chunk_bytes):
                piece = flat[a : a + chunk_bytes]
                if len(pending) >= depth - 1:
                    yield _finish(pending, free)
                buf = free.pop() if free else pool.acquire()
                if not any(buf is h for h in held):
                    held.append(buf)
                buf[: piece.numel()].copy_(piece, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
                pending.append((buf, piece.numel(), event))
        while pending:
            yield _finish(pending, free)
    finally:
        if pending:
            torch.cuda.synchronize()
        if pool is not None:
            for buf in held:
                pool.release(buf)


def _finish(
    pending: deque[tuple[torch.Tensor, int, torch.cuda.Event | None]], free: list[torch.Tensor]
) -> memoryview:
    buf, n, event = pending.popleft()
    if event is not None:
        event.synchronize()
    free.append(buf)  # refilled only after the caller comes back for the next chunk
    return host_bytes(buf[:n])
