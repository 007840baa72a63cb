"""Same-host results: sealed shared-memory segments (memfd) passed over the bulk plane's
abstract Unix socket, the client's tensors built on the mapping; every fallback to TCP."""

from __future__ import annotations

import gc
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from _output import OutputLines

from tensorslice.client import Client, TensorSliceError
from tensorslice.core.codec import same_host_socket
from tensorslice.server import ServerConfig, TensorStore, create_server

X = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(13))  # 2 MiB
SEGMENT = "memfd:tensorslice-result"


def _server(**config: object) -> tuple[object, str]:
    store = TensorStore(device="cuda" if torch.cuda.is_available() else "cpu")
    store.add("x", X)
    srv, port = create_server(store, "127.0.0.1:0",
                              ServerConfig(unary_max_bytes=1024, **config))  # type: ignore[arg-type]
    srv.start()
    return srv, f"127.0.0.1:{port}"


@pytest.fixture()
def served() -> Iterator[tuple[object, str]]:
    srv, address = _server()
    yield srv, address
    srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


def _mapped() -> int:
    with open("/proc/self/maps") as f:
        return sum(SEGMENT in line for line in f)


def _open_segments() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"/{SEGMENT}")
        except OSError:
            pass
    return count


@pytest.mark.e2e
def test_results_come_as_segments_and_live_on_the_mapping(
    served: tuple[object, str],
) -> None:
    srv, address = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    assert bulk.same_host
    gc.collect()
    before = _mapped()
    with Client(address, timeout=30, same_host=True) as c:
        view = c.tensor("x")[0:40]
        gather = c.tensor("x")[[5, 1, 9, 9], :, 3]
        assert view.equal(X[0:40]) and gather.equal(X[[5, 1, 9, 9], :, 3])
        assert c.transports["shared_memory"] == 2 and c.transports["bulk"] == 0
        assert _mapped() == before + 2  # the tensors are built on the mappings
        assert _open_segments() == 0  # no descriptor kept, on either side
        view.add_(1)  # private to this result: the next one is untouched
        assert c.tensor("x")[0:40].equal(X[0:40])
        assert view.equal(X[0:40] + 1)
        data = c.slice_bytes("x", (slice(2, 50),))  # bytes: copied out of the segment
        assert isinstance(data, bytes) and c.transports["shared_memory"] == 4
    deadline = time.monotonic() + 5  # the server counts after its send returns
    while bulk.shared < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bulk.shared == 4 and bulk.pending == 0
    del view, gather
    gc.collect()
    assert _mapped() == before  # dropping the tensors unmaps their segments


@pytest.mark.e2e
def test_same_host_off_by_option_or_environment(
    served: tuple[object, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, address = served
    with Client(address, timeout=30, same_host=False) as c:
        assert c.tensor("x")[0:40].equal(X[0:40])
        assert c.transports["bulk"] == 1 and c.transports["shared_memory"] == 0
    with Client(address, timeout=30) as c:  # off by default
        assert c.tensor("x")[0:40].equal(X[0:40])
        assert c.transports["bulk"] == 1
    monkeypatch.setenv("TENSORSLICE_SAME_HOST", "1")
    with Client(address, timeout=30) as c:
        assert c.tensor("x")[0:40].equal(X[0:40])
        assert c.transports["shared_memory"] == 1


@pytest.mark.e2e
def test_results_outlive_the_server(served: tuple[object, str]) -> None:
    srv, address = served
    with Client(address, timeout=30, same_host=True) as c:
        got = c.tensor("x")[[3, 2, 1]]
    srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]
    assert got.equal(X[[3, 2, 1]])  # the segment is the client's, not the server's


@pytest.mark.e2e
def test_server_without_same_host_falls_back_to_tcp_once() -> None:
    srv, address = _server(same_host=False)
    try:
        with Client(address, timeout=30, same_host=True) as c:
            assert c.tensor("x")[0:40].equal(X[0:40])
            assert c.tensor("x")[1:41].equal(X[1:41])
            assert c.transports["bulk"] == 2 and not c._same_host  # tried once only
    finally:
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


def _impostor(name: bytes, answer: str) -> tuple[socket.socket, threading.Thread]:
    """A listener at the same-host name that closes, or passes a bad segment."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(1)
    listener.settimeout(30)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            conn.recv(16)
            if answer == "close":
                return
            fd = os.memfd_create("impostor", os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, 64)
                with mmap.mmap(fd, 64) as m:
                    m[:8] = b"\xff" * 8
                size = 64 if answer == "unsealed" else 1 << 30
                socket.send_fds(conn, [size.to_bytes(8, "little")], [fd])
            finally:
                os.close(fd)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.e2e
@pytest.mark.parametrize("answer", ["close", "unsealed", "wrong size"])
def test_a_foreign_socket_at_the_name_never_gives_wrong_data(answer: str) -> None:
    srv, address = _server(same_host=False)
    bulk = srv.bulk  # type: ignore[attr-defined]
    listener, thread = _impostor(same_host_socket(bulk.port), answer)
    try:
        with Client(address, timeout=30, same_host=True) as c:
            if answer == "close":  # the ticket is untouched: redeemed over TCP
                assert c.tensor("x")[0:40].equal(X[0:40])
                assert c.transports["bulk"] == 1
            else:
                with pytest.raises(TensorSliceError, match=r"same-host segment .*refused"):
                    c.tensor("x")[0:40]
        thread.join(timeout=30)
        assert _open_segments() == 0
    finally:
        listener.close()
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


_CHILD = """
import sys, time
from tensorslice.client import Client
with Client(sys.argv[1], timeout=30, same_host=True) as c:
    t = c.tensor("x")[0:40]
    print("fetched", c.transports["shared_memory"], float(t.sum()), flush=True)
    time.sleep(120)
"""


@pytest.mark.e2e
def test_a_client_killed_holding_segments_leaves_nothing_on_the_server(
    served: tuple[object, str],
) -> None:
    srv, address = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    mapped = _mapped()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, address], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert OutputLines(proc).wait_for(r"fetched (\d+)") == "1"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert bulk.pending == 0 and bulk.connections == 0 and bulk.held_bytes == 0
    assert _open_segments() == 0 and _mapped() == mapped
    srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]
    if os.path.isdir("/dev/shm"):  # segments are anonymous: nothing is ever named there
        assert not [n for n in os.listdir("/dev/shm") if "tensorslice" in n]
