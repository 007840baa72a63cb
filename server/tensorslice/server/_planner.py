"""The planner: a selection becomes a plan (views first, then gathers), then a result.

`plan()` is a pure function of the tensor's metadata and the selection: it validates every
selector on the host (no kernel ever sees a bad index), normalizes what can be a view into a
view, and records the steps with the bytes each moves. `execute()` runs a plan against the
tensor and returns payloads that produce the result's bytes slab by slab, so a contiguous
result is streamed from the tensor's own memory and a row gather writes straight into
reused buffers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tensorslice.core.codec import dtype_from_name, dtype_name
from tensorslice.core.errors import InvalidSelection, ResultTooLarge, SelectionOutOfRange
from tensorslice.core.selection import (
    Combine,
    Ellipsis_,
    Full,
    Index,
    Indices,
    Mask,
    NewAxis,
    Range,
    Selection,
    Selector,
    Threshold,
)
from tensorslice.server._payload import (
    ContiguousPayload,
    Payload,
    RowGatherPayload,
    StridedPayload,
)

__all__ = ["Plan", "Step", "TensorMeta", "execute", "plan"]


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
class _Range:
    dim: int
    start: int
    stop: int
    step: int
    length: int


@dataclass(frozen=True)
class _Index:
    dim: int
    index: int


@dataclass(frozen=True, eq=False)
class _Gather:
    dim: int
    index: torch.Tensor  # int64, non-negative, on the host; any shape in VECTORIZED


@dataclass(frozen=True, eq=False)
class _MaskND:
    dim: int
    ndim: int
    mask: torch.Tensor


@dataclass(frozen=True)
class _Thresh:
    dim: int
    spec: Threshold
    over: tuple[int, ...]


@dataclass(frozen=True)
class _New:
    pass


_Bound = _Range | _Index | _Gather | _MaskND | _Thresh | _New


@dataclass
class Plan:
    """A plan: steps to show, and what `execute` needs to run them."""

    meta: TensorMeta
    steps: list[Step]
    result_shape: tuple[int, ...]  # -1 where the data decides
    result_dtype: torch.dtype
    zero_copy: bool
    bound: tuple[_Bound, ...] = field(repr=False)
    mode: str = field(repr=False)  # "view" | "rows" | "select" | "torch" | "threshold"
    combine: Combine = Combine.OUTER
    limit: int = 0  # bytes; 0 means none
    base: Plan | None = field(default=None, repr=False)  # threshold: the region it reads

    @property
    def result_nbytes(self) -> int:
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


# ---------------------------------------------------------------------------- binding


def _consumed(sel: Selector, combine: Combine) -> int:
    if isinstance(sel, (NewAxis, Ellipsis_)):
        return 0
    if isinstance(sel, Mask):
        return max(sel.values.ndim, 1)
    return 1


def _bind(meta: TensorMeta, selection: Selection) -> list[tuple[Selector, int | None]]:
    """Expand the ellipsis and give each selector its first source dimension."""
    sels = list(selection.selectors)
    n_ell = sum(isinstance(s, Ellipsis_) for s in sels)
    if n_ell > 1:
        raise InvalidSelection(f"an index can only have a single ellipsis ('...'); got {n_ell}")
    used = sum(_consumed(s, selection.combine) for s in sels)
    ndim = len(meta.shape)
    if used > ndim:
        raise InvalidSelection(
            f"too many indices for tensor '{meta.name}' of {ndim} dimensions: "
            f"{used} dimensions indexed"
        )
    expanded: list[Selector] = []
    for s in sels:
        if isinstance(s, Ellipsis_):
            expanded.extend(Full() for _ in range(ndim - used))
        else:
            expanded.append(s)
    if n_ell == 0:
        expanded.extend(Full() for _ in range(ndim - used))
    out: list[tuple[Selector, int | None]] = []
    d = 0
    for s in expanded:
        if isinstance(s, NewAxis):
            out.append((s, None))
        else:
            out.append((s, d))
            d += _consumed(s, selection.combine)
    return out


def _check_indices(meta: TensorMeta, d: int, values: torch.Tensor) -> torch.Tensor:
    size = meta.shape[d]
    v = values.to(torch.int64).cpu()
    if v.numel():
        lo, hi = (int(x) for x in torch.aminmax(v))  # one pass; the common case ends here
        if lo < -size or hi >= size:
            bad = (v < -size) | (v >= size)
            first = int(v[bad].reshape(-1)[0])
            raise SelectionOutOfRange(
                f"index {first} is out of bounds for {meta.dim(d)} of size {size}"
            )
        if lo < 0:
            v = torch.where(v < 0, v + size, v)
    return v


def _normalize(meta: TensorMeta, sel: Selector, d: int | None) -> _Bound:
    if d is None:
        return _New()
    size = meta.shape[d]
    if isinstance(sel, Full):
        return _Range(d, 0, size, 1, size)
    if isinstance(sel, Range):
        if sel.step == 0:
            raise InvalidSelection(
                f"slice step cannot be zero (for {meta.dim(d)} of size {size})"
            )
        start, stop, step = slice(sel.start, sel.stop, sel.step).indices(size)
        return _Range(d, start, stop, step, len(range(start, stop, step)))
    if isinstance(sel, Index):
        i = sel.index
        if not -size <= i < size:
            raise SelectionOutOfRange(
                f"index {i} is out of bounds for {meta.dim(d)} of size {size}"
            )
        return _Index(d, i + size if i < 0 else i)
    if isinstance(sel, Indices):
        return _Gather(d, _check_indices(meta, d, sel.values))
    if isinstance(sel, Mask):
        m = sel.values
        k = max(m.ndim, 1)
        want = meta.shape[d : d + k]
        if tuple(m.shape) != tuple(want):
            if m.ndim <= 1:
                raise InvalidSelection(
                    f"mask of length {m.numel()} does not match {meta.dim(d)} of size {size}"
                )
            dims = ", ".join(str(x) for x in range(d, d + k))
            raise InvalidSelection(
                f"mask of shape {list(m.shape)} does not match dimensions {dims} "
                f"of shape {list(want)}"
            )
        if m.ndim == 1:
            return _Gather(d, m.nonzero().reshape(-1))
        return _MaskND(d, k, m)
    if isinstance(sel, Threshold):
        return _Thresh(d, sel, ())
    raise InvalidSelection(f"not a selector: {sel!r}")


def _as_range(g: _Gather) -> _Range | None:
    """An index list that is an arithmetic progression with a positive step, as a range."""
    v = g.index
    if v.ndim != 1:
        return None
    n = v.numel()
    if n == 0:
        return _Range(g.dim, 0, 0, 1, 0)
    first = int(v[0])
    if n == 1:
        return _Range(g.dim, first, first + 1, 1, 1)
    step = int(v[1]) - first
    if step <= 0:
        return None
    expected = torch.arange(first, first + step * n, step, dtype=torch.int64)
    if not torch.equal(v, expected):
        return None
    return _Range(g.dim, first, first + step * (n - 1) + 1, step, n)


def _positions(r: _Range) -> torch.Tensor:
    """The positions a range selects, in order (empty ranges included, whatever the sign
    of the step: `torch.arange` refuses bounds that disagree with the step)."""
    return r.start + r.step * torch.arange(r.length, dtype=torch.int64)


def _negative_to_gather(r: _Range) -> _Gather:
    return _Gather(r.dim, _positions(r))


# ---------------------------------------------------------------------------- planning


def plan(meta: TensorMeta, selection: Selection, *, limit: int = 0) -> Plan:
    """Validate a selection against a tensor and plan it. Raises InvalidSelection,
    SelectionOutOfRange or ResultTooLarge with a message naming dimension, value and size."""
    out_dtype = dtype_from_name(selection.dtype) if selection.dtype else meta.dtype
    pairs = _bind(meta, selection)
    if selection.combine is Combine.VECTORIZED:
        # Like PyTorch, report a bad integer or slice before a bad index list or mask;
        # OUTER reports the first bad selector, left to right.
        for s, d in pairs:
            if isinstance(s, (Index, Range)):
                _normalize(meta, s, d)
    bound = [_normalize(meta, s, d) for s, d in pairs]
    limit = combined_limit(selection.max_bytes, limit)
    thresholds = [b for b in bound if isinstance(b, _Thresh)]
    if thresholds:
        return _plan_threshold(meta, selection, bound, out_dtype, limit)
    p = _plan_bound(meta, bound, selection.combine, out_dtype)
    p.limit = limit
    _check_limit(p, limit)
    return p


def combined_limit(max_bytes: int, server_limit: int) -> int:
    """The tighter of a caller's `max_bytes` and the server's limit; 0 means none."""
    limits = [x for x in (max_bytes, server_limit) if x > 0]
    return min(limits) if limits else 0


def _check_limit(p: Plan, limit: int) -> None:
    n = p.result_nbytes
    if limit and n > limit:
        raise ResultTooLarge(
            f"result of {n} bytes (shape {list(p.result_shape)}, "
            f"{dtype_name(p.result_dtype)}) exceeds the limit of {limit} bytes"
        )


def _plan_bound(
    meta: TensorMeta, bound: list[_Bound], combine: Combine, out_dtype: torch.dtype
) -> Plan:
    item = meta.dtype.itemsize
    advanced = [b for b in bound if isinstance(b, (_Gather, _MaskND))]
    if combine is Combine.OUTER:
        for a in advanced:
            if isinstance(a, _MaskND) or a.index.ndim != 1:
                raise InvalidSelection(
                    f"OUTER combination takes one-dimensional index lists and masks; "
                    f"the one on {meta.dim(a.dim)} has "
                    f"{a.ndim if isinstance(a, _MaskND) else a.index.ndim} dimensions"
                )
        bound = [_negative_to_gather(b) if isinstance(b, _Range) and b.step < 0 else b
                 for b in bound]
        bound = [(_as_range(b) or b) if isinstance(b, _Gather) else b for b in bound]
        mode = "rows"
    else:
        if len(advanced) == 1 and isinstance(advanced[0], _Gather):
            bound = [(_as_range(b) or b) if isinstance(b, _Gather) else b for b in bound]
            mode = "rows"
        elif advanced:
            mode = "torch"
        else:
            mode = "rows"
        if mode == "rows" and any(isinstance(b, _Range) and b.step < 0 for b in bound):
            mode = "torch"
    gathers = [b for b in bound if isinstance(b, _Gather)]
    if mode == "rows" and not gathers:
        mode = "view"

    out_shape = _out_shape(meta, bound, mode)
    result_bytes = math.prod(out_shape) * out_dtype.itemsize
    steps: list[Step] = []
    for b in bound:
        if isinstance(b, _Range) and (b.start, b.length, b.step) != (0, meta.shape[b.dim], 1):
            what = "reversed slice" if b.step < 0 else "narrow"
            steps.append(Step("view", b.dim, f"{what} {b.start}:{b.stop}:{b.step}", 0))
        elif isinstance(b, _Index):
            steps.append(Step("view", b.dim, f"select {b.index}", 0))
    zero_copy = False
    if mode == "view":
        zero_copy = _view_is_contiguous(meta, bound) and out_dtype == meta.dtype
        if not zero_copy:
            steps.append(Step("copy", -1, "strided view copied slab by slab", 2 * result_bytes))
    elif mode == "rows":
        lead = max(g.dim for g in gathers)
        trailing_whole = all(
            isinstance(b, _Range) and (b.start, b.length, b.step) == (0, meta.shape[b.dim], 1)
            for b in bound
            if not isinstance(b, _New) and b.dim > lead
        )
        if trailing_whole:
            rows = math.prod(
                _sel_len(b) for b in bound if not isinstance(b, _New) and b.dim <= lead
            )
            row_elems = math.prod(meta.shape[lead + 1 :])
            dims = ",".join(str(g.dim) for g in gathers)
            steps.append(
                Step(
                    "gather",
                    gathers[0].dim if len(gathers) == 1 else -1,
                    f"row gather over dims {dims}: {rows} rows of {row_elems * item} bytes",
                    2 * rows * row_elems * item,
                )
            )
        else:
            mode = "select"
            # Each index_select sees the view with the gathers not yet run at full size.
            shape = [meta.shape[b.dim] if isinstance(b, _Gather) else _sel_len(b)
                     for b in bound if not isinstance(b, _New)]
            for g in sorted(gathers, key=lambda g: g.index.numel() / max(meta.shape[g.dim], 1)):
                shape[g.dim] = g.index.numel()
                nbytes = math.prod(shape) * item
                steps.append(
                    Step("gather", g.dim, f"index_select {g.index.numel()} of "
                         f"{meta.shape[g.dim]}", 2 * nbytes)
                )
    elif mode == "torch":
        if any(isinstance(b, _Range) and b.step < 0 for b in bound):
            steps.append(Step("copy", -1, "reverse negative-step slices (flip)", 0))
        steps.append(
            Step("gather", -1, "advanced indexing (PyTorch broadcasting rules)", 2 * result_bytes)
        )
    if out_dtype != meta.dtype:
        steps.append(
            Step("cast", -1, f"{dtype_name(meta.dtype)} -> {dtype_name(out_dtype)}",
                 math.prod(out_shape) * (item + out_dtype.itemsize))
        )
    steps = [replace(s, order=i) for i, s in enumerate(steps)]
    return Plan(meta, steps, out_shape, out_dtype, zero_copy, tuple(bound), mode, combine)


def _sel_len(b: _Bound) -> int:
    if isinstance(b, _Range):
        return b.length
    if isinstance(b, _Index):
        return 1
    if isinstance(b, _Gather):
        return b.index.numel()
    raise AssertionError(b)


def _out_shape(meta: TensorMeta, bound: Sequence[_Bound], mode: str) -> tuple[int, ...]:
    if mode == "torch":
        _check_broadcast(bound)
        # Dimension placement follows PyTorch exactly: ask it, on a meta tensor.
        probe = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
        return tuple(probe[_torch_index(meta, bound, "meta")].shape)
    shape: list[int] = []
    for b in bound:
        if isinstance(b, _New):
            shape.append(1)
        elif isinstance(b, _Range):
            shape.append(b.length)
        elif isinstance(b, _Gather):
            shape.extend(b.index.shape)
        elif isinstance(b, _Index):
            pass
        else:  # pragma: no cover - other kinds plan elsewhere
            raise AssertionError(b)
    return tuple(shape)


def _check_broadcast(bound: Sequence[_Bound]) -> None:
    """Index lists and masks of a VECTORIZED request must broadcast together (a k-D mask
    counts as k index lists of its number of true entries), as in PyTorch."""
    shapes = [
        tuple(b.index.shape) if isinstance(b, _Gather) else (int(b.mask.sum()),)
        for b in bound
        if isinstance(b, (_Gather, _MaskND))
    ]
    try:
        torch.broadcast_shapes(*shapes)  # type: ignore[no-untyped-call]
    except RuntimeError:
        listed = ", ".join(str(list(s)) for s in shapes)
        raise InvalidSelection(
            f"shape mismatch: indexing tensors could not be broadcast together with shapes "
            f"{listed}"
        ) from None


def _view_is_contiguous(meta: TensorMeta, bound: Sequence[_Bound]) -> bool:
    """Whether the view of the (contiguous) source is one contiguous block: past the first
    dimension selected to more than one position (which needs step 1), every dimension
    must be whole."""
    dims = [b for b in bound if not isinstance(b, _New)]
    lens = [_sel_len(b) for b in dims]
    if 0 in lens:
        return True
    first = next((i for i, n in enumerate(lens) if n != 1), None)
    if first is None:
        return True
    b = dims[first]
    if isinstance(b, _Range) and b.step != 1:
        return False
    return all(lens[j] == meta.shape[dims[j].dim] for j in range(first + 1, len(dims)))


def _torch_index(
    meta: TensorMeta, bound: Sequence[_Bound], device: str | torch.device
) -> tuple[Any, ...]:
    """The index PyTorch itself would receive (negative steps already reversed)."""
    out: list[Any] = []
    for b in bound:
        if isinstance(b, _New):
            out.append(None)
        elif isinstance(b, _Range):
            out.append(slice(None) if b.step < 0 else slice(b.start, b.stop, b.step))
        elif isinstance(b, _Index):
            out.append(b.index)
        elif isinstance(b, _Gather):
            out.append(b.index.to(device))
        elif isinstance(b, _MaskND):
            # A k-D mask is k index lists of its true positions (what PyTorch does itself);
            # computed on the host, so a meta probe gets real shapes.
            out.extend(i.to(device) for i in b.mask.nonzero(as_tuple=True))
    return tuple(out)


# ---------------------------------------------------------------------------- thresholds


def _plan_threshold(
    meta: TensorMeta,
    selection: Selection,
    bound: list[_Bound],
    out_dtype: torch.dtype,
    limit: int,
) -> Plan:
    thr_all = [b for b in bound if isinstance(b, _Thresh)]
    if len(thr_all) > 1:
        raise InvalidSelection(f"at most one threshold per request; got {len(thr_all)}")
    thr = thr_all[0]
    spec = thr.spec
    d = thr.dim
    ndim = len(meta.shape)
    if any(isinstance(b, _New) for b in bound):
        raise InvalidSelection("a threshold cannot be combined with new axes (None)")
    if selection.combine is Combine.VECTORIZED and any(
        isinstance(b, (_Gather, _MaskND)) for b in bound
    ):
        raise InvalidSelection(
            "in VECTORIZED combination a threshold cannot be combined with index lists or masks"
        )
    batch = next(b for b in bound if not isinstance(b, _New) and b.dim == 0)
    has_batch = d != 0 and not isinstance(batch, _Index)
    if spec.scope == "per_sample" and not has_batch:
        why = "the threshold is on it" if d == 0 else "it is selected by a single index"
        raise InvalidSelection(
            f"scope per_sample needs a batch dimension 0 to keep positions per sample; "
            f"{why}"
        )
    over: list[int] = []
    for o in spec.over:
        if not -ndim <= o < ndim:
            raise InvalidSelection(
                f"statistic dimension {o} is out of range for a tensor of {ndim} dimensions"
            )
        o = o + ndim if o < 0 else o
        if o == d:
            raise InvalidSelection(
                f"statistic cannot reduce {meta.dim(d)}: the threshold selects along it"
            )
        if o == 0 and d != 0:
            raise InvalidSelection(
                "statistic cannot reduce the batch dimension 0: the mask has one entry per "
                "sample and position"
            )
        over.append(o)
    base_bound: list[_Bound] = [
        _Range(d, 0, meta.shape[d], 1, meta.shape[d]) if isinstance(b, _Thresh) else b
        for b in bound
    ]
    base = _plan_bound(meta, base_bound, selection.combine, meta.dtype)
    if spec.over:
        for b in base_bound:
            if isinstance(b, (_Index, _New)) or b.dim in (0, d) or b.dim in over:
                continue
            n = _sel_len(b)
            if n != 1:
                raise InvalidSelection(
                    f"the statistic must reduce every dimension but the batch (0) and the "
                    f"threshold's {meta.dim(d)}; {meta.dim(b.dim)} of size {n} is neither"
                )
        over_t = tuple(over)
    else:
        over_t = tuple(x for x in range(ndim) if x not in (0, d) or (d == 0 and x != 0))
    if spec.scope == "topk":
        if not 1 <= spec.k <= meta.shape[d]:
            raise SelectionOutOfRange(
                f"k {spec.k} is out of range for {meta.dim(d)} of size {meta.shape[d]}"
            )
    elif spec.k:
        raise InvalidSelection(f"k is only meaningful with scope topk; got k={spec.k}")
    thr = replace(thr, over=over_t)
    bound = [thr if isinstance(b, _Thresh) else b for b in bound]
    region = base.result_nbytes
    steps = list(base.steps)
    steps.append(Step("reduce", d, f"{spec.stat} over dims {list(over_t)} {spec.op} "
                      f"{spec.value:g} ({spec.scope})", region))
    out_shape = list(base.result_shape)
    d_out = d - sum(1 for b in bound if isinstance(b, _Index) and b.dim < d)
    if spec.scope == "topk":
        out_shape[d_out] = spec.k
        steps.append(Step("gather", d, f"top {spec.k} positions per sample", -1))
    elif spec.scope == "per_sample":
        out_shape = [-1] + [s for i, s in enumerate(out_shape) if i not in (0, d_out)]
        steps.append(Step("gather", d, "kept (sample, position) rows, jagged", -1))
    else:
        out_shape[d_out] = -1
        steps.append(Step("gather", d, "positions kept by the shared mask", -1))
    if out_dtype != meta.dtype:
        steps.append(Step("cast", -1, f"{dtype_name(meta.dtype)} -> {dtype_name(out_dtype)}", -1))
    steps = [replace(s, order=i) for i, s in enumerate(steps)]
    return Plan(meta, steps, tuple(out_shape), out_dtype, False, tuple(bound), "threshold",
                selection.combine, limit, base)


# ---------------------------------------------------------------------------- execution


def execute(p: Plan, tensor: torch.Tensor) -> list[Payload]:
    """Run a plan: the payloads of the result, named as in the safetensors file."""
    if p.mode == "threshold":
        return _execute_threshold(p, tensor)
    return [_payload(p, tensor)]


def materialize(p: Plan, tensor: torch.Tensor) -> torch.Tensor:
    """The result of a (non-threshold) plan as a tensor: a view where the plan is a view."""
    if p.mode == "view":
        return tensor[_torch_index(p.meta, p.bound, tensor.device)]
    if p.mode == "torch":
        return _run_torch(p, tensor)
    if p.mode == "rows":
        src, flat = _row_source(p, tensor)
        return src.index_select(0, flat).view(p.result_shape)
    return _run_select(p, tensor)


def _payload(p: Plan, tensor: torch.Tensor) -> Payload:
    cast = p.result_dtype if p.result_dtype != p.meta.dtype else None
    if p.mode == "view":
        v = tensor[_torch_index(p.meta, p.bound, tensor.device)]
        if v.is_contiguous() and cast is None:
            return ContiguousPayload("values", v)
        return StridedPayload("values", v, cast)
    if p.mode == "rows":
        src, flat = _row_source(p, tensor)
        return RowGatherPayload("values", src, flat, p.result_shape, cast)
    result = _run_torch(p, tensor) if p.mode == "torch" else _run_select(p, tensor)
    if cast is not None:
        result = result.to(cast)
    return ContiguousPayload("values", result.contiguous())


def _row_source(p: Plan, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The source as (rows, row) and the flat row numbers of the result, in order."""
    dims = [b for b in p.bound if not isinstance(b, _New)]
    lead = max(b.dim for b in dims if isinstance(b, _Gather))
    shape = p.meta.shape
    src = tensor.view(math.prod(shape[: lead + 1]), -1)
    if lead == 0:  # a list on the first dimension: its positions are the row numbers
        first = dims[0]
        assert isinstance(first, _Gather)
        return src, first.index.reshape(-1).to(tensor.device)
    flat = torch.zeros((), dtype=torch.int64)
    for b in dims[: lead + 1]:
        if isinstance(b, _Range):
            pos = _positions(b)
        elif isinstance(b, _Index):
            pos = torch.tensor([b.index], dtype=torch.int64)
        else:
            assert isinstance(b, _Gather)
            pos = b.index.reshape(-1)
        flat = (flat.reshape(-1, 1) * shape[b.dim] + pos.reshape(1, -1)).reshape(-1)
    return src, flat.reshape(-1).to(tensor.device)


def _run_select(p: Plan, tensor: torch.Tensor) -> torch.Tensor:
    dims = [b for b in p.bound if not isinstance(b, _New)]
    view_index = tuple(
        slice(b.start, b.stop, b.step) if isinstance(b, _Range)
        else slice(b.index, b.index + 1) if isinstance(b, _Index)
        else slice(None)
        for b in dims
    )
    v = tensor[view_index]
    gathers = sorted((b for b in dims if isinstance(b, _Gather)),
                     key=lambda g: g.index.numel() / max(p.meta.shape[g.dim], 1))
    for g in gathers:
        v = v.index_select(g.dim, g.index.reshape(-1).to(tensor.device))
    return v.reshape(p.result_shape)


def _run_torch(p: Plan, tensor: torch.Tensor) -> torch.Tensor:
    v = tensor
    flips = [b.dim for b in p.bound if isinstance(b, _Range) and b.step < 0]
    if flips:
        # One entry per source dimension (a k-D mask covers k of them).
        pre: list[slice] = [slice(None)] * tensor.ndim
        for b in p.bound:
            if isinstance(b, _Range) and b.step < 0:
                pre[b.dim] = (
                    slice(b.start + (b.length - 1) * b.step, b.start + 1, -b.step)
                    if b.length else slice(0, 0)
                )
        v = v[tuple(pre)].flip(flips)
    return v[_torch_index(p.meta, p.bound, tensor.device)]


_STAT_FNS = {
    "mean": lambda x, dims: x.mean(dims),
    "sum": lambda x, dims: x.sum(dims),
    "max": lambda x, dims: x.amax(dims),
    "min": lambda x, dims: x.amin(dims),
    "abs_mean": lambda x, dims: x.abs().mean(dims),
    "l2": lambda x, dims: torch.linalg.vector_norm(x, 2, dims),
}
_OP_FNS = {
    ">": torch.gt,
    ">=": torch.ge,
    "<": torch.lt,
    "<=": torch.le,
}


def statistic(w: torch.Tensor, stat: str, reduce_dims: Sequence[int]) -> torch.Tensor:
    """The statistic of `w` over `reduce_dims` (float32, float64 for 64-bit sources)."""
    acc = torch.float64 if w.dtype in (torch.float64, torch.int64) else torch.float32
    x = w.to(acc)
    if not reduce_dims:
        return x
    out: torch.Tensor = _STAT_FNS[stat](x, tuple(reduce_dims))
    return out


def _execute_threshold(p: Plan, tensor: torch.Tensor) -> list[Payload]:
    assert p.base is not None
    thr = next(b for b in p.bound if isinstance(b, _Thresh))
    spec, d = thr.spec, thr.dim
    w = materialize(p.base, tensor)
    kept_dims = [b.dim for b in p.bound if not isinstance(b, (_Index, _New))]
    d_w = kept_dims.index(d)
    batch_w = 0 if kept_dims and kept_dims[0] == 0 and d != 0 else None
    reduce_dims = [i for i in range(w.ndim) if i not in (d_w, batch_w)]
    stat = statistic(w, spec.stat, reduce_dims)  # (B, C) or (C,)
    passed = _OP_FNS[spec.op](stat, spec.value)
    device = w.device
    out: list[Payload] = []
    if spec.scope in ("any", "all"):
        keep = passed if passed.ndim == 1 else (
            passed.any(0) if spec.scope == "any" else passed.all(0)
        )
        idx = keep.nonzero().reshape(-1)
        values = w.index_select(d_w, idx)
        out.append(_dense("values", values, p))
        out.append(ContiguousPayload("indices", idx))
    elif spec.scope == "topk":
        idx = stat.topk(spec.k, dim=-1).indices  # (B, k) or (k,)
        if idx.ndim == 1:
            values = w.index_select(d_w, idx)
        else:
            moved = w.movedim(d_w, 1)
            rows = torch.arange(moved.shape[0], device=device).reshape(-1, 1)
            values = moved[rows, idx].movedim(1, d_w).contiguous()
        out.append(_dense("values", values, p))
        out.append(ContiguousPayload("indices", idx.contiguous()))
    else:  # per_sample
        b_idx, p_idx = passed.nonzero(as_tuple=True)
        counts = passed.sum(1)
        offsets = torch.zeros(passed.shape[0] + 1, dtype=torch.int64, device=device)
        offsets[1:] = counts.cumsum(0)
        values = w.movedim(d_w, 1)[b_idx, p_idx]
        out.append(_dense("values", values, p))
        out.append(ContiguousPayload("offsets", offsets))
        out.append(ContiguousPayload("indices", p_idx.contiguous()))
    total = sum(x.nbytes for x in out)
    if p.limit and total > p.limit:
        raise ResultTooLarge(
            f"result of {total} bytes (values shape {list(out[0].shape)}, "
            f"{dtype_name(p.result_dtype)}) exceeds the limit of {p.limit} bytes"
        )
    return out


def _dense(name: str, values: torch.Tensor, p: Plan) -> Payload:
    if p.result_dtype != values.dtype:
        values = values.to(p.result_dtype)
    return ContiguousPayload(name, values.contiguous())
