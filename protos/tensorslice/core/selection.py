"""The selection model: what a request selects, independent of gRPC.

Selectors apply to dimensions left to right, as in Python indexing. The same objects are
built by the client from a Python index and by the server from a `SliceRequest`; the
conversion to and from protobuf lives here, in one place.
"""

from __future__ import annotations

import ctypes
import enum
import math
import operator
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from tensorslice.core.errors import (
    InvalidIndex,
    InvalidIndexType,
    InvalidSelection,
    UnconvertibleIndex,
)
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
    "bind",
    "consumed",
    "is_plain",
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
    """Positions (an int64 tensor of any shape), in order, duplicates kept. A list, NumPy
    array or integer tensor is converted."""

    values: torch.Tensor

    def __post_init__(self) -> None:
        if isinstance(self.values, torch.Tensor) and self.values.dtype == torch.int64:
            return
        t = _index_data(self.values)
        if t.dtype in _MASK_DTYPES:
            raise InvalidSelection("Indices takes integer positions; use Mask for bools")
        if t.dtype not in _INDEX_DTYPES:
            raise InvalidSelection(f"Indices takes integer positions; got {t.dtype}")
        object.__setattr__(self, "values", t.to(torch.int64))


@dataclass(frozen=True, eq=False)
class Mask:
    """A bool tensor; a mask of k dimensions consumes k tensor dimensions. A 0-d mask (PyTorch's
    ``x[True]``) consumes none and adds a dimension of size 1 (true) or 0 (false).

    `counts_as_one`: where ``...`` stands for the dimensions the other selectors leave, the
    mask counts as one whatever its dimensions, as PyTorch counts a mask given as a list or
    a NumPy array (``x[np.array(True)]`` on a 0-d tensor is one index too many). A list or
    NumPy array of bools is converted."""

    values: torch.Tensor
    counts_as_one: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.values, torch.Tensor) and self.values.dtype == torch.bool:
            return
        t = _index_data(self.values)
        if t.dtype not in _MASK_DTYPES:
            raise InvalidSelection(f"Mask takes bools; got {t.dtype}")
        object.__setattr__(self, "values", t.to(torch.bool))


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
_SELECTOR_TYPES = (Full, Range, Index, Indices, Mask, Threshold, NewAxis, Ellipsis_)


@dataclass(frozen=True)
class Selection:
    """A whole request apart from the tensor's name."""

    selectors: tuple[Selector, ...] = ()
    combine: Combine = Combine.OUTER
    dtype: str | None = None
    max_bytes: int = 0

    def __post_init__(self) -> None:
        # A Python index may stand for the selectors: Selection(([0, 2], [1, 3]), OUTER).
        combine = Combine(self.combine)
        sels = self.selectors
        if not (isinstance(sels, tuple) and all(isinstance(s, _SELECTOR_TYPES) for s in sels)):
            sels = (outer_selectors(sels) if combine is Combine.OUTER
                    else selectors_from_index(sels))
        object.__setattr__(self, "selectors", sels)
        object.__setattr__(self, "combine", combine)


# ---------------------------------------------------------------------------- Python index
#
# PyTorch's own reading of an index (torch/csrc/autograd/python_variable_indexing.cpp),
# step by step, so that ``remote[idx]`` means what ``local[idx]`` means:
# - a tuple is a tuple; a tensor or a NumPy array is one index; another sequence shorter
#   than 32 that holds a sequence, a tensor, a slice, None or ``...`` is read as a tuple
#   (``x[[[0, 1], [1, 2]]]`` is ``x[[0, 1], [1, 2]]``); anything else is one index;
# - each item: an int (NumPy's included, bools excluded) selects; a slice narrows; a Python
#   bool or a 0-d bool/uint8 tensor adds a dimension of size 1 (True) or 0 (False); a 0-d
#   integer tensor selects; long/int tensors gather, bool/uint8 tensors mask; any other
#   sequence (list, range, NumPy array) becomes a tensor as ``torch.tensor`` makes it (bool
#   and uint8 stay masks, everything else turns into int64, floats truncated); any other
#   object with ``__index__`` selects.

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_INDEX_DTYPES = (torch.int64, torch.int32)
_MASK_DTYPES = (torch.bool, torch.uint8)
_TUPLE_RULE_MAX = 32  # PyTorch reads only sequences shorter than this as tuples


def _is_int(obj: object) -> bool:
    return isinstance(obj, (int, np.integer)) and not isinstance(obj, (bool, np.bool_))


def _is_sequence(obj: object) -> bool:
    """CPython's ``PySequence_Check``, the test PyTorch's index parser applies (it counts
    strings, ranges and NumPy arrays, but not dicts, tensors or NumPy scalars)."""
    return bool(ctypes.pythonapi.PySequence_Check(ctypes.py_object(obj)))


def _int64(value: int, what: str) -> int:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise InvalidSelection(f"{what} {value} does not fit in int64 (overflow)")
    return value


def _short(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_tuple(index: object) -> tuple[object, ...]:
    if isinstance(index, tuple):
        return index
    if isinstance(index, (torch.Tensor, np.ndarray)) or not _is_sequence(index):
        return (index,)
    try:
        n = len(index)  # type: ignore[arg-type]
        if n >= _TUPLE_RULE_MAX:
            return (index,)
        for i in range(n):
            item = index[i]  # type: ignore[index]
            if (isinstance(item, (torch.Tensor, slice)) or item is None or item is Ellipsis
                    or _is_sequence(item)):
                warnings.warn(
                    "a non-tuple sequence used for multidimensional indexing is read as a "
                    "tuple, as PyTorch reads it (and deprecates); use x[tuple(seq)] instead "
                    "of x[seq]", UserWarning, stacklevel=4)
                return tuple(index)  # type: ignore[arg-type]
    except Exception:  # a sequence that fails to enumerate is one index, as in PyTorch
        return (index,)
    return (index,)


def _from_tensor(t: torch.Tensor) -> Selector:
    t = t.detach()
    if t.ndim == 0 and (t.dtype in _MASK_DTYPES):
        return Mask(t.cpu().to(torch.bool))
    if t.ndim == 0 and not (t.dtype.is_floating_point or t.dtype.is_complex):
        return Index(int(t.item()))
    if t.dtype in _MASK_DTYPES:
        return Mask(t.cpu().to(torch.bool))
    if t.dtype in _INDEX_DTYPES:
        return Indices(t.cpu().to(torch.int64))
    raise InvalidIndex(
        f"tensors used as indices must be long, int, byte or bool tensors; got {t.dtype}"
    )


def _tensor_from_data(obj: object) -> torch.Tensor:
    """The index tensor PyTorch makes of a sequence: bool and uint8 data stay masks,
    anything else becomes int64."""
    try:
        t = torch.tensor(obj)
        if t.dtype not in (torch.int64, *_MASK_DTYPES):
            t = torch.tensor(obj, dtype=torch.int64)
    except Exception as exc:
        # PyTorch's indexing first walks the data for its dtype: a string in it, or an item
        # that cannot be read, fails there, before `torch.tensor` would look at shapes.
        exc = _inference_error(obj) or exc
        message = f"cannot use {_short(obj)} as an index: {exc}"
        if isinstance(exc, TypeError):
            raise InvalidIndexType(message) from None
        if isinstance(exc, IndexError):
            raise InvalidIndex(message) from None
        if isinstance(exc, ValueError):
            raise InvalidSelection(message) from None
        raise UnconvertibleIndex(message) from None
    return t


def _index_data(obj: object) -> torch.Tensor:
    """The positions or bools of an `Indices` or `Mask` given as a list, an array or a
    tensor, as a tensor on the host."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    return _tensor_from_data(obj)


def _inference_error(obj: object) -> Exception | None:
    """The error PyTorch's dtype inference meets walking `obj`, if any."""
    if isinstance(obj, (str, bytes)):
        return TypeError(f"new(): invalid data type '{type(obj).__name__}'")
    if isinstance(obj, (np.ndarray, torch.Tensor)) or not _is_sequence(obj):
        return None
    try:
        items = [obj[i] for i in range(len(obj))]  # type: ignore[index, arg-type]
    except Exception as exc:
        return exc
    for item in items:
        err = _inference_error(item)
        if err is not None:
            return err
    return None


def _slice_bound(value: object, name: str) -> int | None:
    if value is None:
        return None
    try:
        i = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidIndexType(
            f"slice indices must be integers or None or have an __index__ method; "
            f"slice {name} is {_short(value)}"
        ) from None
    return min(max(i, -_INT64_MAX), _INT64_MAX)  # what Python's own slices clamp to


def _one(obj: object) -> Selector:
    if isinstance(obj, _SELECTOR_TYPES):
        return obj
    if obj is None:
        return NewAxis()
    if obj is Ellipsis:
        return Ellipsis_()
    if isinstance(obj, bool):
        return Mask(torch.tensor(obj))
    if _is_int(obj):
        return Index(_int64(int(obj), "index"))  # type: ignore[call-overload]
    if isinstance(obj, slice):
        step = _slice_bound(obj.step, "step")
        return Range(_slice_bound(obj.start, "start"), _slice_bound(obj.stop, "stop"), step)
    if isinstance(obj, torch.Tensor):
        return _from_tensor(obj)
    if _is_sequence(obj):
        sel = _from_tensor(_tensor_from_data(obj))
        if isinstance(sel, Mask) and sel.values.ndim != 1:
            return Mask(sel.values, counts_as_one=True)
        return sel
    try:
        i = operator.index(obj)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidIndex(
            f"only integers, slices (`:`), ellipsis (`...`), None, sequences and long, int, "
            f"byte or bool tensors are valid indices; got {type(obj).__name__}"
        ) from None
    return Index(_int64(i, "index"))


def _specified(items: tuple[object, ...]) -> int:
    """PyTorch's count of the dimensions an index specifies, before reading its items: a
    bool or uint8 tensor counts its dimensions, None, ``...`` and bools none, anything else
    one."""
    count = 0
    for item in items:
        if isinstance(item, torch.Tensor):
            count += item.ndim if item.dtype in _MASK_DTYPES else 1
        elif not (item is None or item is Ellipsis or isinstance(item, bool)):
            count += 1
    return count


def selectors_from_index(
    index: object, tensor: tuple[str, int] | None = None
) -> tuple[Selector, ...]:
    """Turn a Python index (what ``x[...]`` receives) into selectors, as PyTorch reads it.
    With `tensor` (its name and number of dimensions), too many indices are reported first,
    before any item is read, as PyTorch does (the server checks again in any case)."""
    plain = _plain(index, tensor)
    if plain is not None:
        return plain
    items = _as_tuple(index)
    single = not isinstance(index, tuple) and (
        index is None or index is Ellipsis or isinstance(index, (bool, slice)) or _is_int(index)
    )
    if tensor is not None and not single:
        name, ndim = tensor
        count = _specified(items)
        if count > ndim:
            raise InvalidIndex(
                f"too many indices for tensor '{name}' of {ndim} dimensions: "
                f"{count} dimensions indexed"
            )
    return tuple(_one(item) for item in items)


def is_plain(item: object) -> bool:
    """An int (not a bool), a slice of ints and None, None or ``...``."""
    t = type(item)
    if t is slice:
        return all(v is None or type(v) is int
                   for v in (item.start, item.stop, item.step))  # type: ignore[attr-defined]
    return t is int or item is None or item is Ellipsis


def _plain(index: object, tensor: tuple[str, int] | None) -> tuple[Selector, ...] | None:
    """The selectors of an index of ints, slices of ints, None and ``...`` (alone or in a
    tuple: what most reads are), read straight, as `selectors_from_index` reads them (too
    many indices in a tuple reported first); None for any other index."""
    if type(index) is tuple:
        if not all(is_plain(item) for item in index):
            return None
        if tensor is not None:
            name, ndim = tensor
            count = sum(1 for item in index if item is not None and item is not Ellipsis)
            if count > ndim:
                raise InvalidIndex(
                    f"too many indices for tensor '{name}' of {ndim} dimensions: "
                    f"{count} dimensions indexed"
                )
        items: tuple[object, ...] = index
    elif is_plain(index):
        items = (index,)
    else:
        return None
    out: list[Selector] = []
    for item in items:
        if type(item) is int:
            out.append(Index(_int64(item, "index")))
        elif type(item) is slice:
            start, stop, step = (None if v is None else min(max(v, -_INT64_MAX), _INT64_MAX)
                                 for v in (item.start, item.stop, item.step))
            out.append(Range(start, stop, step))
        else:
            out.append(NewAxis() if item is None else Ellipsis_())
    return tuple(out)


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
            mask=_pb.Mask(values=m.numpy().tobytes(), shape=list(m.shape), scalar=m.ndim == 0,
                          counts_as_one=sel.counts_as_one)
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
        if msg.mask.scalar:
            if raw.size != 1 or msg.mask.shape:
                raise InvalidSelection(
                    f"selector {pos}: a scalar mask holds one value and no shape; got "
                    f"{raw.size} values and shape {list(msg.mask.shape)}"
                )
            return Mask(torch.tensor(bool(raw[0])), msg.mask.counts_as_one)
        shape = _shape_of(msg.mask.shape, raw.size, "mask", pos)
        return Mask(_bool_view(raw).reshape(shape), msg.mask.counts_as_one)
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


# ---------------------------------------------------------------------------- binding


def consumed(sel: Selector) -> int:
    """The dimensions of the tensor a selector consumes (a mask: its own dimensions)."""
    if isinstance(sel, (NewAxis, Ellipsis_)):
        return 0
    if isinstance(sel, Mask):
        return sel.values.ndim
    return 1


def _counted(sel: Selector) -> int:
    """The dimensions a selector counts for when ``...`` is expanded (PyTorch's count)."""
    if isinstance(sel, Mask) and sel.counts_as_one:
        return 1
    return consumed(sel)


def _whole_slice(sel: Selector) -> bool:
    return isinstance(sel, Full) or (
        isinstance(sel, Range) and sel.start in (None, 0) and sel.stop is None
        and sel.step in (None, 1))


def bind(name: str, ndim: int, selectors: Sequence[Selector]
         ) -> list[tuple[Selector, int | None]]:
    """Each selector with its first dimension (None for those that consume none), the
    ellipses expanded into ``:``. As in PyTorch, each ``...`` stands for the dimensions the
    other selectors leave; a second one then covers dimensions past the last, so
    ``x[..., ...]`` is ``x`` and ``x[..., 0, ...]`` is ``x[..., 0]`` on a 2-D tensor; past
    the last dimension only ``:`` is accepted (and does nothing). The server's planner and
    the sharded client both bind this way."""
    used = sum(_counted(s) for s in selectors)
    if used > ndim:
        raise InvalidIndex(
            f"too many indices for tensor '{name}' of {ndim} dimensions: "
            f"{used} dimensions indexed")
    out: list[tuple[Selector, int | None]] = []
    d = 0
    for s in selectors:
        k = consumed(s)
        if isinstance(s, Ellipsis_):
            for _ in range(ndim - used):
                if d < ndim:
                    out.append((Full(), d))
                d += 1
        elif k == 0 and d <= ndim:
            out.append((s, None))
        elif k and d >= ndim and _whole_slice(s):
            d += 1
        elif d + k > ndim:
            raise InvalidIndex(
                f"too many indices for tensor '{name}' of {ndim} dimensions: "
                f"{d + k} dimensions indexed (with several '...', each stands for "
                f"{ndim - used})")
        else:
            out.append((s, d))
            d += k
    out.extend((Full(), x) for x in range(d, ndim))
    return out
