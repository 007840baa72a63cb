"""gRPC over a Unix domain socket: ``ServerConfig(unix_socket=PATH)`` / ``serve --unix``,
clients at ``unix:PATH``, large results over the bulk data plane on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _output import OutputLines
from torch.utils.data import DataLoader

from tensorslice.client import AsyncClient, Client, RemoteTensorDataset
from tensorslice.server import ServerConfig, TensorStore, create_server

X = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(11))  # 2 MiB


def _store() -> TensorStore:
    store = TensorStore(device="cuda" if torch.cuda.is_available() else "cpu")
    store.add("x", X)
    return store


@pytest.mark.e2e
def test_client_async_client_and_dataset_over_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "ts.sock"
    srv, _ = create_server(_store(), "127.0.0.1:0",
                           ServerConfig(unary_max_bytes=1024, unix_socket=str(path)))
    srv.start()
    try:
        assert path.is_socket()
        bulk = srv.bulk
        assert bulk is not None
        with Client(f"unix:{path}", timeout=30, same_host=False) as c:
            assert c.tensor("x")[0, 3, 0].cpu().equal(X[0, 3, 0])  # inline
            before = bulk.sent
            big = c.tensor("x")[0:40, [5, 1]].cpu()  # over unary_max_bytes: bulk ticket
            assert big.equal(X[0:40, [5, 1]])
            deadline = time.monotonic() + 5  # counted after the last sendall returns
            while bulk.sent == before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert bulk.sent == before + 1 and c._bulk_ok

        async def go() -> torch.Tensor:
            async with AsyncClient(f"unix:{path}", timeout=30) as a:
                r = await a.tensor("x")
                return await r[3:30, [4, 2]]

        assert asyncio.run(go()).cpu().equal(X[3:30, [4, 2]])

        with Client(f"unix:{path}", timeout=30) as c:
            ds = RemoteTensorDataset(c, "x")
            loader = DataLoader(ds, batch_size=16, num_workers=2,
                                multiprocessing_context="fork")
            got = torch.cat([b.cpu() for b in loader])
            assert got.equal(X)
    finally:
        srv.stop(grace=None).wait(10)
    assert not path.exists()  # gRPC removes its socket file on stop


@pytest.mark.e2e
def test_a_unix_only_server_keeps_its_bulk_plane_on_loopback(tmp_path: Path) -> None:
    path = tmp_path / "only.sock"
    srv, _ = create_server(_store(), f"unix:{path}", ServerConfig(unary_max_bytes=1024))
    srv.start()
    try:
        bulk = srv.bulk
        assert bulk is not None
        assert bulk._listener.getsockname()[0] == "127.0.0.1"
        with Client(f"unix:{path}", timeout=30) as c:
            assert c.tensor("x")[0:40].cpu().equal(X[0:40])
    finally:
        srv.stop(grace=None).wait(10)


@pytest.mark.e2e
def test_an_unreachable_bulk_plane_streams_over_the_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "nobulk.sock"
    srv, _ = create_server(_store(), f"unix:{path}",
                           ServerConfig(unary_max_bytes=1024, chunk_bytes=4096))
    srv.start()
    try:
        with Client(f"unix:{path}", timeout=30, same_host=False) as c:
            srv.bulk.advertised_host = ""  # tickets name no host: the client uses its own
            c._bulk_host = "127.0.0.2"  # a loopback address the bulk plane does not hold
            assert c.tensor("x")[0:40].cpu().equal(X[0:40])
            assert not c._bulk_ok
    finally:
        srv.stop(grace=None).wait(10)


@pytest.mark.e2e
def test_a_unix_socket_that_cannot_be_bound_is_refused(tmp_path: Path) -> None:
    from tensorslice.server._server import AddressInUse

    path = tmp_path / "missing-dir" / "ts.sock"
    with pytest.raises(AddressInUse, match=f"cannot listen on unix:{path}"):
        create_server(_store(), "127.0.0.1:0", ServerConfig(unix_socket=str(path)))


@pytest.mark.e2e
def test_serve_unix_cli_and_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "cli.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorslice.server._cli", "serve", "--port", "0",
         "--unix", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert OutputLines(proc).wait_for(r"  also on (unix:\S+)") == f"unix:{path}"
        with Client(f"unix:{path}", timeout=10) as c:
            assert [t.name for t in c.list_tensors()] == ["demo"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
