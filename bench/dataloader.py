"""DataLoader throughput: one epoch over `RemoteTensorDataset` (one `SliceMany` call and one
server-side gather per batch) against the same DataLoader (batch size, workers, shuffle)
over a local `TensorDataset` holding the same tensors (per-sample indexing, then collate).

    python -m bench.dataloader [--quick]

The server runs in a separate process. `run(quick)` returns the table rows as dicts with
keys figure, value, unit, peer, peer_value, ratio, goal, met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from tensorslice.client import Client, RemoteTensorDataset

GOAL = 1.0  # remote samples/s at least the local DataLoader's

# The tensors are generated from a seed in the server process and, identically, here.
_SERVER = """
import sys
import torch
sys.path.insert(0, sys.argv[3])
from bench.dataloader import make_tensors
from tensorslice.server import ServerConfig, TensorStore, create_server
x, y = make_tensors(int(sys.argv[1]), tuple(int(d) for d in sys.argv[2].split(",")))
store = TensorStore(device="cpu")
store.add("x", x)
store.add("y", y)
server, port = create_server(store, "127.0.0.1:0", ServerConfig())
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def make_tensors(rows: int, sample: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, *sample, generator=g)
    y = torch.randint(0, 1000, (rows,), generator=g, dtype=torch.int64)
    return x, y


def _epoch(loader: DataLoader[Any]) -> tuple[float, int]:
    """Seconds for one epoch (workers started and stopped included), and rows seen."""
    start = time.perf_counter()
    rows = 0
    for _x, y in loader:
        rows += len(y)
    return time.perf_counter() - start, rows


def _samples_per_second(make: Callable[[], DataLoader[Any]], rows: int) -> float:
    seconds, seen = _epoch(make())
    if seen != rows:
        raise RuntimeError(f"an epoch delivered {seen} rows, expected {rows}")
    return rows / seconds


# (label, rows, shape of one sample): rows of 256 features (1 KiB), and CIFAR-like images
# (3 x 32 x 32, 12 KiB), where per-sample indexing and collate cost the local loader more.
CONFIGS = (("tabular", 65536, (256,)), ("image", 16384, (3, 32, 32)))


def run(quick: bool) -> list[dict[str, Any]]:
    return [_run_one(label, rows // (4 if quick else 1), sample, quick)
            for label, rows, sample in CONFIGS]


def _run_one(label: str, rows: int, sample: tuple[int, ...], quick: bool) -> dict[str, Any]:
    batch, workers, reps = 256, 2, (3 if quick else 5)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(rows), ",".join(map(str, sample)), root],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip()
        if not port:
            raise RuntimeError("the benchmark server did not start")
        x, y = make_tensors(rows, sample)
        local = TensorDataset(x, y)
        client = Client(f"127.0.0.1:{port}", timeout=120)
        remote = RemoteTensorDataset(client, ["x", "y"])
        check = remote[[0, rows - 1]]
        if not (torch.equal(check[0], x[[0, rows - 1]]) and torch.equal(check[1], y[[0, -1]])):
            raise RuntimeError("the server holds other tensors than the local ones")
        common: dict[str, Any] = {"batch_size": batch, "shuffle": True, "num_workers": workers}
        # Remote and local epochs interleave, so both see the same machine state; the
        # ratio is of the medians.
        local_runs: list[float] = []
        remote_runs: list[float] = []
        for _ in range(reps):
            remote_runs.append(_samples_per_second(
                lambda: DataLoader(remote, collate_fn=remote.collate, **common), rows))
            local_runs.append(_samples_per_second(
                lambda: DataLoader(local, **common), rows))
        client.close()
    finally:
        proc.kill()
        proc.wait()
    remote_sps, local_sps = statistics.median(remote_runs), statistics.median(local_runs)
    ratio = remote_sps / local_sps
    shape = f"x ({rows}, {', '.join(map(str, sample))}) f32 + y ({rows},) i64"
    return {
        "figure": f"DataLoader epoch ({label}), {shape}, batch {batch}, "
                  f"{workers} workers, shuffle",
        "value": round(remote_sps),
        "unit": "samples/s",
        "peer": "same DataLoader over a local TensorDataset",
        "peer_value": round(local_sps),
        "ratio": round(ratio, 2),
        "goal": f"≥{GOAL:g}×",
        "met": ratio >= GOAL,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dataloader", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller tensor, fewer epochs")
    args = parser.parse_args(argv)
    for row in run(args.quick):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
