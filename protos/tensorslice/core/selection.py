"""The selection model: what a request selects, independent of gRPC.

Selectors apply to dimensions left to right, as in Python indexing. The same objects are
built by the client from a Python index and by the server from a `SliceRequest`; the
conversion to and from protobuf lives here, in one place.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from tensorslice.core.errors import InvalidSelection
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = [
    "Combine",
    "Ellipsis_",
    "Full",
    "Index",
    "Indices",
    "Mask",
    "NewAxis",
    "Range",
    "Selection",
    "Selector",
    "Threshold",
    "selection_from_proto",
    "selection_to_proto",
    "selectors_from_index",
]


class Combine(enum.Enum):
    """How several index lists or masks combine."""

    OUTER = "outer"
    """Each acts on its own dimension: ``x[b][:, c]``."""
    VECTORIZED = "vectorized"
    """PyTorch's advanced indexing, broadcasting and dimension placement included."""


@dataclass(frozen=True)
class Full:
    """``:``: the whole dimension."""


@dataclass(frozen=True)
class Range:
    """A Python slice; a negative step has NumPy's meaning."""

    start: int | None = None
    stop: int | None = None
    step: int | None = None


@dataclass(frozen=True)
class Index:
    """One position; drops the dimension."""

    index: int


@dataclass(frozen=True, eq=False)
class Indices:
    """Positions (an int64 tensor of any shape), in order, duplicates kept."""

    values: torch.Tensor


@dataclass(frozen=True, eq=False)
class Mask:
    """A bool tensor; a mask of k dimensions consumes k tensor dimensions."""

    values: torch.Tensor


STATS = ("mean", "max", "min", "sum", "abs_mean", "l2")
OPS = (">", ">=", "<", "<=")
SCOPES = ("any", "all", "per_sample", "topk")


@dataclass(frozen=True)
class Threshold:
    """Keep positions of this dimension whose statistic passes ``op value``."""

    stat: str
    op: str = ">"
    value: float = 0.0
    scope: str = "any"
    over: tuple[int, ...] = ()
    k: int = 0


@dataclass(frozen=True)
class NewAxis:
    """``None``: a new dimension of size 1."""


@dataclass(frozen=True)
class Ellipsis_:
    """``...``: as many ``:`` as the other selectors leave."""


Selector: TypeAlias = Full | Range | Index | Indices | Mask | Threshold | NewAxis | Ellipsis_


@dataclass(frozen=True)
class Selection:
    """A whole request apart from the tensor's name."""

    selectors: tuple[Selector, ...] = ()
    combine: Combine = Combine.OUTER
    dtype: str | None = None
    max_bytes: int = 0


# ---------------------------------------------------------------------------- Python index


def _is_int(obj: object) -> bool:
    return isinstance(obj, (int, np.integer)) and not isinstance(obj, (bool, np.bool_))


def _as_index_tensor(obj: object) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
    else:
        if isinstance(obj, np.ndarray):
            arr = obj
        else:
            try:
                arr = np.asarray(obj)
            except ValueError as exc:  # ragged nested lists
                raise InvalidSelection(f"cannot use {obj!r} as an index: {exc}") from None
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "biu":
            raise InvalidSelection(
                f"tensors used as indices must be long, int, byte or bool tensors; got {arr.dtype}"
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise InvalidSelection(
            f"tensors used as indices must be long, int, byte or bool tensors; got {t.dtype}"
        )
    return t.cpu()


def _one(obj: object) -> Selector:
    if isinstance(obj, (Full, Range, Index, Indices, Mask, Threshold, NewAxis, Ellipsis_)):
        return obj
    if obj is None:
        return NewAxis()
    if obj is Ellipsis:
        return Ellipsis_()
    if isinstance(obj, (bool, np.bool_)):
        raise InvalidSelection("a Python bool as a whole index is not supported; use a mask")
    if _is_int(obj):
        return Index(int(obj))  # type: ignore[call-overload]
    if isinstance(obj, slice):
        parts = []
        for name in ("start", "stop", "step"):
            v = getattr(obj, name)
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point:
                v = int(v.item())
            if v is not None and not _is_int(v):
                raise InvalidSelection(f"slice {name} must be an integer or None; got {v!r}")
            parts.append(None if v is None else int(v))
        return Range(*parts)
    if isinstance(obj, (list, tuple, np.ndarray, torch.Tensor)):
        t = _as_index_tensor(obj)
        if t.dtype in (torch.bool, torch.uint8):
            if t.ndim == 0:
                raise InvalidSelection("a 0-dimensional bool tensor as an index is not supported")
            return Mask(t.to(torch.bool))
        if t.ndim == 0:
            return Index(int(t.item()))
        return Indices(t.to(torch.int64))
    raise InvalidSelection(
        f"only integers, slices, ..., None, lists and integer or bool tensors are valid "
        f"indices; got {type(obj).__name__}"
    )


def selectors_from_index(index: object) -> tuple[Selector, ...]:
    """Turn a Python index (what ``x[...]`` receives) into selectors."""
    items = index if isinstance(index, tuple) else (index,)
    return tuple(_one(item) for item in items)


def outer_selectors(index: object) -> tuple[Selector, ...]:
    """Selectors for orthogonal indexing: each list or mask must be one-dimensional."""
    sels = selectors_from_index(index)
    for pos, sel in enumerate(sels):
        if isinstance(sel, (Indices, Mask)) and sel.values.ndim != 1:
            raise InvalidSelection(
                f"orthogonal indexing takes one-dimensional index lists and masks; "
                f"selector {pos} has {sel.values.ndim} dimensions"
            )
    return sels


# ---------------------------------------------------------------------------- protobuf

_STAT_TO_PB = {
    "mean": _pb.Threshold.MEAN,
    "max": _pb.Threshold.MAX,
    "min": _pb.Threshold.MIN,
    "sum": _pb.Threshold.SUM,
    "abs_mean": _pb.Threshold.ABS_MEAN,
    "l2": _pb.Threshold.L2,
}
_OP_TO_PB = {
    ">": _pb.Threshold.GT,
    ">=": _pb.Threshold.GE,
    "<": _pb.Threshold.LT,
    "<=": _pb.Threshold.LE,
}
_SCOPE_TO_PB = {
    "any": _pb.Threshold.ANY,
    "all": _pb.Threshold.ALL,
    "per_sample": _pb.Threshold.PER_SAMPLE,
    "topk": _pb.Threshold.TOPK,
}
_PB_TO_COMBINE = {_pb.OUTER: Combine.OUTER, _pb.VECTORIZED: Combine.VECTORIZED}
_MAX_DTYPE_CHARS = 64
_MAX_SELECTORS = 1024
_PB_TO_STAT = {v: k for k, v in _STAT_TO_PB.items()}
_PB_TO_OP = {v: k for k, v in _OP_TO_PB.items()}
_PB_TO_SCOPE = {v: k for k, v in _SCOPE_TO_PB.items()}


def _lookup(table: Mapping[str, Any], value: str, what: str, choices: Sequence[str]) -> Any:
    try:
        return table[value]
    except KeyError:
        raise InvalidSelection(
            f"unknown {what} {value!r}; expected one of {', '.join(choices)}"
        ) from None


def _selector_to_proto(sel: Selector) -> _pb.Selector:
    if isinstance(sel, Full):
        return _pb.Selector(full=_pb.Full())
    if isinstance(sel, Range):
        r = _pb.Range()
        if sel.start is not None:
            r.start = sel.start
        if sel.stop is not None:
            r.stop = sel.stop
        if sel.step is not None:
            r.step = sel.step
        return _pb.Selector(range=r)
    if isinstance(sel, Index):
        return _pb.Selector(index=_pb.Index(index=sel.index))
    if isinstance(sel, Indices):
        v = sel.values
        return _pb.Selector(
            indices=_pb.Indices(values=v.reshape(-1).tolist(), shape=list(v.shape))
        )
    if isinstance(sel, Mask):
        m = sel.values.to(torch.bool).contiguous()
        return _pb.Selector(
            mask=_pb.Mask(values=m.numpy().tobytes(), shape=list(m.shape))
        )
    if isinstance(sel, Threshold):
        return _pb.Selector(
            threshold=_pb.Threshold(
                stat=_lookup(_STAT_TO_PB, sel.stat, "statistic", STATS),
                op=_lookup(_OP_TO_PB, sel.op, "comparison", OPS),
                value=float(sel.value),
                scope=_lookup(_SCOPE_TO_PB, sel.scope, "scope", SCOPES),
                over=list(sel.over),
                k=sel.k,
            )
        )
    if isinstance(sel, NewAxis):
        return _pb.Selector(new_axis=_pb.NewAxis())
    if isinstance(sel, Ellipsis_):
        return _pb.Selector(ellipsis=_pb.Ellipsis())
    raise InvalidSelection(f"not a selector: {sel!r}")


def selection_to_proto(tensor: str, selection: Selection) -> _pb.SliceRequest:
    """Build the `SliceRequest` for a selection of one tensor."""
    return _pb.SliceRequest(
        tensor=tensor,
        selectors=[_selector_to_proto(s) for s in selection.selectors],
        combine=(
            _pb.VECTORIZED if selection.combine is Combine.VECTORIZED else _pb.OUTER
        ),
        dtype=selection.dtype or "",
        max_bytes=selection.max_bytes,
    )


_MAX_INDEX_DIMS = 64


def _shape_of(shape: Sequence[int], count: int, what: str, pos: int) -> tuple[int, ...]:
    if not shape:
        return (count,)
    if len(shape) > _MAX_INDEX_DIMS:
        raise InvalidSelection(
            f"selector {pos}: {what} of {len(shape)} dimensions; at most {_MAX_INDEX_DIMS}"
        )
    dims = tuple(int(s) for s in shape)
    # Python integers: a product that would wrap int64 is simply not `count`.
    if any(d < 0 for d in dims) or math.prod(dims) != count:
        shown = str(list(dims)) if len(dims) <= 8 else f"{list(dims[:8])}..."
        raise InvalidSelection(
            f"selector {pos}: {what} shape {shown} does not hold its {count} values"
        )
    return dims


def _bool_view(raw: np.ndarray[Any, Any]) -> torch.Tensor:
    """Mask bytes already checked to be 0 or 1, as a bool tensor sharing their memory (a
    request's mask is read, never written: no copy, whatever its size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the buffer is read-only
        return torch.from_numpy(raw.view(np.bool_))


def _selector_from_proto(msg: _pb.Selector, pos: int) -> Selector:
    kind = msg.WhichOneof("kind")
    if kind == "full":
        return Full()
    if kind == "range":
        r = msg.range
        return Range(
            r.start if r.HasField("start") else None,
            r.stop if r.HasField("stop") else None,
            r.step if r.HasField("step") else None,
        )
    if kind == "index":
        return Index(msg.index.index)
    if kind == "indices":
        listed = msg.indices.values
        values = np.fromiter(listed, dtype=np.int64, count=len(listed))  # no list between
        shape = _shape_of(msg.indices.shape, values.size, "index list", pos)
        return Indices(torch.from_numpy(values).reshape(shape))
    if kind == "mask":
        raw = np.frombuffer(msg.mask.values, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidSelection(f"selector {pos}: mask values must be 0 or 1")
        shape = _shape_of(msg.mask.shape, raw.size, "mask", pos)
        return Mask(_bool_view(raw).reshape(shape))
    if kind == "threshold":
        t = msg.threshold
        if t.stat not in _PB_TO_STAT:
            raise InvalidSelection(f"selector {pos}: unknown statistic {t.stat}")
        if t.op not in _PB_TO_OP:
            raise InvalidSelection(f"selector {pos}: unknown comparison {t.op}")
        if t.scope not in _PB_TO_SCOPE:
            raise InvalidSelection(f"selector {pos}: unknown scope {t.scope}")
        return Threshold(
            stat=_PB_TO_STAT[t.stat],
            op=_PB_TO_OP[t.op],
            value=t.value,
            scope=_PB_TO_SCOPE[t.scope],
            over=tuple(t.over),
            k=t.k,
        )
    if kind == "new_axis":
        return NewAxis()
    if kind == "ellipsis":
        return Ellipsis_()
    raise InvalidSelection(f"selector {pos} is empty")


def selection_from_proto(req: _pb.SliceRequest) -> Selection:
    """The selection a `SliceRequest` carries; malformed content raises InvalidSelection."""
    if req.max_bytes < 0:
        raise InvalidSelection(f"max_bytes must not be negative; got {req.max_bytes}")
    if req.combine not in _PB_TO_COMBINE:
        raise InvalidSelection(
            f"unknown combine {req.combine}; expected OUTER (0) or VECTORIZED (1)"
        )
    if len(req.dtype) > _MAX_DTYPE_CHARS:
        raise InvalidSelection(
            f"unknown dtype of {len(req.dtype)} characters; a dtype is a name such as "
            f"'float16'"
        )
    if len(req.selectors) > _MAX_SELECTORS:
        raise InvalidSelection(
            f"{len(req.selectors)} selectors; at most {_MAX_SELECTORS} (one per dimension, "
            f"and new axes)"
        )
    return Selection(
        selectors=tuple(_selector_from_proto(s, i) for i, s in enumerate(req.selectors)),
        combine=_PB_TO_COMBINE[req.combine],
        dtype=req.dtype or None,
        max_bytes=req.max_bytes,
    )
