"""The planner's vocabulary: what it knows of a tensor (`TensorMeta`), the selectors bound to
source dimensions, and the frozen `Plan` that `_plan` makes and `_execute` runs.

No I/O, no gRPC: this module, `_plan` and `_threshold` import only torch and the core.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tensorslice.core.codec import dtype_name
from tensorslice.core.selection import Combine, Threshold

__all__ = [
    "Bound",
    "BoundIndex",
    "BoundRange",
    "BoundThreshold",
    "Flag",
    "Gather",
    "MaskND",
    "Mode",
    "NewDim",
    "Plan",
    "Step",
    "TensorMeta",
    "flagged_shape",
    "positions",
    "sel_len",
    "torch_index",
]


@dataclass(frozen=True)
class TensorMeta:
    """What the planner knows of a tensor: no data, only its description."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str = "cpu"
    dim_names: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def dim(self, d: int) -> str:
        """``dimension 1 (C)``, or ``dimension 1`` where names are unknown."""
        if d < len(self.dim_names) and self.dim_names[d]:
            return f"dimension {d} ({self.dim_names[d]})"
        return f"dimension {d}"


@dataclass(frozen=True)
class Step:
    """One step of a plan, for people and for `Explain`."""

    kind: str  # view | reduce | gather | cast | copy
    dim: int  # source dimension, or -1 for several
    detail: str
    bytes_moved: int
    order: int = 0


# Bound selectors: each knows the source dimension it acts on.
@dataclass(frozen=True)
class BoundRange:
    dim: int
    start: int
    stop: int
    step: int
    length: int


@dataclass(frozen=True)
class BoundIndex:
    dim: int
    index: int


@dataclass(frozen=True, eq=False)
class Gather:
    dim: int
    index: torch.Tensor  # int64, non-negative, on the host; any shape in VECTORIZED


@dataclass(frozen=True, eq=False)
class MaskND:
    dim: int
    ndim: int
    mask: torch.Tensor


@dataclass(frozen=True)
class BoundThreshold:
    dim: int
    spec: Threshold
    over: tuple[int, ...]


@dataclass(frozen=True)
class NewDim:
    pass


@dataclass(frozen=True)
class Flag:
    """A 0-d mask (``x[True]``): a new dimension of size 1, indexed by ``[0]`` (True) or
    ``[]`` (False), an advanced index there, as in PyTorch."""

    value: bool


Bound = BoundRange | BoundIndex | Gather | MaskND | BoundThreshold | NewDim | Flag


class Mode(enum.Enum):
    """How a plan produces its result (chosen by `tensorslice.server._plan.choose_mode`)."""

    VIEW = "view"  # a view of the source: streamed from its memory, or copied slab by slab
    ROWS = "rows"  # a row gather: whole trailing rows, written into reused buffers
    SELECT = "select"  # index_select along each gathered dimension
    TORCH = "torch"  # PyTorch's advanced indexing (broadcast lists, k-D masks, flips)
    THRESHOLD = "threshold"  # a statistic decides the positions; the base plan reads them


@dataclass(frozen=True)
class Plan:
    """A plan: steps to show, and what `execute` needs to run them. Immutable: a plan is
    cached and shared between calls."""

    meta: TensorMeta
    steps: tuple[Step, ...]
    result_shape: tuple[int, ...]  # -1 where the data decides
    result_dtype: torch.dtype
    zero_copy: bool
    bound: tuple[Bound, ...] = field(repr=False)
    mode: Mode = field(repr=False)
    combine: Combine = Combine.OUTER
    limit: int = 0  # bytes; 0 means none
    base: Plan | None = field(default=None, repr=False)  # threshold: the region it reads

    @property
    def result_nbytes(self) -> int:
        """The result's size in bytes, known before any work; -1 where the data decides."""
        if any(s < 0 for s in self.result_shape):
            return -1
        return math.prod(self.result_shape) * self.result_dtype.itemsize

    @functools.cached_property
    def _summary(self) -> str:
        kinds = [f"{s.kind}({s.dim})" if s.dim >= 0 else s.kind for s in self.steps]
        shape = "x".join("?" if s < 0 else str(s) for s in self.result_shape) or "scalar"
        how = "zero-copy" if self.zero_copy else "copy"
        return f"{' > '.join(kinds) or 'view'}; {shape} {dtype_name(self.result_dtype)}; {how}"

    def summary(self) -> str:
        """One line: the steps, the result's shape and dtype, zero-copy or copy."""
        return self._summary


def positions(r: BoundRange) -> torch.Tensor:
    """The positions a range selects, in order (empty ranges included, whatever the sign
    of the step: `torch.arange` refuses bounds that disagree with the step)."""
    return r.start + r.step * torch.arange(r.length, dtype=torch.int64)


def sel_len(b: Bound) -> int:
    if isinstance(b, BoundRange):
        return b.length
    if isinstance(b, BoundIndex):
        return 1
    if isinstance(b, Gather):
        return b.index.numel()
    raise AssertionError(b)


def torch_index(
    meta: TensorMeta, bound: Sequence[Bound], device: str | torch.device
) -> tuple[Any, ...]:
    """The index PyTorch itself would receive (negative steps already reversed)."""
    out: list[Any] = []
    for b in bound:
        if isinstance(b, NewDim):
            out.append(None)
        elif isinstance(b, BoundRange):
            out.append(slice(None) if b.step < 0 else slice(b.start, b.stop, b.step))
        elif isinstance(b, BoundIndex):
            out.append(b.index)
        elif isinstance(b, Gather):
            out.append(b.index.to(device))
        elif isinstance(b, MaskND):
            # A k-D mask is k index lists of its true positions (what PyTorch does itself);
            # computed on the host, so a meta probe gets real shapes.
            out.extend(i.to(device) for i in b.mask.nonzero(as_tuple=True))
        elif isinstance(b, Flag):  # its dimension of size 1 is in place (`flagged_shape`)
            out.append(torch.zeros(int(b.value), dtype=torch.int64, device=device))
    return tuple(out)


def flagged_shape(
    bound: Sequence[Bound], sizes: Sequence[int | None], source: Sequence[int]
) -> tuple[int, ...]:
    """The shape `torch_index` indexes: the source's (with `sizes` where given, one per
    bound selector), plus a dimension of size 1 where each flag stands."""
    shape: list[int] = []
    for b, size in zip(bound, sizes, strict=True):
        if isinstance(b, Flag):
            shape.append(1)
        elif isinstance(b, MaskND):
            shape.extend(source[b.dim : b.dim + b.ndim])
        elif isinstance(b, (BoundRange, BoundIndex, Gather)):
            shape.append(source[b.dim] if size is None else size)
    return tuple(shape)
