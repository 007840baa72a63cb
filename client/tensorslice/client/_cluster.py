"""Sharded tensors: `ClusterClient` (and `AsyncClusterClient`) over a cluster spec, and
`ShardedTensor` (`AsyncShardedTensor`), which indexes the whole tensor like a
`RemoteTensor` while its rows live on several servers.

    with ClusterClient("cluster.json", timeout=30) as cc:
        acts = cc.tensor("acts")           # the whole tensor: shape, dtype
        acts[[5, 3000, 5], :, 2:4]         # split per shard, asked in parallel, merged

Splitting and merging are `tensorslice.core.shards` (pure). What to ask the shards, and how
to combine their answers, is written once, as flows (generators that yield an `Ask`: calls
to make on some shards, all at once, and receive their results); the sync client performs
an `Ask` with one `Client` per shard on a thread pool (one thread per shard, made per
process), the async client with one `AsyncClient` per shard and `asyncio.gather`. A result
is built only once every shard asked has answered: a shard that fails fails the whole
call, naming the shard and its rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine, Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from tensorslice.client._async import AsyncClient
from tensorslice.client._base import DEFAULT, BaseRemoteTensor, Explainer, Indexer, Timeout
from tensorslice.client._client import Client
from tensorslice.core.errors import (
    DeadlineExceeded,
    InvalidClusterSpec,
    InvalidSelection,
    NotSupportedAcrossShards,
    ServerUnavailable,
    TensorNotFound,
)
from tensorslice.core.results import SlicePlan, TensorInfo, WhereResult
from tensorslice.core.selection import Combine, Full, Indices, Selection, Threshold, bind
from tensorslice.core.shards import ClusterSpec, Piece, Split, merge, split

__all__ = [
    "AsyncClusterClient",
    "AsyncShardedTensor",
    "ClusterClient",
    "ShardedPlan",
    "ShardedTensor",
    "load_spec",
]

R = TypeVar("R")


def load_spec(spec: ClusterSpec | Mapping[str, Any] | str | os.PathLike[str]) -> ClusterSpec:
    """A validated `ClusterSpec` from a spec, a dict, or a JSON file (YAML for ``.yaml`` /
    ``.yml`` where PyYAML is installed)."""
    if isinstance(spec, ClusterSpec):
        return spec
    if isinstance(spec, Mapping):
        return ClusterSpec.from_dict(spec)
    path = Path(spec)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidClusterSpec(f"cannot read the cluster spec {str(path)!r}: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise InvalidClusterSpec(
                f"{str(path)!r} is YAML, and PyYAML is not installed: install it "
                f"(pip install pyyaml) or write the spec as JSON") from None
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidClusterSpec(f"{str(path)!r} is not valid YAML: {exc}") from None
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidClusterSpec(f"{str(path)!r} is not valid JSON: {exc}") from None
    return ClusterSpec.from_dict(obj)


@dataclass(frozen=True)
class ShardedPlan:
    """What a sharded request would do: each piece it asks, with that shard's plan, and how
    the parts merge (``one shard, its result as is``, ``concatenated along ...``...)."""

    parts: tuple[tuple[Piece, SlicePlan], ...]
    merge: str

    def __str__(self) -> str:
        lines = [f"{len(self.parts)} shard(s); {self.merge}"]
        lines += [f"  {piece}: {plan.summary}" for piece, plan in self.parts]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- flows


@dataclass(frozen=True)
class Call:
    """One call of a shard's client: ``getattr(client, method)(*args, **kwargs)``."""

    method: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ask:
    """Calls to make, each on its piece's shard, all at once; the flow receives their
    results in order, or the first failure (in order) once all have finished."""

    tensor: str
    jobs: tuple[tuple[Piece, Call], ...]


Flow = Generator[Ask, list[Any], R]


def _ask_one(tensor: str, jobs: Sequence[tuple[Piece, Call]]) -> Ask:
    return Ask(tensor, tuple(jobs))


def _shard_error(spec: ClusterSpec, tensor: str, piece: Piece, exc: Exception) -> Exception:
    """A transport failure of a shard, as the same class naming the shard and its rows."""
    if isinstance(exc, (ServerUnavailable, DeadlineExceeded)):
        addrs = ", ".join(spec.shards[piece.shard])
        return type(exc)(f"{piece} of {tensor!r} at {addrs}: {exc}")
    return exc


class _ClusterBase:
    """The spec, the per-shard clients, the open tensors; the flows both drivers run."""

    clients: Mapping[str, Client | AsyncClient]

    def __init__(self, spec: ClusterSpec | Mapping[str, Any] | str | os.PathLike[str]) -> None:
        self.spec = load_spec(spec)
        self._infos: dict[str, tuple[TensorInfo, tuple[TensorInfo | None, ...]]] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shards={list(self.spec.shards)}, "
                f"tensors={list(self.spec.tensors)})")

    @staticmethod
    def _address(addrs: tuple[str, ...]) -> Any:
        return addrs[0] if len(addrs) == 1 else list(addrs)

    def _pieces(self, name: str) -> tuple[Piece, ...]:
        try:
            return self.spec.pieces(name)
        except KeyError:
            known = ", ".join(repr(t) for t in self.spec.tensors)
            raise TensorNotFound(
                f"tensor {name!r} is not in the cluster spec; its tensors are {known}"
            ) from None

    def _open_flow(self, name: str, timeout: Timeout
                   ) -> Flow[tuple[TensorInfo, tuple[TensorInfo | None, ...]]]:
        pieces = self._pieces(name)
        held = [p for p in pieces if p.rows] or [pieces[0]]
        got: list[TensorInfo] = yield _ask_one(
            name, [(p, Call("describe", (name,), {"timeout": timeout})) for p in held])
        by_piece = dict(zip(held, got, strict=True))
        first_p, first = held[0], got[0]
        for p, info in by_piece.items():
            if not info.shape:
                raise InvalidClusterSpec(
                    f"{p} holds {name!r} as a 0-dimensional tensor; a sharded tensor is cut "
                    f"along dimension 0")
            if info.shape[0] != p.rows:
                raise InvalidClusterSpec(
                    f"{p} holds {info.shape[0]} rows of {name!r}; the spec gives it "
                    f"{p.rows}")
            if info.dtype != first.dtype:
                raise InvalidClusterSpec(
                    f"shards disagree on the dtype of {name!r}: {first_p} holds "
                    f"{first.dtype}, {p} holds {info.dtype}")
            if tuple(info.shape[1:]) != tuple(first.shape[1:]):
                raise InvalidClusterSpec(
                    f"shards disagree on the trailing shape of {name!r}: {first_p} holds "
                    f"{list(first.shape[1:])}, {p} holds {list(info.shape[1:])}")
        shape = (pieces[-1].stop, *first.shape[1:])
        whole = replace(first, shape=shape, version=0,
                        nbytes=torch.Size(shape).numel() * first.dtype.itemsize)
        infos = tuple(by_piece.get(p) for p in pieces)
        self._infos[name] = (whole, infos)
        return whole, infos

    def _cached_flow(self, name: str) -> Flow[tuple[TensorInfo, tuple[TensorInfo | None, ...]]]:
        if name in self._infos:
            return self._infos[name]
        return (yield from self._open_flow(name, DEFAULT))

    def _slice_many_flow(
        self, items: Mapping[str, tuple[str, object]], max_bytes: int, share_memory: bool,
        timeout: Timeout,
    ) -> Flow[dict[str, torch.Tensor]]:
        if not items:
            raise InvalidSelection("slice_many needs at least one item")
        out: dict[str, torch.Tensor] = {}
        plans: dict[str, tuple[_Sharded, Split]] = {}
        per_shard: dict[str, dict[str, tuple[str, object]]] = {}
        piece_of: dict[str, Piece] = {}
        for key, item in items.items():
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise InvalidSelection(
                    f"slice_many: item {key!r} must be (tensor name, index or Selection); "
                    f"got {item!r}")
            name, index = item
            whole, infos = yield from self._cached_flow(name)
            t = _Sharded(self, whole, self._pieces(name), infos)
            sel = t._selection(index)
            if any(isinstance(s, Threshold) for s in sel.selectors):
                got = yield from t._threshold_flow(sel, timeout)
                out[key] = got["values"]
                out.update({f"{key}.{k}": v for k, v in got.items() if k != "values"})
                continue
            s = t._split(sel)
            plans[key] = (t, s)
            for j, part in enumerate(s.parts):
                piece = t.pieces[part.piece]
                per_shard.setdefault(piece.shard, {})[f"{key}\x00{j}"] = (name, part.selection)
                piece_of[piece.shard] = piece
        if per_shard:
            results: list[dict[str, torch.Tensor]] = yield _ask_one(
                ", ".join(sorted({n for n, _ in items.values()})),
                [(piece_of[sh], Call("slice_many", (batch,), {
                    "max_bytes": max_bytes, "share_memory": share_memory, "timeout": timeout}))
                 for sh, batch in per_shard.items()])
            got_all: dict[str, torch.Tensor] = {}
            for r in results:
                got_all.update(r)
            for key, (t, s) in plans.items():
                out[key] = t._finish(s, [got_all[f"{key}\x00{j}"] for j in range(len(s.parts))])
        return {key: out[key] for key in _ordered(items, out)}

    def _explain_flow(self, name: str, selection: object, timeout: Timeout
                      ) -> Flow[ShardedPlan]:
        whole, infos = yield from self._cached_flow(name)
        t = _Sharded(self, whole, self._pieces(name), infos)
        return (yield from t._explain_flow(t._selection(selection), timeout))


def _ordered(items: Mapping[str, object], out: Mapping[str, torch.Tensor]) -> list[str]:
    """The result's keys: each item's, in the caller's order, each followed by its extras."""
    keys: list[str] = []
    for key in items:
        keys.append(key)
        keys += [k for k in (f"{key}.indices", f"{key}.offsets") if k in out]
    return keys


def _merge_note(s: Split) -> str:
    if len(s.parts) == 1 and not s.scatter:
        return "one shard, its result as is"
    how = "scattered to their positions" if s.scatter else "concatenated"
    block = f", then shaped {list(s.block)}" if s.block is not None and len(s.block) != 1 else ""
    return f"{how} along result axis {s.axis} (dimension 0 of the whole){block}"


class _Sharded(BaseRemoteTensor[Any]):
    """Metadata, selections and the flows of a sharded tensor; `ShardedTensor` and
    `AsyncShardedTensor` drive them."""

    def __init__(self, client: Any, info: TensorInfo, pieces: tuple[Piece, ...],
                 piece_infos: tuple[TensorInfo | None, ...]) -> None:
        super().__init__(client, info)
        self.pieces = pieces
        self.piece_infos = piece_infos
        self._versions: tuple[int, ...] | None = None  # pinned per piece

    def _pinned_all(self) -> Any:
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out._versions = tuple(0 if i is None else i.version for i in self.piece_infos)
        return out

    def _selection(self, index: object) -> Selection:
        if isinstance(index, Selection):
            return index
        return self._sel(index, Combine.VECTORIZED)

    def _split(self, selection: Selection) -> Split:
        return split(selection, self.name, self.info.shape, self.pieces, self.info.dim_names)

    def _version(self, piece: int) -> int:
        return 0 if self._versions is None else self._versions[piece]

    def _ask(self, parts: Sequence[tuple[int, Selection]], timeout: Timeout) -> Ask:
        return _ask_one(self.name, [
            (self.pieces[i], Call("slice", (self.name, sel),
                                  {"version": self._version(i), "timeout": timeout}))
            for i, sel in parts])

    @staticmethod
    def _finish(s: Split, results: Sequence[torch.Tensor]) -> torch.Tensor:
        out = merge(s, results)
        if s.deferred is not None and out.numel():
            raise s.deferred
        return out

    def _slice_flow(self, selection: object, timeout: Timeout) -> Flow[dict[str, torch.Tensor]]:
        sel = self._selection(selection)
        if any(isinstance(x, Threshold) for x in sel.selectors):
            return (yield from self._threshold_flow(sel, timeout))
        s = self._split(sel)
        got = yield self._ask([(p.piece, p.selection) for p in s.parts], timeout)
        return {"values": self._finish(s, [g["values"] for g in got])}

    def _explain_flow(self, sel: Selection, timeout: Timeout) -> Flow[ShardedPlan]:
        if any(isinstance(x, Threshold) for x in sel.selectors):
            parts, note = self._threshold_parts(sel)
        else:
            s = self._split(sel)
            parts = [(p.piece, p.selection) for p in s.parts]
            note = _merge_note(s)
        plans: list[SlicePlan] = yield _ask_one(self.name, [
            (self.pieces[i], Call("explain", (self.name, x), {"timeout": timeout}))
            for i, x in parts])
        return ShardedPlan(tuple((self.pieces[i], p)
                                 for (i, _), p in zip(parts, plans, strict=True)), note)

    # ------------------------------------------------------------------ thresholds
    def _base(self, sel: Selection) -> tuple[Selection, int, int, Threshold]:
        """The selection bound (ellipses expanded) with its threshold's dimension whole;
        the threshold's position, dimension and itself."""
        pairs = bind(self.name, self.ndim, sel.selectors)
        found = [(i, d, s) for i, (s, d) in enumerate(pairs) if isinstance(s, Threshold)]
        if len(found) != 1:
            raise InvalidSelection(f"at most one threshold per request; got {len(found)}")
        i, d, thr = found[0]
        assert d is not None
        sels = tuple(Full() if j == i else s for j, (s, _) in enumerate(pairs))
        return replace(sel, selectors=sels), i, d, thr

    def _threshold_parts(self, sel: Selection) -> tuple[list[tuple[int, Selection]], str]:
        """The per-piece threshold requests (the first round, for any/all) and a note on
        the merge."""
        base, i, d, thr = self._base(sel)
        if d == 0:
            held = [j for j, p in enumerate(self.pieces) if p.rows] or [0]
            if len(held) > 1 and thr.scope == "topk":
                raise NotSupportedAcrossShards(
                    f"scope topk over dimension 0 of the sharded tensor {self.name!r} needs "
                    f"one ranking of all {self.info.shape[0]} rows, which no shard has; "
                    f"use any or all (each row's own statistic decides), or ask each shard")
            return [(j, sel) for j in held], "each shard's kept rows, concatenated in row order"
        s = self._split(base)

        def put_back(x: Selection) -> Selection:
            sels = list(x.selectors)
            sels[i] = thr
            return replace(x, selectors=tuple(sels))

        parts = [(p.piece, put_back(p.selection)) for p in s.parts]
        if len(parts) == 1:
            return parts, "one shard, its result as is"
        note = {
            "topk": "per sample: each shard's samples, merged along dimension 0",
            "per_sample": "per sample: the jagged parts interleaved in sample order",
        }.get(thr.scope, f"the shards' kept positions combined ({thr.scope}: "
                         f"{'union' if thr.scope == 'any' else 'intersection'}), then those "
                         f"positions read from every shard")
        return parts, note

    def _threshold_flow(self, sel: Selection, timeout: Timeout
                        ) -> Flow[dict[str, torch.Tensor]]:
        parts, _ = self._threshold_parts(sel)
        got: list[dict[str, torch.Tensor]] = yield self._ask(parts, timeout)
        base, i, d, thr = self._base(sel)
        if d == 0:
            if len(got) == 1:
                start = self.pieces[parts[0][0]].start
                return {**got[0], "indices": got[0]["indices"] + start} if start else got[0]
            return {
                "values": torch.cat([g["values"] for g in got], 0),
                "indices": torch.cat([g["indices"] + self.pieces[j].start
                                      for (j, _), g in zip(parts, got, strict=True)]),
            }
        if len(got) == 1:
            return got[0]
        s = self._split(base)
        if thr.scope == "topk":
            return {"values": merge(s, [g["values"] for g in got]),
                    "indices": merge(s, [g["indices"] for g in got])}
        if thr.scope == "per_sample":
            return _merge_jagged(s, got)
        kept = [g["indices"].cpu() for g in got]
        if thr.scope == "any":
            keep = torch.unique(torch.cat(kept))
        else:
            keep = kept[0]
            for k in kept[1:]:
                keep = keep[torch.isin(keep, k)]
        sels = list(base.selectors)
        sels[i] = Indices(keep)
        second = yield from self._slice_flow(
            replace(base, selectors=tuple(sels), combine=Combine.OUTER), timeout)
        return {"values": second["values"], "indices": keep.to(got[0]["indices"].device)}


def _merge_jagged(s: Split, got: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample (jagged) parts interleaved back into the whole batch's sample order."""
    counts = [g["offsets"].numel() - 1 for g in got]
    total = s.total if s.scatter else sum(counts)
    where: list[torch.Tensor] = []  # each part's samples' positions in the whole batch
    at = 0
    for part, c in zip(s.parts, counts, strict=True):
        where.append(part.positions if part.positions is not None
                     else torch.arange(at, at + c, dtype=torch.int64))
        at += c
    lengths = torch.zeros(total, dtype=torch.int64)
    for pos, g in zip(where, got, strict=True):
        lengths[pos] = g["offsets"].cpu().diff()
    offsets = torch.zeros(total + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    first = got[0]["values"]
    n = int(offsets[-1])
    values = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
    indices = torch.empty(n, dtype=torch.int64, device=got[0]["indices"].device)
    for pos, g in zip(where, got, strict=True):
        off = g["offsets"].cpu()
        seg = torch.repeat_interleave(torch.arange(pos.numel()), off.diff())
        dest = offsets[pos][seg] + torch.arange(seg.numel()) - off[:-1][seg]
        values.index_copy_(0, dest.to(values.device), g["values"])
        indices.index_copy_(0, dest.to(indices.device), g["indices"])
    return {"values": values, "offsets": offsets.to(got[0]["offsets"].device),
            "indices": indices}


# ---------------------------------------------------------------------------- sync


class ClusterClient(_ClusterBase):
    """Tensors whose rows are spread over several tensorslice servers (a cluster spec:
    a path to a JSON or YAML file, a dict, or a `ClusterSpec`; see the README's "Sharded
    tensors"). One `Client` per shard, made with `client_kwargs` (``timeout=``,
    ``token=``, ``tls=``...); a shard with several addresses gets one `Client` over the
    list of its replicas. Safe to pickle (DataLoader workers): the thread pool is made
    per process."""

    clients: dict[str, Client]

    def __init__(self, spec: ClusterSpec | Mapping[str, Any] | str | os.PathLike[str],
                 **client_kwargs: Any) -> None:
        super().__init__(spec)
        self.clients = {shard: Client(self._address(addrs), **client_kwargs)
                        for shard, addrs in self.spec.shards.items()}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        with self._lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.shutdown(wait=False)
            self._pool = None

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"], state["_pool_pid"], state["_lock"] = None, 0, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ driving flows
    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                # One per process: a pool inherited across fork has no threads.
                self._pool = ThreadPoolExecutor(max_workers=len(self.clients),
                                                thread_name_prefix="tensorslice-shard")
                self._pool_pid = os.getpid()
            return self._pool

    def _perform(self, ask: Ask) -> list[Any]:
        def run(piece: Piece, call: Call) -> Any:
            try:
                return getattr(self.clients[piece.shard], call.method)(*call.args,
                                                                       **call.kwargs)
            except Exception as exc:
                raise _shard_error(self.spec, ask.tensor, piece, exc) from None

        if len(ask.jobs) == 1:
            return [run(*ask.jobs[0])]
        pool = self._executor()
        futures: list[Future[Any]] = [pool.submit(run, p, c) for p, c in ask.jobs]
        errors = [f.exception() for f in futures]  # waits for every one
        for e in errors:
            if e is not None:
                raise e
        return [f.result() for f in futures]

    def _drive(self, flow: Flow[R]) -> R:
        outcome: Any = None
        error: Exception | None = None
        while True:
            try:
                ask = flow.send(outcome) if error is None else flow.throw(error)
            except StopIteration as done:
                result: R = done.value
                return result
            outcome, error = None, None
            try:
                outcome = self._perform(ask)
            except Exception as exc:
                error = exc

    # ------------------------------------------------------------------ API
    def describe(self, name: str, *, timeout: Timeout = DEFAULT) -> TensorInfo:
        """The whole tensor's metadata, after checking every shard that holds rows of it:
        each holds the rows the spec says, and all agree on dtype and trailing shape."""
        return self._drive(self._open_flow(name, timeout))[0]

    def tensor(self, name: str, *, timeout: Timeout = DEFAULT) -> ShardedTensor:
        """A handle that indexes the whole sharded tensor like a local one."""
        whole, infos = self._drive(self._open_flow(name, timeout))
        return ShardedTensor(self, whole, self._pieces(name), infos)

    def slice(self, name: str, selection: object, *, timeout: Timeout = DEFAULT
              ) -> dict[str, torch.Tensor]:
        """As `Client.slice`, over the whole sharded tensor."""
        whole, infos = self._drive(self._cached_flow(name))
        t = ShardedTensor(self, whole, self._pieces(name), infos)
        return self._drive(t._slice_flow(selection, timeout))

    def slice_many(
        self,
        items: Mapping[str, tuple[str, object]],
        *,
        max_bytes: int = 0,
        share_memory: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> dict[str, torch.Tensor]:
        """As `Client.slice_many`: ``{key: (tensor name, index or Selection)}`` gives
        ``{key: tensor}``. Each shard is asked once (one `slice_many` call holding every
        item's part on it), all shards in parallel; `max_bytes` bounds each shard's call.
        Threshold items are answered by `where`'s merge, one at a time."""
        return self._drive(self._slice_many_flow(items, max_bytes, share_memory, timeout))

    def explain(self, name: str, selection: object, *, timeout: Timeout = DEFAULT
                ) -> ShardedPlan:
        """The per-shard plans of a selection of the whole tensor; nothing is executed."""
        return self._drive(self._explain_flow(name, selection, timeout))


class ShardedTensor(_Sharded):
    """A tensor whose rows (dimension 0) are held by several servers; it indexes like a
    `RemoteTensor`: ``t[idx]``, ``t.oindex[idx]``, ``t.select(...)``, ``t.where(...)``,
    ``t.explain[idx]`` (the per-shard plans), ``t.astype(...)``, ``t.at_version()``."""

    client: ClusterClient

    def astype(self, dtype: str | torch.dtype, *, max_bytes: int | None = None
               ) -> ShardedTensor:
        """The same tensor whose results the shards cast to `dtype`."""
        cast: ShardedTensor = self._cast(dtype, max_bytes)
        return cast

    def at_version(self) -> ShardedTensor:
        """This tensor pinned to the version each shard described when the handle was
        made: every read returns those versions' data, or raises `VersionGone`."""
        pinned: ShardedTensor = self._pinned_all()
        return pinned

    def _values(self, selection: Selection) -> torch.Tensor:
        return self.client._drive(self._slice_flow(selection, DEFAULT))["values"]

    def __getitem__(self, index: object) -> torch.Tensor:
        return self._values(self._sel(index, Combine.VECTORIZED))

    @property
    def oindex(self) -> Indexer[torch.Tensor]:
        """``t.oindex[idx]``: index lists and masks combine orthogonally."""
        return Indexer(lambda idx: self._values(self._sel(idx, Combine.OUTER)))

    def fetch(self) -> torch.Tensor:
        """The whole tensor."""
        return self._values(self._sel((), Combine.VECTORIZED))

    def select(self, **by_name: object) -> torch.Tensor:
        """Orthogonal selection by dimension name."""
        return self._values(self._by_name(by_name))

    def where(
        self,
        dim: int | str,
        stat: str,
        *,
        over: Sequence[int | str] = (),
        op: str = ">",
        value: float = 0.0,
        scope: str = "any",
        k: int = 0,
        index: Sequence[object] = (),
    ) -> WhereResult:
        """As `RemoteTensor.where`, over the whole tensor (the README's "Sharded tensors"
        says how each scope merges; ``topk`` over dimension 0 across shards raises
        `NotSupportedAcrossShards`)."""
        sel = self._threshold(dim, stat, over, op, value, scope, k, index)
        out = self.client._drive(self._threshold_flow(sel, DEFAULT))
        return WhereResult(out["values"], out["indices"], out.get("offsets"))

    @property
    def explain(self) -> Explainer[ShardedPlan]:
        """``t.explain[idx]`` (and ``.oindex``, ``.select``, ``.where``): the plan of each
        shard the request would ask, and how their results merge; nothing executed."""
        return Explainer(self, lambda sel: self.client._drive(self._explain_flow(sel, DEFAULT)))


# ---------------------------------------------------------------------------- async


class AsyncClusterClient(_ClusterBase):
    """`ClusterClient` over `AsyncClient`s: every call is a coroutine, the shards a call
    needs are asked concurrently (`asyncio.gather`)."""

    clients: dict[str, AsyncClient]

    def __init__(self, spec: ClusterSpec | Mapping[str, Any] | str | os.PathLike[str],
                 **client_kwargs: Any) -> None:
        super().__init__(spec)
        self.clients = {shard: AsyncClient(self._address(addrs), **client_kwargs)
                        for shard, addrs in self.spec.shards.items()}

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()

    async def __aenter__(self) -> AsyncClusterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _perform(self, ask: Ask) -> list[Any]:
        async def run(piece: Piece, call: Call) -> Any:
            try:
                return await getattr(self.clients[piece.shard], call.method)(
                    *call.args, **call.kwargs)
            except Exception as exc:
                raise _shard_error(self.spec, ask.tensor, piece, exc) from None

        got = await asyncio.gather(*(run(p, c) for p, c in ask.jobs), return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException):
                raise g
        return list(got)

    async def _drive(self, flow: Flow[R]) -> R:
        outcome: Any = None
        error: Exception | None = None
        while True:
            try:
                ask = flow.send(outcome) if error is None else flow.throw(error)
            except StopIteration as done:
                result: R = done.value
                return result
            outcome, error = None, None
            try:
                outcome = await self._perform(ask)
            except Exception as exc:
                error = exc

    async def describe(self, name: str, *, timeout: Timeout = DEFAULT) -> TensorInfo:
        """As `ClusterClient.describe`."""
        return (await self._drive(self._open_flow(name, timeout)))[0]

    async def tensor(self, name: str, *, timeout: Timeout = DEFAULT) -> AsyncShardedTensor:
        """As `ClusterClient.tensor`: ``await t[idx]``."""
        whole, infos = await self._drive(self._open_flow(name, timeout))
        return AsyncShardedTensor(self, whole, self._pieces(name), infos)

    async def slice(self, name: str, selection: object, *, timeout: Timeout = DEFAULT
                    ) -> dict[str, torch.Tensor]:
        """As `ClusterClient.slice`."""
        whole, infos = await self._drive(self._cached_flow(name))
        t = AsyncShardedTensor(self, whole, self._pieces(name), infos)
        return await self._drive(t._slice_flow(selection, timeout))

    async def slice_many(
        self,
        items: Mapping[str, tuple[str, object]],
        *,
        max_bytes: int = 0,
        share_memory: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> dict[str, torch.Tensor]:
        """As `ClusterClient.slice_many`."""
        return await self._drive(self._slice_many_flow(items, max_bytes, share_memory,
                                                       timeout))

    async def explain(self, name: str, selection: object, *, timeout: Timeout = DEFAULT
                      ) -> ShardedPlan:
        """As `ClusterClient.explain`."""
        return await self._drive(self._explain_flow(name, selection, timeout))


class AsyncShardedTensor(_Sharded):
    """`ShardedTensor` for `AsyncClusterClient`: every access returns a coroutine
    (``await t[idx]``); an index is validated when the coroutine is made."""

    client: AsyncClusterClient

    def astype(self, dtype: str | torch.dtype, *, max_bytes: int | None = None
               ) -> AsyncShardedTensor:
        """As `ShardedTensor.astype`."""
        cast: AsyncShardedTensor = self._cast(dtype, max_bytes)
        return cast

    def at_version(self) -> AsyncShardedTensor:
        """As `ShardedTensor.at_version`."""
        pinned: AsyncShardedTensor = self._pinned_all()
        return pinned

    async def _values(self, selection: Selection) -> torch.Tensor:
        return (await self.client._drive(self._slice_flow(selection, DEFAULT)))["values"]

    def __getitem__(self, index: object) -> Coroutine[Any, Any, torch.Tensor]:
        return self._values(self._sel(index, Combine.VECTORIZED))

    @property
    def oindex(self) -> Indexer[Coroutine[Any, Any, torch.Tensor]]:
        """``t.oindex[idx]``: index lists and masks combine orthogonally."""
        return Indexer(lambda idx: self._values(self._sel(idx, Combine.OUTER)))

    def fetch(self) -> Coroutine[Any, Any, torch.Tensor]:
        """The whole tensor."""
        return self._values(self._sel((), Combine.VECTORIZED))

    def select(self, **by_name: object) -> Coroutine[Any, Any, torch.Tensor]:
        """As `ShardedTensor.select`."""
        return self._values(self._by_name(by_name))

    async def where(
        self,
        dim: int | str,
        stat: str,
        *,
        over: Sequence[int | str] = (),
        op: str = ">",
        value: float = 0.0,
        scope: str = "any",
        k: int = 0,
        index: Sequence[object] = (),
    ) -> WhereResult:
        """As `ShardedTensor.where`."""
        sel = self._threshold(dim, stat, over, op, value, scope, k, index)
        out = await self.client._drive(self._threshold_flow(sel, DEFAULT))
        return WhereResult(out["values"], out["indices"], out.get("offsets"))

    @property
    def explain(self) -> Explainer[Coroutine[Any, Any, ShardedPlan]]:
        """As `ShardedTensor.explain`, with ``await``."""
        return Explainer(self, lambda sel: self.client._drive(self._explain_flow(sel, DEFAULT)))



