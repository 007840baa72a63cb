"""The planner, without gRPC: which requests are views and which are gathers, the bytes each
step moves, the order of steps, and how results are produced (no copy of a contiguous
result; row gathers into reused buffers)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tensorslice.client import Client, Combine, Full, ResultTooLarge, Selection, Threshold
from tensorslice.core.selection import selectors_from_index
from tensorslice.server import Plan, TensorMeta, TensorStore, execute, plan
from tensorslice.server._payload import (
    DEFAULT_POOL,
    BufferPool,
    ContiguousPayload,
    RowGatherPayload,
    StridedPayload,
)
from tensorslice.server._stream import frames

SHAPE = (16, 12, 6, 5)
META = TensorMeta("x", SHAPE, torch.float32, dim_names=("N", "C", "H", "W"))
ITEM = 4
ROW = 6 * 5 * ITEM  # bytes of one (n, c) feature map
SAMPLE = 12 * ROW  # bytes of one sample


def plan_of(index: Any, combine: Combine = Combine.VECTORIZED, **kw: Any) -> Plan:
    return plan(META, Selection(selectors_from_index(index), combine, **kw))


def kinds(p: Plan) -> list[tuple[str, int]]:
    return [(s.kind, s.dim) for s in p.steps]


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(SHAPE)


def _run_one(p: Plan, t: torch.Tensor, pool: BufferPool | None = None) -> torch.Tensor:
    """Execute and reassemble the single payload of a plan from its slabs."""
    (payload,) = execute(p, t)
    pool = pool or BufferPool()
    raw = b"".join(
        bytes(s.contiguous().reshape(-1).view(torch.uint8).numpy())
        for s in payload.slabs(4 << 20, pool)
    )
    out = torch.frombuffer(bytearray(raw), dtype=payload.dtype) if raw else torch.empty(0)
    return out.reshape(payload.shape)


# ---------------------------------------------------------------------------- views

MASK_RUN = torch.zeros(16, dtype=torch.bool)
MASK_RUN[3:8] = True

VIEWS: list[tuple[Any, tuple[int, ...], list[tuple[str, int]]]] = [
    ((slice(0, 10),), (10, 12, 6, 5), [("view", 0)]),
    (3, (12, 6, 5), [("view", 0)]),
    ((slice(2, 5), slice(None), slice(None), slice(None)), (3, 12, 6, 5), [("view", 0)]),
    (([2, 3, 4],), (3, 12, 6, 5), [("view", 0)]),  # arithmetic progression -> range
    ((MASK_RUN,), (5, 12, 6, 5), [("view", 0)]),  # one run of true -> range
    ((3, 4), (6, 5), [("view", 0), ("view", 1)]),
    ((3, slice(2, 5)), (3, 6, 5), [("view", 0), ("view", 1)]),
    ((5, 7, slice(1, 3), slice(None)), (2, 5), [("view", 0), ("view", 1), ("view", 2)]),
    ((), SHAPE, []),
    ((slice(4, 4),), (0, 12, 6, 5), [("view", 0)]),
]


@pytest.mark.unit
@pytest.mark.parametrize("index,shape,steps", VIEWS, ids=[repr(v[0])[:40] for v in VIEWS])
def test_zero_copy_views(index: Any, shape: tuple[int, ...], steps: list[Any],
                         x: torch.Tensor) -> None:
    p = plan_of(index)
    assert p.zero_copy is True
    assert p.result_shape == shape
    assert p.result_nbytes == math.prod(shape) * ITEM
    assert kinds(p) == steps
    assert all(s.bytes_moved == 0 for s in p.steps)
    (payload,) = execute(p, x)
    assert isinstance(payload, ContiguousPayload)
    assert torch.equal(payload.tensor, x[index])


@pytest.mark.e2e
def test_contiguous_slice_is_served_from_the_source_memory(x: torch.Tensor) -> None:
    p = plan_of((slice(2, 5),))
    (payload,) = execute(p, x)
    assert isinstance(payload, ContiguousPayload)
    t = payload.tensor
    assert t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert t.data_ptr() == x.data_ptr() + 2 * SAMPLE
    assert x.data_ptr() <= t.data_ptr() < x.data_ptr() + x.nbytes
    (slab,) = list(payload.slabs(4 << 20, BufferPool()))
    assert slab.data_ptr() == t.data_ptr()  # the slab is the source's own memory
    assert torch.equal(t, x[2:5])


# ---------------------------------------------------------------------------- copies, gathers


@pytest.mark.unit
def test_channel_range_is_a_strided_copy_not_zero_copy(x: torch.Tensor) -> None:
    p = plan_of((slice(None), slice(2, 5)))
    result = 16 * 3 * ROW
    assert p.zero_copy is False
    assert kinds(p) == [("view", 1), ("copy", -1)]
    assert p.steps[1].bytes_moved == 2 * result
    assert p.result_nbytes == result
    (payload,) = execute(p, x)
    assert isinstance(payload, StridedPayload)
    assert torch.equal(_run_one(p, x), x[:, 2:5])


@pytest.mark.unit
def test_index_list_on_dim_0_is_a_row_gather(x: torch.Tensor) -> None:
    p = plan_of(([0, 2, 5],))
    assert p.zero_copy is False
    assert kinds(p) == [("gather", 0)]
    assert p.steps[0].bytes_moved == 2 * 3 * SAMPLE
    assert p.result_nbytes == 3 * SAMPLE
    (payload,) = execute(p, x)
    assert isinstance(payload, RowGatherPayload)
    assert torch.equal(_run_one(p, x), x[[0, 2, 5]])


@pytest.mark.unit
def test_outer_two_lists_is_one_row_gather_never_the_intermediate(x: torch.Tensor) -> None:
    b, c = [0, 2, 5, 5, 15], [1, 4, 5, 11]
    p = plan_of((b, c), Combine.OUTER)
    result = len(b) * len(c) * ROW
    assert p.result_shape == (5, 4, 6, 5)
    assert p.result_nbytes == result
    # One step: the gather over dims 0 and 1 at once; x[b] (5 whole samples) is never built.
    assert kinds(p) == [("gather", -1)]
    assert p.steps[0].bytes_moved == 2 * result
    assert sum(s.bytes_moved for s in p.steps) < 2 * len(b) * SAMPLE
    (payload,) = execute(p, x)
    assert isinstance(payload, RowGatherPayload)
    assert payload.flat.numel() == len(b) * len(c)
    assert torch.equal(_run_one(p, x), x[b][:, c])


@pytest.mark.unit
def test_outer_gathers_with_a_view_between(x: torch.Tensor) -> None:
    """Lists on dims 0 and 1 with dim 2 narrowed: view first, then index_select, most
    selective first; each step's bytes are what that index_select reads and writes."""
    p = plan_of(([0, 2, 5], [1, 4, 5], slice(1, 3)), Combine.OUTER)
    assert kinds(p) == [("view", 2), ("gather", 0), ("gather", 1)]
    item_hw = 2 * 5 * ITEM
    assert p.steps[1].bytes_moved == 2 * (3 * 12 * item_hw)  # (3, 12, 2, 5) after dim 0
    assert p.steps[2].bytes_moved == 2 * (3 * 3 * item_hw)  # (3, 3, 2, 5) after dim 1
    assert torch.equal(_run_one(p, x), x[[0, 2, 5]][:, [1, 4, 5]][:, :, 1:3])


@pytest.mark.unit
def test_views_come_before_gathers_and_orders_are_sequential() -> None:
    cases = [
        plan_of((slice(1, 9), [1, 4, 5]), Combine.OUTER),
        plan_of(([0, 5, 2], slice(1, 9), [1, 4]), Combine.OUTER),
        plan_of((slice(0, 10), [3, 1], 2), Combine.VECTORIZED, dtype="float16"),
        plan_of(([1, 0], slice(None), [4, 2], slice(1, 4))),
    ]
    for p in cases:
        assert [s.order for s in p.steps] == list(range(len(p.steps)))
        ks = [s.kind for s in p.steps]
        assert "gather" in ks
        first_gather = ks.index("gather")
        assert all(k == "view" for k in ks[:first_gather])
        assert "view" not in ks[first_gather:]


@pytest.mark.unit
def test_cast_step_and_result_dtype() -> None:
    p = plan_of((slice(0, 2),), dtype="float16")
    assert p.zero_copy is False
    assert p.result_dtype == torch.float16
    assert p.result_nbytes == 2 * 12 * 30 * 2
    assert kinds(p)[-1] == ("cast", -1)
    assert p.steps[-1].bytes_moved == 2 * 12 * 30 * (4 + 2)


@pytest.mark.unit
def test_threshold_plan_is_data_dependent() -> None:
    p = plan(META, Selection((Full(), Threshold("mean", ">", 0.1))))
    assert p.result_shape == (16, -1, 6, 5)
    assert p.result_nbytes == -1
    assert p.zero_copy is False
    assert [s.kind for s in p.steps] == ["reduce", "gather"]


@pytest.mark.unit
def test_vectorized_mask_nd_plans_and_executes(x: torch.Tensor) -> None:
    m = torch.rand(16, 12) > 0.5
    p = plan_of((m,))
    assert p.result_shape == (int(m.sum()), 6, 5)
    assert torch.equal(_run_one(p, x), x[m])


@pytest.mark.unit
def test_row_gather_reuses_its_buffer(x: torch.Tensor) -> None:
    pool = BufferPool()
    ptrs = set()
    want = x[[0, 2, 5, 7]][:, [1, 3, 10]]
    for _ in range(5):
        p = plan_of(([0, 2, 5, 7], [1, 3, 10]), Combine.OUTER)
        (payload,) = execute(p, x)
        assert isinstance(payload, RowGatherPayload)
        slabs = list(payload.slabs(4 << 20, pool))
        ptrs.update(s.data_ptr() for s in slabs)
        assert torch.equal(_run_one(p, x, pool), want)
    assert pool.allocations == 1
    assert len(ptrs) == 1


@pytest.mark.unit
def test_strided_copy_reuses_its_buffer(x: torch.Tensor) -> None:
    pool = BufferPool()
    for _ in range(4):
        p = plan_of((slice(None), slice(2, 5)))
        assert torch.equal(_run_one(p, x, pool), x[:, 2:5])
    assert pool.allocations == 1


@pytest.mark.unit
def test_frames_of_a_row_gather_reuse_the_default_pool(x: torch.Tensor) -> None:
    p = plan_of(([3, 1, 4], [1, 5, 9]), Combine.OUTER)
    list(frames(execute(p, x), {}))  # warm up
    before = DEFAULT_POOL.allocations
    for _ in range(5):
        list(frames(execute(p, x), {}))
    assert DEFAULT_POOL.allocations == before


# ---------------------------------------------------------------------------- explain


EXPLAINED: list[Any] = [
    (slice(0, 10),),
    (slice(None), slice(2, 5)),
    ([0, 2, 5],),
    (slice(0, 10), [1, 3]),
    ([0, 2, 5], slice(None), [1, 2, 3]),
    (slice(None, None, -2), 3),
]


@pytest.mark.e2e
@pytest.mark.parametrize("index", EXPLAINED, ids=[repr(e)[:40] for e in EXPLAINED])
def test_explain_via_client_matches_plan(client: Client, store: TensorStore, index: Any) -> None:
    meta = store.get("demo").meta
    want = plan(meta, Selection(selectors_from_index(index), Combine.VECTORIZED))
    got = client.tensor("demo").explain[index]
    assert got.result_shape == want.result_shape
    assert got.result_nbytes == want.result_nbytes
    assert got.result_dtype == "float32"
    assert got.zero_copy == want.zero_copy
    assert got.summary == want.summary()
    assert [(s.kind, s.dim, s.detail, s.bytes_moved, s.order) for s in got.steps] == [
        (s.kind, s.dim, s.detail, s.bytes_moved, s.order) for s in want.steps
    ]


@pytest.mark.e2e
def test_explain_outer_via_client(client: Client) -> None:
    sel = Selection(selectors_from_index(([0, 2, 5], [1, 4, 5])), Combine.OUTER)
    got = client.explain("demo", sel)
    assert [(s.kind, s.dim) for s in got.steps] == [("gather", -1)]
    assert got.steps[0].bytes_moved == 2 * got.result_nbytes
    assert got.zero_copy is False
    zc = client.tensor("demo").explain[0:10]
    assert zc.zero_copy is True
    assert zc.result_nbytes == 10 * 12 * 6 * 5 * 4


@pytest.mark.e2e
def test_served_contiguous_slice_and_repeated_gathers(client: Client, demo: torch.Tensor) -> None:
    """Through the server: results equal local ones; repeated gathers allocate nothing new."""
    r = client.tensor("demo")
    assert torch.equal(r[2:5].cpu(), demo[2:5])
    r.oindex[[0, 2, 5], [1, 4, 5]]  # warm up
    before = DEFAULT_POOL.allocations
    for _ in range(5):
        assert torch.equal(r.oindex[[0, 2, 5], [1, 4, 5]].cpu(), demo[[0, 2, 5]][:, [1, 4, 5]])
    assert DEFAULT_POOL.allocations == before


@pytest.mark.unit
def test_vectorized_negative_step_plans_its_true_shape() -> None:
    """The plan's shape (what `explain` shows and `max_bytes` checks) counts the positions a
    negative step selects, not the whole dimension."""
    meta = TensorMeta("big", (256, 1024), torch.float32)
    p = plan(meta, Selection(selectors_from_index(slice(200, 100, -1)), Combine.VECTORIZED))
    assert p.result_shape == (100, 1024)
    assert p.result_nbytes == 100 * 1024 * 4
    small = plan(meta, Selection(selectors_from_index((slice(2, 0, -1), [0, 5])),
                                 Combine.VECTORIZED, max_bytes=16))
    assert small.result_shape == (2, 2)
    with pytest.raises(ResultTooLarge, match=r"result of 8192 bytes \(shape \[2, 1024\]"):
        plan(meta, Selection(selectors_from_index(slice(2, 0, -1)), Combine.VECTORIZED,
                             max_bytes=4096))


@pytest.mark.unit
@pytest.mark.parametrize("shape,index", [
    ((3, 0, 5, 6), (slice(None), torch.empty((0, 1, 1), dtype=torch.int64))),
    ((10, 0), (slice(None), torch.empty(2, 0, dtype=torch.int64))),
    ((10, 0), ([1, 2],)),
    ((4, 0, 3), (slice(None), [], slice(None))),
])
def test_empty_gathers_over_size_0_dimensions(shape: tuple[int, ...], index: Any) -> None:
    x = torch.empty(shape)
    p = plan(TensorMeta("e", shape, torch.float32),
             Selection(selectors_from_index(index), Combine.VECTORIZED))
    assert p.result_shape == tuple(x[index].shape)
    assert _run_one(p, x).shape == x[index].shape


@pytest.mark.unit
def test_flags_place_their_dimension_as_torch_does(x: torch.Tensor) -> None:
    for index in [(True,), (False, 0), (slice(None), True, [0, 1]), ([0, 1], True, [1, 2]),
                  (torch.tensor(True), ..., torch.tensor(False))]:
        p = plan_of(index)
        assert p.result_shape == tuple(x[index].shape), index
        assert torch.equal(_run_one(p, x), x[index])


def _general_plan(meta: TensorMeta, selection: Selection, limit: int = 0) -> Plan:
    """The plan `plan_region` makes, without the one-pass plan of ints and slices."""
    from tensorslice.core.selection import bind
    from tensorslice.server._plan import _check_limit, _normalize, combined_limit, plan_region

    out_dtype = getattr(torch, selection.dtype) if selection.dtype else meta.dtype
    pairs = bind(meta.name, len(meta.shape), selection.selectors)
    bound = [_normalize(meta, s, d) for s, d in pairs]
    p = plan_region(meta, bound, selection.combine, out_dtype,
                    combined_limit(selection.max_bytes, limit))
    _check_limit(p, p.limit)
    return p


def _basic_index(g: torch.Generator, shape: tuple[int, ...]) -> tuple[object, ...]:
    def pick(n: int) -> object:
        r = int(torch.randint(0, 6, (1,), generator=g))
        a, b = (int(x) for x in torch.randint(-n - 2, n + 3, (2,), generator=g))
        step = int(torch.randint(1, 4, (1,), generator=g))
        return [slice(None), slice(a, b), slice(a, None, step), slice(None, b, step),
                a if -n <= a < n else 0, None][r]

    items = [pick(n) for n in shape[: int(torch.randint(0, len(shape) + 1, (1,),
                                                       generator=g))]]
    if int(torch.randint(0, 4, (1,), generator=g)) == 0:
        items.insert(int(torch.randint(0, len(items) + 1, (1,), generator=g)), ...)
    return tuple(items)


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(8))
def test_ints_and_slices_plan_in_one_pass_as_the_general_planner_does(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for shape in [(7,), (5, 6), (3, 4, 5), (2, 0, 3), (4, 1, 2, 3)]:
        meta = TensorMeta("x", shape, torch.float32)
        for _ in range(60):
            index = _basic_index(g, shape)
            for combine in (Combine.VECTORIZED, Combine.OUTER):
                for dtype, max_bytes in ((None, 0), ("float16", 0), (None, 8)):
                    sel = Selection(selectors_from_index(index), combine, dtype, max_bytes)
                    try:
                        want: Any = _general_plan(meta, sel, limit=64)
                    except Exception as exc:
                        want = (type(exc), str(exc))
                    try:
                        got: Any = plan(meta, sel, limit=64)
                    except Exception as exc:
                        got = (type(exc), str(exc))
                    assert got == want, (index, combine, dtype, max_bytes)
                    if isinstance(got, Plan):
                        assert got.summary() == want.summary()


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(4))
def test_a_zero_copy_view_is_read_where_it_lies(seed: int) -> None:
    from tensorslice.server._execute import view_bytes

    g = torch.Generator().manual_seed(seed)
    base = torch.arange(400, dtype=torch.float64)
    seen = 0
    for shape in [(7,), (5, 6), (3, 4, 5), (2, 0, 3), (4, 1, 2, 3)]:
        n = math.prod(shape)
        x = base[3 : 3 + n].view(shape)  # a storage offset, as a slice of a larger one has
        meta = TensorMeta("x", shape, x.dtype)
        for _ in range(40):
            index = _basic_index(g, shape)
            try:
                p = plan(meta, Selection(selectors_from_index(index), Combine.VECTORIZED))
            except Exception:
                continue
            data = view_bytes(p, x)
            assert (data is not None) == p.zero_copy, index
            if data is not None:
                seen += 1
                want = x[index].contiguous()
                assert bytes(data) == want.numpy().tobytes(), index
                assert tuple(want.shape) == p.result_shape
    assert seen > 50
