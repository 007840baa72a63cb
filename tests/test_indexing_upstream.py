"""PyTorch's and NumPy's own indexing tests, run against the remote path.

The getitem cases of `test/test_indexing.py` (pytorch/pytorch) and
`numpy/_core/tests/test_indexing.py` (numpy/numpy), NumPy's `TestMultiIndexingAutomated`
combinations included in full (every index `test_multidim` builds, on the (3, 1, 5, 6)
arange and its empty twin (3, 0, 5, 6)), are in `upstream_indexing_cases`. Each case's id
names its origin. For every case, `remote[idx]` through the sync and the async client must
do what `local[idx]` does in PyTorch: the same values, dtype and shape, or an error that is
an instance of the class PyTorch raises (and a `TensorSliceError`). Cases marked
`deviation` are where tensorslice deliberately differs (a negative step keeps NumPy's
meaning); they are checked against that meaning instead.

`remote.oindex[idx]` and `remote.select(...)` keep their orthogonal meaning: on the cases
whose lists and masks are all one-dimensional, each index applies to its own dimension in
turn.

One server holds every tensor (on the test device: CUDA where present); the remote results
of all cases are fetched once per client kind (the async client runs them concurrently) and
each test item checks one. The same cases (and the orthogonal ones) also run against a
3-shard cluster (`ClusterClient`) holding every tensor with a dimension 0 in 3 uneven
pieces.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sharded import serve_sharded
from upstream_indexing_cases import Case, build_tensors, cases, numpy_meaning

from tensorslice.client import (
    AsyncClient,
    AsyncClusterClient,
    Client,
    ClusterClient,
    TensorSliceError,
)
from tensorslice.core.selection import (
    Ellipsis_,
    Full,
    Index,
    Indices,
    Mask,
    NewAxis,
    Range,
    selectors_from_index,
)
from tensorslice.server import ServerConfig, TensorStore, create_server

# PyTorch's own warnings on deprecated forms (uint8 masks, lists read as tuples), which the
# client repeats where it reads an index the same way.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TENSORS = build_tensors()
CASES = cases()
_BY_ID = {c.id: c for c in CASES}
# Every case of a tensor with a dimension 0 also runs on a 3-shard cluster holding it in 3
# uneven pieces (a 0-d tensor has no rows to cut).
SHARDABLE = {name: t for name, t in TENSORS.items() if t.ndim}
SHARDED_CASES = [c for c in CASES if c.tensor in SHARDABLE]

Outcome = tuple[torch.Tensor | None, BaseException | None]


def _dim_names(t: torch.Tensor) -> tuple[str, ...]:
    return tuple(f"d{i}" for i in range(t.ndim))


@pytest.fixture(scope="module")
def upstream_server(device: str) -> Iterator[str]:
    store = TensorStore(device=device)
    for name, t in TENSORS.items():
        store.add(name, t, dim_names=_dim_names(t))
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(max_result_bytes=1 << 28))
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(grace=None)


def _local(case: Case) -> Outcome:
    """What PyTorch does with the case (NumPy's meaning for a deviation)."""
    x = TENSORS[case.tensor]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if case.deviation:
                return numpy_meaning(x, case.index), None
            return x[case.index], None
        except Exception as exc:  # the outcome to compare with
            return None, exc


@pytest.fixture(scope="module")
def upstream_cluster(device: str) -> Iterator[dict[str, Any]]:
    names = {name: _dim_names(t) for name, t in SHARDABLE.items()}
    with serve_sharded(SHARDABLE, device, names, ServerConfig(max_result_bytes=1 << 28)) as spec:
        yield spec


def _sync_outcomes(address: str | dict[str, Any], items: list[tuple[str, str, Any]]
                   ) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    with (Client(address, timeout=60) if isinstance(address, str)
          else ClusterClient(address, timeout=60)) as c:
        remotes = {name: c.tensor(name) for name in {n for _, n, _ in items}}
        for key, name, index in items:
            try:
                out[key] = (remotes[name][index].cpu(), None)
            except Exception as exc:  # the outcome to compare with
                out[key] = (None, exc)
    return out


def _async_outcomes(address: str | dict[str, Any], items: list[tuple[str, str, Any]]
                    ) -> dict[str, Outcome]:
    async def run() -> dict[str, Outcome]:
        async with (AsyncClient(address, timeout=60) if isinstance(address, str)
                    else AsyncClusterClient(address, timeout=60)) as c:
            names = sorted({n for _, n, _ in items})
            infos = await asyncio.gather(*(c.tensor(n) for n in names))
            remotes = dict(zip(names, infos, strict=True))
            gate = asyncio.Semaphore(16)

            async def one(name: str, index: Any) -> Outcome:
                async with gate:
                    try:
                        return (await remotes[name][index]).cpu(), None
                    except Exception as exc:  # the outcome to compare with
                        return None, exc

            got = await asyncio.gather(*(one(n, i) for _, n, i in items))
            return {k: g for (k, _, _), g in zip(items, got, strict=True)}

    return asyncio.run(run())


@pytest.fixture(scope="module")
def outcomes(upstream_server: str) -> dict[str, dict[str, Outcome]]:
    items = [(c.id, c.tensor, c.index) for c in CASES]
    return {
        "sync": _sync_outcomes(upstream_server, items),
        "async": _async_outcomes(upstream_server, items),
    }


@pytest.fixture(scope="module")
def sharded_outcomes(upstream_cluster: dict[str, Any]) -> dict[str, dict[str, Outcome]]:
    items = [(c.id, c.tensor, c.index) for c in SHARDED_CASES]
    return {"sync": _sync_outcomes(upstream_cluster, items),
            "async": _async_outcomes(upstream_cluster, items)}


def _describe(o: Outcome) -> str:
    t, e = o
    if e is not None:
        return f"{type(e).__name__}: {e}"
    assert t is not None
    return f"tensor {tuple(t.shape)} {t.dtype}"


def assert_agrees(want: Outcome, got: Outcome) -> None:
    """Same values, dtype and shape; or an error of the class PyTorch raises."""
    want_t, want_e = want
    got_t, got_e = got
    if want_e is not None:
        assert got_e is not None, f"PyTorch raises {_describe(want)}; remote gave {_describe(got)}"
        assert isinstance(got_e, type(want_e)), (
            f"PyTorch raises {_describe(want)}; remote raised {_describe(got)}"
        )
        assert isinstance(got_e, TensorSliceError), f"not a TensorSliceError: {got_e!r}"
        assert str(got_e), "an error without a message"
        return
    assert want_t is not None
    assert got_e is None, f"PyTorch answers {_describe(want)}; remote raised {_describe(got)}"
    assert got_t is not None
    assert got_t.dtype == want_t.dtype, f"dtype {got_t.dtype} != {want_t.dtype}"
    assert got_t.shape == want_t.shape, f"shape {tuple(got_t.shape)} != {tuple(want_t.shape)}"
    assert torch.equal(got_t, want_t.cpu()), "values differ"


def _param(case: Case) -> Any:
    marks = [pytest.mark.deviation(case.deviation)] if case.deviation else []
    return pytest.param(case.id, id=case.id, marks=marks)


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("case_id", [_param(c) for c in CASES])
def test_getitem_agrees_with_torch(
    case_id: str, kind: str, outcomes: dict[str, dict[str, Outcome]]
) -> None:
    assert_agrees(_local(_BY_ID[case_id]), outcomes[kind][case_id])


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("case_id", [_param(c) for c in SHARDED_CASES])
def test_getitem_agrees_with_torch_on_3_shards(
    case_id: str, kind: str, sharded_outcomes: dict[str, dict[str, Outcome]]
) -> None:
    assert_agrees(_local(_BY_ID[case_id]), sharded_outcomes[kind][case_id])


@pytest.mark.unit
def test_the_tables_are_whole() -> None:
    """Both suites, NumPy's automated combinations in full, on both arrays."""
    origins = {c.id.split("#")[0] for c in CASES}
    assert sum(o.startswith("torch:") for o in origins) >= 50
    assert sum(o.startswith("numpy:") for o in origins) >= 40
    auto = [c for c in CASES if "TestMultiIndexingAutomated.test_multidim" in c.id]
    assert sum(c.tensor == "auto" for c in auto) == sum(c.tensor == "auto_empty" for c in auto)
    assert sum(c.tensor == "auto" for c in auto) == 3 * 2 * 17 * 2 * 6 + 3
    assert len(CASES) > 2900
    assert len(SHARDED_CASES) > 2800


# ---------------------------------------------------------------------------- orthogonal


def _orthogonal_items(case: Case) -> list[Any] | None:
    """The index items of a case where torch answers and every list or mask is 1-D (at
    least one of them), with at most one ``...`` and no negative step; else None."""
    if case.deviation or _local(case)[1] is not None:
        return None
    items = list(case.index) if isinstance(case.index, tuple) else [case.index]
    try:
        sels = [selectors_from_index((i,))[0] for i in items]
    except TensorSliceError:
        return None
    if sum(isinstance(s, Ellipsis_) for s in sels) > 1:
        return None
    lists = [s for s in sels if isinstance(s, (Indices, Mask))]
    if not lists or any(s.values.ndim != 1 for s in lists):
        return None
    return items


def orthogonal(x: torch.Tensor, items: list[Any]) -> torch.Tensor:
    """Each index applied to its own dimension, in turn (``x[b][:, c]``)."""
    sels = [selectors_from_index((i,))[0] for i in items]
    used = sum(0 if isinstance(s, (NewAxis, Ellipsis_)) else 1 for s in sels)
    ndim = x.ndim
    d = 0  # the output dimension the next selector acts on
    for s in sels:
        if isinstance(s, Ellipsis_):
            d += ndim - used
        elif isinstance(s, NewAxis):
            x = x.unsqueeze(d)
            d += 1
        elif isinstance(s, Index):
            x = x.select(d, s.index)
        elif isinstance(s, Range):
            x = x[(slice(None),) * d + (slice(s.start, s.stop, s.step),)]
            d += 1
        elif isinstance(s, Full):
            d += 1
        else:
            assert isinstance(s, (Indices, Mask))
            v = s.values.nonzero().reshape(-1) if isinstance(s, Mask) else s.values
            x = x.index_select(d, torch.where(v < 0, v + x.shape[d], v))
            d += 1
    return x


ORTHO = [(c, items) for c in CASES if (items := _orthogonal_items(c)) is not None]


@pytest.mark.unit
def test_orthogonal_cases_exist() -> None:
    assert len(ORTHO) >= 100


@pytest.fixture(scope="module")
def ortho_outcomes(
    upstream_server: str, upstream_cluster: dict[str, Any]
) -> dict[str, dict[str, Outcome]]:
    out: dict[str, dict[str, Outcome]] = {"oindex": {}, "select": {}, "async-oindex": {},
                                          "sharded-oindex": {}, "sharded-select": {}}
    for prefix, source in (("", Client(upstream_server, timeout=60)),
                           ("sharded-", ClusterClient(upstream_cluster, timeout=60))):
        with source as c:
            for case, items in ORTHO:
                if prefix and case.tensor not in SHARDABLE:
                    continue
                remote = c.tensor(case.tensor)
                try:
                    out[prefix + "oindex"][case.id] = (remote.oindex[tuple(items)].cpu(), None)
                except Exception as exc:  # the outcome to compare with
                    out[prefix + "oindex"][case.id] = (None, exc)
                if any(i is None or i is Ellipsis for i in items):
                    continue
                by_name = {f"d{k}": i for k, i in enumerate(items)}
                try:
                    out[prefix + "select"][case.id] = (remote.select(**by_name).cpu(), None)
                except Exception as exc:  # the outcome to compare with
                    out[prefix + "select"][case.id] = (None, exc)

    async def run() -> None:
        async with AsyncClient(upstream_server, timeout=60) as ac:
            for case, items in ORTHO:
                remote = await ac.tensor(case.tensor)
                try:
                    got = (await remote.oindex[tuple(items)]).cpu()
                    out["async-oindex"][case.id] = (got, None)
                except Exception as exc:  # the outcome to compare with
                    out["async-oindex"][case.id] = (None, exc)

    asyncio.run(run())
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("case,items", ORTHO, ids=[c.id for c, _ in ORTHO])
def test_oindex_and_select_are_orthogonal(
    case: Case, items: list[Any], ortho_outcomes: dict[str, dict[str, Outcome]]
) -> None:
    want: Outcome = (orthogonal(TENSORS[case.tensor], items), None)
    assert_agrees(want, ortho_outcomes["oindex"][case.id])
    assert_agrees(want, ortho_outcomes["async-oindex"][case.id])
    if case.id in ortho_outcomes["select"]:
        assert_agrees(want, ortho_outcomes["select"][case.id])
    if case.tensor in SHARDABLE:
        assert_agrees(want, ortho_outcomes["sharded-oindex"][case.id])
        if case.id in ortho_outcomes["select"]:
            assert_agrees(want, ortho_outcomes["sharded-select"][case.id])
