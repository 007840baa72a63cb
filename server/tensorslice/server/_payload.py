"""Payloads: the tensors of a result, produced slab by slab as bytes for the wire.

A payload never builds a full-size copy it does not need: a contiguous tensor is read
straight from its own memory, a strided view is copied slab by slab into a reused buffer,
and a row gather writes each slab of rows straight into a reused buffer. Device tensors
cross to the host through pinned staging buffers (`_staging`). Where the caller gives the
result's memory (a same-host segment), `write_into` writes the bytes there directly: a
gather's rows land in the caller's memory, with no slab buffer between.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

__all__ = [
    "POOL_MAX_BYTES",
    "SERIAL_GATHER_BYTES",
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

SERIAL_GATHER_BYTES = 16 << 20
"""A row gather written into the caller's memory (`write_into`) up to this size runs on
the calling thread alone (a DataLoader batch): memory-bound work of a few milliseconds,
where torch's intra-op threads cost more than they save once other calls keep the cores
busy (on the loaded 2-core machine a 256 KiB gather took 9.6-15 ms at p50 on two threads,
86-114 us on one). Larger ones use torch's threads."""


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

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def slabs(self, slab_bytes: int, pool: BufferPool) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def write_into(self, out: torch.Tensor, slab_bytes: int, pool: BufferPool) -> bool:
        """Write the tensor's bytes into `out`, a flat CPU uint8 tensor of `nbytes`: in one
        pass where the payload can (a copy or a gather straight into `out`), else slab by
        slab. False, with nothing written, where the source is on a device (the caller
        copies the staged pieces instead)."""
        if self.device.type != "cpu":
            return False
        at = 0
        for slab in self.slabs(slab_bytes, pool):
            flat = slab.reshape(-1).view(torch.uint8)
            out[at : at + flat.numel()].copy_(flat)
            at += flat.numel()
        return True

    def _typed(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """`out` as a tensor of `dtype` and this payload's shape, or None where its address
        is not aligned for `dtype` (the slab by slab path then writes it)."""
        if out.data_ptr() % dtype.itemsize:
            return None
        return out.view(dtype).view(self.shape)


class ContiguousPayload(Payload):
    """A contiguous tensor, streamed from its own memory."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        assert tensor.is_contiguous()
        super().__init__(name, tuple(tensor.shape), tensor.dtype)
        self.tensor = tensor

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def write_into(self, out: torch.Tensor, slab_bytes: int, pool: BufferPool) -> bool:
        if self.tensor.device.type != "cpu":
            return False
        n = self.tensor.numel()
        if n:
            out.copy_(self.tensor.as_strided((n,), (1,)).view(torch.uint8))
        return True

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

    @property
    def device(self) -> torch.device:
        return self.view.device

    def write_into(self, out: torch.Tensor, slab_bytes: int, pool: BufferPool) -> bool:
        typed = self._typed(out, self.dtype) if self.view.device.type == "cpu" else None
        if typed is None:
            return super().write_into(out, slab_bytes, pool)
        typed.copy_(self.view)  # casts too
        return True

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

    @property
    def device(self) -> torch.device:
        return self.src.device

    def write_into(self, out: torch.Tensor, slab_bytes: int, pool: BufferPool) -> bool:
        typed = (self._typed(out, self.dtype)
                 if self.cast is None and self.src.device.type == "cpu" else None)
        n = self.flat.numel()
        if typed is None or n == 0 or self.src.shape[1] == 0:
            return super().write_into(out, slab_bytes, pool)
        if self.nbytes <= SERIAL_GATHER_BYTES and self.src.is_contiguous():
            # Rows as bytes (numpy has no bfloat16), gathered by numpy on this thread; the
            # planner checked every row number ("clip" skips numpy's buffered check).
            np.take(self.src.view(torch.uint8).numpy(), self.flat.numpy(), axis=0,
                    out=out.view(n, -1).numpy(), mode="clip")
            return True
        torch.index_select(self.src, 0, self.flat, out=typed.view(n, -1))
        return True

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

