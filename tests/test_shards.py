"""Sharded tensors: the cluster spec, the pure splitter, and `ClusterClient` end to end.

The splitter's property: for generated indexes (those of the semantics suite) over a tensor
cut into uneven pieces, planning and executing each part on its piece (the server's own
planner, no network) and merging equals planning the whole selection on the whole tensor,
errors included (the same class). The served semantics and upstream suites run against a
3-shard cluster in `test_semantics` and `test_indexing_upstream`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sharded import cuts, serve_sharded
from test_semantics import SHAPES, _make, index_exprs

from tensorslice.client import (
    AsyncClusterClient,
    Client,
    ClusterClient,
    InvalidClusterSpec,
    NotSupportedAcrossShards,
    RemoteTensorDataset,
    SelectionOutOfRange,
    ServerUnavailable,
    TensorNotFound,
    TensorSliceError,
)
from tensorslice.client._base import make_selection
from tensorslice.client._cluster import load_spec
from tensorslice.client._receive import Assembler
from tensorslice.core.selection import Combine, Range, Selection
from tensorslice.core.shards import ClusterSpec, Piece, merge, split
from tensorslice.server import ServerConfig, TensorMeta, TensorStore, create_server, execute, plan
from tensorslice.server._stream import pieces as file_pieces

# ---------------------------------------------------------------------------- the spec

GOOD: dict[str, Any] = {
    "shards": {"a": ["127.0.0.1:1"], "b": ["127.0.0.1:2", "127.0.0.1:3"]},
    "tensors": {"x": [{"shard": "b", "rows": [4, 10]}, {"shard": "a", "rows": [0, 4]}]},
}


def _with(**changes: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(GOOD))
    spec.update(changes)
    return spec


@pytest.mark.unit
def test_a_spec_is_read_and_its_pieces_sorted(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(GOOD))
    for source in (GOOD, str(path), path):
        spec = load_spec(source)
        assert spec.pieces("x") == (Piece("a", 0, 4), Piece("b", 4, 10))
        assert spec.shards["b"] == ("127.0.0.1:2", "127.0.0.1:3")


BAD_SPECS = [
    (_with(tensors={"x": [{"shard": "a", "rows": [0, 4]}, {"shard": "b", "rows": [5, 10]}]}),
     "tensor 'x': rows [4, 5) are held by no shard (a gap after shard 'a' (rows [0, 4)), "
     "before shard 'b' (rows [5, 10)))"),
    (_with(tensors={"x": [{"shard": "a", "rows": [2, 4]}]}),
     "tensor 'x': rows [0, 2) are held by no shard (a gap before the first piece, before "
     "shard 'a' (rows [2, 4)))"),
    (_with(tensors={"x": [{"shard": "a", "rows": [0, 6]}, {"shard": "b", "rows": [4, 10]}]}),
     "tensor 'x': shard 'a' (rows [0, 6)) and shard 'b' (rows [4, 10)) overlap on rows "
     "[4, 6)"),
    (_with(tensors={"x": [{"shard": "c", "rows": [0, 6]}]}),
     "tensor 'x', piece 0: unknown shard 'c'; the spec's shards are 'a', 'b'"),
    (_with(shards={"a": [], "b": ["h:1"]}),
     "shard 'a' has no address; give a list of one or more"),
    (_with(tensors={"x": [{"shard": "a", "rows": [3, 1]}]}),
     "tensor 'x', piece 0 on shard 'a': rows must be [START, STOP] with 0 <= START <= STOP; "
     "got [3, 1]"),
    (_with(tensors={}), "the cluster spec needs 'tensors'"),
    (_with(tensors={"x": [{"shard": "a", "rows": [0, 4]}, {"shard": "b", "rows": [4, 6]},
                          {"shard": "a", "rows": [6, 9]}]}),
     "tensor 'x': shard 'a' holds two pieces, rows [0, 4) and [6, 9); a server holds one "
     "row range of a tensor, under the tensor's name"),
    (_with(extra=1), "unknown keys in the cluster spec: 'extra'"),
]


@pytest.mark.unit
@pytest.mark.parametrize("spec,message", BAD_SPECS, ids=[m[:40] for _, m in BAD_SPECS])
def test_a_bad_spec_is_refused_by_name(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidClusterSpec, match=re.escape(message)):
        ClusterSpec.from_dict(spec)


@pytest.mark.unit
def test_a_spec_file_that_is_no_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text("{shards")
    with pytest.raises(InvalidClusterSpec, match="is not valid JSON"):
        ClusterClient(path)


# ---------------------------------------------------------------------------- the splitter

NAMES = [f"t{nd}" for nd in SHAPES]
TENSORS = {f"t{nd}": _make(shape, torch.float32, nd) for nd, shape in SHAPES.items()}
# Wider dimension 0 than the semantics suite's, so that 3 uneven pieces all hold rows.
TENSORS.update({f"w{nd}": _make((11, *shape[1:]), torch.int64, nd)
                for nd, shape in SHAPES.items()})


def _pieces_of(n: int, bounds: list[int]) -> tuple[Piece, ...]:
    stops = [*sorted(min(b, n) for b in bounds), n]
    out, at = [], 0
    for i, s in enumerate(stops):
        out.append(Piece(f"s{i}", at, s))
        at = s
    return tuple(out)


def _planned(x: torch.Tensor, name: str, sel: Selection) -> torch.Tensor:
    """`sel` of `x` as a server answers it: planned, executed, the file decoded."""
    meta = TensorMeta(name, tuple(x.shape), x.dtype)
    asm = Assembler()
    asm.feed(b"".join(bytes(p) for p in file_pieces(execute(plan(meta, sel), x), {})))
    return asm.tensors()["values"]


def _outcome(fn: Any) -> tuple[torch.Tensor | None, type[Exception] | None]:
    try:
        return fn(), None
    except TensorSliceError as exc:
        return None, type(exc)


def _sharded(x: torch.Tensor, name: str, sel: Selection, pcs: tuple[Piece, ...]
             ) -> torch.Tensor:
    s = split(sel, name, x.shape, pcs)
    got = [_planned(x[pcs[p.piece].start : pcs[p.piece].stop], name, p.selection)
           for p in s.parts]
    out = merge(s, got)
    if s.deferred is not None and out.numel():
        raise s.deferred
    if len(s.parts) == 1 and not s.scatter and (s.block is None or len(s.block) == 1):
        assert out.data_ptr() == got[0].data_ptr()  # one shard: its result, no merge copy
    return out


@pytest.mark.unit
@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.sampled_from(sorted(TENSORS)), outer=st.booleans(),
       mode=st.sampled_from(["ok", "ok", "ok", "oob", "bad"]),
       bounds=st.lists(st.integers(0, 11), min_size=1, max_size=4), data=st.data())
def test_split_then_merge_is_the_whole_answer(
    name: str, outer: bool, mode: str, bounds: list[int], data: st.DataObject
) -> None:
    x = TENSORS[name]
    pcs = _pieces_of(x.shape[0], bounds)
    idx = data.draw(index_exprs(tuple(x.shape), mode, outer=outer), label="idx")
    combine = Combine.OUTER if outer else Combine.VECTORIZED
    want, want_e = _outcome(lambda: _planned(
        x, name, make_selection(idx, combine, tensor=(name, x.ndim))))
    got, got_e = _outcome(lambda: _sharded(
        x, name, make_selection(idx, combine, tensor=(name, x.ndim)), pcs))
    if want_e is not None:
        assert got_e is not None and issubclass(got_e, want_e), (got_e, want_e)
        return
    assert got_e is None, got_e
    assert got is not None and want is not None
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.unit
@pytest.mark.parametrize(
    "idx", [12, [1, 12], torch.tensor([[12]]), (slice(None), slice(None)), -11])
def test_dimension_0_errors_name_the_whole_size(idx: Any) -> None:
    pcs = (Piece("a", 0, 3), Piece("b", 3, 10))
    bad = 12 if idx != -11 else -11
    if isinstance(idx, tuple):  # fine: no error
        assert len(split(make_selection(idx), "x", (10, 2), pcs).parts) == 2
        return
    with pytest.raises(SelectionOutOfRange, match=re.escape(
            f"index {bad} is out of bounds for dimension 0 (N) of size 10")):
        s = split(make_selection(idx), "x", (10, 2), pcs, ("N", "C"))
        assert s.deferred is not None
        raise s.deferred


@pytest.mark.unit
def test_a_gather_is_grouped_per_shard_and_put_back_in_order() -> None:
    pcs = (Piece("a", 0, 3), Piece("b", 3, 3), Piece("c", 3, 10))
    s = split(make_selection([9, 0, 4, 0, -1]), "x", (10,), pcs)
    assert [(p.piece, p.selection.selectors[0].values.tolist(),  # type: ignore[union-attr]
             p.positions.tolist() if p.positions is not None else None) for p in s.parts] == [
        (0, [0, 0], [1, 3]), (2, [6, 1, 6], [0, 2, 4])]
    assert merge(s, [torch.tensor([0, 0]), torch.tensor([9, 4, 9])]).tolist() == [9, 0, 4, 0, 9]


@pytest.mark.unit
def test_a_range_is_cut_per_shard() -> None:
    pcs = (Piece("a", 0, 3), Piece("b", 3, 7), Piece("c", 7, 10))
    s = split(make_selection(slice(9, None, -2)), "x", (10,), pcs)  # 9 7 5 3 1
    assert [(p.piece, p.selection.selectors[0]) for p in s.parts] == [
        (2, Range(2, None, -2)), (1, Range(2, None, -2)), (0, Range(1, 2, 1))]
    assert (s.axis, s.total, s.scatter) == (0, 5, False)
    assert split(make_selection(slice(4, 6)), "x", (10,), pcs).parts[0].piece == 1


# ---------------------------------------------------------------------------- end to end

DEMO = torch.arange(20 * 6 * 4, dtype=torch.float32).reshape(20, 6, 4).sin()
LABELS = torch.arange(20, dtype=torch.int64) * 7


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    with serve_sharded({"acts": DEMO, "labels": LABELS},
                       dim_names={"acts": ("N", "C", "H"), "labels": ("N",)}) as spec:
        yield spec


@pytest.fixture(scope="module")
def whole() -> Iterator[Client]:
    store = TensorStore()
    store.add("acts", DEMO, dim_names=("N", "C", "H"))
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig())
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            yield c
    finally:
        srv.stop(None)


@pytest.mark.e2e
def test_a_sharded_tensor_looks_like_the_whole(cluster: dict[str, Any]) -> None:
    assert cuts(20) == [(0, 4), (4, 14), (14, 20)]
    with ClusterClient(cluster, timeout=30) as cc:
        acts = cc.tensor("acts")
        assert acts.shape == DEMO.shape and acts.dtype == DEMO.dtype
        assert acts.info.dim_names == ("N", "C", "H")
        assert torch.equal(acts.fetch(), DEMO)
        assert torch.equal(acts[[19, 0, 5, 0], 2], DEMO[[19, 0, 5, 0], 2])
        assert torch.equal(acts.oindex[[15, 1], [0, 5]], DEMO[[15, 1]][:, [0, 5]])
        assert torch.equal(acts.select(N=slice(2, 18, 5), C=[1]), DEMO[2:18:5, [1]])
        assert torch.equal(acts.astype("float16")[3:6], DEMO[3:6].half())
        assert torch.equal(acts.at_version()[-1], DEMO[-1])
        plan = acts.explain[[19, 0, 5]]
        assert [p.shard for p, _ in plan.parts] == ["s0", "s1", "s2"]
        assert "scattered to their positions along result axis 0" in str(plan)
        assert plan.parts[1][1].result_shape == (1, 6, 4)
        with pytest.raises(TensorNotFound, match="'nope' is not in the cluster spec"):
            cc.tensor("nope")


@pytest.mark.e2e
@pytest.mark.parametrize("kw", [
    dict(dim=1, stat="mean", scope="any", value=0.1),
    dict(dim=1, stat="max", scope="all", value=-0.5),
    dict(dim=1, stat="mean", scope="topk", k=2),
    dict(dim=1, stat="l2", scope="per_sample", value=1.5),
    dict(dim=1, stat="mean", scope="per_sample", value=0.0, index=([18, 2, 7, 2],)),
    dict(dim=1, stat="mean", scope="any", value=0.2, index=([18, 2, 7],)),
    dict(dim=2, stat="min", scope="topk", k=3, index=(slice(1, 19, 4),)),
    dict(dim=0, stat="mean", scope="any", value=0.0),
    dict(dim=0, stat="abs_mean", scope="all", value=0.6),
    dict(dim=1, stat="mean", scope="any", value=0.1, index=(3,)),
])
def test_where_merges_as_the_whole_answers(
    cluster: dict[str, Any], whole: Client, kw: dict[str, Any]
) -> None:
    want = whole.tensor("acts").where(**kw)
    with ClusterClient(cluster, timeout=30) as cc:
        got = cc.tensor("acts").where(**kw)
    assert torch.equal(got.values, want.values)
    assert torch.equal(got.indices, want.indices)
    assert (got.offsets is None) == (want.offsets is None)
    if want.offsets is not None:
        assert got.offsets is not None and torch.equal(got.offsets, want.offsets)


@pytest.mark.e2e
def test_the_async_cluster_mirrors_the_sync_one(cluster: dict[str, Any], whole: Client) -> None:
    async def run() -> None:
        async with AsyncClusterClient(cluster, timeout=30) as cc:
            acts = await cc.tensor("acts")
            assert acts.shape == DEMO.shape
            assert torch.equal(await acts[[19, 0, 5, 0], 2], DEMO[[19, 0, 5, 0], 2])
            assert torch.equal(await acts.oindex[[15, 1], [0, 5]], DEMO[[15, 1]][:, [0, 5]])
            assert torch.equal(await acts.at_version().fetch(), DEMO)
            plan = await acts.explain[2:18]
            assert [p.shard for p, _ in plan.parts] == ["s0", "s1", "s2"]
            for kw in (dict(dim=1, stat="mean", scope="any", value=0.1),
                       dict(dim=1, stat="l2", scope="per_sample", value=1.5)):
                got, want = await acts.where(**kw), whole.tensor("acts").where(**kw)
                assert torch.equal(got.values, want.values)
                assert torch.equal(got.indices, want.indices)
            out = await cc.slice_many({"x": ("acts", [17, 1]), "y": ("labels", slice(2, 16))})
            assert torch.equal(out["x"], DEMO[[17, 1]])
            assert torch.equal(out["y"], LABELS[2:16])

    asyncio.run(run())


@pytest.mark.e2e
def test_topk_over_dimension_0_is_refused_across_shards(cluster: dict[str, Any]) -> None:
    with ClusterClient(cluster, timeout=30) as cc:
        with pytest.raises(NotSupportedAcrossShards, match="scope topk over dimension 0"):
            cc.tensor("acts").where(dim=0, stat="mean", scope="topk", k=2)


@pytest.mark.e2e
def test_slice_many_and_a_dataset_over_shards(cluster: dict[str, Any]) -> None:
    with ClusterClient(cluster, timeout=30) as cc:
        out = cc.slice_many({"x": ("acts", [17, 1, 17]), "y": ("labels", slice(2, 16, 3)),
                             "z": ("acts", (slice(None), 0, 1))})
        assert torch.equal(out["x"], DEMO[[17, 1, 17]])
        assert torch.equal(out["y"], LABELS[2:16:3])
        assert torch.equal(out["z"], DEMO[:, 0, 1])
        ds = RemoteTensorDataset(cc, ["acts", "labels"])
        assert len(ds) == 20
        x, y = ds.collate(ds.__getitems__([13, 3, 19, 0]))
        assert torch.equal(x, DEMO[[13, 3, 19, 0]]) and torch.equal(y, LABELS[[13, 3, 19, 0]])
        x2, _ = ds[5]
        assert torch.equal(x2, DEMO[5])
        for workers in (0, 2):  # the client pickles into workers (fork here)
            loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True,
                                                 num_workers=workers, collate_fn=ds.collate)
            seen = torch.cat([yb for _, yb in loader])
            assert sorted(seen.tolist()) == LABELS.tolist()


@pytest.mark.e2e
def test_shards_that_disagree_are_named(cluster: dict[str, Any]) -> None:
    stores = [TensorStore(), TensorStore()]
    stores[0].add("t", torch.zeros(3, 4))
    stores[1].add("t", torch.zeros(2, 4, dtype=torch.float64))
    stores[0].add("u", torch.zeros(3, 4))
    stores[1].add("u", torch.zeros(2, 5))
    stores[0].add("v", torch.zeros(3, 4))
    stores[1].add("v", torch.zeros(4, 4))
    servers = [create_server(s, "127.0.0.1:0", ServerConfig()) for s in stores]
    for srv, _ in servers:
        srv.start()
    try:
        spec = {"shards": {"p": [f"127.0.0.1:{servers[0][1]}"],
                           "q": [f"127.0.0.1:{servers[1][1]}"]},
                "tensors": {n: [{"shard": "p", "rows": [0, 3]}, {"shard": "q", "rows": [3, 5]}]
                            for n in ("t", "u", "v")}}
        with ClusterClient(spec, timeout=10) as cc:
            with pytest.raises(InvalidClusterSpec, match=re.escape(
                    "shards disagree on the dtype of 't': shard 'p' (rows [0, 3)) holds "
                    "torch.float32, shard 'q' (rows [3, 5)) holds torch.float64")):
                cc.tensor("t")
            with pytest.raises(InvalidClusterSpec, match=re.escape(
                    "shards disagree on the trailing shape of 'u': shard 'p' (rows [0, 3)) "
                    "holds [4], shard 'q' (rows [3, 5)) holds [5]")):
                cc.tensor("u")
            with pytest.raises(InvalidClusterSpec, match=re.escape(
                    "shard 'q' (rows [3, 5)) holds 4 rows of 'v'; the spec gives it 2")):
                cc.tensor("v")
    finally:
        for srv, _ in servers:
            srv.stop(None)


@pytest.mark.e2e
def test_a_shard_down_fails_the_call_by_name(cluster: dict[str, Any]) -> None:
    """A shard that goes away (no replica): every read that needs it raises
    ServerUnavailable naming the shard, its rows and its address, never a partial result;
    reads that need only the others still work."""
    store = TensorStore()
    store.add("acts", DEMO[14:20].clone())
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig())
    srv.start()
    spec = json.loads(json.dumps(cluster))
    spec["shards"]["s2"] = [f"127.0.0.1:{port}"]
    try:
        with ClusterClient(spec, timeout=10, retries=0) as cc:
            acts = cc.tensor("acts")
            assert torch.equal(acts[[19, 0]], DEMO[[19, 0]])
            srv.stop(None).wait()
            assert torch.equal(acts[0:14], DEMO[0:14])  # the live shards still answer
            for read in (lambda: acts[[0, 5, 15]], lambda: acts.fetch(),
                         lambda: cc.slice_many({"a": ("acts", [1, 19])})):
                with pytest.raises(ServerUnavailable, match=re.escape(
                        f"shard 's2' (rows [14, 20)) of 'acts' at 127.0.0.1:{port}: ")):
                    read()
    finally:
        srv.stop(None)


@pytest.mark.unit
def test_a_0_dimensional_tensor_cannot_be_split() -> None:
    with pytest.raises(TensorSliceError, match="no dimension 0"):
        split(make_selection(()), "x", (), (Piece("a", 0, 0),))

