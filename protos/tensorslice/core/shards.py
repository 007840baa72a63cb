"""Sharded tensors: the cluster spec, and a selection split along dimension 0.

A sharded tensor is cut along dimension 0 into pieces, row ranges ``[start, stop)`` each
held by one shard (a server holding those rows under the tensor's name). `split` turns a
selection of the WHOLE tensor into one selection per shard it touches and says how their
results merge; `merge` merges them. Pure: no I/O, no gRPC (the client runs the calls).

What `split` guarantees (the same meaning as one server holding the whole tensor):
- the index is bound as the server binds it (``...`` expanded, PyTorch's count of
  dimensions) and dimension 0 is validated against the whole tensor: a bad integer, list
  entry or mask there names dimension 0 and the whole size, as a local tensor's would;
  the other dimensions are checked by the shards, which hold them whole;
- ranges are cut per piece (any step, a negative one with NumPy's meaning); an integer goes
  to the one piece holding it; index lists and masks on dimension 0 are grouped per piece,
  and advanced indices broadcast together with dimension 0's (VECTORIZED) are sent as the
  flattened positions each piece owns: `merge` scatters them back, so the caller's order
  and duplicates are kept;
- a selection that touches one piece is that piece's answer with no merge copy; a
  selection that touches none still asks one piece (for the result's shape and dtype).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tensorslice.core.errors import (
    InvalidClusterSpec,
    InvalidIndex,
    InvalidSelection,
    SelectionOutOfRange,
)
from tensorslice.core.selection import (
    Combine,
    Full,
    Index,
    Indices,
    Mask,
    Range,
    Selection,
    Selector,
    Threshold,
    bind,
    consumed,
)

__all__ = [
    "ClusterSpec",
    "Part",
    "Piece",
    "Split",
    "merge",
    "split",
]


# ---------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of dimension 0 of a tensor, held by `shard`."""

    shard: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"shard {self.shard!r} (rows [{self.start}, {self.stop}))"


@dataclass(frozen=True)
class ClusterSpec:
    """Shard name -> its addresses (replicas); tensor name -> its pieces, in row order.

    Built by `from_dict`, which validates: every shard has at least one address, every
    piece names a known shard, and each tensor's pieces cover ``[0, rows)`` with no gap
    and no overlap (empty pieces are allowed)."""

    shards: Mapping[str, tuple[str, ...]]
    tensors: Mapping[str, tuple[Piece, ...]]

    @classmethod
    def from_dict(cls, obj: object) -> ClusterSpec:
        if not isinstance(obj, Mapping):
            raise InvalidClusterSpec(
                f"a cluster spec is an object with 'shards' and 'tensors'; got "
                f"{type(obj).__name__}")
        unknown = sorted(set(obj) - {"shards", "tensors"})
        if unknown:
            raise InvalidClusterSpec(
                f"unknown keys in the cluster spec: {', '.join(map(repr, unknown))}; "
                f"expected 'shards' and 'tensors'")
        raw_shards, raw_tensors = obj.get("shards"), obj.get("tensors")
        if not isinstance(raw_shards, Mapping) or not raw_shards:
            raise InvalidClusterSpec(
                "the cluster spec needs 'shards': shard name -> list of addresses")
        shards: dict[str, tuple[str, ...]] = {}
        for name, addrs in raw_shards.items():
            if not isinstance(name, str) or not name:
                raise InvalidClusterSpec(f"a shard name must be a non-empty string; got {name!r}")
            if isinstance(addrs, str):
                addrs = [addrs]
            if not isinstance(addrs, Sequence) or not addrs:
                raise InvalidClusterSpec(
                    f"shard {name!r} has no address; give a list of one or more "
                    f"(HOST:PORT, dns:///NAME:PORT, ipv4:..., unix:...)")
            if not all(isinstance(a, str) and a for a in addrs):
                raise InvalidClusterSpec(
                    f"shard {name!r}: every address must be a non-empty string; got {addrs!r}")
            shards[name] = tuple(addrs)
        if not isinstance(raw_tensors, Mapping) or not raw_tensors:
            raise InvalidClusterSpec(
                "the cluster spec needs 'tensors': tensor name -> list of "
                "{'shard': NAME, 'rows': [START, STOP]}")
        tensors: dict[str, tuple[Piece, ...]] = {}
        for tname, raw in raw_tensors.items():
            if not isinstance(tname, str) or not tname:
                raise InvalidClusterSpec(
                    f"a tensor name must be a non-empty string; got {tname!r}")
            tensors[tname] = _pieces(tname, raw, shards)
        return cls(shards, tensors)

    def pieces(self, tensor: str) -> tuple[Piece, ...]:
        """The pieces of `tensor`, in row order (KeyError if the spec has no such tensor)."""
        return self.tensors[tensor]


def _pieces(tensor: str, raw: object, shards: Mapping[str, object]) -> tuple[Piece, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise InvalidClusterSpec(
            f"tensor {tensor!r}: its pieces are a non-empty list of "
            f"{{'shard': NAME, 'rows': [START, STOP]}}")
    out: list[Piece] = []
    for i, p in enumerate(raw):
        if not (isinstance(p, Mapping) and set(p) == {"shard", "rows"}):
            raise InvalidClusterSpec(
                f"tensor {tensor!r}, piece {i}: expected {{'shard': NAME, 'rows': "
                f"[START, STOP]}}; got {p!r}")
        shard, rows = p["shard"], p["rows"]
        if shard not in shards:
            known = ", ".join(repr(s) for s in shards)
            raise InvalidClusterSpec(
                f"tensor {tensor!r}, piece {i}: unknown shard {shard!r}; the spec's shards "
                f"are {known}")
        if not (isinstance(rows, Sequence) and len(rows) == 2
                and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
                and 0 <= rows[0] <= rows[1]):
            raise InvalidClusterSpec(
                f"tensor {tensor!r}, piece {i} on shard {shard!r}: rows must be "
                f"[START, STOP] with 0 <= START <= STOP; got {rows!r}")
        out.append(Piece(shard, rows[0], rows[1]))
    out.sort(key=lambda p: (p.start, p.stop))
    holder: dict[str, Piece] = {}
    for p in out:
        if p.rows and p.shard in holder:
            q = holder[p.shard]
            raise InvalidClusterSpec(
                f"tensor {tensor!r}: shard {p.shard!r} holds two pieces, rows "
                f"[{q.start}, {q.stop}) and [{p.start}, {p.stop}); a server holds one row "
                f"range of a tensor, under the tensor's name")
        if p.rows:
            holder[p.shard] = p
    covered = 0
    prev: Piece | None = None
    for p in out:
        if p.start > covered:
            after = f"after {prev}" if prev is not None else "before the first piece"
            raise InvalidClusterSpec(
                f"tensor {tensor!r}: rows [{covered}, {p.start}) are held by no shard "
                f"(a gap {after}, before {p})")
        if p.start < covered and p.rows:
            assert prev is not None
            raise InvalidClusterSpec(
                f"tensor {tensor!r}: {prev} and {p} overlap on rows "
                f"[{p.start}, {min(covered, p.stop)})")
        covered = max(covered, p.stop)
        if p.rows:
            prev = p
    return tuple(out)


# ---------------------------------------------------------------------------- split


@dataclass(frozen=True, eq=False)
class Part:
    """What to ask one piece: `selection`, and where its result goes in the merged axis
    (`positions`; None: after the previous part, in order)."""

    piece: int
    selection: Selection
    positions: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class Split:
    """A selection of the whole tensor as per-piece selections. The parts' results are
    merged along `axis` (concatenated in order, or scattered to their positions, of
    `total`), then that axis is reshaped to `block` where given. With `deferred`, the
    selection holds an out-of-range list entry that PyTorch reports only where the result
    has elements: raise it then."""

    parts: tuple[Part, ...]
    axis: int = 0
    total: int = 0
    block: tuple[int, ...] | None = None
    deferred: SelectionOutOfRange | None = field(default=None)

    @property
    def scatter(self) -> bool:
        return any(p.positions is not None for p in self.parts)


class _Dims:
    """Messages naming a dimension as the server names it."""

    def __init__(self, dim_names: Sequence[str]) -> None:
        self.names = tuple(dim_names)

    def __call__(self, d: int) -> str:
        if d < len(self.names) and self.names[d]:
            return f"dimension {d} ({self.names[d]})"
        return f"dimension {d}"


def _check_basic(sel: Selector, d: int, size: int, dims: _Dims) -> None:
    if isinstance(sel, Range) and sel.step == 0:
        raise InvalidSelection(f"slice step cannot be zero (for {dims(d)} of size {size})")
    if isinstance(sel, Index) and not -size <= sel.index < size:
        raise SelectionOutOfRange(
            f"index {sel.index} is out of bounds for {dims(d)} of size {size}")


def _check_mask(m: torch.Tensor, d: int, shape: Sequence[int], dims: _Dims) -> None:
    k = max(m.ndim, 1)
    want = tuple(shape[d : d + k])
    if tuple(m.shape) != want:
        if m.ndim <= 1:
            raise InvalidIndex(
                f"mask of length {m.numel()} does not match {dims(d)} of size {shape[d]}")
        listed = ", ".join(str(x) for x in range(d, d + k))
        raise InvalidIndex(
            f"mask of shape {list(m.shape)} does not match dimensions {listed} "
            f"of shape {list(want)}")


def _rows(values: torch.Tensor, size: int, dims: _Dims) -> tuple[torch.Tensor, str | None]:
    """Index-list entries of dimension 0 made non-negative; the message of the first
    out-of-range entry, if any."""
    v = values.to(torch.int64)
    if not v.numel():
        return v, None
    lo, hi = (int(x) for x in torch.aminmax(v))
    if lo < -size or hi >= size:
        first = int(v[(v < -size) | (v >= size)].reshape(-1)[0])
        return v, f"index {first} is out of bounds for {dims(0)} of size {size}"
    return (torch.where(v < 0, v + size, v) if lo < 0 else v), None


def _owner(rows: torch.Tensor, pieces: Sequence[Piece]) -> torch.Tensor:
    """The piece holding each row (rows already in range)."""
    stops = torch.tensor([p.stop for p in pieces], dtype=torch.int64)
    # The first piece whose stop is past the row: empty pieces are never chosen.
    return torch.searchsorted(stops, rows.contiguous(), right=True)


def _first_holding(pieces: Sequence[Piece]) -> int:
    return next((i for i, p in enumerate(pieces) if p.rows), 0)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _range_parts(start: int, stop: int, step: int, pieces: Sequence[Piece]
                 ) -> list[tuple[int, int, Range]]:
    """(first position in the range's order, piece, local range) for each piece the
    positions ``range(start, stop, step)`` touch."""
    r = range(start, stop, step)
    n = len(r)
    out: list[tuple[int, int, Range]] = []
    for i, p in enumerate(pieces):
        if not p.rows:
            continue
        if step > 0:
            lo, hi = _ceil_div(p.start - start, step), _ceil_div(p.stop - start, step)
        else:
            lo = _ceil_div(start - p.stop + 1, -step)
            hi = _ceil_div(start - p.start + 1, -step)
        lo, hi = min(n, max(0, lo)), min(n, max(0, hi))
        if lo >= hi:
            continue
        sub = r[lo:hi]
        first = sub[0] - p.start
        if len(sub) == 1:
            local = Range(first, first + 1, 1)
        else:
            last = sub[-1] - p.start
            local = Range(first, last + (1 if step > 0 else -1), step)
            if step < 0 and last - 1 < 0:
                local = Range(first, None, step)
        out.append((lo, i, local))
    out.sort()
    return out


def _plain(sel: Selector) -> Selector:
    """A selector as a part sends it: its ``...`` already expanded into ``:``, a mask
    counts the dimensions it consumes."""
    if isinstance(sel, Mask) and sel.counts_as_one:
        return Mask(sel.values)
    return sel


def _kinds(pairs: Sequence[tuple[Selector, int | None]], combine: Combine) -> list[str]:
    """Each bound selector's kind for dimension placement: new, int, basic, adv."""
    out: list[str] = []
    for s, d in pairs:
        if isinstance(s, Mask) and s.values.ndim == 0:
            out.append("adv")  # a flag: a dimension of size 1, indexed
        elif d is None:
            out.append("new")
        elif isinstance(s, Index):
            out.append("int")
        elif isinstance(s, (Indices, Mask)) and combine is Combine.VECTORIZED:
            out.extend(["adv"] * max(consumed(s), 1))
        else:
            out.append("basic")
    return out


def output_axis(kinds: Sequence[str], target: int, block_ndim: int) -> int:
    """The result axis of the `target`-th kind (for an ``adv`` one, the first axis of the
    broadcast block of `block_ndim` dimensions), by PyTorch's placement: integers select
    first; the indexed dimensions' broadcast block stays in place when they are adjacent,
    else goes first."""
    q = -1
    inter: list[int] = []  # intermediate dimension of each kind (-1 for ints)
    for k in kinds:
        if k == "int":
            inter.append(-1)
        else:
            q += 1
            inter.append(q)
    indexed = [inter[i] for i, k in enumerate(kinds) if k == "adv"]
    qt = inter[target]
    if not indexed:
        return qt
    adjacent = indexed == list(range(indexed[0], indexed[0] + len(indexed)))
    if kinds[target] == "adv":
        return indexed[0] if adjacent else 0
    if adjacent:
        return qt if qt < indexed[0] else qt - len(indexed) + block_ndim
    return block_ndim + qt - sum(1 for x in indexed if x < qt)


def split(
    selection: Selection,
    name: str,
    shape: Sequence[int],
    pieces: Sequence[Piece],
    dim_names: Sequence[str] = (),
) -> Split:
    """The per-piece selections of `selection` of the whole tensor `name` of `shape`,
    and how their results merge. Raises the errors the server raises for dimension 0,
    naming the whole size. Thresholds are split by the client (`where`), not here."""
    shape = tuple(shape)
    if not shape:
        raise InvalidSelection(f"tensor {name!r} has no dimension 0 to be sharded along")
    dims = _Dims(dim_names)
    combine = selection.combine
    pairs = bind(name, len(shape), selection.selectors)
    i0 = next(i for i, (_, d) in enumerate(pairs) if d == 0)
    sel0 = pairs[i0][0]
    n = shape[0]

    def with_first(new: Sequence[Selector]) -> Selection:
        sels = ([_plain(s) for s, _ in pairs[:i0]] + list(new)
                + [_plain(s) for s, _ in pairs[i0 + 1:]])
        return Selection(tuple(sels), combine, selection.dtype, selection.max_bytes)

    vectorized = combine is Combine.VECTORIZED
    if vectorized:  # the server reports integers and slices before lists and masks
        for s, d in pairs:
            if d is not None and isinstance(s, (Index, Range)):
                _check_basic(s, d, shape[d], dims)
    else:
        _check_basic(sel0, 0, n, dims)

    if isinstance(sel0, Threshold):
        raise InvalidSelection("a threshold selection is split by `where`, not `split`")
    if isinstance(sel0, Index):
        i = sel0.index + n if sel0.index < 0 else sel0.index
        k = int(_owner(torch.tensor([i]), pieces)[0])
        return Split((Part(k, with_first([Index(i - pieces[k].start)])),))
    kinds = _kinds(pairs, combine)
    target = sum(max(consumed(s), 1) if vectorized and isinstance(s, Mask)
                 and s.values.ndim else 1 for s, _ in pairs[:i0])
    if isinstance(sel0, (Full, Range)):
        start, stop, step = (0, n, 1) if isinstance(sel0, Full) else slice(
            sel0.start, sel0.stop, sel0.step).indices(n)
        cut = _range_parts(start, stop, step, pieces)
        adv = [s for s, _ in pairs if isinstance(s, (Indices, Mask))]
        block_ndim = max((s.values.ndim if isinstance(s, Indices) else 1 for s in adv),
                         default=0)
        axis = output_axis(kinds, target, block_ndim)
        if not cut:
            return Split((Part(_first_holding(pieces), with_first([Range(0, 0, 1)])),), axis)
        return Split(tuple(Part(i, with_first([r])) for _, i, r in cut), axis,
                     len(range(start, stop, step)))

    # An index list or a mask on dimension 0.
    assert isinstance(sel0, (Indices, Mask))
    if isinstance(sel0, Mask):
        _check_mask(sel0.values, 0, shape, dims)
    if not vectorized:
        if sel0.values.ndim != 1:
            raise InvalidSelection(
                f"OUTER combination takes one-dimensional index lists and masks; the one "
                f"on {dims(0)} has {sel0.values.ndim} dimensions")
        if isinstance(sel0, Mask):
            rows = sel0.values.nonzero().reshape(-1)
        else:
            rows, bad = _rows(sel0.values, n, dims)
            if bad is not None:
                raise SelectionOutOfRange(bad)
        axis = output_axis(kinds, target, 0)
        return _scatter(rows, pieces, lambda keep, local: with_first([Indices(local)]),
                        axis, None, None)
    return _split_advanced(selection, pairs, i0, shape, pieces, dims, kinds, target)


def _scatter(
    rows: torch.Tensor,
    pieces: Sequence[Piece],
    make: object,
    axis: int,
    block: tuple[int, ...] | None,
    deferred: SelectionOutOfRange | None,
) -> Split:
    """Parts for the flat `rows` of dimension 0: each piece gets the positions it holds
    (`make(positions, local rows)` builds its selection), merged back by position."""
    assert callable(make)
    total = rows.numel()
    if not total:
        k = _first_holding(pieces)
        return Split((Part(k, make(rows, rows)),), axis, 0, block, deferred)
    owner = _owner(rows, pieces)
    held = torch.unique(owner).tolist()
    if len(held) == 1:
        k = int(held[0])
        local = rows - pieces[k].start
        return Split((Part(k, make(None, local)),), axis, total, block, deferred)
    parts = []
    for k in held:
        pos = (owner == k).nonzero().reshape(-1)
        parts.append(Part(int(k), make(pos, rows[pos] - pieces[int(k)].start), pos))
    return Split(tuple(parts), axis, total, block, deferred)


def _split_advanced(
    selection: Selection,
    pairs: list[tuple[Selector, int | None]],
    i0: int,
    shape: tuple[int, ...],
    pieces: Sequence[Piece],
    dims: _Dims,
    kinds: list[str],
    target: int,
) -> Split:
    """VECTORIZED advanced indexing with dimension 0 indexed: every index list and mask is
    broadcast, flattened, and each piece gets the flat positions whose row it holds."""
    n = shape[0]
    sel0 = pairs[i0][0]
    deferred: SelectionOutOfRange | None = None
    # Every advanced selector as its index tensors (a k-D mask: k lists of its true
    # positions, as PyTorch reads it); masks checked against the tensor's shape first.
    lists: list[list[torch.Tensor] | None] = []
    for s, d in pairs:
        if isinstance(s, Mask) and s.values.ndim == 0:
            lists.append(None)  # a flag stays as it is: it broadcasts as (1,) or (0,)
        elif isinstance(s, Mask):
            assert d is not None
            _check_mask(s.values, d, shape, dims)
            lists.append(list(s.values.nonzero(as_tuple=True)))
        elif isinstance(s, Indices):
            lists.append([s.values])
        else:
            lists.append(None)
    first = lists[i0]
    assert first is not None
    if isinstance(sel0, Indices):
        rows, bad = _rows(first[0], n, dims)
        if bad is not None:
            if n == 0 and rows.numel():
                raise SelectionOutOfRange(bad)
            # PyTorch reports it only where the result has elements: the merge decides.
            deferred = SelectionOutOfRange(bad)
            rows = torch.zeros_like(rows)
        first[0] = rows
    shapes: list[tuple[int, ...]] = []  # as the server lists them
    for (s, _), ts in zip(pairs, lists, strict=True):
        if isinstance(s, Indices):
            shapes.append(tuple(s.values.shape))
        elif isinstance(s, Mask):
            shapes.append((ts[0].numel(),) if ts else (int(bool(s.values)),))
    try:
        block = tuple(torch.broadcast_shapes(*shapes))  # type: ignore[no-untyped-call]
    except RuntimeError:
        listed = ", ".join(str(list(s)) for s in shapes)
        raise InvalidIndex(
            f"shape mismatch: indexing tensors could not be broadcast together with shapes "
            f"{listed}") from None
    flat: list[list[torch.Tensor] | None] = [
        None if ts is None else [t.expand(block).reshape(-1) for t in ts] for ts in lists]
    f0 = flat[i0]
    assert f0 is not None
    rows = f0[0]
    axis = output_axis(kinds, target, 1)

    def make(keep: torch.Tensor | None, local: torch.Tensor) -> Selection:
        sels: list[Selector] = []
        for i, ((s, _), ts) in enumerate(zip(pairs, flat, strict=True)):
            if ts is None:
                sels.append(_plain(s))
                continue
            for j, t in enumerate(ts):
                if i == i0 and j == 0:
                    sels.append(Indices(local))
                else:
                    sels.append(Indices(t if keep is None else t[keep]))
        return Selection(tuple(sels), Combine.VECTORIZED, selection.dtype, selection.max_bytes)

    return _scatter(rows, pieces, make, axis, block, deferred)


# ---------------------------------------------------------------------------- merge


def merge(s: Split, results: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts' results (in `s.parts` order) as the whole selection's result."""
    if len(results) == 1 and not s.scatter:
        out = results[0]
    elif not s.scatter:
        out = torch.cat(list(results), dim=s.axis)
    else:
        first = results[0]
        shape = list(first.shape)
        shape[s.axis] = s.total
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
        for part, r in zip(s.parts, results, strict=True):
            assert part.positions is not None
            out.index_copy_(s.axis, part.positions.to(out.device), r)
    if s.block is not None and (len(s.block) != 1 or out.shape[s.axis] != s.block[0]):
        shape = list(out.shape)
        out = out.reshape(shape[: s.axis] + list(s.block) + shape[s.axis + 1 :])
    return out
