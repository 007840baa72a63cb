"""Fuzzing the index parser and the planner: index expressions of every kind PyTorch
accepts (and many it refuses) go through the client to a real server.

Kinds: ints (negative, out of range, beyond int64), slices (huge and negative bounds and
steps, step 0), lists and nested lists of ints, lists of bools, tensors of every integer
dtype and bool (0-d included), NumPy arrays (integer, unsigned, bool, float, 0-d), None,
``...`` (several), ranges, objects with ``__index__``, Python bools and floats; whole
indices as tuples, single items and short lists (which PyTorch may read as tuples). The
tensors include size-0 dimensions and a 0-d tensor.

What must hold: the server never answers INTERNAL or UNKNOWN, every error is a
`TensorSliceError`; where PyTorch answers, the results agree (values, dtype, shape; a
negative step with NumPy's meaning); where PyTorch raises, so does the client (an answer
only as the README's deviations allow). Which error an index with several faults reports
may differ (PyTorch reads items and applies them in turn; NumPy's automated tests make the
same reservation); the class of single faults is checked case by case in
`test_indexing_upstream`. The example count is bounded so that CI stays fast.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from upstream_indexing_cases import numpy_meaning

from tensorslice.client import Client, InternalServerError, TensorSliceError
from tensorslice.core.errors import Status
from tensorslice.server import ServerConfig, TensorStore, create_server

# PyTorch's own warnings on deprecated forms (uint8 masks, lists read as tuples), which the
# client repeats where it reads an index the same way.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHAPES = {
    "f435": (4, 3, 5),
    "f302": (3, 0, 2),
    "f0": (0,),
    "f2132": (2, 1, 3, 2),
    "f5": (5,),
    "f": (),
}
TENSORS = {name: torch.arange(float(np.prod(s))).reshape(s) for name, s in SHAPES.items()}
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
              torch.uint32, torch.uint64)
NP_DTYPES = (np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float64, np.bool_)

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


class Idx:
    """An object with ``__index__`` (NumPy's `Zero`, any value)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"Idx({self.value})"


small = st.integers(-7, 7)
big = st.sampled_from([1 << 31, -(1 << 40), (1 << 63) - 1, -(1 << 63), 1 << 63, 1 << 64,
                       -(1 << 70), 1 << 62])
ints = st.one_of(small, small, small, big)
bound = st.one_of(st.none(), small, big)
step = st.one_of(st.none(), st.integers(-4, 4), big)
slices = st.builds(slice, bound, bound, step)
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(shapes)
    dtype = draw(st.sampled_from((*INT_DTYPES, torch.bool, torch.float32)))
    if dtype == torch.bool:
        return torch.rand(shape, generator=torch.Generator().manual_seed(draw(small))) > 0.5
    if dtype == torch.float32:
        return torch.randint(-4, 4, shape).float()
    lo = 0 if not dtype.is_signed else -5
    return torch.randint(lo, 5, shape).to(dtype)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(shapes)
    dtype = draw(st.sampled_from(NP_DTYPES))
    values = np.random.default_rng(draw(small) + 7).integers(-5 if np.issubdtype(
        dtype, np.signedinteger) or dtype == np.float64 else 0, 5, size=shape)
    return values.astype(dtype)


int_lists = st.lists(small, max_size=4)
nested = st.lists(st.lists(small, min_size=2, max_size=2), min_size=1, max_size=3)
bool_lists = st.lists(st.booleans(), max_size=5)
ranges = st.builds(range, st.integers(-3, 3), st.integers(-3, 6))

items = st.one_of(
    ints, slices, int_lists, nested, bool_lists, tensors(), arrays(),
    st.none(), st.just(Ellipsis), ranges, st.builds(Idx, small), st.booleans(),
    st.sampled_from([0.0, 1.5, "0"]),
)


@st.composite
def indices(draw: st.DrawFn) -> Any:
    parts = draw(st.lists(items, max_size=5))
    how = draw(st.sampled_from(["tuple", "tuple", "single", "list"]))
    if how == "single":
        return parts[0] if parts else ()
    if how == "list":
        return list(parts)
    return tuple(parts)


@pytest.fixture(scope="module")
def fuzz_client(device: str) -> Iterator[Client]:
    store = TensorStore(device=device)
    for name, t in TENSORS.items():
        store.add(name, t)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(max_result_bytes=1 << 26))
    srv.start()
    with Client(f"127.0.0.1:{port}", timeout=60) as c:
        yield c
    srv.stop(grace=None)


def _has_step(index: Any, pred: Any) -> bool:
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, slice) and isinstance(p.step, int) and pred(p.step) for p in parts)


def _huge_step(index: Any) -> bool:
    return _has_step(index, lambda s: abs(s) >= 1 << 62)


def _local(x: torch.Tensor, index: Any) -> tuple[torch.Tensor | None, BaseException | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if _has_step(index, lambda s: s < 0):
                # A short list holding a slice is a tuple (PyTorch's rule).
                return numpy_meaning(x, tuple(index) if isinstance(index, list) else index), None
            return x[index], None
        except Exception as exc:  # the outcome to compare with
            return None, exc


def _check_error(exc: BaseException) -> None:
    assert isinstance(exc, TensorSliceError), f"not a TensorSliceError: {exc!r}"
    assert not isinstance(exc, InternalServerError), f"the server failed: {exc}"
    assert exc.status not in (Status.INTERNAL, Status.UNKNOWN), exc


@pytest.mark.e2e
@SETTINGS
@given(name=st.sampled_from(sorted(SHAPES)), index=indices())
def test_fuzzed_indices_never_fail_the_server(
    fuzz_client: Client, name: str, index: Any
) -> None:
    x = TENSORS[name]
    want, want_exc = _local(x, index)
    try:
        got = fuzz_client.tensor(name)[index].cpu()
    except Exception as exc:  # classified below
        _check_error(exc)
        if want_exc is None and not _huge_step(index):
            raise AssertionError(f"PyTorch answers {want!r}; remote: {exc!r}") from None
        return
    if want_exc is not None:
        # Where PyTorch refuses, tensorslice may answer only as the README's deviations
        # say: a negative step (NumPy's meaning, checked above) or a step so large that
        # PyTorch's strides overflow.
        assert _huge_step(index), f"PyTorch raises {want_exc!r}; remote answered {got.shape}"
        return
    assert want is not None
    if _huge_step(index):  # PyTorch's stride arithmetic overflows (README: deviations)
        return
    assert got.dtype == want.dtype and got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got, want)


@pytest.mark.e2e
@SETTINGS
@given(name=st.sampled_from(sorted(SHAPES)), index=indices())
def test_fuzzed_orthogonal_indices_never_fail_the_server(
    fuzz_client: Client, name: str, index: Any
) -> None:
    try:
        fuzz_client.tensor(name).oindex[index]
    except Exception as exc:  # classified below
        _check_error(exc)
