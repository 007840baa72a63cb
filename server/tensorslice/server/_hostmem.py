"""Recycled host memory for a CPU store's tensors.

A tensor written into fresh memory pays a page fault per 4 KiB page on its first touch,
and freeing it returns every page to the system: on the 2-core development machine a
256 MiB upload into fresh memory ran at a third of the speed of the same bytes into memory
touched before. So the memory of a large tensor is an anonymous mapping that goes back to
a pool when the last tensor on it is gone, and the next allocation of the same size takes
it, already faulted in (as the client recycles its receive buffers). Guarantees:

- A mapping is reused only once nothing can reach it: each tensor is built on a fresh
  ctypes view of its mapping (`torch.frombuffer`), and the mapping returns to the pool when
  that view is collected, which torch allows only once the last tensor (views included) on
  it is gone.
- Bounded: the pool keeps at most `max_kept` bytes of mappings; the store counts them
  with its tensors against its budget, and `trim`s them where a reservation needs their
  room (they are never reported as the tensors' memory).
- Reused memory holds old bytes, as `torch.empty` may: every user overwrites what it
  exposes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import threading
import weakref

import torch

__all__ = ["HEAP_MMAP_THRESHOLD", "MIN_RECYCLED_BYTES", "HostMemory", "return_large_frees"]

MIN_RECYCLED_BYTES = 1 << 20
"""Smaller tensors come from the allocator as usual."""
_PAGE = mmap.PAGESIZE

HEAP_MMAP_THRESHOLD = 1 << 20
"""`serve`'s malloc mmap threshold: allocations this large get mappings of their own."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_frees(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Have glibc give each allocation of `threshold` bytes or more a mapping of its own,
    returned to the system when it is freed; True where that was set.

    By default glibc raises its threshold to the size of each large block freed (up to
    32 MiB), so the transient buffers of large results come from the heap afterwards, and a
    heap gives memory back only from its top: one block still in use above them keeps every
    freed page below it resident. Under `scripts/soak`'s mixed load the server's anonymous
    memory swung between 0.3 and 1.1 GiB for about 0.27 GiB in use; with this setting it
    stays within some 10 MiB of that. A fixed threshold also fixes glibc's trim threshold.
    Not where ``MALLOC_MMAP_THRESHOLD_`` is set (the operator chose) or the C library is not
    glibc.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


class HostMemory:
    """Anonymous mappings for host tensors, recycled (see the module's description)."""

    def __init__(self, max_kept: int = 1 << 30) -> None:
        self.max_kept = max_kept
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0
        self._lock = threading.RLock()  # finalizers may run while this thread holds it
        self.reused = 0  # allocations served from the pool (for tests and benchmarks)

    @property
    def kept(self) -> int:
        """Bytes of mappings in the pool now."""
        with self._lock:
            return self._kept

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor, on a recycled mapping where one of its size
        is kept, else on a new one."""
        nbytes = 1
        for s in shape:
            nbytes *= s
        nbytes *= dtype.itemsize
        size = -(-nbytes // _PAGE) * _PAGE
        with self._lock:
            kept = self._free.get(size)
            region = kept.pop() if kept else None
            if region is not None:
                self._kept -= size
                self.reused += 1
        if region is None:
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:  # fewer page faults on the first touch, where the kernel allows it
                    region.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass
        # A view by address, not by buffer export: the mapping can be closed once it is
        # gone (the finalizer holds the mapping until then).
        addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
        view = (ctypes.c_char * nbytes).from_address(addr)
        weakref.finalize(view, self._back, region, size)
        flat = torch.frombuffer(memoryview(view).cast("B"), dtype=torch.uint8)
        return flat.view(dtype).reshape(shape)

    def _back(self, region: mmap.mmap, size: int) -> None:
        """The last tensor on `region` is gone: keep it, or unmap it beyond the bound."""
        with self._lock:
            keep = self._kept + size <= self.max_kept
            if keep:
                self._free.setdefault(size, []).append(region)
                self._kept += size
        if not keep:
            region.close()

    def trim(self, need: int) -> None:
        """Unmap kept mappings until `need` bytes are given back or none is left."""
        gone: list[mmap.mmap] = []
        freed = 0
        with self._lock:
            for size in sorted(self._free, reverse=True):
                regions = self._free[size]
                while regions and freed < need:
                    gone.append(regions.pop())
                    freed += size
                if not regions:
                    del self._free[size]
            self._kept -= freed
        for region in gone:
            region.close()
