"""Helpers of the same-host tests: a server holding one tensor, polling, a raw session on a
server's abstract Unix socket, and a client process to kill."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _output import OutputLines

from tensorslice.core.codec import INSTANCE_BYTES, SESSION_MAGIC, SHM_HELLO, same_host_socket
from tensorslice.server import ServerConfig, TensorStore, create_server

X = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(13))  # 2 MiB


def start(port: int = 0, *, device: str = "cpu", tensor: torch.Tensor = X,
          **config: Any) -> tuple[Any, str]:
    """A started server on 127.0.0.1 (`port`; 0 for any) holding `tensor` as "x"."""
    store = TensorStore(device=device)
    store.add("x", tensor)
    srv, port = create_server(store, f"127.0.0.1:{port}", ServerConfig(**config))
    srv.start()
    return srv, f"127.0.0.1:{port}"


def until(check: Callable[[], bool], seconds: float = 10) -> bool:
    """Poll `check` (the server's threads notice a closed connection asynchronously)."""
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()


def exact(sock: socket.socket, n: int) -> bytes:
    """`n` bytes from `sock`, or fewer where it closes first (`MSG_WAITALL` is no help: a
    socket with a timeout is non-blocking underneath)."""
    out = b""
    while len(out) < n and (part := sock.recv(n - len(out))):
        out += part
    return out


def session(port: int, timeout: float = 10) -> socket.socket:
    """A raw session with the bulk plane on `port`, past the server's greeting."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(same_host_socket(port))
    sock.sendall(SESSION_MAGIC)
    greeting = exact(sock, len(SHM_HELLO) + INSTANCE_BYTES)
    assert greeting[: len(SHM_HELLO)] == SHM_HELLO
    return sock


@contextlib.contextmanager
def child(program: str, address: str, fetched: int) -> Iterator[subprocess.Popen[str]]:
    """A Python process running `program` against `address`, once it has printed
    "fetched N" with N at least `fetched`; killed with SIGKILL (and reaped) when the block
    ends, whatever happens in it."""
    proc = subprocess.Popen([sys.executable, "-c", program, address], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert int(OutputLines(proc).wait_for(r"fetched (\d+)")) >= fetched
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
