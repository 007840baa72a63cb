"""The bytes the peers send: a filled buffer (never untouched zero pages) and its check."""

from __future__ import annotations

import numpy as np
import torch

STRIDE = 4096


def make_payload(nbytes: int) -> np.ndarray:
    """``nbytes`` of resident memory with a sparse pattern that :func:`check` verifies."""
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(0x5A)
    marks = buf[::STRIDE]
    marks[:] = (np.arange(marks.size, dtype=np.int64) % 251).astype(np.uint8)
    return buf


def check(dst: torch.Tensor | np.ndarray, nbytes: int) -> None:
    """Raise if ``dst`` (uint8, at least ``nbytes`` long) does not hold the payload."""
    arr = dst.numpy() if isinstance(dst, torch.Tensor) else dst
    marks = arr[:nbytes:STRIDE]
    want = (np.arange(marks.size, dtype=np.int64) % 251).astype(np.uint8)
    if not np.array_equal(marks, want) or (nbytes > 1 and arr[1] != 0x5A and STRIDE > 1):
        raise AssertionError("received bytes do not match the payload")


PATTERN_MOD = 65521
_BLOCK = 1 << 24


def pattern_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A resident tensor whose flat element ``i`` is ``i % 65521``, filled block by block so
    that a 4 GiB tensor needs no second 4 GiB of scratch."""
    t = torch.empty(shape, dtype=dtype)
    flat = t.view(-1)
    for start in range(0, flat.numel(), _BLOCK):
        end = min(start + _BLOCK, flat.numel())
        flat[start:end] = torch.arange(start, end, dtype=torch.int64).remainder_(PATTERN_MOD)
    return t


def check_pattern(y: torch.Tensor, flat_start: int = 0, samples: int = 4099) -> None:
    """Raise unless contiguous ``y`` holds the elements of :func:`pattern_tensor` from
    flat index ``flat_start`` on (checked at a stride)."""
    flat = y.reshape(-1)
    idx = torch.arange(0, flat.numel(), max(1, flat.numel() // samples), dtype=torch.int64)
    want = (idx + flat_start).remainder_(PATTERN_MOD).to(y.dtype)
    if not torch.equal(flat[idx], want):
        raise AssertionError("received tensor does not match the served tensor")
