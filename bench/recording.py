"""Recording overhead: a model's forward passes over a dataset alone, beside the same passes
with an `ActivationRecorder` appending two layers' outputs to a local server (the README's
"Recording a model's activations" model, over five times its data: longer epochs scatter
less on a shared machine).

    python -m bench.recording [--quick]

The server runs in a separate process. Epochs alone and recorded interleave, so both see the
same machine state; the figure is the ratio of the medians. `run(quick)` returns the table
rows as dicts with keys figure, value, unit, peer, peer_value, ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from tensorslice.client import ActivationRecorder, Client

_SERVER = """
from tensorslice.server import ServerConfig, TensorStore, create_server
store = TensorStore(device="cpu")
server, port = create_server(store, "127.0.0.1:0", ServerConfig())
server.start()
print(port, flush=True)
server.wait_for_termination()
"""

SAMPLES, BATCH = 1600, 32
LAYERS = ("bench_conv1", "bench_conv2")


def make_model() -> tuple[torch.nn.Sequential, torch.Tensor]:
    """The README example's model (two convolutions, eval mode) and `SAMPLES` images."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU()).eval()
    return model, torch.randn(SAMPLES, 3, 16, 16)


def _batches(images: torch.Tensor) -> list[torch.Tensor]:
    return [images[i : i + BATCH] for i in range(0, len(images), BATCH)]


def _alone(model: torch.nn.Sequential, images: torch.Tensor) -> tuple[float, float]:
    """Seconds of the epoch: wall clock, and CPU time of this process (all its threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    for batch in _batches(images):
        model(batch)
    return time.perf_counter() - start, time.process_time() - cpu


def _recorded(client: Client, model: torch.nn.Sequential, images: torch.Tensor
              ) -> tuple[float, float]:
    """As `_alone`, from the first forward until every batch is acknowledged by the server."""
    start, cpu = time.perf_counter(), time.process_time()
    with ActivationRecorder(client, {LAYERS[0]: model[1], LAYERS[1]: model[3]},
                            dtype=torch.float16):
        for batch in _batches(images):
            model(batch)
    return time.perf_counter() - start, time.process_time() - cpu


def run(quick: bool) -> list[dict[str, Any]]:
    epochs = 3 if quick else 9
    threads = torch.get_num_threads()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip()
        if not port:
            raise RuntimeError("the benchmark server did not start")
        model, images = make_model()
        alone: list[tuple[float, float]] = []
        recorded: list[tuple[float, float]] = []
        # One intra-op thread: on a shared machine, several spin against each other and the
        # epochs' times scatter by 10x either way.
        torch.set_num_threads(1)
        with torch.no_grad(), Client(f"127.0.0.1:{port}", timeout=120) as client:
            model(images[:BATCH])  # warm up
            for _ in range(epochs + 1):  # the first pair warms the connection up
                alone.append(_alone(model, images))
                recorded.append(_recorded(client, model, images))
                got = {name: client.describe(name).shape for name in LAYERS}
                if got != {LAYERS[0]: (SAMPLES, 16, 16, 16), LAYERS[1]: (SAMPLES, 32, 16, 16)}:
                    raise RuntimeError(f"recorded shapes {got}")
                for name in LAYERS:
                    client.drop(name)
    finally:
        torch.set_num_threads(threads)
        proc.kill()
        proc.wait()
    rows = []
    for k, what in ((0, "wall clock"), (1, "CPU time of the model's process")):
        a = [t[k] for t in alone[1:]]
        r = [t[k] for t in recorded[1:]]
        alone_s, recorded_s = statistics.median(a), statistics.median(r)
        # Each pair ran back to back: their ratio is less exposed to the load drifting.
        pairs = statistics.median(x / y for x, y in zip(r, a, strict=True))
        rows.append({
            "figure": f"forward over {SAMPLES} images (batch {BATCH}, 1 thread) recording 2 "
                      f"layers (float16) to a local server, {what}",
            "value": recorded_s,
            "unit": "s",
            "peer": "the same forward passes alone",
            "peer_value": alone_s,
            "ratio": round(recorded_s / alone_s, 2),
            "note": f"median of the {epochs} epoch pairs' ratios: {pairs:.2f}; "
                    f"{(recorded_s - alone_s) / (SAMPLES // BATCH) * 1e3:.1f} ms per batch",
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recording", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    args = parser.parse_args(argv)
    for row in run(args.quick):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
