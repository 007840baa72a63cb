"""Arrow Flight peer: DoGet of N bytes as record batches of one uint8 column.

The ticket is ``b"nbytes:batch"`` (``batch`` 0 means one batch). Batches are zero-copy views
of the server's buffer; the client copies each batch into one preallocated torch tensor,
so the bytes land in a ``torch.Tensor`` end to end.
"""

from __future__ import annotations

import multiprocessing.connection
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import torch

from bench._common import HOST, Child, MiB, gbps, median
from bench._payload import check, make_payload
from bench._rss import control_loop

BATCHES = (1 * MiB, 4 * MiB, 16 * MiB, 0)  # 0: the whole payload as one batch
SCHEMA = pa.schema([("b", pa.uint8())])


def batch_label(batch: int) -> str:
    return "one batch" if batch == 0 else f"{batch // MiB} MiB"


class _Server(fl.FlightServerBase):  # type: ignore[misc]
    def __init__(self, payload: np.ndarray) -> None:
        super().__init__(location=f"grpc://{HOST}:0")
        self._payload = payload

    def _batches(self, nbytes: int, batch: int) -> Iterable[pa.RecordBatch]:
        step = batch or nbytes
        for off in range(0, nbytes, step):
            n = min(step, nbytes - off)
            buf = pa.py_buffer(self._payload[off : off + n])
            arr = pa.Array.from_buffers(pa.uint8(), n, [None, buf])
            yield pa.RecordBatch.from_arrays([arr], schema=SCHEMA)

    def do_get(self, context: Any, ticket: fl.Ticket) -> fl.FlightDataStream:
        nbytes, batch = (int(x) for x in ticket.ticket.decode().split(":"))
        nbytes = min(nbytes, self._payload.size)
        return fl.GeneratorStream(SCHEMA, self._batches(nbytes, batch))


def _server_main(ctrl: multiprocessing.connection.Connection, nbytes: int) -> None:
    server = _Server(make_payload(nbytes))
    threading.Thread(target=server.serve, daemon=True).start()
    ctrl.send(server.port)
    control_loop(ctrl)
    server.shutdown()


def start_server(nbytes: int) -> tuple[Child, int]:
    child = Child(_server_main, nbytes)
    return child, int(child.ready)


def connect(port: int) -> fl.FlightClient:
    return fl.connect(f"grpc://{HOST}:{port}")


def get_into(client: fl.FlightClient, dst: torch.Tensor, nbytes: int, batch: int) -> torch.Tensor:
    out = dst.numpy()
    reader = client.do_get(fl.Ticket(f"{nbytes}:{batch}".encode()))
    off = 0
    for chunk in reader:
        col = chunk.data.column(0)
        n = len(col)
        out[off : off + n] = col.to_numpy(zero_copy_only=True)
        off += n
    if off != nbytes:
        raise AssertionError(f"received {off} bytes, expected {nbytes}")
    return dst[:nbytes]


def throughput(nbytes: int, reps: int, batches: Iterable[int] = BATCHES) -> dict[int, float]:
    """Median GB/s per batch size (0: one batch) of ``nbytes`` into a preallocated tensor."""
    server, port = start_server(nbytes)
    out: dict[int, float] = {}
    with server:
        client = connect(port)
        try:
            dst = torch.empty(nbytes, dtype=torch.uint8)
            for batch in batches:
                check(get_into(client, dst, nbytes, batch), nbytes)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    get_into(client, dst, nbytes, batch)
                    times.append(time.perf_counter() - t0)
                out[batch] = gbps(nbytes, median(times))
        finally:
            client.close()
    return out


# RSS client hooks (see bench._rss.ClientSpec); 4 MiB batches.
def rss_setup(port: int, nbytes: int) -> tuple[fl.FlightClient, int]:
    client = connect(port)
    get_into(client, torch.empty(4096, dtype=torch.uint8), 4096, 0)
    return client, nbytes


def rss_receive(state: tuple[fl.FlightClient, int]) -> None:
    client, nbytes = state
    dst = torch.empty(nbytes, dtype=torch.uint8)
    check(get_into(client, dst, nbytes, 4 * MiB), nbytes)
