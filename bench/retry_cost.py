"""What a gRPC channel's retry settings cost a small call: the 4 KiB read ``t[1:2]`` of a
tensorslice server (the `Client`, over TCP) and the raw unary call of 4 KiB, each on
channels that differ only in their retry settings, the variants interleaved round by round
in one process run (all see the same machine):

- ``off``: ``grpc.enable_retries=0`` (no retries at all, transparent retries included);
- ``filter``: ``grpc.enable_retries=1`` and no retry policy (gRPC's own default: only
  transparent retries, of a call that never left the client);
- ``policy``: ``grpc.enable_retries=1`` and a ``retryPolicy`` for the read methods in the
  service config, as the client's channel carried before it retried in its own flow;
- ``retries=0``, ``retries=3``: the `Client`'s own channel, with those settings (3 is the
  default).

    python -m bench.retry_cost [--rounds N] [--count N]

Prints the medians over the rounds of each variant's p50 and of this process's CPU time
per call (the client's side: gRPC's threads and the caller's), and their ratios to
``off``. The CPU time is the steadier figure on a loaded machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc

from bench import _grpc_raw, _tensorslice
from bench._common import HOST
from tensorslice.client import Client
from tensorslice.core.endpoint import READ_METHODS, SERVICE_NAME

_BASE: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", 256 << 20),
]
_POLICY = json.dumps({"methodConfig": [{
    "name": [{"service": SERVICE_NAME, "method": m} for m in READ_METHODS]
    + [{"service": _grpc_raw.SERVICE}],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
VARIANTS: dict[str, list[tuple[str, Any]] | int] = {
    "off": [*_BASE, ("grpc.enable_retries", 0)],
    "filter": [*_BASE, ("grpc.enable_retries", 1)],
    "policy": [*_BASE, ("grpc.enable_retries", 1), ("grpc.service_config", _POLICY)],
    "retries=0": 0,  # the Client's own channel options, with those retries
    "retries=3": 3,
}


class _Client(Client):
    """A `Client` whose channel has the given options (an int: its own, with that many
    retries)."""

    def __init__(self, address: str, options: list[tuple[str, Any]] | int) -> None:
        super().__init__(address, same_host=False, tls=False,
                         retries=options if isinstance(options, int) else 3)
        self._given = None if isinstance(options, int) else options

    def _options(self) -> list[tuple[str, Any]]:
        return super()._options() if self._given is None else list(self._given)


def _round(call: Callable[[], object], count: int) -> tuple[float, float]:
    """(p50 seconds, this process's CPU seconds per call) of `count` sequential calls."""
    cpu = time.process_time()
    p50 = _grpc_raw.latency_p50(call, count, 30.0)
    return p50, (time.process_time() - cpu) / (count + min(50, count))


def measure(rounds: int, count: int) -> dict[str, dict[str, float]]:
    """{variant: {"tensorslice": p50 s, "tensorslice_cpu": CPU s per call, "raw": ...,
    "raw_cpu": ...}}, medians over `rounds`."""
    server, port = _tensorslice.start_tensorslice_server(
        {"s": _tensorslice.TensorSpec((16384, 1024))})
    raw, raw_port = _grpc_raw.start_server(_grpc_raw.UNARY_BYTES)
    clients: dict[str, _Client] = {}
    channels: list[grpc.Channel] = []
    calls: dict[tuple[str, str], Callable[[], object]] = {}
    with server, raw:
        try:
            for name, options in VARIANTS.items():
                c = clients[name] = _Client(f"{HOST}:{port}", options)
                t = c.tensor("s")
                if t[1:2].numel() * 4 != 4096 or c.last_transport != "inline":
                    raise AssertionError(f"t[1:2] is not a 4 KiB inline answer ({name})")
                calls[name, "tensorslice"] = functools.partial(t.__getitem__, slice(1, 2))
                ch = grpc.insecure_channel(f"{HOST}:{raw_port}", options=c._options())
                channels.append(ch)
                unary = ch.unary_unary(_grpc_raw.UNARY, None, None)
                calls[name, "raw"] = functools.partial(unary, b"", timeout=30)
            figs: dict[tuple[str, str], list[float]] = {}
            for _ in range(rounds):
                for (name, kind), call in calls.items():
                    p50, cpu = _round(call, count)
                    figs.setdefault((name, kind), []).append(p50)
                    figs.setdefault((name, f"{kind}_cpu"), []).append(cpu)
        finally:
            for c in clients.values():
                c.close()
            for ch in channels:
                ch.close()
    out: dict[str, dict[str, float]] = {}
    for (name, kind), values in figs.items():
        out.setdefault(name, {})[kind] = statistics.median(values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count", type=int, default=400, help="calls per round and variant")
    args = ap.parse_args()
    out = measure(args.rounds, args.count)
    print(f"a 4 KiB call, medians of {args.rounds} rounds of {args.count} calls: p50 and "
          f"the client's CPU per call (us), each with its ratio to 'off'")
    kinds = ("tensorslice", "tensorslice_cpu", "raw", "raw_cpu")
    print(f"{'variant':8}" + "".join(f"{k:>22}" for k in kinds))
    for name, figs in out.items():
        print(f"{name:8}" + "".join(
            f"{figs[k] * 1e6:15.0f} {figs[k] / out['off'][k]:6.3f}" for k in kinds))


if __name__ == "__main__":
    main()
