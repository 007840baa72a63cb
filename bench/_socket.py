"""Raw TCP socket peer: the server ``sendall``s N bytes, the client ``recv_into`` a buffer."""

from __future__ import annotations

import multiprocessing.connection
import socket
import struct
import threading
import time
from dataclasses import dataclass

import torch

from bench._common import HOST, Child, gbps, median
from bench._payload import check, make_payload
from bench._rss import control_loop

MAX_CONNECTIONS = 64
MAX_REQUESTS = 100_000
_REQ = struct.Struct("<Q")


def _serve_conn(conn: socket.socket, payload: memoryview) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(MAX_REQUESTS):
            head = _recv_exact(conn, _REQ.size)
            if head is None:
                return
            (n,) = _REQ.unpack(head)
            if n == 0 or n > len(payload):
                return
            conn.sendall(payload[:n])


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    for _ in range(n):
        more = conn.recv(n - len(data))
        if not more:
            return None
        data += more
        if len(data) == n:
            return data
    return None


def _server_main(ctrl: multiprocessing.connection.Connection, nbytes: int) -> None:
    payload = make_payload(nbytes).data
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind((HOST, 0))
    lsock.listen(8)

    def accept_loop() -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=_serve_conn, args=(conn, payload), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    ctrl.send(lsock.getsockname()[1])
    control_loop(ctrl)
    lsock.close()


def start_server(nbytes: int) -> tuple[Child, int]:
    child = Child(_server_main, nbytes)
    return child, int(child.ready)


@dataclass
class SocketClient:
    sock: socket.socket
    dst: torch.Tensor

    def get(self, nbytes: int, timeout: float = 120.0) -> torch.Tensor:
        self.sock.sendall(_REQ.pack(nbytes))
        view = self.dst.numpy().data[:nbytes]
        got = 0
        deadline = time.monotonic() + timeout
        while got < nbytes:
            if time.monotonic() > deadline:
                raise TimeoutError("socket receive timed out")
            k = self.sock.recv_into(view[got:], nbytes - got)
            if k == 0:
                raise ConnectionError("server closed the connection")
            got += k
        return self.dst[:nbytes]

    def close(self) -> None:
        self.sock.close()


def connect(port: int, nbytes: int) -> SocketClient:
    sock = socket.create_connection((HOST, port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return SocketClient(sock, torch.empty(nbytes, dtype=torch.uint8))


def throughput(nbytes: int, reps: int) -> float:
    """Median GB/s of ``nbytes`` from a server process into a preallocated tensor."""
    server, port = start_server(nbytes)
    with server:
        client = connect(port, nbytes)
        try:
            check(client.get(nbytes), nbytes)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                client.get(nbytes)
                times.append(time.perf_counter() - t0)
        finally:
            client.close()
    return gbps(nbytes, median(times))


# RSS client hooks (see bench._rss.ClientSpec); the buffer is allocated inside ``receive``.
def rss_setup(port: int, nbytes: int) -> tuple[socket.socket, int]:
    sock = socket.create_connection((HOST, port), timeout=120)
    return sock, nbytes


def rss_receive(state: tuple[socket.socket, int]) -> None:
    sock, nbytes = state
    client = SocketClient(sock, torch.empty(nbytes, dtype=torch.uint8))
    check(client.get(nbytes), nbytes)
