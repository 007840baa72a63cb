"""Threshold planning: selections whose positions a statistic decides (`where`).

`check` validates the request before the region it reads is planned (by `_plan`), and
`plan_threshold` completes the plan from that region's plan. Pure, like `_plan`: the work
happens in `_execute`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tensorslice.core.codec import dtype_name
from tensorslice.core.errors import InvalidSelection, SelectionOutOfRange
from tensorslice.core.selection import Combine, Selection
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
    sel_len,
)

__all__ = ["check", "plan_threshold"]


def check(
    meta: TensorMeta, selection: Selection, bound: list[Bound]
) -> tuple[BoundThreshold, list[Bound]]:
    """Validate a threshold request against the tensor (before its region is planned): the
    threshold with its explicit statistic dimensions normalized, and the bound selectors of
    the region it reads (the threshold's dimension whole)."""
    thr_all = [b for b in bound if isinstance(b, BoundThreshold)]
    if len(thr_all) > 1:
        raise InvalidSelection(f"at most one threshold per request; got {len(thr_all)}")
    thr = thr_all[0]
    spec = thr.spec
    d = thr.dim
    ndim = len(meta.shape)
    if meta.dtype.is_complex:
        raise InvalidSelection(
            f"a threshold compares real statistics; tensor {meta.name!r} is "
            f"{dtype_name(meta.dtype)} (select its values and compare their abs() instead)"
        )
    if any(isinstance(b, (NewDim, Flag)) for b in bound):
        raise InvalidSelection(
            "a threshold cannot be combined with new axes (None) or 0-dimensional masks"
        )
    if selection.combine is Combine.VECTORIZED and any(
        isinstance(b, (Gather, MaskND)) for b in bound
    ):
        raise InvalidSelection(
            "in VECTORIZED combination a threshold cannot be combined with index lists or masks"
        )
    batch = next(b for b in bound if not isinstance(b, (NewDim, Flag)) and b.dim == 0)
    has_batch = d != 0 and not isinstance(batch, BoundIndex)
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
    base_bound: list[Bound] = [
        BoundRange(d, 0, meta.shape[d], 1, meta.shape[d]) if isinstance(b, BoundThreshold) else b
        for b in bound
    ]
    return replace(thr, over=tuple(over)), base_bound


def plan_threshold(
    meta: TensorMeta,
    selection: Selection,
    bound: list[Bound],
    thr: BoundThreshold,
    base: Plan,
    out_dtype: torch.dtype,
    limit: int,
) -> Plan:
    """The plan of a threshold request, given `check`'s threshold and the plan of the region
    it reads (`base`)."""
    spec, d, over = thr.spec, thr.dim, thr.over
    ndim = len(meta.shape)
    if spec.over:
        for b in bound:
            if isinstance(b, (BoundIndex, NewDim, Flag)) or b.dim in (0, d) or b.dim in over:
                continue
            n = sel_len(b)
            if n != 1:
                raise InvalidSelection(
                    f"the statistic must reduce every dimension but the batch (0) and the "
                    f"threshold's {meta.dim(d)}; {meta.dim(b.dim)} of size {n} is neither"
                )
        over_t = tuple(over)
    else:
        over_t = tuple(x for x in range(ndim) if x not in (0, d) or (d == 0 and x != 0))
    if spec.scope == "topk":
        if spec.k == 0:
            raise InvalidSelection(
                f"scope topk needs k, how many positions of {meta.dim(d)} to keep per "
                f"sample (1 to {meta.shape[d]})"
            )
        if not 1 <= spec.k <= meta.shape[d]:
            raise SelectionOutOfRange(
                f"k {spec.k} is out of range for {meta.dim(d)} of size {meta.shape[d]}"
            )
    elif spec.k:
        raise InvalidSelection(f"k is only meaningful with scope topk; got k={spec.k}")
    thr = replace(thr, over=over_t)
    bound = [thr if isinstance(b, BoundThreshold) else b for b in bound]
    region = base.result_nbytes
    steps = list(base.steps)
    steps.append(Step("reduce", d, f"{spec.stat} over dims {list(over_t)} {spec.op} "
                      f"{spec.value:g} ({spec.scope})", region))
    out_shape = list(base.result_shape)
    d_out = d - sum(1 for b in bound if isinstance(b, BoundIndex) and b.dim < d)
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
    return Plan(meta, tuple(replace(s, order=i) for i, s in enumerate(steps)),
                tuple(out_shape), out_dtype, False, tuple(bound), Mode.THRESHOLD,
                selection.combine, limit, base)
