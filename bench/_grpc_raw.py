"""Raw gRPC peer: a generic handler (no protobuf, bytes in and out) on a sync server.

``Stream`` sends N bytes in chunks (the request is ``<QQ``: nbytes, chunk); ``Unary``
answers 4 KiB. gRPC Python only sends ``bytes``, so the server copies each chunk once.
"""

from __future__ import annotations

import multiprocessing.connection
import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import torch

from bench._common import HOST, Child, MiB, gbps, median
from bench._payload import check, make_payload
from bench._rss import control_loop

SERVICE = "bench.Raw"
STREAM = f"/{SERVICE}/Stream"
UNARY = f"/{SERVICE}/Unary"
UNARY_BYTES = 4096
CHUNKS = (1 * MiB, 2 * MiB, 4 * MiB)
_REQ = struct.Struct("<QQ")
OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def _server_main(ctrl: multiprocessing.connection.Connection, nbytes: int) -> None:
    payload = make_payload(nbytes).data
    small = bytes(payload[:UNARY_BYTES])

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        n, chunk = _REQ.unpack(request)
        n = min(n, len(payload))
        for off in range(0, n, chunk):
            yield bytes(payload[off : min(off + chunk, n)])

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return small

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), handlers=[handler], options=OPTIONS
    )
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    ctrl.send(port)
    control_loop(ctrl)
    server.stop(grace=None)


def start_server(nbytes: int) -> tuple[Child, int]:
    child = Child(_server_main, nbytes)
    return child, int(child.ready)


class RawClient:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"{HOST}:{port}", options=OPTIONS)
        self._stream: Any = self.channel.unary_stream(STREAM, None, None)
        self._unary: Any = self.channel.unary_unary(UNARY, None, None)

    def get_into(self, dst: torch.Tensor, nbytes: int, chunk: int) -> torch.Tensor:
        out = dst.numpy()
        off = 0
        for msg in self._stream(_REQ.pack(nbytes, chunk), timeout=600):
            k = len(msg)
            out[off : off + k] = np.frombuffer(msg, dtype=np.uint8)
            off += k
        if off != nbytes:
            raise AssertionError(f"received {off} bytes, expected {nbytes}")
        return dst[:nbytes]

    def unary(self) -> bytes:
        return self._unary(b"", timeout=30)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.channel.close()


def stream_throughput(nbytes: int, reps: int) -> dict[int, float]:
    """Median GB/s per chunk size, ``nbytes`` landing in a preallocated tensor."""
    server, port = start_server(nbytes)
    out: dict[int, float] = {}
    with server:
        client = RawClient(port)
        try:
            dst = torch.empty(nbytes, dtype=torch.uint8)
            for chunk in CHUNKS:
                check(client.get_into(dst, nbytes, chunk), nbytes)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    client.get_into(dst, nbytes, chunk)
                    times.append(time.perf_counter() - t0)
                out[chunk] = gbps(nbytes, median(times))
        finally:
            client.close()
    return out


def latency_p50(call: Any, count: int, max_seconds: float) -> float:
    """p50 seconds of sequential ``call()``, at most ``count`` calls or ``max_seconds``."""
    for _ in range(min(50, count)):
        call()
    lat: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(count):
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        if t1 > deadline:
            break
    return median(lat)


def qps(call: Any, threads: int, count: int, max_seconds: float) -> float:
    """Calls per second of ``threads`` threads calling ``call()``, bounded by count and time."""
    per_thread = max(1, count // threads)
    done = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    deadline = 0.0

    def worker(i: int) -> None:
        start.wait()
        try:
            for _ in range(per_thread):
                call()
                done[i] += 1
                if time.perf_counter() > deadline:
                    return
        except BaseException as e:  # surfaced below
            errors.append(e)

    for _ in range(min(50, count)):
        call()
    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    deadline = time.perf_counter() + max_seconds
    t0 = time.perf_counter()
    start.wait()
    for t in pool:
        t.join(max_seconds + 60)
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(done) / elapsed


def unary_figures(count: int, max_seconds: float, threads: int = 8) -> tuple[float, float]:
    """(p50 seconds, QPS with ``threads`` threads) of the 4 KiB unary call."""
    server, port = start_server(UNARY_BYTES)
    with server:
        client = RawClient(port)
        try:
            p50 = latency_p50(client.unary, count, max_seconds)
            rate = qps(client.unary, threads, count * 4, max_seconds)
        finally:
            client.close()
    return p50, rate


# RSS client hooks (see bench._rss.ClientSpec).
def rss_setup(port: int, nbytes: int) -> tuple[RawClient, int]:
    client = RawClient(port)
    client.unary()
    return client, nbytes


def rss_receive(state: tuple[RawClient, int]) -> None:
    client, nbytes = state
    dst = torch.empty(nbytes, dtype=torch.uint8)
    check(client.get_into(dst, nbytes, 2 * MiB), nbytes)
