"""Scaling over shards: N = 1, 2, 4, 8 server processes, each holding its rows of one
tensor (4 KiB rows), and C client processes, each gathering lists of random rows of the
whole tensor through the sharded client (one call per shard a gather touches, in
parallel, merged in the caller's order). The figure per N is the aggregate rows/s of all
clients (median of several windows), set against 0.8·N × the rate of one shard.

    python -m bench.scaling [--quick] [--shards 1,2,4,8] [--clients C] [--seconds S]
    scripts/bench --only scaling

Writes bench/results/scaling.json and bench/results/scaling.svg (the curve). Everything
runs on 127.0.0.1; the clients and the servers share the machine's cores, so the curve
flattens where the cores run out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing.connection
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench._common import HOST, SPAWN, machine_info
from bench._payload import pattern_tensor
from bench._tensorslice import TensorSpec, start_tensorslice_server
from tensorslice.client import Client

GOAL = 0.8  # aggregate >= GOAL * N * one shard
ROW_ELEMS = 1024  # float32: 4 KiB rows
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    shards: tuple[int, ...]
    clients: int
    rows: int  # of the whole tensor
    gather: int  # rows per gather
    seconds: float  # per window
    windows: int

    @staticmethod
    def make(quick: bool, shards: tuple[int, ...] | None = None,
             clients: int | None = None, seconds: float | None = None) -> Settings:
        return Settings(
            shards=shards or ((1, 2) if quick else (1, 2, 4, 8)),
            clients=clients or (2 if quick else 4),
            rows=8192 if quick else 16384,
            gather=128,
            seconds=seconds or (1.0 if quick else 3.0),
            windows=2 if quick else 5,
        )


def pieces(rows: int, n: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of each of ``n`` shards: as even as can be."""
    cuts = [rows * i // n for i in range(n + 1)]
    return list(itertools.pairwise(cuts))


def spec(addresses: list[str], rows: int) -> dict[str, Any]:
    """The cluster spec of one tensor ``acts`` over the servers ``addresses``."""
    return {
        "shards": {f"s{i}": [a] for i, a in enumerate(addresses)},
        "tensors": {"acts": [{"shard": f"s{i}", "rows": [a, b]}
                             for i, (a, b) in enumerate(pieces(rows, len(addresses)))]},
    }


def whole(rows: int, n: int) -> torch.Tensor:
    """The tensor the ``n`` servers hold together: each holds the pattern of its rows."""
    return torch.cat([pattern_tensor((b - a, ROW_ELEMS)) for a, b in pieces(rows, n)])


class Sharded:
    """Gathers of rows of the sharded tensor: indices grouped per shard, the shards asked
    in parallel, the rows put back in the caller's order."""

    def __init__(self, cluster: dict[str, Any]) -> None:
        self.clients = [Client(addrs[0], timeout=60) for addrs in cluster["shards"].values()]
        self.starts = torch.tensor([p["rows"][0] for p in cluster["tensors"]["acts"]])
        self.remotes = [c.tensor("acts") for c in self.clients]
        self.pool = ThreadPoolExecutor(len(self.clients))

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        owner = torch.searchsorted(self.starts, idx, right=True) - 1
        out = torch.empty((len(idx), ROW_ELEMS), dtype=torch.float32)
        jobs = []
        for s in sorted(set(owner.tolist())):
            where = (owner == s).nonzero().flatten()
            local = (idx[where] - self.starts[s]).tolist()
            jobs.append((where, self.pool.submit(self.remotes[s].__getitem__, local)))
        for where, job in jobs:
            out[where] = job.result()
        return out

    def close(self) -> None:
        self.pool.shutdown()
        for c in self.clients:
            c.close()


def _client_main(conn: multiprocessing.connection.Connection, cluster: dict[str, Any],
                 s: Settings, seed: int) -> None:
    """One client process: check a gather, then on each "go" gather for ``s.seconds`` and
    report (gathers, seconds)."""
    torch.set_num_threads(1)
    try:
        sharded = Sharded(cluster)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, s.rows, (s.gather,), generator=g)
        want = whole(s.rows, len(cluster["shards"]))[idx]
        if not torch.equal(sharded.gather(idx), want):
            raise AssertionError("a gather across the shards disagrees with the local rows")
    except Exception as exc:
        conn.send(exc)
        return
    conn.send("ready")
    while conn.recv() == "go":
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < s.seconds:
            sharded.gather(torch.randint(0, s.rows, (s.gather,), generator=g))
            count += 1
        conn.send((count, elapsed))
    sharded.close()


def measure(n: int, s: Settings) -> dict[str, Any]:
    """Aggregate rows/s of ``s.clients`` clients over ``n`` shards: median of the windows."""
    servers = [start_tensorslice_server({"acts": TensorSpec((b - a, ROW_ELEMS))})
               for a, b in pieces(s.rows, n)]
    clients: list[tuple[Any, multiprocessing.connection.Connection]] = []
    try:
        cluster = spec([f"{HOST}:{port}" for _, port in servers], s.rows)
        for i in range(s.clients):
            parent, child = SPAWN.Pipe()
            proc = SPAWN.Process(target=_client_main, args=(child, cluster, s, i), daemon=True)
            proc.start()
            child.close()
            clients.append((proc, parent))
        for _, conn in clients:
            if not conn.poll(120):
                raise RuntimeError("a client process did not start within 120 s")
            msg = conn.recv()
            if isinstance(msg, BaseException):
                raise RuntimeError(f"a client process failed: {msg!r}")
        rates = []
        for _ in range(s.windows):
            for _, conn in clients:
                conn.send("go")
            total = 0.0
            for _, conn in clients:
                if not conn.poll(s.seconds + 120):
                    raise RuntimeError("a client process did not report")
                count, elapsed = conn.recv()
                total += count * s.gather / elapsed
            rates.append(total)
    finally:
        for proc, conn in clients:
            try:
                conn.send("stop")
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for server, _ in servers:
            server.close()
    return {"shards": n, "rows_per_s": float(statistics.median(rates)), "windows": rates}


def run(quick: bool, shards: tuple[int, ...] | None = None, clients: int | None = None,
        seconds: float | None = None) -> list[dict[str, Any]]:
    """Measure every N; write scaling.json and scaling.svg; return the table rows."""
    s = Settings.make(quick, shards, clients, seconds)
    points = []
    for n in s.shards:
        print(f"[scaling] {n} shard(s), {s.clients} clients ...", file=sys.stderr, flush=True)
        points.append(measure(n, s))
    one = next((p["rows_per_s"] for p in points if p["shards"] == 1), None)
    rows = []
    for p in points:
        goal_value = GOAL * p["shards"] * one if one else None
        p["vs_one"] = p["rows_per_s"] / one if one else None
        p["ratio_to_goal"] = p["rows_per_s"] / goal_value if goal_value else None
        rows.append({
            "figure": f"{p['shards']} shard(s), {s.clients} clients, gathers of {s.gather} "
                      f"× 4 KiB rows",
            "value": p["rows_per_s"], "unit": "rows/s",
            "peer": f"{GOAL:g}·N × 1 shard", "peer_value": goal_value,
            "ratio": p["ratio_to_goal"],
        })
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (RESULTS / "scaling.json").write_text(json.dumps(
        {"machine": machine, "settings": asdict(s), "goal": GOAL, "points": points,
         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    (RESULTS / "scaling.svg").write_text(svg(points, s, machine))
    return rows


def svg(points: list[dict[str, Any]], s: Settings, machine: dict[str, Any]) -> str:
    """The curve as a small standalone SVG: measured aggregate rows/s per N, beside N × and
    0.8·N × one shard."""
    w, h, left, right, top, bottom = 560, 360, 70, 20, 40, 50
    ns = [p["shards"] for p in points]
    one = next((p["rows_per_s"] for p in points if p["shards"] == 1), points[0]["rows_per_s"])
    top_value = float(max(max(ns) * one, *(p["rows_per_s"] for p in points))) * 1.05

    def x(n: float) -> float:
        span = max(1.0, float(len(ns) - 1))
        return left + (w - left - right) * ns.index(int(n)) / span

    def y(v: float) -> float:
        return h - bottom - (h - top - bottom) * v / top_value

    def line(values: list[float], style: str) -> str:
        pts = " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v in zip(ns, values, strict=True))
        return f'<polyline fill="none" {style} points="{pts}"/>'

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">tensorslice: aggregate gather rate over '
           f'N shards ({s.clients} clients, {machine.get("cores")} cores)</text>']
    for i in range(6):
        v = top_value * i / 5
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
                   f'{v / 1000:.0f}k</text>')
    for n in ns:
        out.append(f'<text x="{x(n):.1f}" y="{h - bottom + 18}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 10}" text-anchor="middle">'
               f'shards (server processes)</text>')
    out.append(f'<text x="14" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + h - bottom) / 2})">rows/s (4 KiB rows)</text>')
    out.append(line([n * one for n in ns], 'stroke="#999" stroke-dasharray="2,3"'))
    out.append(line([GOAL * n * one for n in ns], 'stroke="#c33" stroke-dasharray="6,4"'))
    out.append(line([p["rows_per_s"] for p in points], 'stroke="#1f5fbf" stroke-width="2.5"'))
    for p in points:
        out.append(f'<circle cx="{x(p["shards"]):.1f}" cy="{y(p["rows_per_s"]):.1f}" r="4" '
                   f'fill="#1f5fbf"/>')
    legend = [("#1f5fbf", "", "measured"), ("#c33", ' stroke-dasharray="6,4"', "goal 0.8·N × 1"),
              ("#999", ' stroke-dasharray="2,3"', "N × 1 shard")]
    for i, (color, dash, label) in enumerate(legend):
        ly = top + 8 + 16 * i
        out.append(f'<line x1="{left + 10}" x2="{left + 40}" y1="{ly}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{left + 46}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 1, 2; short windows")
    ap.add_argument("--shards", default=None, help="comma-separated N (default 1,2,4,8)")
    ap.add_argument("--clients", type=int, default=None, help="client processes (default 4)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per window")
    args = ap.parse_args(argv)
    shards = tuple(int(n) for n in args.shards.split(",")) if args.shards else None
    for r in run(args.quick, shards, args.clients, args.seconds):
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "—"
        print(f"{r['figure']}: {r['value']:,.0f} rows/s, {ratio} of {r['peer']}")
    print(f"JSON and SVG: {RESULTS}/scaling.json, scaling.svg", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
