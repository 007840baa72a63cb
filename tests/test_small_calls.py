"""Small calls made cheap without changing what they answer: the server's answers kept by
request bytes (`AnswerCache`), and a handle's operations kept by index (`index_key`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorslice.client import Client, TensorNotFound, VersionGone
from tensorslice.client._base import index_key
from tensorslice.server import ServerConfig, TensorStore, create_server
from tensorslice.server._orchestrate import AnswerCache
from tensorslice.server._server import TensorSliceServer

X = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32)


@pytest.fixture()
def served() -> Iterator[tuple[TensorSliceServer, Client]]:
    store = TensorStore(device="cpu")
    store.add("x", X)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(unary_max_bytes=4096))
    srv.start()
    try:
        # the gRPC path (a same-host session's calls: tests/test_same_host_calls.py)
        with Client(f"127.0.0.1:{port}", timeout=30, same_host=False) as c:
            yield srv, c
    finally:
        srv.stop(grace=None)


def _answers(srv: TensorSliceServer) -> AnswerCache:
    assert srv.service is not None
    return srv.service.calls.answers


# ---------------------------------------------------------------------------- keys


@pytest.mark.unit
def test_simple_indexes_have_exact_keys() -> None:
    keys = [index_key(i) for i in (1, slice(1, 2), (1, slice(None)), None, ..., (None, 0),
                                   slice(1, 2, 1), (1,), (slice(1, 2),))]
    assert None not in keys
    assert len(set(keys)) == len(keys)  # no two of these read the same
    assert index_key(slice(1, 2)) == index_key(slice(1, 2))


@pytest.mark.unit
@pytest.mark.parametrize("index", [
    True, (True,), np.int64(1), [1, 2], (1, [2]), torch.tensor(1), slice(np.int64(1), 2),
    slice(1.0, 2), (slice(1, 2), (0,)), 1.5,
])
def test_other_indexes_have_none(index: object) -> None:
    # bools add a dimension and NumPy ints are not ints: never mistaken for an int key
    assert index_key(index) is None


# ---------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_a_repeated_read_is_answered_from_the_cache(
        served: tuple[TensorSliceServer, Client]) -> None:
    srv, c = served
    t = c.tensor("x")
    first = t[3:5]
    assert len(_answers(srv)) == 1
    again = t[3:5]
    assert torch.equal(first, X[3:5]) and torch.equal(again, X[3:5])
    assert again.data_ptr() != first.data_ptr()  # a result of its own, writable
    again[0, 0] = -1
    assert torch.equal(t[3:5], X[3:5])
    assert _answers(srv).hits >= 2
    assert c.transports["inline"] == 3


@pytest.mark.e2e
def test_a_replaced_tensor_is_never_answered_from_an_old_answer(
        served: tuple[TensorSliceServer, Client]) -> None:
    _, c = served
    t = c.tensor("x")
    assert torch.equal(t[1], X[1])
    c.put("x", X + 1, replace=True)
    assert torch.equal(t[1], X[1] + 1)
    c.drop("x")
    with pytest.raises(TensorNotFound):
        t[1]


@pytest.mark.e2e
def test_a_pinned_version_gone_is_refused_though_its_answer_was_kept(
        served: tuple[TensorSliceServer, Client]) -> None:
    _, c = served
    old = c.tensor("x").at_version()
    assert torch.equal(old[2], X[2])
    c.put("x", X * 2, replace=True)
    with pytest.raises(VersionGone):
        old[2]
    assert torch.equal(c.tensor("x")[2], X[2] * 2)


@pytest.mark.e2e
def test_large_answers_and_tickets_are_not_kept(
        served: tuple[TensorSliceServer, Client]) -> None:
    srv, c = served
    t = c.tensor("x")
    assert torch.equal(t[0:40], X[0:40])  # 5 KiB: over unary_max_bytes, a bulk ticket
    assert len(_answers(srv)) == 0
    assert c.last_transport in ("bulk", "shared_memory")


@pytest.mark.e2e
def test_the_cache_is_bounded_in_bytes(served: tuple[TensorSliceServer, Client]) -> None:
    srv, c = served
    cache = _answers(srv)
    t = c.tensor("x")
    assert torch.equal(t[0], X[0])
    one = cache.nbytes  # a request and its answer: one 128-byte row and a header
    cache.max_bytes = 2 * one + one // 2  # room for two such
    for i in range(1, 10):
        assert torch.equal(t[i], X[i])
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 2
    assert torch.equal(t[9], X[9]) and cache.hits == 1  # the newest stayed
    assert torch.equal(t[0], X[0]) and cache.hits == 1  # the oldest went


@pytest.mark.e2e
def test_handle_copies_keep_reads_of_their_own(
        served: tuple[TensorSliceServer, Client]) -> None:
    _, c = served
    t = c.tensor("x")
    assert t[1:3].dtype == torch.float32
    half = t.astype("float16")
    assert half[1:3].dtype == torch.float16 and torch.equal(half[1:3], X[1:3].half())
    assert t[1:3].dtype == torch.float32
    c.put("x", -X, replace=True)
    assert torch.equal(t[1:3], -X[1:3])
    assert torch.equal(half[1:3], -X[1:3].half())


_ints = st.one_of(st.integers(-40, 40), st.integers(-(1 << 70), 1 << 70))
_plain_items = st.one_of(
    _ints, st.none(), st.just(Ellipsis),
    st.builds(slice, st.one_of(st.none(), _ints), st.one_of(st.none(), _ints),
              st.one_of(st.none(), _ints)),
)


def _read_as(index: object, tensor: tuple[str, int] | None, plain: bool) -> object:
    from tensorslice.core import selection

    try:
        if plain:
            return selection.selectors_from_index(index, tensor)
        saved = selection._plain
        selection._plain = lambda index, tensor: None  # type: ignore[assignment]
        try:
            return selection.selectors_from_index(index, tensor)
        finally:
            selection._plain = saved  # type: ignore[assignment]
    except Exception as exc:
        return (type(exc), str(exc))


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(index=st.one_of(_plain_items, st.lists(_plain_items, max_size=5).map(tuple)),
       ndim=st.one_of(st.none(), st.integers(0, 4)))
def test_ints_and_slices_read_straight_as_the_general_reading_does(index: object,
                                                                    ndim: int | None) -> None:
    tensor = None if ndim is None else ("x", ndim)
    assert _read_as(index, tensor, True) == _read_as(index, tensor, False)
