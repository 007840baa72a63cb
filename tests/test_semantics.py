"""Remote indexing means exactly what local indexing means.

Property tests: generated index expressions over tensors of 1 to 5 dimensions and six
dtypes; `remote[idx]` against `local[idx]` (PyTorch's advanced indexing, broadcasting and
dimension placement included), `remote.oindex[idx]` against per-dimension application.
Each runs against the planner directly (many examples, `unit`) and through a served client
(a smaller sample, `e2e`), both against one server and against a 3-shard cluster holding
each tensor in 3 uneven pieces (`ClusterClient`).
Negative-step slices (refused by torch) follow NumPy: the reference reverses them first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sharded import serve_sharded

from tensorslice.client import (
    Client,
    ClusterClient,
    InvalidSelection,
    SelectionOutOfRange,
    TensorSliceError,
)
from tensorslice.client._base import Indexer, make_selection
from tensorslice.client._receive import Assembler
from tensorslice.core.selection import (
    Combine,
    Selection,
    selection_from_proto,
    selection_to_proto,
    selectors_from_index,
)
from tensorslice.server import ServerConfig, TensorMeta, TensorStore, create_server, execute, plan
from tensorslice.server._stream import pieces

SHAPES: dict[int, tuple[int, ...]] = {
    1: (6,),
    2: (5, 4),
    3: (4, 3, 5),
    4: (3, 4, 2, 5),
    5: (2, 3, 1, 4, 3),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)
NAMES = [f"t{nd}_{str(dt).removeprefix('torch.')}" for nd in SHAPES for dt in DTYPES]

# The planner is checked directly (plan, execute, the file's bytes decoded as a client does)
# on many examples; the served path, through gRPC and both transports, on a smaller sample.
SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SERVED_SETTINGS = settings(SETTINGS, max_examples=150)


def _make(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 8).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return torch.randint(-(10**12), 10**12, shape, generator=g, dtype=torch.int64)


class _Quiet(dict):  # type: ignore[type-arg]
    """A dict that hypothesis reports by name only (fixtures appear in falsifying examples)."""

    def __repr__(self) -> str:
        return f"<{len(self)} tensors>"


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = _Quiet()
    for seed, name in enumerate(NAMES):
        nd, dt = name[1:].split("_", 1)
        out[name] = _make(SHAPES[int(nd)], getattr(torch, dt), seed)
    return out


@pytest.fixture(scope="module")
def sem_client(tensors: dict[str, torch.Tensor], device: str) -> Iterator[Client]:
    store = TensorStore(device=device)
    for name, t in tensors.items():
        store.add(name, t)
    # Results over 512 bytes take the bulk data plane, smaller ones come inline: the
    # property tests cover both transports.
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(unary_max_bytes=512))
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            yield c
    finally:
        srv.stop(grace=None)


@pytest.fixture(scope="module")
def sem_cluster(tensors: dict[str, torch.Tensor], device: str) -> Iterator[ClusterClient]:
    """The same tensors, each cut into 3 uneven pieces over 3 servers (`sharded.cuts`)."""
    with serve_sharded(tensors, device, config=ServerConfig(unary_max_bytes=512)) as spec:
        with ClusterClient(spec, timeout=30) as cc:
            yield cc


@pytest.fixture(scope="module", params=["one server", "3 shards"])
def remotes(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Every tensor as one server holds it, and as a 3-shard cluster holds it: the served
    properties run against both."""
    source: Client | ClusterClient = request.getfixturevalue(
        "sem_client" if request.param == "one server" else "sem_cluster")
    return _Quiet({name: source.tensor(name) for name in NAMES})


class _Planned:
    """``remote[idx]`` and ``remote.oindex[idx]`` without a server: the selection through
    its proto mapping, `plan`, `execute`, and the file's bytes decoded by the client's
    `Assembler`."""

    def __init__(self, name: str, x: torch.Tensor) -> None:
        self.meta = TensorMeta(name, tuple(x.shape), x.dtype, str(x.device))
        self.x = x
        self.oindex: Indexer[torch.Tensor] = Indexer(lambda idx: self._run(idx, Combine.OUTER))

    def __getitem__(self, idx: object) -> torch.Tensor:
        return self._run(idx, Combine.VECTORIZED)

    def _run(self, idx: object, combine: Combine) -> torch.Tensor:
        sel: Selection = make_selection(idx, combine)
        sel = selection_from_proto(selection_to_proto(self.meta.name, sel))
        payloads = execute(plan(self.meta, sel), self.x)
        asm = Assembler()
        asm.feed(b"".join(bytes(p) for p in pieces(payloads, {})))
        return asm.tensors()["values"]


@pytest.fixture(scope="module")
def planned(tensors: dict[str, torch.Tensor], device: str) -> dict[str, _Planned]:
    return _Quiet({name: _Planned(name, t.to(device)) for name, t in tensors.items()})


# ---------------------------------------------------------------------------- strategies
#
# mode "ok": every index in range (index lists may still fail to broadcast together);
# mode "oob": out-of-range integers and list entries allowed;
# mode "bad": malformed pieces allowed (step 0, masks of the wrong length, extra selectors).
MODES = st.sampled_from(["ok", "ok", "ok", "ok", "oob", "bad"])


def _int_strategy(n: int, mode: str) -> st.SearchStrategy[int]:
    if mode == "oob":
        return st.integers(-n - 3, n + 2)
    return st.integers(-n, n - 1)


@st.composite
def slices(draw: st.DrawFn, n: int, mode: str) -> slice:
    bound = st.none() | st.integers(-n - 3, n + 3)
    steps = st.none() | st.integers(-4, 4).filter(lambda s: s != 0)
    if mode == "bad":
        steps = steps | st.just(0)
    return slice(draw(bound), draw(bound), draw(steps))


@st.composite
def masks_1d(draw: st.DrawFn, n: int, mode: str) -> Any:
    length = n
    if mode == "bad" and draw(st.booleans()):
        length = draw(st.sampled_from([n - 1, n + 1]).filter(lambda v: v >= 0))
    bits = draw(st.lists(st.booleans(), min_size=length, max_size=length))
    if draw(st.booleans()):
        return torch.tensor(bits, dtype=torch.bool).reshape(length)
    return bits  # a Python list of bools is a mask too


@st.composite
def index_lists(draw: st.DrawFn, n: int, mode: str, two_d: bool) -> Any:
    ints = _int_strategy(n, mode)
    if two_d:
        rows = draw(st.integers(1, 3))
        cols = draw(st.integers(1, 3))
        flat = draw(st.lists(ints, min_size=rows * cols, max_size=rows * cols))
        nested = [flat[r * cols : (r + 1) * cols] for r in range(rows)]
        return torch.tensor(nested, dtype=torch.int64) if draw(st.booleans()) else nested
    values = draw(st.lists(ints, min_size=0, max_size=6))
    if values and draw(st.booleans()):
        values = values + values[: draw(st.integers(1, len(values)))]  # duplicates
    return torch.tensor(values, dtype=torch.int64) if draw(st.booleans()) else values


@st.composite
def dim_items(
    draw: st.DrawFn, shape: tuple[int, ...], dims: list[int], mode: str, outer: bool
) -> list[Any]:
    """Items consuming exactly `dims` (consecutive dimensions), left to right."""
    items: list[Any] = []
    i = 0
    while i < len(dims):
        n = shape[dims[i]]
        kinds = ["int", "slice", "full", "list", "mask"]
        if not outer:
            kinds += ["list2d"]
            if len(dims) - i >= 2:
                kinds += ["maskk"]
        kind = draw(st.sampled_from(kinds))
        if kind == "maskk":
            k = draw(st.integers(2, len(dims) - i))
            mshape = tuple(shape[d] for d in dims[i : i + k])
            size = math.prod(mshape)
            bits = draw(st.lists(st.booleans(), min_size=size, max_size=size))
            items.append(torch.tensor(bits, dtype=torch.bool).reshape(mshape))
            i += k
            continue
        if kind == "int":
            items.append(draw(_int_strategy(n, mode)))
        elif kind == "slice":
            items.append(draw(slices(n, mode)))
        elif kind == "full":
            items.append(slice(None))
        elif kind == "list":
            items.append(draw(index_lists(n, mode, two_d=False)))
        elif kind == "list2d":
            items.append(draw(index_lists(n, mode, two_d=True)))
        else:
            items.append(draw(masks_1d(n, mode)))
        i += 1
    return items


@st.composite
def index_exprs(draw: st.DrawFn, shape: tuple[int, ...], mode: str, outer: bool = False) -> Any:
    ndim = len(shape)
    if draw(st.booleans()):
        a = draw(st.integers(0, ndim))
        b = draw(st.integers(a, ndim))
        lead = draw(dim_items(shape, list(range(a)), mode, outer))
        trail = draw(dim_items(shape, list(range(b, ndim)), mode, outer))
        items = [*lead, Ellipsis, *trail]
    else:
        m = draw(st.integers(0, ndim))
        items = draw(dim_items(shape, list(range(m)), mode, outer))
    for _ in range(draw(st.integers(0, 2))):
        items.insert(draw(st.integers(0, len(items))), None)
    if mode == "bad" and draw(st.booleans()):
        items.append(0)  # one selector too many (unless an ellipsis absorbs it)
    if len(items) == 1 and not isinstance(items[0], list) and draw(st.booleans()):
        return items[0]  # a bare index, not a tuple
    return tuple(items)


# ---------------------------------------------------------------------------- references


def _consumed(item: Any) -> int:
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
        return max(item.ndim, 1)
    return 1


def _bind(ndim: int, items: list[Any]) -> list[int | None]:
    """The first source dimension of each item (None for None / Ellipsis)."""
    used = sum(_consumed(it) for it in items)
    out: list[int | None] = []
    d = 0
    for it in items:
        if it is Ellipsis:
            out.append(None)
            d += max(ndim - used, 0)
        elif it is None:
            out.append(None)
        else:
            out.append(d)
            d += _consumed(it)
    return out


def _positive(s: slice, n: int) -> slice:
    """The positive-step slice holding the positions of a negative-step one."""
    start, stop, step = s.indices(n)
    pos = range(start, stop, step)
    if not pos:
        return slice(0, 0)
    return slice(pos[-1], pos[0] + 1, -step)


def reference(x: torch.Tensor, idx: Any) -> torch.Tensor:
    """`x[idx]` with NumPy's meaning for negative steps: such a slice on dimension d is
    applied first (positions narrowed, then flipped) and replaced by `:`."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    for i, (it, d) in enumerate(zip(items, _bind(x.ndim, items), strict=True)):
        if isinstance(it, slice) and it.step is not None and it.step < 0 and d is not None:
            if d < x.ndim:
                pre: list[slice] = [slice(None)] * x.ndim
                pre[d] = _positive(it, x.shape[d])
                x = x[tuple(pre)].flip(d)
                items[i] = slice(None)
    return x[tuple(items)] if isinstance(idx, tuple) else x[items[0]]


class _Oob(Exception):
    pass


class _Bad(Exception):
    pass


def oreference(x: torch.Tensor, idx: Any) -> torch.Tensor:
    """Orthogonal indexing, one dimension at a time: each list or mask picks positions of
    its own dimension (`x[b][:, c]`)."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(it is Ellipsis for it in items) > 1:
        raise _Bad("two ellipses")
    used = sum(_consumed(it) for it in items)
    if used > x.ndim:
        raise _Bad("too many indices")
    out = x
    od = 0  # the output dimension the next item acts on
    for it, d in zip(items, _bind(x.ndim, items), strict=True):
        if it is None:
            out = out.unsqueeze(od)
            od += 1
            continue
        if it is Ellipsis:
            od += x.ndim - used
            continue
        assert d is not None
        n = x.shape[d]
        if isinstance(it, int):
            if not -n <= it < n:
                raise _Oob(f"{it} on {d}")
            out = out.select(od, it % n)
            continue
        if isinstance(it, slice):
            if it.step == 0:
                raise _Bad("step 0")
            pos = torch.tensor(list(range(*it.indices(n))), dtype=torch.int64)
        else:
            t = torch.as_tensor(it)
            if t.dtype == torch.bool:
                if t.shape != (n,):
                    raise _Bad("mask length")
                pos = t.nonzero().reshape(-1)
            else:
                pos = t.to(torch.int64).reshape(-1)
                if pos.numel() and bool(((pos < -n) | (pos >= n)).any()):
                    raise _Oob(f"{pos.tolist()} on {d}")
                pos = torch.where(pos < 0, pos + n, pos)
        out = out.index_select(od, pos)
        od += 1
    return out


def _has_oob(x: torch.Tensor, idx: Any) -> bool:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    for it, d in zip(items, _bind(x.ndim, items), strict=True):
        if d is None or d >= x.ndim or isinstance(it, slice) or it is None:
            continue
        if isinstance(it, int):
            values = torch.tensor([it])
        else:
            t = torch.as_tensor(it)
            if t.dtype == torch.bool:
                continue
            values = t.reshape(-1)
        n = x.shape[d]
        if values.numel() and bool(((values < -n) | (values >= n)).any()):
            return True
    return False


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------- properties


def _check_getitem(x: torch.Tensor, idx: Any, target: Any) -> None:
    try:
        want = reference(x, idx)
    except (IndexError, ValueError, RuntimeError) as exc:
        if "out of bounds" in str(exc):
            expected: tuple[type[TensorSliceError], ...] = (SelectionOutOfRange,)
        elif _has_oob(x, idx):  # the server checks bounds first; both are right
            expected = (InvalidSelection, SelectionOutOfRange)
        else:
            expected = (InvalidSelection,)
        with pytest.raises(expected):
            target[idx]
        return
    # An out-of-range list entry where the result has no elements: PyTorch skips its bounds
    # check, and so does the server (index lists are checked where the result has elements).
    _assert_same(target[idx], want)


@pytest.mark.unit
@SETTINGS
@given(name=st.sampled_from(NAMES), mode=MODES, data=st.data())
def test_getitem_matches_torch(
    name: str, mode: str, data: st.DataObject,
    tensors: dict[str, torch.Tensor], planned: dict[str, _Planned],
) -> None:
    x = tensors[name]
    _check_getitem(x, data.draw(index_exprs(x.shape, mode), label="idx"), planned[name])


@pytest.mark.e2e
@SERVED_SETTINGS
@given(name=st.sampled_from(NAMES), mode=MODES, data=st.data())
def test_getitem_matches_torch_served(
    name: str, mode: str, data: st.DataObject,
    tensors: dict[str, torch.Tensor], remotes: dict[str, Any],
) -> None:
    x = tensors[name]
    _check_getitem(x, data.draw(index_exprs(x.shape, mode), label="idx"), remotes[name])


def _check_oindex(x: torch.Tensor, idx: Any, target: Any) -> None:
    try:
        want = oreference(x, idx)
    except _Oob:
        with pytest.raises(SelectionOutOfRange):
            target.oindex[idx]
        return
    except _Bad:
        with pytest.raises(InvalidSelection):
            target.oindex[idx]
        return
    _assert_same(target.oindex[idx], want)


@pytest.mark.unit
@SETTINGS
@given(name=st.sampled_from(NAMES), mode=MODES, data=st.data())
def test_oindex_matches_per_dimension(
    name: str, mode: str, data: st.DataObject,
    tensors: dict[str, torch.Tensor], planned: dict[str, _Planned],
) -> None:
    x = tensors[name]
    _check_oindex(x, data.draw(index_exprs(x.shape, mode, outer=True), label="idx"),
                  planned[name])


@pytest.mark.e2e
@SERVED_SETTINGS
@given(name=st.sampled_from(NAMES), mode=MODES, data=st.data())
def test_oindex_matches_per_dimension_served(
    name: str, mode: str, data: st.DataObject,
    tensors: dict[str, torch.Tensor], remotes: dict[str, Any],
) -> None:
    x = tensors[name]
    _check_oindex(x, data.draw(index_exprs(x.shape, mode, outer=True), label="idx"),
                  remotes[name])


@pytest.mark.e2e
@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(NAMES), data=st.data())
def test_oindex_equals_sequential_indexing(
    name: str, data: st.DataObject,
    tensors: dict[str, torch.Tensor], remotes: dict[str, Any],
) -> None:
    """With one list per dimension and nothing else, OUTER is the article's x[b][:, c]."""
    x = tensors[name]
    lists = [
        data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=4), label=f"dim{d}")
        for d, n in enumerate(x.shape)
    ]
    want = x
    for d, lst in enumerate(lists):
        want = want[(slice(None),) * d + (lst,)]
    _assert_same(remotes[name].oindex[tuple(lists)], want)


# ---------------------------------------------------------------------------- examples

B, C = torch.tensor([0, 3, 3, 15]), torch.tensor([1, 11, 0])

EXAMPLES: list[Any] = [
    (slice(0, 10),),
    3,
    -1,
    (slice(None), slice(2, 5)),
    (slice(None), [1, 3, 5]),
    ([2, 3, 4],),
    ([0, 2, 5], slice(None), -1),
    (B[:, None], C),  # the broadcast (4, 3) block
    (B, slice(None), [0, 1, 2, 5]),  # separated advanced indices: broadcast dim first
    (slice(None), [1, 2], [0, 5]),  # adjacent: in place
    (slice(None), [1, 2], None, [0, 5]),  # None between: not adjacent any more
    (Ellipsis, [4, 0, 4]),
    (None, Ellipsis, None),
    (slice(None, None, -1),),
    (slice(12, 1, -3), slice(None, None, -2), [1, 0]),
    (slice(-100, 100, 5),),
    (torch.arange(16) % 3 == 0,),
    (slice(None), torch.ones(12, 6, dtype=torch.bool).tril()),
    (torch.tensor([[0, 1], [2, 2]]), 0, slice(1, 3)),
    ([],),
    (slice(None), []),
    # regressions found by the properties above
    (torch.ones(16, 12, dtype=torch.bool).tril(), slice(None, None, -2), -1),  # k-D mask, flip
    (slice(5, 2), [0, 1]),  # empty range before a gather
    ([1, 2, 3], slice(None), [[0], [5]]),  # broadcast (2, 3), separated: first
    (slice(None), torch.tensor([[1, 0], [11, 11]]), slice(1, 5, 3)),  # 2-D list, in place
    (None, torch.ones(16, 12, dtype=torch.bool).triu(), Ellipsis, 4),
]


@pytest.fixture(scope="module", params=["one server", "3 shards"])
def demo_remote(request: pytest.FixtureRequest, demo: torch.Tensor, server: str,
                device: str) -> Iterator[Any]:
    """The demo tensor as the `server` fixture holds it, and cut over 3 shards."""
    if request.param == "one server":
        with Client(server, timeout=30) as c:
            yield c.tensor("demo")
        return
    with serve_sharded({"demo": demo}, device, {"demo": ("N", "C", "H", "W")}) as spec:
        with ClusterClient(spec, timeout=30) as cc:
            yield cc.tensor("demo")


@pytest.mark.e2e
@pytest.mark.parametrize("idx", EXAMPLES, ids=[repr(e)[:40] for e in EXAMPLES])
def test_examples_on_demo(demo_remote: Any, demo: torch.Tensor, idx: Any) -> None:
    _assert_same(demo_remote[idx], reference(demo, idx))


OEXAMPLES: list[Any] = [
    (slice(2, 6, -3),),  # empty negative-step range
    ([0, 2, 5], [1, 4, 5]),
    (slice(None, None, -5), [11, 0, 11], 2),
    (Ellipsis, [True, False, True, False, True]),
    ([3, 3], None, slice(10, 1, -4), Ellipsis, [0, -1]),
]


@pytest.mark.e2e
@pytest.mark.parametrize("idx", OEXAMPLES, ids=[repr(e)[:40] for e in OEXAMPLES])
def test_oindex_examples_on_demo(demo_remote: Any, demo: torch.Tensor, idx: Any) -> None:
    _assert_same(demo_remote.oindex[idx], oreference(demo, idx))


@pytest.mark.unit
def test_reference_helper_is_numpy_meaning() -> None:
    """The reference itself: negative steps as NumPy reads them."""
    a = torch.arange(60).reshape(3, 4, 5)
    for idx in [(slice(None, None, -1),), (slice(None), slice(3, 0, -2), [0, 4]),
                (slice(-1, -100, -2), [1, 0], slice(4, None, -3))]:
        want = torch.from_numpy(np.ascontiguousarray(a.numpy()[idx]))
        assert torch.equal(reference(a, idx), want)


@pytest.mark.e2e
def test_several_ellipses_mean_what_torch_makes_of_them(
    demo_remote: Any, demo: torch.Tensor
) -> None:
    """Each ``...`` stands for the dimensions the others leave; a second one covers
    dimensions past the last (PyTorch's reading; NumPy refuses two)."""
    remote = demo_remote
    for idx in [(Ellipsis, Ellipsis), (Ellipsis, 0, Ellipsis), (0, Ellipsis, Ellipsis)]:
        _assert_same(remote[idx], demo[idx])
    with pytest.raises(IndexError, match="too many indices"):
        remote[..., ..., 0]


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore::UserWarning")  # PyTorch's own, on deprecated forms
@pytest.mark.parametrize("index", [
    [[0, 1], [1, 2]],  # a short list of lists is a tuple
    [torch.tensor(0), torch.tensor(1)],  # ... of tensors too
    [[0, 1], [1]],  # ragged: a tuple, broadcast
    [range(2), range(2)],
    [slice(None), 1],
    [0, None],
    [np.array(0)],
    [[0]] * 32,  # 32 or more: one index
    np.array([[0, 1], [1, 2]]),  # a NumPy array is never a tuple
    (np.array(1), 0),  # 0-d arrays and tensors select
    (0, torch.tensor(1, dtype=torch.int8)),
    [0.5, 1.5],  # floats in a list truncate
    np.array([0.0, 2.0]),
    np.array([0, 1], dtype=np.uint64),
    True, False, np.array(True), torch.tensor(False), torch.tensor(1, dtype=torch.uint8),
    (True, [0, 1], True),
    (Ellipsis, 0, Ellipsis),
])
def test_client_reads_an_index_as_torch_does(index: Any) -> None:
    """The selectors a Python index becomes, planned by the server's own planner, have the
    shape torch gives (values: `test_indexing_upstream`, through a served client)."""
    x = torch.arange(60.0).reshape(3, 4, 5)
    p = plan(TensorMeta("x", (3, 4, 5), torch.float32),
             Selection(selectors_from_index(index), Combine.VECTORIZED))
    assert p.result_shape == tuple(x[index].shape)


@pytest.mark.unit
def test_a_list_read_as_a_tuple_warns_as_torch_does() -> None:
    with pytest.warns(UserWarning, match=r"use x\[tuple\(seq\)\] instead of x\[seq\]"):
        assert len(selectors_from_index([[0, 1], [1, 2]])) == 2
