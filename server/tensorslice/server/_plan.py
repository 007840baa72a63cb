"""Planning: a selection becomes a frozen `Plan` (views first, then gathers), before any data
moves.

`plan()` is a pure function of the tensor's metadata and the selection: it validates every
selector on the host (no kernel ever sees a bad index), normalizes what can be a view into a
view, chooses how the result is produced (`choose_mode`, the one place a `Mode` is decided)
and records the steps with the bytes each moves. Thresholds plan in `_threshold`; `_execute`
runs plans. Imports neither gRPC nor the client.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from tensorslice.core.codec import dtype_from_name, dtype_name
from tensorslice.core.errors import (
    InvalidIndex,
    InvalidSelection,
    ResultTooLarge,
    SelectionOutOfRange,
)
from tensorslice.core.selection import (
    Combine,
    Full,
    Index,
    Indices,
    Mask,
    NewAxis,
    Range,
    Selection,
    Selector,
    Threshold,
    bind,
)
from tensorslice.server import _threshold
from tensorslice.server._model import (
    Bound,
    BoundIndex,
    BoundRange,
    BoundThreshold,
    Flag,
    Gather,
    MaskND,
    Mode,
    NewDim,
    Plan,
    Step,
    TensorMeta,
    flagged_shape,
    positions,
    sel_len,
    torch_index,
)

__all__ = ["choose_mode", "combined_limit", "plan", "plan_region"]


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


def _normalize(
    meta: TensorMeta, sel: Selector, d: int | None,
    deferred: list[SelectionOutOfRange] | None = None,
) -> Bound:
    if isinstance(sel, Mask) and sel.values.ndim == 0:
        return Flag(bool(sel.values))
    if d is None:
        return NewDim()
    size = meta.shape[d]
    if isinstance(sel, Full):
        return BoundRange(d, 0, size, 1, size)
    if isinstance(sel, Range):
        if sel.step == 0:
            raise InvalidSelection(
                f"slice step cannot be zero (for {meta.dim(d)} of size {size})"
            )
        start, stop, step = slice(sel.start, sel.stop, sel.step).indices(size)
        length = len(range(start, stop, step))
        if length <= 1:
            # At most one position: the step no longer matters, and a huge one (2**62)
            # would overflow a view's stride.
            start = start if length else 0
            return BoundRange(d, start, start + length, 1, length)
        return BoundRange(d, start, stop, step, length)
    if isinstance(sel, Index):
        i = sel.index
        if not -size <= i < size:
            raise SelectionOutOfRange(
                f"index {i} is out of bounds for {meta.dim(d)} of size {size}"
            )
        return BoundIndex(d, i + size if i < 0 else i)
    if isinstance(sel, Indices):
        try:
            return Gather(d, _check_indices(meta, d, sel.values))
        except SelectionOutOfRange as exc:
            if deferred is None:
                raise
            # PyTorch checks index lists only where the result has elements, or where the
            # lists have some and index a size-0 dimension: kept until `plan` knows.
            deferred.append(exc)
            return Gather(d, torch.zeros(sel.values.shape, dtype=torch.int64))
    if isinstance(sel, Mask):
        m = sel.values
        k = max(m.ndim, 1)
        want = meta.shape[d : d + k]
        if tuple(m.shape) != tuple(want):
            if m.ndim <= 1:
                raise InvalidIndex(
                    f"mask of length {m.numel()} does not match {meta.dim(d)} of size {size}"
                )
            dims = ", ".join(str(x) for x in range(d, d + k))
            raise InvalidIndex(
                f"mask of shape {list(m.shape)} does not match dimensions {dims} "
                f"of shape {list(want)}"
            )
        if m.ndim == 1:
            return Gather(d, m.nonzero().reshape(-1))
        return MaskND(d, k, m)
    if isinstance(sel, Threshold):
        return BoundThreshold(d, sel, ())
    raise InvalidSelection(f"not a selector: {sel!r}")


def _as_range(g: Gather) -> BoundRange | None:
    """An index list that is an arithmetic progression with a positive step, as a range."""
    v = g.index
    if v.ndim != 1:
        return None
    n = v.numel()
    if n == 0:
        return BoundRange(g.dim, 0, 0, 1, 0)
    first = int(v[0])
    if n == 1:
        return BoundRange(g.dim, first, first + 1, 1, 1)
    step = int(v[1]) - first
    if step <= 0:
        return None
    expected = torch.arange(first, first + step * n, step, dtype=torch.int64)
    if not torch.equal(v, expected):
        return None
    return BoundRange(g.dim, first, first + step * (n - 1) + 1, step, n)


def _negative_to_gather(r: BoundRange) -> Gather:
    return Gather(r.dim, positions(r))


# ---------------------------------------------------------------------------- planning


def plan(meta: TensorMeta, selection: Selection, *, limit: int = 0) -> Plan:
    """Validate a selection against a tensor and plan it. Raises InvalidSelection,
    SelectionOutOfRange or ResultTooLarge with a message naming dimension, value and size."""
    out_dtype = dtype_from_name(selection.dtype) if selection.dtype else meta.dtype
    pairs = bind(meta.name, len(meta.shape), selection.selectors)
    if all(type(s) in _BASIC for s, _ in pairs):
        p = _plan_basic(meta, pairs, selection.combine, out_dtype,
                        combined_limit(selection.max_bytes, limit))
        if p is not None:
            _check_limit(p, limit=p.limit)
            return p
    if selection.combine is Combine.VECTORIZED:
        # Like PyTorch, report a bad integer or slice before a bad index list or mask;
        # OUTER reports the first bad selector, left to right.
        for s, d in pairs:
            if isinstance(s, (Index, Range)):
                _normalize(meta, s, d)
    deferred: list[SelectionOutOfRange] = []
    vectorized = selection.combine is Combine.VECTORIZED
    bound = [_normalize(meta, s, d, deferred if vectorized else None) for s, d in pairs]
    limit = combined_limit(selection.max_bytes, limit)
    if deferred and any(isinstance(b, BoundThreshold) for b in bound):
        raise deferred[0]
    if any(isinstance(b, BoundThreshold) for b in bound):
        thr, base_bound = _threshold.check(meta, selection, bound)
        base = plan_region(meta, base_bound, selection.combine, meta.dtype)
        p = _threshold.plan_threshold(meta, selection, bound, thr, base, out_dtype, limit)
        _check_limit(p, limit)  # a size the data decides (-1) is checked before its gather
        return p
    p = plan_region(meta, bound, selection.combine, out_dtype, limit)
    if deferred and (p.result_nbytes != 0 or (
        any(isinstance(b, Gather) and meta.shape[b.dim] == 0 for b in bound)
        and math.prod(_index_shape(bound)) > 0
    )):
        raise deferred[0]
    _check_limit(p, limit)
    return p


_BASIC = frozenset({Full, Range, Index, NewAxis})  # after `bind`: no ``...`` is left


def _plan_basic(meta: TensorMeta, pairs: Sequence[tuple[Selector, int | None]],
                combine: Combine, out_dtype: torch.dtype, limit: int) -> Plan | None:
    """The plan of ints, slices and new axes (what most reads are), in one pass: the plan
    `plan_region` makes of them, a view, with no index list or mask to consider; None
    where a slice has a negative step (a flip: `plan_region`'s)."""
    bound: list[Bound] = []
    steps: list[Step] = []
    out_shape: list[int] = []
    for s, d in pairs:
        b = _normalize(meta, s, d)  # the first bad selector raises, left to right
        if type(b) is BoundRange:
            if b.step < 0:
                return None
            out_shape.append(b.length)
            if not (b.start == 0 and b.length == meta.shape[b.dim] and b.step == 1):
                steps.append(Step("view", b.dim, f"narrow {b.start}:{b.stop}:{b.step}", 0,
                                  len(steps)))
        elif type(b) is BoundIndex:
            steps.append(Step("view", b.dim, f"select {b.index}", 0, len(steps)))
        else:  # a new axis
            out_shape.append(1)
        bound.append(b)
    shape = tuple(out_shape)
    elems = math.prod(shape)
    zero_copy = _view_is_contiguous(meta, bound) and out_dtype == meta.dtype
    if not zero_copy:
        steps.append(Step("copy", -1, "strided view copied slab by slab",
                          2 * elems * out_dtype.itemsize, len(steps)))
    if out_dtype != meta.dtype:
        steps.append(Step("cast", -1, f"{dtype_name(meta.dtype)} -> {dtype_name(out_dtype)}",
                          elems * (meta.dtype.itemsize + out_dtype.itemsize), len(steps)))
    return Plan(meta, tuple(steps), shape, out_dtype, zero_copy, tuple(bound), Mode.VIEW,
                combine, limit)


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


def _whole(meta: TensorMeta, b: Bound) -> bool:
    return isinstance(b, BoundRange) and (b.start, b.length, b.step) == (0, meta.shape[b.dim], 1)


def _rewrite(meta: TensorMeta, bound: list[Bound], combine: Combine) -> list[Bound]:
    """Bound selectors in their cheapest equivalent form: an index list that is a
    progression becomes a range (OUTER, or VECTORIZED with a single list); in OUTER a
    negative-step slice becomes an index list. Checks that OUTER lists are 1-D."""
    advanced = [b for b in bound if isinstance(b, (Gather, MaskND, Flag))]
    if combine is Combine.OUTER:
        for a in advanced:
            if isinstance(a, Flag):
                raise InvalidSelection(
                    "OUTER combination takes one-dimensional index lists and masks; "
                    "got a 0-dimensional mask"
                )
            if isinstance(a, MaskND) or a.index.ndim != 1:
                raise InvalidSelection(
                    f"OUTER combination takes one-dimensional index lists and masks; "
                    f"the one on {meta.dim(a.dim)} has "
                    f"{a.ndim if isinstance(a, MaskND) else a.index.ndim} dimensions"
                )
        bound = [_negative_to_gather(b) if isinstance(b, BoundRange) and b.step < 0 else b
                 for b in bound]
    elif not (len(advanced) == 1 and isinstance(advanced[0], Gather)):
        return bound
    return [(_as_range(b) or b) if isinstance(b, Gather) else b for b in bound]


def choose_mode(meta: TensorMeta, bound: Sequence[Bound], combine: Combine) -> Mode:
    """How the result of (rewritten) bound selectors is produced; the one place a mode is
    chosen."""
    if any(isinstance(b, BoundThreshold) for b in bound):
        return Mode.THRESHOLD
    gathers = [b for b in bound if isinstance(b, Gather)]
    if (
        any(isinstance(b, (MaskND, Flag)) for b in bound)
        or any(isinstance(b, BoundRange) and b.step < 0 for b in bound)
        or (combine is Combine.VECTORIZED and len(gathers) > 1)
    ):
        return Mode.TORCH
    if not gathers:
        return Mode.VIEW
    lead = max(g.dim for g in gathers)
    if all(_whole(meta, b) for b in bound if not isinstance(b, (NewDim, Flag)) and b.dim > lead):
        return Mode.ROWS
    return Mode.SELECT


def plan_region(
    meta: TensorMeta,
    bound: list[Bound],
    combine: Combine,
    out_dtype: torch.dtype,
    limit: int = 0,
) -> Plan:
    """The plan of selectors without a threshold (and the region a threshold reads)."""
    item = meta.dtype.itemsize
    bound = _rewrite(meta, bound, combine)
    mode = choose_mode(meta, bound, combine)
    gathers = [b for b in bound if isinstance(b, Gather)]
    out_shape = _out_shape(meta, bound, mode)
    result_bytes = math.prod(out_shape) * out_dtype.itemsize
    steps: list[Step] = []
    for b in bound:
        if isinstance(b, BoundRange) and not _whole(meta, b):
            what = "reversed slice" if b.step < 0 else "narrow"
            steps.append(Step("view", b.dim, f"{what} {b.start}:{b.stop}:{b.step}", 0))
        elif isinstance(b, BoundIndex):
            steps.append(Step("view", b.dim, f"select {b.index}", 0))
    zero_copy = False
    if mode is Mode.VIEW:
        zero_copy = _view_is_contiguous(meta, bound) and out_dtype == meta.dtype
        if not zero_copy:
            steps.append(Step("copy", -1, "strided view copied slab by slab", 2 * result_bytes))
    elif mode is Mode.ROWS:
        lead = max(g.dim for g in gathers)
        rows = math.prod(sel_len(b) for b in bound
                         if not isinstance(b, (NewDim, Flag)) and b.dim <= lead)
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
    elif mode is Mode.SELECT:
        # Each index_select sees the view with the gathers not yet run at full size.
        shape = [meta.shape[b.dim] if isinstance(b, Gather) else sel_len(b)
                 for b in bound if not isinstance(b, (NewDim, Flag))]
        for g in sorted(gathers, key=lambda g: g.index.numel() / max(meta.shape[g.dim], 1)):
            shape[g.dim] = g.index.numel()
            nbytes = math.prod(shape) * item
            steps.append(
                Step("gather", g.dim, f"index_select {g.index.numel()} of "
                     f"{meta.shape[g.dim]}", 2 * nbytes)
            )
    else:  # Mode.TORCH
        # A flag (x[True]) is an advanced index too: PyTorch indexes its dimension with [0].
        advanced = [b for b in bound if isinstance(b, (Gather, MaskND, Flag))]
        flips = [b for b in bound if isinstance(b, BoundRange) and b.step < 0]
        if flips:  # `_execute._run_torch`: the reversed dimensions narrowed, then flipped
            narrowed = _narrowed(meta, bound)
            dims = ",".join(str(f.dim) for f in flips)
            steps.append(Step("copy", flips[0].dim if len(flips) == 1 else -1,
                              f"reversed copy (flip) of dims {dims}: "
                              f"{'x'.join(map(str, narrowed))}",
                              2 * math.prod(narrowed) * item))
            flipped = [replace(b, start=0, stop=b.length, step=1)
                       if isinstance(b, BoundRange) and b.step < 0 else b for b in bound]
            if not advanced and not _view_is_contiguous(replace(meta, shape=narrowed), flipped):
                steps.append(Step("copy", -1, "strided view of the reversed copy copied",
                                  2 * result_bytes))
        if advanced:
            steps.append(Step("gather", -1, "advanced indexing (PyTorch broadcasting rules)",
                              2 * result_bytes))
    if out_dtype != meta.dtype:
        steps.append(
            Step("cast", -1, f"{dtype_name(meta.dtype)} -> {dtype_name(out_dtype)}",
                 math.prod(out_shape) * (item + out_dtype.itemsize))
        )
    return Plan(meta, tuple(replace(s, order=i) for i, s in enumerate(steps)), out_shape,
                out_dtype, zero_copy, tuple(bound), mode, combine, limit)


def _narrowed(meta: TensorMeta, bound: Sequence[Bound]) -> tuple[int, ...]:
    """The source's shape with each negative-step slice's dimension cut to its length."""
    shape = list(meta.shape)
    for b in bound:
        if isinstance(b, BoundRange) and b.step < 0:
            shape[b.dim] = b.length
    return tuple(shape)


def _out_shape(meta: TensorMeta, bound: Sequence[Bound], mode: Mode) -> tuple[int, ...]:
    if mode is Mode.TORCH:
        _check_broadcast(bound)
        # Dimension placement follows PyTorch exactly: ask it, on a meta tensor shaped as
        # `_execute` indexes (negative steps already applied, flag dimensions inserted).
        sizes = [b.length if isinstance(b, BoundRange) and b.step < 0 else None for b in bound]
        probe = torch.empty(flagged_shape(bound, sizes, meta.shape), dtype=meta.dtype,
                            device="meta")
        return tuple(probe[torch_index(meta, bound, "meta")].shape)
    shape: list[int] = []
    for b in bound:
        if isinstance(b, NewDim):
            shape.append(1)
        elif isinstance(b, BoundRange):
            shape.append(b.length)
        elif isinstance(b, Gather):
            shape.extend(b.index.shape)
        elif isinstance(b, BoundIndex):
            pass
        else:  # pragma: no cover - other kinds plan elsewhere
            raise AssertionError(b)
    return tuple(shape)


def _index_shape(bound: Sequence[Bound]) -> tuple[int, ...]:
    """The shape index lists and masks broadcast to (checked by `_check_broadcast`)."""
    shapes = [
        tuple(b.index.shape) if isinstance(b, Gather)
        else (int(b.value),) if isinstance(b, Flag)
        else (int(b.mask.sum()),)
        for b in bound
        if isinstance(b, (Gather, MaskND, Flag))
    ]
    return tuple(torch.broadcast_shapes(*shapes))  # type: ignore[no-untyped-call]


def _check_broadcast(bound: Sequence[Bound]) -> None:
    """Index lists and masks of a VECTORIZED request must broadcast together (a k-D mask
    counts as k index lists of its number of true entries), as in PyTorch."""
    shapes = [
        tuple(b.index.shape) if isinstance(b, Gather)
        else (int(b.value),) if isinstance(b, Flag)
        else (int(b.mask.sum()),)
        for b in bound
        if isinstance(b, (Gather, MaskND, Flag))
    ]
    try:
        torch.broadcast_shapes(*shapes)  # type: ignore[no-untyped-call]
    except RuntimeError:
        listed = ", ".join(str(list(s)) for s in shapes)
        raise InvalidIndex(
            f"shape mismatch: indexing tensors could not be broadcast together with shapes "
            f"{listed}"
        ) from None


def _view_is_contiguous(meta: TensorMeta, bound: Sequence[Bound]) -> bool:
    """Whether the view of the (contiguous) source is one contiguous block: past the first
    dimension selected to more than one position (which needs step 1), every dimension
    must be whole."""
    dims = [b for b in bound if not isinstance(b, (NewDim, Flag))]
    lens = [sel_len(b) for b in dims]
    if 0 in lens:
        return True
    first = next((i for i, n in enumerate(lens) if n != 1), None)
    if first is None:
        return True
    b = dims[first]
    if isinstance(b, BoundRange) and b.step != 1:
        return False
    return all(lens[j] == meta.shape[dims[j].dim] for j in range(first + 1, len(dims)))
