"""RemoteTensorDataset and RemoteTensorIterableDataset under a real DataLoader, with worker
processes started by fork, spawn and forkserver, against a server in a subprocess (an
in-process gRPC server would be forked along with the workers)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection

import grpc
import pytest
import torch
from _output import first_line
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub
from torch.utils.data import DataLoader, DistributedSampler, SubsetRandomSampler

from tensorslice.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    RemoteTensor,
    RemoteTensorDataset,
    RemoteTensorIterableDataset,
    SelectionOutOfRange,
    ServerUnavailable,
)

pytestmark = pytest.mark.e2e

N, D = 1000, 6  # 1000 rows: batches of 64 leave a partial last batch
LOADER_TIMEOUT = 120  # seconds a loader waits for a batch: a stuck worker fails, never hangs

_SERVER = """
import sys, torch
from tensorslice.server import ServerConfig, TensorStore, create_server
n, d = int(sys.argv[1]), int(sys.argv[2])
store = TensorStore(device="cpu")
store.add("x", torch.arange(n * d, dtype=torch.float32).reshape(n, d))
store.add("y", torch.arange(n, dtype=torch.int64))
store.add("t", torch.arange(n * 3, dtype=torch.int32).reshape(3, n))  # aligned on dim 1
store.add("short", torch.zeros(n - 1))
server, port = create_server(store, "127.0.0.1:0", ServerConfig())
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def _start_server() -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "TENSORSLICE_TEST_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(N), str(D)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        port = first_line(proc).strip()
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    proc, addr = _start_server()
    yield addr
    proc.kill()
    proc.wait()


@pytest.fixture()
def parent_client(address: str) -> Iterator[Client]:
    """A client the parent has used (its channel is open) before any loader forks."""
    with Client(address, timeout=30) as c:
        assert {t.name for t in c.list_tensors()} >= {"x", "y"}
        yield c


def _check_rows(x: torch.Tensor, y: torch.Tensor) -> None:
    want = y.to(torch.float32).reshape(-1, 1) * D + torch.arange(D, dtype=torch.float32)
    assert torch.equal(x, want)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_epoch_delivers_every_sample_once(parent_client: Client, method: str) -> None:
    ds = RemoteTensorDataset(parent_client, ["x", "y"])  # shares the parent's used client
    assert len(ds) == N
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2,
                        collate_fn=ds.collate, multiprocessing_context=method,
                        timeout=LOADER_TIMEOUT)
    seen: list[int] = []
    for x, y in loader:
        assert x.shape == (len(y), D) and x.dtype == torch.float32 and y.dtype == torch.int64
        _check_rows(x, y)
        seen += y.tolist()
    assert sorted(seen) == list(range(N))
    assert seen != list(range(N))  # shuffled
    assert parent_client.describe("x").shape == (N, D)  # the parent's channel still works


def test_default_collate_and_single_tensor(address: str) -> None:
    pairs = RemoteTensorDataset(address, ["x", "y"])
    x, y = next(iter(DataLoader(pairs, batch_size=10)))  # PyTorch's default collate
    assert torch.equal(y, torch.arange(10))
    _check_rows(x, y)
    single = RemoteTensorDataset(address, "y")
    batches = list(DataLoader(single, batch_size=300, collate_fn=single.collate))
    assert torch.equal(torch.cat(batches), torch.arange(N))
    assert [len(b) for b in batches] == [300, 300, 300, 100]


def test_indexing(address: str) -> None:
    ds = RemoteTensorDataset(address, ["x", "y"])
    x, y = ds[3]
    assert int(y) == 3 and torch.equal(x, torch.arange(18, 24, dtype=torch.float32))
    assert int(ds[-1][1]) == N - 1
    xs, ys = ds[[5, 1, 5]]
    assert ys.tolist() == [5, 1, 5]
    _check_rows(xs, ys)
    assert ds[10:13][1].tolist() == [10, 11, 12]
    batch = ds.__getitems__([7, 2])
    assert [int(s[1]) for s in batch] == [7, 2]  # per-sample views, for default_collate
    with pytest.raises(SelectionOutOfRange):
        ds[N]
    with pytest.raises(ValueError, match="differ in size along dimension 0"):
        RemoteTensorDataset(address, ["x", "short"])
    with pytest.raises(ValueError, match="has no dimension 2"):
        RemoteTensorDataset(address, "x", dim=2)


def test_other_dimension_puts_the_batch_first(address: str) -> None:
    ds = RemoteTensorDataset(address, "t", dim=1)
    assert len(ds) == N
    t = ds[[4, 9]]
    y = torch.tensor([4, 9])
    assert t.shape == (2, 3)
    assert torch.equal(t, (torch.arange(3).reshape(1, 3) * N + y.reshape(2, 1)).to(torch.int32))
    assert ds[9].tolist() == [9, N + 9, 2 * N + 9]


def test_distributed_sampler(address: str) -> None:
    ds = RemoteTensorDataset(address, ["x", "y"])
    seen: list[int] = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        for x, y in DataLoader(ds, batch_size=128, sampler=sampler, collate_fn=ds.collate):
            _check_rows(x, y)
            seen += y.tolist()
    assert sorted(seen) == list(range(N))


def test_iterable_covers_every_row_once_across_ranks_and_workers(address: str) -> None:
    seen: list[int] = []
    for rank in range(2):
        ds = RemoteTensorIterableDataset(address, ["x", "y"], batch_size=64, rank=rank,
                                         world_size=2)
        for x, y in DataLoader(ds, batch_size=None, num_workers=2,
                               multiprocessing_context="fork", timeout=LOADER_TIMEOUT):
            _check_rows(x, y)
            assert y.tolist() == list(range(int(y[0]), int(y[0]) + len(y)))  # contiguous
            seen += y.tolist()
    assert sorted(seen) == list(range(N))
    one = RemoteTensorIterableDataset(address, "y", batch_size=300, drop_last=True)
    assert [b.tolist() for b in one] == [list(range(i, i + 300)) for i in (0, 300, 600)]
    assert one.num_batches() == 3


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_server_killed_mid_epoch_raises_within_timeout(method: str) -> None:
    proc, addr = _start_server()
    try:
        ds = RemoteTensorDataset(Client(addr, timeout=10), ["x", "y"])
        loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2,
                            collate_fn=ds.collate, multiprocessing_context=method,
                            timeout=LOADER_TIMEOUT)
        it = iter(loader)
        next(it)
        proc.kill()
        proc.wait()
        # Within the client's timeout: a worker stuck past it would make the loader raise
        # its own RuntimeError (LOADER_TIMEOUT), not these.
        with pytest.raises((ServerUnavailable, DeadlineExceeded)):
            for _ in it:
                pass
    finally:
        proc.kill()
        proc.wait()


class _Rows(torch.utils.data.Dataset[torch.Tensor]):
    """A user's own Dataset that holds a RemoteTensor (pickled into spawn/forkserver
    workers)."""

    def __init__(self, remote: RemoteTensor) -> None:
        self.remote = remote

    def __len__(self) -> int:
        return len(self.remote)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.remote[i]


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_dataset_holding_a_remote_tensor(parent_client: Client, method: str) -> None:
    remote = parent_client.tensor("x")
    again = pickle.loads(pickle.dumps(remote))
    assert again.info == remote.info and again.client.address == remote.client.address
    rows = list(range(0, N, 50))
    loader = DataLoader(_Rows(remote), batch_size=5, sampler=rows, num_workers=2,
                        multiprocessing_context=method, timeout=LOADER_TIMEOUT)
    got = torch.cat(list(loader))
    _check_rows(got, torch.tensor(rows))



# ------------------------------------------------------------- fork, whatever the parent does
# gRPC cannot be used in a process forked while another thread was inside gRPC ("Other
# threads are currently calling into gRPC, skipping fork() handlers"): workers forked from
# a process that loaded the client never call gRPC; they use the data plane.

FORK_ROWS, FORK_EPOCHS = 96, 20


def _twenty_forked_epochs(address: str) -> None:
    """20 epochs under fork (each forks its two workers afresh), over the first FORK_ROWS
    samples: every one exactly once per epoch."""
    ds = RemoteTensorDataset(address, ["x", "y"])
    loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=ds.collate,
                        sampler=SubsetRandomSampler(range(FORK_ROWS)),
                        multiprocessing_context="fork", timeout=LOADER_TIMEOUT)
    for _ in range(FORK_EPOCHS):
        seen: list[int] = []
        for x, y in loader:
            _check_rows(x, y)
            seen += y.tolist()
        assert sorted(seen) == list(range(FORK_ROWS))


def test_fork_while_a_readiness_future_is_pending(address: str) -> None:
    with socket.socket() as unused:  # a port nobody listens on: the future never resolves
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"
    channel = grpc.insecure_channel(dead)
    future = grpc.channel_ready_future(channel)
    try:
        _twenty_forked_epochs(address)
        assert not future.done()  # it was pending the whole time
    finally:
        future.cancel()
        channel.close()


def test_fork_while_a_thread_consumes_a_stream(address: str) -> None:
    channel = grpc.insecure_channel(address)
    watch = HealthStub(channel).Watch(HealthCheckRequest(service=""))
    updates: list[int] = []

    def consume() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for update in watch:
                updates.append(update.status)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        _twenty_forked_epochs(address)
    finally:
        watch.cancel()
        thread.join(timeout=10)
        channel.close()
    assert updates and updates[0] == HealthCheckResponse.SERVING


def test_fork_while_an_async_client_loop_runs_in_a_thread(address: str) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    stop = threading.Event()
    results: list[int] = []

    async def keep_slicing() -> None:
        async with AsyncClient(address, timeout=30) as client:
            y = await client.tensor("y")
            while not stop.is_set():
                results.append(int((await y[[7]])[0]))

    running = asyncio.run_coroutine_threadsafe(keep_slicing(), loop)
    try:
        _twenty_forked_epochs(address)
    finally:
        stop.set()
        running.result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
    assert results and set(results) == {7}


def _forked_health(client: Client, out: Connection) -> None:
    """In a forked child: the health checks a worker may make, sent back as text."""
    from tensorslice.client import TensorNotFound

    answers = [client.health(), client.health("tensorslice.v1.TensorSlice")]
    try:
        client.health("no.such.Service")
        answers.append("no error")
    except TensorNotFound as exc:
        answers.append(f"TensorNotFound: {exc}")
    out.send(answers)
    out.close()


def test_health_from_a_forked_child_while_a_parent_thread_is_in_grpc(
        parent_client: Client) -> None:
    channel = grpc.insecure_channel(parent_client.address)
    watch = HealthStub(channel).Watch(HealthCheckRequest(service=""))
    first = threading.Event()

    def consume() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for _ in watch:
                first.set()

    thread = threading.Thread(target=consume)
    thread.start()
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_forked_health, args=(parent_client, send))
    try:
        # The parent's thread is inside gRPC from now on, waiting on the stream.
        assert first.wait(LOADER_TIMEOUT)
        child.start()
        send.close()
        assert receive.poll(LOADER_TIMEOUT), "the forked child did not answer"
        answers = receive.recv()
        child.join(LOADER_TIMEOUT)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        watch.cancel()
        thread.join(timeout=10)
        channel.close()
    assert answers == ["SERVING", "SERVING",
                       "TensorNotFound: no health status for service 'no.such.Service'"]
