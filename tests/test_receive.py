"""Receive buffers: one owner at a time, returned exactly once, bounded; and a shared client
under forced thread switching, every result checked."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import sys
import threading
from collections import deque
from collections.abc import Iterator

import pytest
import torch

from tensorslice.client import AsyncClient, Client
from tensorslice.client._receive import BufferPool
from tensorslice.server import ServerConfig, TensorStore, create_server

MIB = 1 << 20


@pytest.fixture()
def fast_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter can: races show up at once."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.unit
def test_a_buffer_is_never_handed_out_twice(fast_switching: None) -> None:
    pool = BufferPool(max_bytes=64 * MIB, min_bytes=MIB)
    live: dict[int, int] = {}  # id of the buffer under a live view -> the thread holding it
    live_lock = threading.Lock()
    clashes: list[str] = []

    def work(me: int) -> None:
        held: deque[memoryview] = deque()
        for round_ in range(400):
            view = pool.take(MIB + (round_ % 3))  # sizes vary: a buffer fits several
            key = id(view.obj)
            with live_lock:
                if key in live:
                    clashes.append(f"thread {me} got the buffer thread {live[key]} holds")
                live[key] = me
            view[:8] = me.to_bytes(8, "little")
            held.append(view)
            if len(held) > 3:
                old = held.popleft()
                if int.from_bytes(old[:8], "little") != me:
                    clashes.append(f"thread {me}: a held buffer was overwritten")
                with live_lock:
                    del live[id(old.obj)]
                del old  # returns the buffer (its finalizer runs here, in this thread)
        with live_lock:
            for v in held:
                del live[id(v.obj)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clashes == []
    assert pool.handed_out > 0  # buffers were recycled, not only fresh ones made


@pytest.mark.unit
def test_a_buffer_returns_once_when_its_last_tensor_is_gone() -> None:
    pool = BufferPool(max_bytes=64 * MIB, min_bytes=MIB)
    view = pool.take(2 * MIB)
    tensor = torch.frombuffer(view, dtype=torch.uint8)[5:9]  # a tensor keeps the view
    del view
    gc.collect()
    assert pool.free_count == 0
    del tensor
    gc.collect()
    gc.collect()
    assert (pool.free_count, pool.free_bytes) == (1, 2 * MIB)  # once, however often collected
    again = pool.take(2 * MIB)
    assert pool.free_count == 0 and pool.handed_out == 1
    other = pool.take(2 * MIB)  # the only free buffer is taken: a fresh one
    assert other.obj is not again.obj and pool.handed_out == 1
    del again, other
    gc.collect()
    assert pool.free_count == 2


@pytest.mark.unit
def test_free_buffers_are_bounded_in_bytes() -> None:
    pool = BufferPool(max_bytes=3 * MIB, min_bytes=MIB)
    views = [pool.take(MIB) for _ in range(5)]
    del views
    gc.collect()
    assert (pool.free_count, pool.free_bytes) == (3, 3 * MIB)
    small = pool.take(MIB // 2)  # under min_bytes: never pooled
    assert pool.free_count == 3 and len(small) == MIB // 2


@pytest.mark.unit
def test_size_fit_takes_the_smallest_free_buffer_that_fits() -> None:
    pool = BufferPool(max_bytes=64 * MIB, min_bytes=MIB)
    a, b, c = pool.take(4 * MIB), pool.take(2 * MIB), pool.take(5 * MIB)
    ids = {len(v.obj): id(v.obj) for v in (a, b, c)}  # type: ignore[arg-type]
    del a, b, c
    gc.collect()
    got = pool.take(2 * MIB)  # fits 2 and 4 MiB (at most twice its size): the 2 MiB one
    assert id(got.obj) == ids[2 * MIB]
    too_big = pool.take(MIB + 1)  # 4 and 5 MiB are more than twice: fresh
    assert id(too_big.obj) not in ids.values()


def _child_pool_state(pool: BufferPool, out: multiprocessing.Queue[tuple[int, int]]) -> None:
    view = pool.take(MIB)  # the lock is a fresh one: no deadlock
    out.put((pool.free_count, len(view)))


@pytest.mark.unit
def test_a_forked_child_starts_with_an_empty_pool() -> None:
    pool = BufferPool(max_bytes=64 * MIB, min_bytes=MIB)
    del_me = [pool.take(MIB) for _ in range(2)]
    del del_me
    gc.collect()
    assert pool.free_count == 2
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[tuple[int, int]] = ctx.Queue()
    with pool._lock:  # held by this thread while the child is forked
        child = ctx.Process(target=_child_pool_state, args=(pool, out))
        child.start()
    assert out.get(timeout=30) == (0, MIB)
    child.join(timeout=30)
    assert child.exitcode == 0


# ---------------------------------------------------------------------- shared clients

ROWS, ROW_ELEMS = 48, MIB // 4  # each row 1 MiB of float32: every result takes a pool buffer
SYNC_THREADS, SYNC_ROUNDS = 8, 250
ASYNC_TASKS, ASYNC_ROUNDS = 16, 64  # 1024 results (slower: each bulk read goes through a thread)


@pytest.fixture(scope="module")
def rows_server() -> Iterator[tuple[str, torch.Tensor]]:
    rows = torch.arange(ROWS, dtype=torch.float32).reshape(ROWS, 1) * 1e6 + torch.arange(
        ROW_ELEMS, dtype=torch.float32)
    store = TensorStore(device="cpu")
    store.add("rows", rows)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig())
    srv.start()
    yield f"127.0.0.1:{port}", rows
    srv.stop(grace=None)


@pytest.mark.e2e
def test_one_client_from_eight_threads_every_result_its_own(
    rows_server: tuple[str, torch.Tensor], fast_switching: None
) -> None:
    address, rows = rows_server
    errors: list[str] = []
    with Client(address, timeout=60) as client:
        remote = client.tensor("rows")

        def work(me: int) -> None:
            kept: deque[tuple[int, torch.Tensor]] = deque()
            for round_ in range(SYNC_ROUNDS):
                i = (me * 7 + round_) % ROWS
                got = remote[i]
                kept.append((i, got))
                if len(kept) > 4:
                    kept.popleft()
                for j, t in kept:  # results kept alive must stay what they were
                    if not torch.equal(t, rows[j]):
                        errors.append(f"thread {me} round {round_}: row {j} changed")
                        return

        threads = [threading.Thread(target=work, args=(k,)) for k in range(SYNC_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


@pytest.mark.e2e
def test_one_async_client_with_sixteen_tasks_every_result_its_own(
    rows_server: tuple[str, torch.Tensor], fast_switching: None
) -> None:
    address, rows = rows_server
    errors: list[str] = []

    async def main() -> None:
        async with AsyncClient(address, timeout=60) as client:
            remote = await client.tensor("rows")

            async def work(me: int) -> None:
                kept: deque[tuple[int, torch.Tensor]] = deque()
                for round_ in range(ASYNC_ROUNDS):
                    i = (me * 5 + round_) % ROWS
                    kept.append((i, await remote[i]))
                    if len(kept) > 4:
                        kept.popleft()
                    for j, t in kept:
                        if not torch.equal(t, rows[j]):
                            errors.append(f"task {me} round {round_}: row {j} changed")
                            return

            await asyncio.gather(*(work(k) for k in range(ASYNC_TASKS)))

    asyncio.run(main())
    assert errors == []
