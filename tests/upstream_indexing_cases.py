"""The getitem cases of PyTorch's and NumPy's own indexing tests, as a table.

Ported from `test/test_indexing.py` (pytorch/pytorch: `TestIndexing`, `NumpyTests`) and
`numpy/_core/tests/test_indexing.py` (numpy/numpy), getitem only: setitem, autograd,
`index_put_`/`index_copy`, flat iterators, structured and object dtypes have no remote
counterpart. Each case names its origin (``torch:test_bool_indices``,
``numpy:TestIndexing.test_scalar_return_type``), the served tensor it indexes and the index.
The expected outcome is not written down: it is what PyTorch itself does with the same
index on the same local tensor (values, dtype and shape, or the exception class), computed
when the test runs; NumPy's cases are run with PyTorch's meaning, which is what the client
promises. A strided upstream tensor (``set_`` with strides, ``.t()``) is served as its
contiguous copy: the values are what indexing sees.

`deviation` marks the cases where tensorslice deliberately differs from PyTorch (a negative
step keeps NumPy's meaning instead of PyTorch's ValueError); their reference applies such
slices first, as NumPy does, and they are listed in the README.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensorslice.core.selection import Ellipsis_, Mask, NewAxis, Range, selectors_from_index

NEGATIVE_STEP = "negative step: NumPy's meaning (PyTorch raises ValueError)"


@dataclass(frozen=True)
class Case:
    id: str  # origin, e.g. "torch:test_bool_indices#2"
    tensor: str  # name of the served tensor
    index: Any
    deviation: str | None = None


def consec(shape: Sequence[int], start: int = 1, dtype: torch.dtype = torch.float32
           ) -> torch.Tensor:
    """1, 2, 3, ... in `shape` (PyTorch's helper of the same name)."""
    n = math.prod(shape)
    return torch.arange(start, start + n, dtype=torch.float64).reshape(tuple(shape)).to(dtype)


def _randn(shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def build_tensors() -> dict[str, torch.Tensor]:
    """Every tensor the cases index, by the name the server holds it under."""
    ref24 = torch.arange(0.0, 24).view(3, 8)
    t: dict[str, torch.Tensor] = {
        "c333": consec((3, 3, 3)),
        "c33333": consec((3, 3, 3, 3, 3)),
        "c555": consec((5, 5, 5)),
        "c10x3": consec((10, 10, 10)),
        "lst10": torch.tensor([list(range(i, i + 10)) for i in range(0, 100, 10)],
                              dtype=torch.float64),
        "c10_half": consec((10,), dtype=torch.float16),
        "c10_double": consec((10,), dtype=torch.float64),
        "strided4": consec((10,), dtype=torch.float64)[0:8:2].contiguous(),
        "strided2": consec((10,), dtype=torch.float64)[4:9:4].contiguous(),
        "c32": consec((3, 2), dtype=torch.float64),
        "transposed": torch.arange(12.0, dtype=torch.float64).view(3, 4).t().contiguous(),
        "strided24": ref24[0:2, 1:8:2].contiguous(),
        "strided22": torch.as_strided(ref24, (2, 2), (7, 1), 10).contiguous(),
        "empty10": torch.empty(10, dtype=torch.float64),
        "a45": torch.arange(0.0, 20).view(4, 5),
        "a485": torch.arange(0.0, 160).view(4, 8, 5),
        "a3986": torch.arange(0.0, 1296).view(3, 9, 8, 6),
        "big_int": torch.arange(0, 123344, dtype=torch.int32),
        "r573": _randn((5, 7, 3), 0),
        "bool3": torch.tensor([True, False, True]),
        "n1000": _randn((1000,), 1),
        "r223": _randn((2, 2, 3), 2),
        "r3225": _randn((3, 2, 2, 5), 3),
        "one": torch.tensor([1.0]),
        "r57": _randn((5, 7), 4),
        "ones324_float": torch.ones(3, 2, 4),
        "ones324_long": torch.ones(3, 2, 4, dtype=torch.long),
        "ones324_bf16": torch.ones(3, 2, 4, dtype=torch.bfloat16),
        "ones324_bool": torch.ones(3, 2, 4, dtype=torch.bool),
        "r44": _randn((4, 4), 5),
        "ar43": torch.arange(0, 12).view(4, 3),
        "ar33": torch.arange(0, 9).view(3, 3),
        "ar44": torch.arange(0, 16).view(4, 4),
        "ar2510": torch.arange(0, 100).view(2, 5, 10),
        "r5": _randn((5,), 6),
        "r2345": _randn((2, 3, 4, 5), 7),
        "e10x0": torch.empty(10, 0),
        "r23": _randn((2, 3), 8),
        "s3": torch.tensor(3.0),
        "s1": torch.tensor(1),
        "strue": torch.tensor(True),
        "s10": torch.tensor(10),
        "sr": _randn((), 9),
        "empty0": torch.tensor([]),
        "a111": torch.tensor([[[5.0]]]),
        "a11": torch.tensor([[5]]),
        "t123": torch.tensor([1, 2, 3]),
        "t789": torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]),
        "ones543": torch.ones((5, 4, 3)),
        "z13": torch.tensor([[0.0, 0.0, 0.0]]),
        "ones234": torch.ones((2, 3, 4)),
        "ones23": torch.ones((2, 3)),
        "t5": torch.tensor([5]),
        "z55": torch.zeros(5, 5),
        "z5": torch.zeros(5),
        "r14_kernel": _randn((4, 4), 10),
        "ar10": torch.arange(10),
        "ar10x2": torch.arange(10).reshape(5, 2),
        "ar25": torch.arange(25).reshape(5, 5),
        "ar10col": torch.arange(10)[:, None].contiguous(),
        "ones64d": torch.ones((1,) * 64),
        "ones1d": torch.ones(1),
        "s1np": torch.tensor(1),
        "ar5": torch.arange(5),
        "ar6": torch.arange(6),
        "ar10m": torch.arange(10).reshape(-1, 1),
        "zeros0": torch.zeros(()),
        "zeros1": torch.zeros(1),
        "zeros11": torch.zeros((1, 1)),
        "a0": torch.tensor([0]),
        "x10": torch.ones(10),
        "x10x2": torch.ones((10, 2)),
        "ones55": torch.ones((5, 5)),
        "z44": torch.zeros((4, 4)),
        "z34567": torch.zeros((3, 4, 5, 6, 7)),
        "ones33": torch.ones((3, 3)),
        "ones112": torch.ones((1, 1, 2)),
        "s5": torch.tensor(5),
        "auto": torch.arange(3 * 1 * 5 * 6).reshape(3, 1, 5, 6),
        "auto_empty": torch.empty((3, 0, 5, 6), dtype=torch.float64),
        "auto1d": torch.arange(10),
    }
    return t


class _Zero:
    """NumPy's `Zero`: the most basic valid index, an object with ``__index__``."""

    def __index__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "Zero()"


class _ArrayLike:
    """NumPy's `ArrayLike`: has ``__array__``, is neither a sequence nor an index."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(0)

    def __repr__(self) -> str:
        return "ArrayLike()"


class _SequenceLike:
    """NumPy's broken sequence: claims one item, fails to give it."""

    def __index__(self) -> int:
        return 0

    def __len__(self) -> int:
        return 1

    def __getitem__(self, item: Any) -> Any:
        raise IndexError("Not possible")

    def __repr__(self) -> str:
        return "SequenceLike()"


class _TupleSubclass(tuple):  # type: ignore[type-arg]
    pass


def _ri_variants(indices: list[Any]) -> list[Any]:
    """PyTorch's `ri` picks a LongTensor, a list or a tuple at random: all three here."""
    return [torch.tensor(indices, dtype=torch.long), list(indices), tuple(indices)]


def torch_cases(t: dict[str, torch.Tensor]) -> Iterator[tuple[str, str, Any]]:
    """(origin, tensor, index) from PyTorch's test/test_indexing.py."""
    o = "torch:test_index"
    for idx in [torch.LongTensor(), 0, 1, 2, (0, 1), slice(0, 2), (2, 2, 2), slice(None),
                (..., 2), (0, ..., 2), (0, 2, ...), (..., 2, 2, 2), (2, ..., 2, 2),
                (2, 2, ..., 2), (2, 2, 2, ...), ..., (1, 1, 1, 1), (1, 1, 1, slice(1, 1)),
                (3, 3, 3, 3, 3, 3, 3, 3), 0.0, slice(0.0, 2.0), (0.0, slice(0.0, 2.0)),
                (0.0, slice(None), slice(0.0, 2.0)), (0.0, ..., slice(0.0, 2.0)),
                (0.0, slice(None), 0.0)]:
        yield o, "c333", idx
    for idx in [(..., 1, 0), (2, ..., 1, 0), (2, 1, 0, ..., 1), ...]:
        yield o, "c33333", idx
    for idx in [torch.LongTensor([2, 4]), (2, None), (2, None, None), (slice(2, 4), None),
                (None, 2, None, None), (None, slice(2, 5), None, None), slice(0),
                (slice(0), 2), (2, slice(0)), (2, slice(1, 1), 2)]:
        yield o, "c555", idx
    for idx in [slice(1, 5, 2), slice(1, 6, 2), slice(1, 9, 4),
                (slice(2, 4), slice(1, 5, 2)), (3, slice(1, 6, 2)),
                (None, 2, slice(1, 9, 4)), (slice(None), 2, slice(1, 6, 2)), slice(1, 9, 0)]:
        yield o, "c10x3", idx
    yield o, "c10x3", slice(1, 9, -1)  # a deviation (negative step), see `cases`
    rng = random.Random(0)  # upstream draws 100 at random; a seeded 40 here
    for _ in range(40):
        s1 = rng.randrange(10)
        i1 = slice(s1, s1 + rng.randrange(1, 10 - s1 + 1), rng.randrange(1, 8))
        if rng.randrange(2) == 0:
            s2 = rng.randrange(10)
            i2 = slice(s2, s2 + rng.randrange(1, 10 - s2 + 1), rng.randrange(1, 8))
            yield o, "lst10", (i1, i2)
        else:
            yield o, "lst10", i1

    o = "torch:test_advancedindex"
    for name in ("c10_half", "c10_double"):
        yield o, name, [0]
        yield o, name, [2, 3, 4]
        for lst in ([0], [3], [2, 3, 4], [0, 2, 4]):
            for v in _ri_variants(lst):
                yield o, name, (v,)
    for name, pairs in (("strided4", ([0], [3], [1, 2], [[2, 1], [0, 3]])),
                        ("strided2", ([0], [1], [0, 1], [[0, 1], [1, 0]]))):
        yield o, name, [0]
        for lst in pairs:
            for v in _ri_variants(lst):
                yield o, name, (v,)
    pairs32: list[tuple[Any, Any]] = [
        ([0, 1, 2], [0]), ([0, 1, 2], [1]), ([0], [0]), ([2], [1]), ([0, 0], [0, 1]),
        ([0, 1, 1, 0, 2], [1]), ([0, 0, 1, 1], [0, 1, 0, 0]),
        ([[0, 0], [1, 2]], ([0],)), ([[0, 0], [1, 2]], [1, 0]),
        ([[0, 0], [1, 2]], [[0, 1], [1, 0]]),
    ]
    for rows, cols in pairs32:
        for k, v in enumerate(_ri_variants(rows)):
            c = cols if isinstance(cols, tuple) else _ri_variants(cols)[k]
            yield o, "c32", (v, c)
    for rows, cols in [([0, 1, 2], [0]), ([0, 1, 2], [1]), ([0], [0]), ([2], [1]),
                       ([0, 0], [0, 1]), ([0, 1, 1, 0, 3], [1]), ([0, 0, 1, 1], [0, 1, 0, 0]),
                       ([[0, 0], [1, 2]], ([0],)), ([[0, 0], [1, 2]], [1, 0]),
                       ([[0, 0], [1, 3]], [[0, 1], [1, 2]])]:
        yield o, "transposed", (torch.tensor(rows), cols)
    for rows, cols in [([0, 1], [0]), ([0, 1], [1]), ([0], [0]), ([1], [3]), ([0, 0], [0, 3]),
                       ([1], [0, 1, 1, 0, 3]), ([0, 0, 1, 1], [0, 1, 0, 0]),
                       ([[0, 0], [1, 1]], ([0],)), ([[0, 1], [1, 0]], [1, 2]),
                       ([[0, 0], [1, 1]], [[0, 1], [1, 2]])]:
        yield o, "strided24", (torch.tensor(rows), cols)
    for rows, cols in [([0], [1]), ([0, 1], [1, 0]), ([[0], [1]], [[0, 1], [0, 1]])]:
        yield o, "strided22", (torch.tensor(rows), torch.tensor(cols))
    for idx in [(torch.tensor([0, 2]),), (torch.tensor([1]), ...), (..., torch.tensor([1])),
                ([1], [0, 2], [3])]:
        yield o, "c32", idx
    for err in (10, -11):
        for idx in (err, torch.LongTensor([err]), [err]):
            yield o, "empty10", idx
    s = slice(None)
    for idx in [(s, [1, 3]), ([0, 2], s), (s, [[0, 1], [2, 3]]), ([-1], [0]), ([0, 2], [-1]),
                (s, [-1]), (s, [0, 1, 1, 2, 2])]:
        yield o, "a45", idx
    for idx in [
        (s, s, (0, 3, 4)), (s, (2, 4, 5, 7), s), ((2, 3), s, s), (s, (0, 2, 3), (1, 3, 4)),
        (s, (0,), (1, 2, 4)), (s, (0, 1, 3), (4,)), (s, ((0, 1), (1, 0)), ((2, 3),)),
        (s, ((0, 1), (2, 3)), ((0,),)), (s, ((5, 6),), ((0, 3), (4, 4))),
        ((0, 2, 3), (1, 3, 4), s), ((0,), (1, 2, 4), s), ((0, 1, 3), (4,), s),
        (((0, 1), (1, 0)), ((2, 1), (3, 5)), s), (((0, 1), (1, 0)), ((2, 3),), s),
        (((0, 1), (2, 3)), ((0,),), s), (((2, 1),), ((0, 3), (4, 4)), s),
        (((2,),), ((0, 3), (4, 1)), s), ((0, 2, 3), s, (1, 3, 4)), ((0, 2),),
        ((0, 2), s), ((0, 2), ...), ((0, 2), s, ...), ((0, 2), ..., s), ((0, 2), (1, 3)),
        ((0, 2), (1, 3), ...), (..., (1, 3), (2, 3)), (..., (2, 3, 4)), (..., s, (2, 3, 4)),
        (s, ..., (2, 3, 4)), (..., s, s, (0, 3, 4)), (s, ..., s, (0, 3, 4)),
        (s, s, ..., (0, 3, 4)), (s, s, (0, 3, 4), ...),
        (..., ((0, 1), (1, 0)), ((2, 1), (3, 5)), s),
        (((0, 1), (1, 0)), ((2, 1), (3, 5)), ..., s), (((0, 1), (1, 0)), ((2, 1), (3, 5)), s, ...),
    ]:
        yield o, "a485", idx
    for idx in [
        (s, s, s, (0, 3, 4)), (s, s, (2, 4, 5, 7), s), (s, (2, 3), s, s), ((1, 2), s, s, s),
        (s, s, (0, 2, 3), (1, 3, 4)), (s, s, (0,), (1, 2, 4)), (s, s, (0, 1, 3), (4,)),
        (s, s, ((0, 1), (1, 0)), ((2, 3),)), (s, s, ((0, 1), (2, 3)), ((0,),)),
        (s, s, ((5, 6),), ((0, 3), (4, 4))), (s, (0, 2, 3), (1, 3, 4), s),
        (s, (0,), (1, 2, 4), s), (s, (0, 1, 3), (4,), s),
        (s, ((0, 1), (3, 4)), ((2, 3), (0, 1)), s), (s, ((0, 1), (3, 4)), ((2, 3),), s),
        (s, ((0, 1), (3, 2)), ((0,),), s), (s, ((2, 1),), ((0, 3), (6, 4)), s),
        (s, ((2,),), ((0, 3), (4, 2)), s), ((0, 1, 2), (1, 3, 4), s, s), ((0,), (1, 2, 4), s, s),
        ((0, 1, 2), (4,), s, s), (((0, 1), (0, 2)), ((2, 4), (1, 5)), s, s),
        (((0, 1), (1, 2)), ((2, 0),), s, s), (((2, 2),), ((0, 3), (4, 5)), s, s),
        (((2,),), ((0, 3), (4, 5)), s, s), (s, (3, 4, 6), (0, 2, 3), (1, 3, 4)),
        (s, (2, 3, 4), (1, 3, 4), (4,)), (s, (0, 1, 3), (4,), (1, 3, 4)),
        (s, (6,), (0, 2, 3), (1, 3, 4)), (s, (2, 3, 5), (3,), (4,)), (s, (0,), (4,), (1, 3, 4)),
        (s, (6,), (0, 2, 3), (1,)), (s, ((0, 3), (3, 6)), ((0, 1), (1, 3)), ((5, 3), (1, 2))),
        ((2, 2, 1), (0, 2, 3), (1, 3, 4), s), ((2, 0, 1), (1, 2, 3), (4,), s),
        ((0, 1, 2), (4,), (1, 3, 4), s), ((0,), (0, 2, 3), (1, 3, 4), s),
        ((0, 2, 1), (3,), (4,), s), ((0,), (4,), (1, 3, 4), s), ((1,), (0, 2, 3), (1,), s),
        (((1, 2), (1, 2)), ((0, 1), (2, 3)), ((2, 3), (3, 5)), s), (..., (0, 3, 4)),
        (..., s, (0, 3, 4)), (..., s, s, (0, 3, 4)), (s, ..., (0, 3, 4)),
        (s, s, ..., (0, 3, 4)), (s, (0, 2, 3), (1, 3, 4)), (s, (0, 2, 3), (1, 3, 4), ...),
        (..., (0, 2, 3), (1, 3, 4), s), ((0,), (1, 2, 4)), ((0,), (1, 2, 4), s),
        ((0,), (1, 2, 4), ...), ((0,), (1, 2, 4), ..., s), ((1,),), ((0, 2, 1), (3,), (4,)),
        ((0, 2, 1), (3,), (4,), s), ((0, 2, 1), (3,), (4,), ...), (..., (0, 2, 1), (3,), (4,)),
        (s, s, [[0, 1], [1, 0]], [[2, 3], [3, 0]]), (s, s, [[2]], [[0, 3], [4, 4]]),
    ]:
        yield o, "a3986", idx

    yield "torch:test_advancedindex_big", "big_int", ([0, 123, 44488, 68807, 123343],)
    yield "torch:test_single_int", "r573", 4
    for idx in [4, (4, s, 1)]:
        yield "torch:test_multiple_int", "r573", idx
    for idx in [None, (s, None), (s, None, None), (..., None)]:
        yield "torch:test_none", "r573", idx
    for idx in [slice(None, None, 1), slice(None, None, 2), slice(None, None, 3),
                slice(None, None, 11), slice(1, 6, 2)]:
        yield "torch:test_step", "ar10", idx
    yield "torch:test_bool_indices", "r573", torch.tensor([True, False, True, True, False])
    yield "torch:test_bool_indices", "bool3", torch.tensor([True, False, False])
    yield "torch:test_bool_indices", "bool3", torch.tensor([1, 0, 0], dtype=torch.uint8)
    windows = [range(i, i + 10) for i in range(1000 - 10)]
    for n in (len(windows), 100, 32, 31):
        yield "torch:test_list_indices", "n1000", windows[:n]
    yield ("torch:test_multiple_bool_indices", "r573",
           (torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool), s,
            torch.tensor([1, 1, 1], dtype=torch.bool)))
    b = ((True, False), (False, False))
    m = torch.tensor(b, dtype=torch.bool)
    z, tt, f = torch.tensor(0), torch.tensor(True), torch.tensor(False)
    for mm in (b, m):
        for rest in [(), (slice(None, None, 2),), (None,), (0,), (z,), (True,),
                     (True, True, True, True), (False,), (True, True, False, True), (tt,),
                     (f,)]:
            yield "torch:test_multi_dimensional_bool_mask", "r223", (mm, *rest)
    for idx in [(s, m, s), (0, m, slice(None, None, 2)), (..., m, slice(None, None, 2)),
                (None, ..., m, slice(None, None, 2))]:
        yield "torch:test_multi_dimensional_bool_mask", "r3225", idx
    yield "torch:test_byte_mask", "r573", torch.ByteTensor([1, 0, 1, 1, 0])
    yield "torch:test_byte_mask", "one", t["one"] == 0
    yield ("torch:test_multiple_byte_mask", "r573",
           (torch.ByteTensor([1, 0, 1, 1, 0]), s, torch.ByteTensor([1, 1, 1])))
    yield "torch:test_byte_mask2d", "r573", t["r57"] > 0
    for idx in [[0, 4, 2], (s, [0, 4, 2]), (s, [[0, 1], [4, 3]])]:
        yield "torch:test_int_indices", "r573", idx
    for name in ("ones324_float", "ones324_long", "ones324_bf16", "ones324_bool"):
        yield "torch:test_index_src_datatype", name, ([0, 2, 1], s, s)
    ind_long = torch.tensor([3, 0, 2, 2])
    for ind in (ind_long, ind_long.int()):
        for idx in [(ind, ind), (ind, s), (s, ind)]:
            yield "torch:test_index_ind_dtype", "r44", idx
    yield ("torch:test_int_indices2d", "ar43",
           (torch.tensor([[0, 0], [3, 3]]), torch.tensor([[0, 2], [0, 2]])))
    yield ("torch:test_int_indices_broadcast", "ar43",
           (torch.tensor([0, 3])[:, None], torch.tensor([0, 2])))
    yield "torch:test_empty_index", "ar43", torch.tensor([], dtype=torch.long)
    yield "torch:test_empty_index", "ar43", torch.zeros(4, 3).bool()
    yield "torch:test_empty_ndim_index", "r5", torch.empty(0, 2, dtype=torch.int64)
    yield "torch:test_empty_ndim_index", "r2345", (s, torch.empty(0, 6, dtype=torch.int64))
    for idx in [[1, 2], ([], []), (s, [0, 1])]:
        yield "torch:test_empty_ndim_index", "e10x0", idx
    yield "torch:test_empty_ndim_index_bool", "r5", torch.empty(0, 2, dtype=torch.uint8)
    yield "torch:test_empty_slice", "r2345", (s, slice(1, 1), s, 1)
    true8, false8 = torch.tensor(1, dtype=torch.uint8), torch.tensor(0, dtype=torch.uint8)
    for name in ("r23", "s3"):
        for idx in [True, False, true8, false8, None, ...]:
            yield "torch:test_index_getitem_copy_bools_slices", name, idx
    for name in ("s1", "strue"):
        for idx in [torch.tensor(True, dtype=torch.uint8), torch.tensor(True)]:
            yield "torch:test_index_scalar_with_bool_mask", name, idx
    zero, one = torch.tensor(0), torch.tensor(1)
    for idx in [zero, (zero, one), (0, one), (zero, 1), one.int(), one.short(), 0, (0, 1), 1]:
        yield "torch:test_getitem_scalars", "r23", idx
    for idx in [s, zero, ...]:
        yield "torch:test_getitem_scalars", "sr", idx
    for idx in [(slice(1, 2), slice(1, 3)), (slice(1, 2), [1, 2])]:
        yield "torch:test_basic_advanced_combined", "ar43", idx
    i, j = torch.IntTensor([0, 1])
    yield "torch:test_variable_slicing", "ar44", slice(i, j)
    yield "torch:test_ellipsis_tensor", "ar33", (..., torch.tensor([0, 2]))
    yield "torch:test_ellipsis_tensor", "ar33", (torch.tensor([0, 2]), ...)
    yield "torch:test_invalid_index", "ar44", slice("0", "1")
    for idx in [(0, 5), (4, 5), (0, 1, 15), (s, s, 12)]:
        yield "torch:test_out_of_bound_index", "ar2510", idx
    yield "torch:test_zero_dim_index", "s10", 0
    for idx in [torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max]:
        yield "torch:test_index_limits", "empty0", idx

    o = "torch:NumpyTests.test_index_no_floats"
    for idx in [0.0, (0, 0.0), (0.0, 0), (0.0, s), (s, 0.0), (s, 0.0, s), (0.0, s, s),
                (0, 0, 0.0), (0.0, 0, 0), (0, 0.0, 0), -1.4, (0, -1.4), (-1.4, 0), (-1.4, s),
                (s, -1.4), (s, -1.4, s), (-1.4, s, s), (0, 0, -1.4), (-1.4, 0, 0),
                (0, -1.4, 0)]:
        yield o, "a111", idx
    yield "torch:NumpyTests.test_none_index", "t123", None
    yield "torch:NumpyTests.test_empty_tuple_index", "t123", ()
    for idx in [[], torch.tensor([]).long(), torch.tensor([]).float()]:
        yield "torch:NumpyTests.test_empty_fancy_index", "t123", idx
    for idx in [..., (0, ...), (..., 0), (0, ..., 1)]:
        yield "torch:NumpyTests.test_ellipsis_index", "t789", idx
    for idx in [0, -1, 1 << 30, 1 << 64]:
        yield "torch:NumpyTests.test_single_int_index", "t789", idx
    for idx in [True, False]:
        yield "torch:NumpyTests.test_single_bool_index", "t789", idx
    o = "torch:NumpyTests.test_boolean_shape_mismatch"
    byte44 = torch.zeros(4, 4, dtype=torch.uint8)
    for idx in [torch.tensor([True]), torch.tensor([False] * 6), byte44, (s, byte44)]:
        yield o, "ones543", idx
    yield "torch:NumpyTests.test_boolean_indexing_onedim", "z13", torch.tensor([True])
    b2 = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])
    for idx in [b2, b2[1], b2[0], b2[2]]:
        yield "torch:NumpyTests.test_boolean_indexing_twodim", "t789", idx
    for idx in [(False, True, ...), (True, [0, 1], True, True, [1], [[2]]),
                (False, [0, 1], ...)]:
        yield "torch:NumpyTests.test_boolean_indexing_weirdness", "ones234", idx
    for idx in [(f, tt, ...), (tt, [0, 1], tt, tt, [1], [[2]]), (f, [0, 1], ...)]:
        yield "torch:NumpyTests.test_boolean_indexing_weirdness_tensors", "ones234", idx
    for idx in [(True, True), (tt, tt)]:
        yield "torch:NumpyTests.test_boolean_indexing_alldims", "ones23", idx
    bl, cl = [True, False, False], [True, True, False]
    for idx in [bl, (bl, bl), cl, (cl, cl)]:
        yield "torch:NumpyTests.test_boolean_list_indexing", "t789", idx
    for idx in [(), ..., s]:
        yield "torch:NumpyTests.test_everything_returns_views", "t5", idx
    yield "torch:NumpyTests.test_broaderrors_indexing", "z55", ([0, 1], [0, 1, 2])
    ind = torch.ones(20, dtype=torch.int64)
    ind[-1] = 10
    yield "torch:NumpyTests.test_trivial_fancy_out_of_bounds", "z5", ind
    ind = torch.ones(20, dtype=torch.int64)
    ind[0] = 11
    yield "torch:NumpyTests.test_trivial_fancy_out_of_bounds", "z5", ind
    yield "torch:NumpyTests.test_index_is_larger", "z55", ([[0], [1], [2]], [0, 1, 2])
    yield "torch:NumpyTests.test_broadcast_subspace", "z55", torch.arange(4, -1, -1).long()
    yield "torch:NumpyTests.test_truncate_leading_1s", "r14_kernel", (range(4), range(4))


def numpy_cases(t: dict[str, torch.Tensor]) -> Iterator[tuple[str, str, Any]]:
    """(origin, tensor, index) from NumPy's numpy/_core/tests/test_indexing.py."""
    s = slice(None)
    o = "numpy:TestIndexing.test_index_no_floats"
    for idx in [0.0, (0, 0.0), (0.0, 0), (0.0, s), (s, 0.0), (s, 0.0, s), (0.0, s, s),
                (0, 0, 0.0), (0.0, 0, 0), (0, 0.0, 0), -1.4, (0, -1.4), (-1.4, 0), (-1.4, s),
                (s, -1.4), (s, -1.4, s), (-1.4, s, s), (0, 0, -1.4), (-1.4, 0, 0),
                (0, -1.4, 0), (slice(0.0, None), 0.0), (slice(0.0, None), 0.0, s)]:
        yield o, "a111", idx
    o = "numpy:TestIndexing.test_slicing_no_floats"
    for idx in [slice(0.0, None), (slice(0, None), slice(0.0, 2)), (slice(0.0, None, 2),
                slice(None, 0)), (slice(0.0, 1, 2), s), (s, slice(0.0, None)),
                slice(None, 0.0), (slice(None, 0), slice(1, 2.0)), (slice(None, 0.0, 2),
                slice(None, 0)), (slice(None, 0.0), s), (s, slice(0, 4.0, 2)),
                slice(None, None, 1.0), (slice(0, None), slice(None, 2, 2.0)),
                (slice(1, None, 4.0), slice(None, 0)), (slice(None, None, 5.0), s),
                (s, slice(0, 4, 2.0)), slice(1.0, 2, 2.0), slice(1.0, None, 2.0),
                (slice(0, None), slice(None, 2.0, 2.0)), (slice(1.0, 1, 4.0), slice(None, 0)),
                (slice(1.0, 5.0, 5.0), s), (s, slice(0.4, 4.0, 2.0)), slice(None, None, 0.0)]:
        yield o, "a11", idx
    arr = torch.tensor([[[1]]])
    yield "numpy:TestIndexing.test_index_no_array_to_index", "a111", slice(arr, arr, arr)
    yield "numpy:TestIndexing.test_none_index", "t123", None
    yield "numpy:TestIndexing.test_empty_tuple_index", "t123", ()
    yield "numpy:TestIndexing.test_empty_tuple_index", "s1np", ()
    o = "numpy:TestIndexing.test_same_kind_index_casting"
    index = np.arange(5)
    u_index = index.astype(np.uintp)
    for name in ("ar10", "ar10x2"):
        yield o, name, index
        yield o, name, u_index
    yield o, "ar25", (u_index, u_index)
    yield o, "ar25", (index, index)
    o = "numpy:TestIndexing.test_empty_fancy_index"
    for idx in [[], np.array([], dtype=np.intp), np.array([])]:
        yield o, "t123", idx
    for idx in [..., (0, ...), (..., 0), (0, ..., 1)]:
        yield "numpy:TestIndexing.test_ellipsis_index", "t789", idx
    for idx in [0, -1, 1 << 30, 1 << 64]:
        yield "numpy:TestIndexing.test_single_int_index", "t789", idx
    for idx in [np.array(True), np.array(False)]:
        yield "numpy:TestIndexing.test_single_bool_index", "t789", idx
    o = "numpy:TestIndexing.test_boolean_shape_mismatch"
    z44 = np.zeros((4, 4), dtype=bool)
    for idx in [np.array([True]), np.array([False] * 6), z44, (s, z44)]:
        yield o, "ones543", idx
    yield "numpy:TestIndexing.test_boolean_indexing_onedim", "z13", np.array([True])
    b2 = np.array([[True, False, True], [False, True, False], [True, False, True]])
    for idx in [b2, b2[1], b2[0], b2[2]]:
        yield "numpy:TestIndexing.test_boolean_indexing_twodim", "t789", idx
    for idx in [[True, False, True], (None, [True, False, True])]:
        yield "numpy:TestIndexing.test_boolean_indexing_list", "t123", idx
    yield ("numpy:TestIndexing.test_reversed_strides_result_allocation", "ar10col",
           np.arange(10)[::-1])
    yield ("numpy:TestIndexing.test_too_many_fancy_indices_special_case", "ones64d",
           (np.array([0]),) * 64)
    for idx in [np.bool_(True), np.array(True), np.bool_(False), np.array(False)]:
        yield "numpy:TestIndexing.test_scalar_array_bool", "s1np", idx
    for idx in [(), ..., s]:
        yield "numpy:TestIndexing.test_everything_returns_views", "ar5", idx
    yield "numpy:TestIndexing.test_broaderrors_indexing", "z55", ([0, 1], [0, 1, 2])
    for pos, val in ((-1, 10), (0, 11)):
        ind = np.ones(20, dtype=np.intp)
        ind[pos] = val
        yield "numpy:TestIndexing.test_trivial_fancy_out_of_bounds", "z5", ind
    yield ("numpy:TestIndexing.test_trivial_fancy_not_possible", "ar6",
           np.arange(6, dtype=np.intp).reshape(2, 1, 3)[:, :, 0])
    bt = np.arange(10).reshape(5, 2).T
    yield "numpy:TestIndexing.test_memory_order", "ar10", bt
    yield "numpy:TestIndexing.test_memory_order", "ar10m", (bt, 0)
    o = "numpy:TestIndexing.test_scalar_return_type"
    yield o, "zeros0", ()
    yield o, "zeros1", _Zero()
    yield o, "zeros11", (_Zero(), np.array(0))
    yield o, "zeros11", (_Zero(), _ArrayLike())
    o = "numpy:TestIndexing.test_small_regressions"
    for idx in [np.array([0], dtype=np.intp), np.array([0], dtype=np.uint8),
                np.array([1], dtype=np.intp), np.array([1], dtype=np.uint8)]:
        yield o, "a0", idx
    yield "numpy:TestIndexing.test_tuple_subclass", "ones55", _TupleSubclass(([1], [1]))
    yield "numpy:TestIndexing.test_tuple_subclass", "ones55", (_TupleSubclass(([1], [1])),)
    yield "numpy:TestIndexing.test_broken_sequence_not_nd_index", "ar10", _SequenceLike()
    yield "numpy:TestIndexing.test_broken_sequence_not_nd_index", "ar10", (_SequenceLike(),)
    ind4 = np.broadcast_to(np.arange(10)[:, None, None, None], (10, 55, 4, 4))
    yield "numpy:TestIndexing.test_indexing_array_weird_strides", "x10", ind4
    yield ("numpy:TestIndexing.test_indexing_array_weird_strides", "x10x2",
           (ind4, np.zeros(4, dtype=np.intp)))
    yield "numpy:TestIndexing.test_indexing_array_negative_strides", "z44", (s, [0, 1, 2, 3])
    o = "numpy:TestIndexing.test_too_many_advanced_indices"
    for index, num, name in itertools.product([True, False, np.array([0])], [64, 80],
                                              ["ones1d", "ones64d"]):
        yield o, name, (index,) * num
    for idx in [[0, 1], ([0, 1], [0, 1]), [s]]:
        yield "numpy:TestIndexing.test_nontuple_ndindex", "ar25", idx
    for idx in [(..., [1, 2], s), ([0, 1], ..., 0), (..., [1, 2], [1, 2])]:
        yield "numpy:TestBroadcastedAssignments.test_broadcast_error_reports_correct_shape", \
            "z34567", idx
    yield "numpy:TestBroadcastedAssignments.test_index_is_larger", "z55", \
        ([[0], [1], [2]], [0, 1, 2])
    yield "numpy:TestBroadcastedAssignments.test_broadcast_subspace", "z55", np.arange(5)[::-1]
    o = "numpy:TestFloatNonIntegerArgument"
    for idx in [np.array([0]), [0, 0], (s, [0, 0]), (s, 0, s), (s, s, s)]:
        yield o + ".test_valid_indexing", "a111", idx
    for idx in [slice(None), slice(0, None), slice(None, 2), slice(0, 2), slice(None, None, 2),
                slice(1, None, 2), slice(None, 2, 2), slice(1, 2, 2)]:
        yield o + ".test_valid_slicing", "a111", idx
    o = "numpy:TestBooleanIndexing.test_boolean_indexing_weirdness"
    for idx in [(False, True, ...), (True, [0, 1], True, True, [1], [[2]]),
                (False, [0, 1], ...)]:
        yield o, "ones234", idx
    o = "numpy:TestBooleanIndexing.test_boolean_indexing_fast_path"
    for idx in [np.array([[False] * 9]), np.array([[False] * 8 + [True]]),
                np.array([[False] * 10])]:
        yield o, "ones33", idx
    yield o, "ones112", np.array([[[True], [False]]])
    for idx in [[0.5, 1.5], (["1", "2"],), []]:
        yield "numpy:TestNonIntegerArrayLike.test_basic", "ar10", idx
    for idx in [(..., ...), ((...,) * 2,), ((...,) * 3,)]:
        yield "numpy:TestMultipleEllipsisError.test_basic", "ar10", idx
    o = "numpy:TestInvalidIndexErrorMessage"
    yield o + ".test_list_of_slices", "z55", [s, s]
    yield o + ".test_tuple_of_non_indexables", "z55", ("1", "2")
    yield o + ".test_tuple_of_non_indexables", "z55", "1"
    yield o + ".test_tuple_mixed_good_bad", "z55", (0, "1")
    for idx in [np.array([1.5, 2.5]), np.array([1.5, 2.5], dtype=np.float32),
                np.array([1.5 + 0j])]:
        yield o + ".test_fancy_index_error_shows_array_dtype", "z5", idx
    yield from automated_cases()


def _complex_indices() -> list[Any]:
    """NumPy's `TestMultiIndexingAutomated._create_complex_indices` ('skip' is None here)."""
    return [
        "skip", Ellipsis, 0,
        np.array([True, False, False]),
        np.array([[True, False], [False, True]]),
        np.array([[[False, False], [False, False]]]),
        slice(-5, 5, 2), slice(1, 1, 100), slice(4, -1, -2), slice(None, None, -3),
        np.empty((0, 1, 1), dtype=np.intp),
        np.array([0, 1, -2]),
        np.array([[2], [0], [1]]),
        np.array([[0, -1], [0, 1]], dtype=np.dtype("intp").newbyteorder()),
        np.array([2, -1], dtype=np.int8),
        np.zeros([1] * 31, dtype=int),
        np.array([0.0, 1.0]),
    ]


def automated_cases() -> Iterator[tuple[str, str, Any]]:
    """NumPy's `TestMultiIndexingAutomated`: every combination `test_multidim` builds, on
    the (3, 1, 5, 6) arange and its empty twin (3, 0, 5, 6), plus `test_boolean` and
    `test_1d`."""
    o = "numpy:TestMultiIndexingAutomated"
    yield o + ".test_boolean", "s5", np.array(True)
    a = np.zeros((3, 1, 5, 6), dtype=bool)
    for idx in [(a,), (a[..., 0],), (a[None, ...],)]:
        yield o + ".test_boolean", "auto", idx
    complex_indices = _complex_indices()
    simple_indices = [Ellipsis, None, -1, [1], np.array([True]), "skip"]
    fill_indices = [slice(None, None), 0]
    for simple_pos in (0, 2, 3):
        tocheck: list[list[Any]] = [fill_indices, complex_indices, fill_indices, fill_indices]
        tocheck[simple_pos] = simple_indices
        for combo in itertools.product(*tocheck):
            index = tuple(i for i in combo if not (isinstance(i, str) and i == "skip"))
            yield o + ".test_multidim", "auto", index
            yield o + ".test_multidim", "auto_empty", index
    for index in [(0, 0, 0, 0), (0, 0, 0, 0, 0), (0, 0, [1], 0, 0)]:
        yield o + ".test_multidim", "auto", index
        yield o + ".test_multidim", "auto_empty", index
    for index in complex_indices:
        if not (isinstance(index, str) and index == "skip"):
            yield o + ".test_1d", "auto1d", index


def _has_negative_step(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, slice) and isinstance(i.step, int) and i.step < 0 for i in items)


def cases() -> list[Case]:
    """Every case, each with a unique id naming its origin."""
    t = build_tensors()
    seen: dict[str, int] = {}
    out: list[Case] = []
    for origin, name, index in itertools.chain(torch_cases(t), numpy_cases(t)):
        n = seen.get(origin, 0)
        seen[origin] = n + 1
        deviation = NEGATIVE_STEP if _has_negative_step(index) else None
        out.append(Case(f"{origin}#{n}", name, index, deviation))
    return out


def numpy_meaning(x: torch.Tensor, index: Any) -> torch.Tensor:
    """`x[index]` with NumPy's meaning for negative steps (the deviation): such a slice on
    source dimension d is applied first (narrowed, then flipped) and replaced by ``:``."""
    items = list(index) if isinstance(index, tuple) else [index]
    sels = [selectors_from_index((i,))[0] for i in items]
    used = sum(0 if isinstance(sl, (NewAxis, Ellipsis_)) else
               sl.values.ndim if isinstance(sl, Mask) else 1 for sl in sels)
    d = 0
    for k, sel in enumerate(sels):
        if isinstance(sel, Ellipsis_):
            d += x.ndim - used
        elif isinstance(sel, Mask):
            d += sel.values.ndim
        elif not isinstance(sel, NewAxis):
            if isinstance(sel, Range) and sel.step is not None and sel.step < 0 and d < x.ndim:
                start, stop, step = slice(sel.start, sel.stop, sel.step).indices(x.shape[d])
                length = len(range(start, stop, step))
                n = x.shape[d]
                pre: list[slice] = [slice(None)] * x.ndim
                pre[d] = (slice(n - 1 - start, n - 1 - start + (length - 1) * -step + 1, -step)
                          if length else slice(0, 0))
                x = x.flip(d)[tuple(pre)]
                items[k] = slice(None)
            d += 1
    return x[tuple(items)]
