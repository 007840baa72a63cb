"""Execution: a plan runs against the tensor and gives payloads that produce the result's
bytes slab by slab, so a contiguous result is streamed from the tensor's own memory and a
row gather writes straight into reused buffers.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import Protocol

import torch

from tensorslice.core.codec import dtype_name
from tensorslice.core.errors import ResultTooLarge
from tensorslice.server._model import (
    BoundIndex,
    BoundRange,
    BoundThreshold,
    Flag,
    Gather,
    MaskND,
    Mode,
    NewDim,
    Plan,
    flagged_shape,
    positions,
    sel_len,
    torch_index,
)
from tensorslice.server._payload import (
    ContiguousPayload,
    Payload,
    RowGatherPayload,
    StridedPayload,
)

__all__ = ["Reserve", "execute", "materialized_bytes", "view_bytes"]

# The modes as module globals: an enum member lookup (`Mode.VIEW`) costs a descriptor call
# per use in Python 3.11, and every call passes here.
_VIEW, _ROWS, _SELECT, _TORCH, _THRESHOLD = (
    Mode.VIEW, Mode.ROWS, Mode.SELECT, Mode.TORCH, Mode.THRESHOLD
)


class Reserve(Protocol):
    """Where execution reserves memory before it builds it (`_limits.Hold`)."""

    def add(self, nbytes: int, what: str) -> None: ...

    def drop(self, nbytes: int) -> None: ...


class _Unbounded:
    def add(self, nbytes: int, what: str) -> None:
        pass

    def drop(self, nbytes: int) -> None:
        pass


def execute(p: Plan, tensor: torch.Tensor, reserve: Reserve | None = None,
            *, slab_bytes: int = 0) -> list[Payload]:
    """Run a plan: the payloads of the result, named as in the safetensors file. Memory
    the result needs beyond the source is reserved with `reserve` before it is built."""
    reserve = reserve or _Unbounded()
    if p.mode is _THRESHOLD:
        return _execute_threshold(p, tensor, reserve)
    reserve.add(materialized_bytes(p, slab_bytes), f"the result of {p.meta.name!r}")
    return [_payload(p, tensor)]


def view_bytes(p: Plan, tensor: torch.Tensor) -> memoryview | None:
    """The result of a zero-copy view of a contiguous CPU tensor as the bytes it is: a view
    of the source's memory where they lie, no tensor made (valid while `tensor` lives);
    None for any other plan. A small read's cost is its calls: this is one."""
    if (p.mode is not _VIEW or not p.zero_copy or tensor.device.type != "cpu"
            or not tensor.is_contiguous()):
        return None
    nbytes = p.result_nbytes
    if nbytes == 0:
        return memoryview(b"")
    stride = p.meta.dtype.itemsize
    strides = [0] * len(p.meta.shape)
    for d in range(len(strides) - 1, -1, -1):  # a contiguous source's, in bytes
        strides[d] = stride
        stride *= p.meta.shape[d]
    offset = 0
    for b in p.bound:
        if type(b) is BoundRange:
            offset += b.start * strides[b.dim]
        elif type(b) is BoundIndex:
            offset += b.index * strides[b.dim]
    block = (ctypes.c_char * nbytes).from_address(tensor.data_ptr() + offset)
    return memoryview(block).cast("B")


def materialized_bytes(p: Plan, slab_bytes: int = 0) -> int:
    """Bytes `execute` builds at once, beyond the source, for a plan that is not a
    threshold (whose statistic and result are reserved step by step as it runs): a view
    streams from the source, a strided view or a row gather goes through one slab buffer,
    any other gather builds its whole result (and its index lists)."""
    elems = math.prod(p.result_shape)
    cast = elems * p.result_dtype.itemsize if p.result_dtype != p.meta.dtype else 0
    if p.mode is _VIEW:
        return 0 if p.zero_copy else slab_bytes
    if p.mode is _ROWS:
        return slab_bytes + (3 * 8 * _row_count(p) if _lead(p) > 0 else 0)
    return _whole_bytes(p) + cast


def _lead(p: Plan) -> int:
    return max(b.dim for b in p.bound if isinstance(b, Gather))


def _row_count(p: Plan) -> int:
    """Rows of a row gather: `_row_source`'s flat row numbers."""
    lead = _lead(p)
    return math.prod(sel_len(b) for b in p.bound
                     if isinstance(b, (BoundRange, BoundIndex, Gather)) and b.dim <= lead)


def _whole_bytes(p: Plan) -> int:
    """What `_materialize` builds for a plan (in the source's dtype)."""
    item = p.meta.dtype.itemsize
    elems = math.prod(p.result_shape)
    if p.mode is _VIEW:
        return 0
    if p.mode is _ROWS:
        return elems * item + 3 * 8 * _row_count(p)
    if p.mode is _SELECT:
        return sum(s.bytes_moved // 2 for s in p.steps if s.kind == "gather")
    # TORCH: the result, the index lists a k-D mask becomes, the flipped region.
    extra = sum(int(b.mask.sum()) * 8 * b.ndim for b in p.bound if isinstance(b, MaskND))
    flips = [b for b in p.bound if isinstance(b, BoundRange) and b.step < 0]
    if flips:
        sizes = list(p.meta.shape)
        for b in flips:
            sizes[b.dim] = b.length
        extra += math.prod(sizes) * item
    return elems * item + extra


def _materialize(p: Plan, tensor: torch.Tensor) -> torch.Tensor:
    """The result of a (non-threshold) plan as a tensor: a view where the plan is a view."""
    if p.mode is _VIEW:
        return tensor[torch_index(p.meta, p.bound, tensor.device)]
    if p.mode is _TORCH:
        return _run_torch(p, tensor)
    if p.mode is _ROWS:
        src, flat = _row_source(p, tensor)
        return src.index_select(0, flat).view(p.result_shape)
    return _run_select(p, tensor)


def _payload(p: Plan, tensor: torch.Tensor) -> Payload:
    cast = p.result_dtype if p.result_dtype != p.meta.dtype else None
    if p.mode is _VIEW:
        v = tensor[torch_index(p.meta, p.bound, tensor.device)]
        if v.is_contiguous() and cast is None:
            return ContiguousPayload("values", v)
        return StridedPayload("values", v, cast)
    if p.mode is _ROWS:
        src, flat = _row_source(p, tensor)
        return RowGatherPayload("values", src, flat, p.result_shape, cast)
    result = _run_torch(p, tensor) if p.mode is _TORCH else _run_select(p, tensor)
    if cast is not None:
        result = result.to(cast)
    return ContiguousPayload("values", result.contiguous())


def _row_source(p: Plan, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The source as (rows, row) and the flat row numbers of the result, in order."""
    dims = [b for b in p.bound if not isinstance(b, (NewDim, Flag))]
    lead = max(b.dim for b in dims if isinstance(b, Gather))
    shape = p.meta.shape
    # Sizes spelled out: a tensor of 0 elements cannot infer a -1.
    src = tensor.view(math.prod(shape[: lead + 1]), math.prod(shape[lead + 1 :]))
    if lead == 0:  # a list on the first dimension: its positions are the row numbers
        first = dims[0]
        assert isinstance(first, Gather)
        return src, first.index.reshape(-1).to(tensor.device)
    flat = torch.zeros((), dtype=torch.int64)
    for b in dims[: lead + 1]:
        if isinstance(b, BoundRange):
            pos = positions(b)
        elif isinstance(b, BoundIndex):
            pos = torch.tensor([b.index], dtype=torch.int64)
        else:
            assert isinstance(b, Gather)
            pos = b.index.reshape(-1)
        flat = (flat.reshape(-1, 1) * shape[b.dim] + pos.reshape(1, -1)).reshape(-1)
    return src, flat.reshape(-1).to(tensor.device)


def _run_select(p: Plan, tensor: torch.Tensor) -> torch.Tensor:
    dims = [b for b in p.bound if not isinstance(b, (NewDim, Flag))]
    view_index = tuple(
        slice(b.start, b.stop, b.step) if isinstance(b, BoundRange)
        else slice(b.index, b.index + 1) if isinstance(b, BoundIndex)
        else slice(None)
        for b in dims
    )
    v = tensor[view_index]
    gathers = sorted((b for b in dims if isinstance(b, Gather)),
                     key=lambda g: g.index.numel() / max(p.meta.shape[g.dim], 1))
    for g in gathers:
        v = v.index_select(g.dim, g.index.reshape(-1).to(tensor.device))
    return v.reshape(p.result_shape)


def _run_torch(p: Plan, tensor: torch.Tensor) -> torch.Tensor:
    v = tensor
    flips = [b.dim for b in p.bound if isinstance(b, BoundRange) and b.step < 0]
    if flips:
        # One entry per source dimension (a k-D mask covers k of them).
        pre: list[slice] = [slice(None)] * tensor.ndim
        for b in p.bound:
            if isinstance(b, BoundRange) and b.step < 0:
                pre[b.dim] = (
                    slice(b.start + (b.length - 1) * b.step, b.start + 1, -b.step)
                    if b.length else slice(0, 0)
                )
        v = v[tuple(pre)].flip(flips)
    if any(isinstance(b, Flag) for b in p.bound):
        v = v.view(flagged_shape(p.bound, [None] * len(p.bound), v.shape))
    return v[torch_index(p.meta, p.bound, tensor.device)]


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


_WIDE = frozenset({torch.float64, torch.int64, torch.int32}
                  | {getattr(torch, n) for n in ("uint32", "uint64") if hasattr(torch, n)})
"""Sources whose values float32 cannot hold exactly (integers past 2**24): their statistic
is float64."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in _WIDE else torch.float32


def _statistic(w: torch.Tensor, stat: str, reduce_dims: Sequence[int]) -> torch.Tensor:
    """The statistic of `w` over `reduce_dims` (float32; float64 for `_WIDE` sources)."""
    x = w.to(_acc_dtype(w.dtype))
    if not reduce_dims:
        return x
    out: torch.Tensor = _STAT_FNS[stat](x, tuple(reduce_dims))
    return out


def _execute_threshold(p: Plan, tensor: torch.Tensor, reserve: Reserve) -> list[Payload]:
    """The statistic first (its intermediates reserved, then given back), then the result,
    whose exact size is known from the mask and is checked against the limit and
    reserved before any value is gathered."""
    assert p.base is not None
    thr = next(b for b in p.bound if isinstance(b, BoundThreshold))
    spec, d = thr.spec, thr.dim
    name = p.meta.name
    region = _whole_bytes(p.base)
    reserve.add(region, f"the region a threshold on {name!r} reads")
    w = _materialize(p.base, tensor)
    kept_dims = [b.dim for b in p.bound if not isinstance(b, (BoundIndex, NewDim, Flag))]
    d_w = kept_dims.index(d)
    batch_w = 0 if kept_dims and kept_dims[0] == 0 and d != 0 else None
    reduce_dims = [i for i in range(w.ndim) if i not in (d_w, batch_w)]
    acc = _acc_dtype(w.dtype)
    scratch = w.numel() * acc.itemsize * ((w.dtype != acc) + (spec.stat == "abs_mean"))
    reserve.add(scratch, f"the statistic of a threshold on {name!r}")
    stat = _statistic(w, spec.stat, reduce_dims)  # (B, C) or (C,)
    reserve.drop(scratch)
    passed = _OP_FNS[spec.op](stat, spec.value)
    device = w.device
    out: list[Payload] = []
    copies = 2 if p.result_dtype != w.dtype else 1  # a cast builds the values twice
    if spec.scope in ("any", "all"):
        keep = passed if passed.ndim == 1 else (
            passed.any(0) if spec.scope == "any" else passed.all(0)
        )
        idx = keep.nonzero().reshape(-1)
        shape = list(w.shape)
        shape[d_w] = idx.numel()
        _reserve_result(p, reserve, shape, idx.numel() * 8, copies)
        values = w.index_select(d_w, idx)
        out.append(_dense("values", values, p))
        out.append(ContiguousPayload("indices", idx))
    elif spec.scope == "topk":
        idx = stat.topk(spec.k, dim=-1).indices  # (B, k) or (k,)
        reserve.add(copies * math.prod(p.result_shape) * p.result_dtype.itemsize + idx.nbytes,
                    f"the result of a threshold on {name!r}")
        if idx.ndim == 1:
            values = w.index_select(d_w, idx)
        else:
            moved = w.movedim(d_w, 1)
            rows = torch.arange(moved.shape[0], device=device).reshape(-1, 1)
            values = moved[rows, idx].movedim(1, d_w).contiguous()
        out.append(_dense("values", values, p))
        out.append(ContiguousPayload("indices", idx.contiguous()))
    else:  # per_sample
        kept = int(passed.sum())
        shape = [kept] + [n for i, n in enumerate(w.shape) if i not in (d_w, batch_w)]
        _reserve_result(p, reserve, shape, (kept + passed.shape[0] + 1) * 8, copies)
        reserve.add(kept * 8, f"the sample numbers of a threshold on {name!r}")
        b_idx, p_idx = passed.nonzero(as_tuple=True)
        counts = passed.sum(1)
        offsets = torch.zeros(passed.shape[0] + 1, dtype=torch.int64, device=device)
        offsets[1:] = counts.cumsum(0)
        values = w.movedim(d_w, 1)[b_idx, p_idx]
        out.append(_dense("values", values, p))
        out.append(ContiguousPayload("offsets", offsets))
        out.append(ContiguousPayload("indices", p_idx.contiguous()))
    del w
    reserve.drop(region)  # the region, where it was built, is gone
    return out


def _reserve_result(p: Plan, reserve: Reserve, shape: list[int], index: int, copies: int
                    ) -> None:
    """Check a threshold result's exact size against the limit, then reserve it: before
    any value is gathered."""
    values = math.prod(shape) * p.result_dtype.itemsize
    total = values + index
    if p.limit and total > p.limit:
        raise ResultTooLarge(
            f"result of {total} bytes (values shape {shape}, "
            f"{dtype_name(p.result_dtype)}) exceeds the limit of {p.limit} bytes"
        )
    reserve.add(values * copies + index, f"the result of a threshold on {p.meta.name!r}")


def _dense(name: str, values: torch.Tensor, p: Plan) -> Payload:
    if p.result_dtype != values.dtype:
        values = values.to(p.result_dtype)
    return ContiguousPayload(name, values.contiguous())
