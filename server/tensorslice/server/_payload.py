"""Payloads: the tensors of a result, produced slab by slab as bytes for the wire.

A payload never builds a full-size copy it does not need: a contiguous tensor is read
straight from its own memory, a strided view is copied slab by slab into a reused buffer,
and a row gather writes each slab of rows straight into a reused buffer. Device tensors
cross to the host through pinned staging buffers (`_staging`).
"""

from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch

__all__ = [
    "POOL_MAX_BYTES",
    "BufferPool",
    "ContiguousPayload",
    "Payload",
    "RowGatherPayload",
    "StridedPayload",
]


POOL_MAX_BYTES = 64 << 20
"""Bytes the server's slab pool (`DEFAULT_POOL`) keeps for reuse, at most: sixteen slabs of
the default size. Buffers in use are not counted (each call's are within its reservation of
`max_materialized_bytes`); what is given back beyond the cap is freed, the least recently
used sizes first."""


class BufferPool:
    """Reusable byte buffers, so that requests do not pay fresh page faults on every slab.

    Guarantees: a buffer is handed out to one caller at a time (it leaves the pool when
    acquired); the free buffers kept never exceed `max_cached` of one size and device, nor
    `max_bytes` in all (the buffers of the sizes least recently given back go first)."""

    def __init__(self, max_cached: int = 16, max_bytes: int = POOL_MAX_BYTES) -> None:
        # Free buffers by (device, size); the order is that of the last `release`.
        self._free: OrderedDict[tuple[str, int], list[torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_cached
        self.max_bytes = max_bytes
        self.held_bytes = 0  # bytes of the free buffers kept
        self.allocations = 0  # how many buffers were ever created (for tests)

    def acquire(self, nbytes: int, device: torch.device) -> torch.Tensor:
        key = (str(device), nbytes)
        with self._lock:
            free = self._free.get(key)
            if free:
                self.held_bytes -= nbytes
                buf = free.pop()
                if not free:
                    del self._free[key]
                return buf
            self.allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def release(self, buf: torch.Tensor) -> None:
        nbytes = buf.numel()
        key = (str(buf.device), nbytes)
        with self._lock:
            if nbytes > self.max_bytes:
                return
            free = self._free.setdefault(key, [])
            self._free.move_to_end(key)
            if len(free) >= self._max:
                return
            while self.held_bytes + nbytes > self.max_bytes:
                oldest = next(iter(self._free))
                stale = self._free[oldest]
                stale.pop()
                self.held_bytes -= oldest[1]
                if not stale and oldest != key:
                    del self._free[oldest]
            free.append(buf)
            self.held_bytes += nbytes


DEFAULT_POOL = BufferPool()


class Payload:
    """One named tensor of a result. `slabs()` yields contiguous tensors whose bytes,
    concatenated, are the tensor's bytes; a slab is valid until the next one is asked for."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.name = name
        self.shape = tuple(shape)
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def renamed(self, name: str) -> Payload:
        """The same payload under another name (this one is left as it is)."""
        other = copy.copy(self)
        other.name = name
        return other

    def slabs(self, slab_bytes: int, pool: BufferPool) -> Iterator[torch.Tensor]:
        raise NotImplementedError


class ContiguousPayload(Payload):
    """A contiguous tensor, streamed from its own memory."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        assert tensor.is_contiguous()
        super().__init__(name, tuple(tensor.shape), tensor.dtype)
        self.tensor = tensor

    def slabs(self, slab_bytes: int, pool: BufferPool) -> Iterator[torch.Tensor]:
        n = self.tensor.numel()
        if n:
            # Flat and stride 1: a tensor torch calls contiguous may still carry any
            # stride on dimensions of size 1 (x[4:5, 0]), which a byte view refuses.
            yield self.tensor.as_strided((n,), (1,))


class StridedPayload(Payload):
    """A strided view (or one to cast), copied slab by slab into a reused buffer."""

    def __init__(self, name: str, view: torch.Tensor, cast: torch.dtype | None = None) -> None:
        super().__init__(name, tuple(view.shape), cast or view.dtype)
        self.view = view

    def slabs(self, slab_bytes: int, pool: BufferPool) -> Iterator[torch.Tensor]:
        if self.view.numel() == 0:
            return
        buf = pool.acquire(slab_bytes, self.view.device)
        try:
            yield from self._copy(self.view.unsqueeze(0) if self.view.ndim == 0 else self.view,
                                  buf, slab_bytes)
        finally:
            pool.release(buf)

    def _copy(self, v: torch.Tensor, buf: torch.Tensor, slab_bytes: int) -> Iterator[torch.Tensor]:
        item = self.dtype.itemsize
        row_bytes = math.prod(v.shape[1:]) * item
        if row_bytes > slab_bytes and v.ndim > 1:
            for i in range(v.shape[0]):
                yield from self._copy(v[i], buf, slab_bytes)
            return
        if v.ndim == 1 and v.shape[0] * item > slab_bytes:
            step = max(1, slab_bytes // item)
        else:
            step = max(1, slab_bytes // max(row_bytes, 1))
        for a in range(0, v.shape[0], step):
            part = v[a : a + step]
            out = buf[: part.numel() * item].view(self.dtype).view(part.shape)
            out.copy_(part)
            yield out


class RowGatherPayload(Payload):
    """Rows of a (rows, row) source picked by flat row numbers, gathered slab by slab
    straight into a reused buffer: the whole result is never built in one piece."""

    def __init__(
        self,
        name: str,
        src: torch.Tensor,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        cast: torch.dtype | None = None,
    ) -> None:
        super().__init__(name, shape, cast or src.dtype)
        self.src = src
        self.flat = flat
        self.cast = cast

    def slabs(self, slab_bytes: int, pool: BufferPool) -> Iterator[torch.Tensor]:
        n = self.flat.numel()
        if n == 0 or self.src.shape[1] == 0:
            return
        row_bytes = self.src.shape[1] * self.src.dtype.itemsize
        if row_bytes >= slab_bytes:
            # Large rows are contiguous in the source: stream them from its memory.
            for r in self.flat.tolist():
                row = self.src[r]
                yield row if self.cast is None else row.to(self.cast)
            return
        rows = max(1, slab_bytes // row_bytes)
        buf = pool.acquire(rows * row_bytes, self.src.device)
        try:
            for a in range(0, n, rows):
                idx = self.flat[a : a + rows]
                out = buf[: idx.numel() * row_bytes].view(self.src.dtype).view(idx.numel(), -1)
                torch.index_select(self.src, 0, idx, out=out)
                yield out if self.cast is None else out.to(self.cast)
        finally:
            pool.release(buf)

