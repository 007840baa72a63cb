"""A soak run: a server process on 127.0.0.1 under mixed load for MINUTES (`scripts/soak`).

Load, every loop bounded by the run's end: two normal clients (small slices, gathers,
thresholds, SliceMany; their latencies are the p50/p99 reported), a client of large slices
and gathers (over the bulk data plane), a slow reader (a `Slice` stream read one message a
second, then dropped), unredeemed bulk tickets (a `Fetch` whose ticket is never claimed),
and one DataLoader epoch a minute (two forked workers; every sample exactly once). Every
result is checked against the same tensors held locally.

Prints the server's memory over time (RSS: its own anonymous and file pages, and the
shared-memory segments of its same-host sessions), errors, and the normal clients'
p50/p99. Exits 1 on any error; when the server's own memory (RSS less the segments) over
the last quarter of the run, as a median, exceeds its peak during the warm-up (the first
20% of the run, at least 30 s) by 5% and 32 MiB or more; or when the segments' RSS
exceeds the bound on them (`ServerConfig.shm_max_bytes`): segments are pooled per
session and kept for reuse, so they fill towards what the load needs for minutes, within
that bound. A median and not a peak: single samples catch transient results in flight, a
leak lifts them all.
The server runs with ``MALLOC_ARENA_MAX=2``: glibc's per-thread arenas otherwise keep
freed memory in as many as eight arenas per core, and RSS then says more about the
allocator than about what the server holds (`serve` itself has large blocks mapped on
their own, see `tensorslice.server._hostmem.return_large_frees`).
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from tensorslice.client import Client, RemoteTensorDataset, ResultTooLarge
from tensorslice.client._base import SERVICE, make_selection
from tensorslice.core.selection import selection_to_proto
from tensorslice.server import ServerConfig
from tensorslice.v1 import tensorslice_pb2 as pb

GROWTH_LIMIT = 0.05
GROWTH_FLOOR = 32 << 20
"""Growth under this many bytes passes: what is in flight at a sample (a 16 MiB slice, a few
4 MiB gathers) moves RSS by that much whatever the server's size."""
TIMEOUT = 60.0


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (time, seconds)
    calls: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def count(self, kind: str, seconds: float | None = None) -> None:
        with self.lock:
            self.calls[kind] = self.calls.get(kind, 0) + 1
            if seconds is not None:
                self.latencies.append((time.monotonic(), seconds))

    def refuse(self, kind: str) -> None:
        with self.lock:
            self.refused[kind] = self.refused.get(kind, 0) + 1

    def error(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "acts": torch.randn(128, 64, 16, 16, generator=g),  # 8 MiB
        "large": torch.randn(256, 64, 32, 32, generator=g),  # 64 MiB
        "x": torch.arange(32768 * 64, dtype=torch.float32).reshape(32768, 64),  # 8 MiB
        "y": torch.arange(32768, dtype=torch.int64),
    }


def _rss(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of a process, in bytes (none where /proc is
    missing)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = re.findall(r"^(VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+)\s+kB", text, re.MULTILINE)
    return {k: int(v) * 1024 for k, v in fields}


class Server:
    """`tensorslice serve` on 127.0.0.1, a free port, the soak's tensors."""

    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorslice.server._cli", "--log-level", "WARNING",
             "serve", "--host", "127.0.0.1", "--port", "0", "--dir", str(directory),
             "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": "2"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            m = re.search(r"serving .* on (127\.0\.0\.1:\d+)", line)
            if m:
                self.address = m.group(1)
                return

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
            self.log.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _loop(stats: Stats, kind: str, end: float, body: Callable[[random.Random], None],
          pause: float = 0.0, seed: int = 0) -> threading.Thread:
    rng = random.Random(seed)

    def run() -> None:
        while time.monotonic() < end:
            try:
                body(rng)
            except ResultTooLarge:
                stats.refuse(kind)
            except Exception as exc:
                stats.error(kind, exc)
                time.sleep(0.5)
            if pause:
                time.sleep(pause)

    thread = threading.Thread(target=run, name=f"soak-{kind}", daemon=True)
    thread.start()
    return thread


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"wrong result: {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("minutes", type=float)
    args = parser.parse_args(argv)
    duration = args.minutes * 60
    local = _tensors()
    stats = Stats()
    with tempfile.TemporaryDirectory(prefix="tensorslice-soak-") as tmp:
        for name, t in local.items():
            save_file({name: t.contiguous()}, str(Path(tmp) / f"{name}.safetensors"))
        server = Server(Path(tmp))
        try:
            return _run(server, local, stats, duration)
        finally:
            server.stop()


def _run(server: Server, local: dict[str, torch.Tensor], stats: Stats, duration: float) -> int:
    start = time.monotonic()
    end = start + duration
    warmup = max(30.0, 0.2 * duration)
    acts, large, y = local["acts"], local["large"], local["y"]
    client = Client(server.address, timeout=TIMEOUT)
    remote_acts = client.tensor("acts")
    remote_large = client.tensor("large")

    def normal(rng: random.Random) -> None:
        t0 = time.perf_counter()
        choice = rng.randrange(4)
        if choice == 0:
            i = rng.randrange(120)
            got = remote_acts[i:i + 4, [1, 3, 5]]
            _expect(torch.equal(got, acts[i:i + 4, [1, 3, 5]]), "small slice")
        elif choice == 1:
            rows = [rng.randrange(128) for _ in range(16)]
            got = remote_acts[rows, :, 3]
            _expect(torch.equal(got, acts[rows, :, 3]), "gather")
        elif choice == 2:
            value = rng.uniform(-0.2, 0.2)
            r = remote_acts.where(dim=1, stat="mean", over=(2, 3), op=">", value=value)
            _expect(torch.equal(r.values, acts[:, r.indices]), "threshold values")
            _expect(bool((acts[:, r.indices].mean(dim=(2, 3)) > value).any(0).all()),
                    "threshold indices")
        else:
            rows = [rng.randrange(128) for _ in range(8)]
            out = client.slice_many({"a": ("acts", (rows, 2)), "b": ("y", rows)})
            _expect(torch.equal(out["a"], acts[rows, 2]) and torch.equal(out["b"], y[rows]),
                    "SliceMany")
        stats.count("normal", time.perf_counter() - t0)

    def big(rng: random.Random) -> None:
        if rng.random() < 0.7:
            a = rng.randrange(192)
            got = remote_large[a:a + 64]  # 16 MiB, a view on the server
            _expect(torch.equal(got, large[a:a + 64]), "large slice")
            stats.count("large slice")
        else:
            rows = [rng.randrange(256) for _ in range(32)]
            got = remote_large[rows, 8:40]  # 4 MiB gather
            _expect(torch.equal(got, large[rows, 8:40]), "large gather")
            stats.count("large gather")

    # Imported after tensorslice.client, which sets gRPC's fork mode before gRPC loads
    # (the DataLoader epochs fork while these threads are inside gRPC).
    import grpc

    channel = grpc.insecure_channel(server.address)
    slice_call = channel.unary_stream(f"/{SERVICE}/Slice",
                                      request_serializer=pb.SliceRequest.SerializeToString,
                                      response_deserializer=None)
    fetch_call = channel.unary_unary(f"/{SERVICE}/Fetch",
                                     request_serializer=pb.SliceRequest.SerializeToString,
                                     response_deserializer=pb.SliceChunk.FromString)

    def slow_reader(rng: random.Random) -> None:
        request = selection_to_proto("large", make_selection(slice(0, 128)))  # 32 MiB
        stream = slice_call(request, timeout=TIMEOUT)
        try:
            for n, _ in enumerate(stream):
                if n == 4:
                    break
                time.sleep(1.0)
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]
        stats.count("slow reader")

    def unredeemed(rng: random.Random) -> None:
        request = selection_to_proto("large", make_selection(
            ([rng.randrange(256) for _ in range(16)],)))  # a 4 MiB gather, materialised
        request.bulk = True
        try:
            answer = fetch_call(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                stats.refuse("unredeemed ticket")
                return
            raise
        _expect(answer.HasField("ticket"), "a ticket")
        stats.count("unredeemed ticket")

    threads = [
        _loop(stats, "normal", end, normal, seed=1),
        _loop(stats, "normal", end, normal, seed=2),
        _loop(stats, "large", end, big, seed=3),
        _loop(stats, "slow reader", end, slow_reader, pause=2.0, seed=4),
        _loop(stats, "unredeemed ticket", end, unredeemed, pause=2.0, seed=5),
    ]

    samples: list[tuple[float, int, int]] = []  # (t, own RSS, segments' RSS)
    interval = min(10.0, max(duration / 12, 2.0))
    next_sample = start
    next_epoch = start + min(15.0, duration / 4)
    seen_latencies = 0
    print(f"soak: {duration / 60:g} min against {server.address} (server pid {server.proc.pid})"
          f"; warm-up {warmup:.0f} s", flush=True)
    print(f"{'t':>6} {'server RSS':>12} {'(anon':>8} {'file':>6} {'shm)':>6} {'calls':>7} "
          f"{'errors':>6} {'p50':>8} {'p99':>8}", flush=True)
    while True:
        now = time.monotonic()
        if now >= next_epoch and now < end:
            _epoch(server.address, local, stats)
            next_epoch += 60.0
            continue
        if now >= next_sample:
            mem = _rss(server.proc.pid)
            rss = mem.get("VmRSS", 0)
            shm = mem.get("RssShmem", 0)
            samples.append((now - start, rss - shm, shm))
            with stats.lock:
                recent = [s for _, s in stats.latencies[seen_latencies:]]
                seen_latencies = len(stats.latencies)
                calls = sum(stats.calls.values())
                errors = len(stats.errors)
            p50, p99 = _percentiles(recent)
            print(f"{now - start:5.0f}s {rss / 2**20:9.1f} MiB "
                  f"({mem.get('RssAnon', 0) / 2**20:7.1f} {mem.get('RssFile', 0) / 2**20:6.1f}"
                  f" {shm / 2**20:6.1f})"
                  f" {calls:7d} {errors:6d} {p50 * 1e3:6.1f}ms {p99 * 1e3:6.1f}ms", flush=True)
            next_sample += interval
            if now >= end:
                break
        if server.proc.poll() is not None:
            stats.error("server", RuntimeError(f"exited with {server.proc.returncode}"))
            break
        time.sleep(min(0.2, max(next_sample - time.monotonic(), 0.0)))
    for t in threads:
        t.join(timeout=TIMEOUT + 10)
        if t.is_alive():
            stats.error(t.name, RuntimeError("did not stop within its timeout"))
    client.close()
    channel.close()
    return _report(stats, samples, warmup, duration)


def _epoch(address: str, local: dict[str, torch.Tensor], stats: Stats) -> None:
    """One DataLoader epoch over x, y: two forked workers, every sample exactly once."""
    t0 = time.perf_counter()
    try:
        ds = RemoteTensorDataset(address, ["x", "y"], timeout=TIMEOUT)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=1024, shuffle=True, num_workers=2, collate_fn=ds.collate,
            multiprocessing_context="fork", timeout=TIMEOUT)
        seen: list[int] = []
        for x, y in loader:
            _expect(torch.equal(x, local["x"][y]), "DataLoader rows")
            seen += y.tolist()
        _expect(sorted(seen) == list(range(len(local["y"]))), "every sample once")
        stats.count("DataLoader epoch")
        print(f"  DataLoader epoch: {len(seen)} samples in {time.perf_counter() - t0:.1f} s",
              flush=True)
    except Exception as exc:
        stats.error("DataLoader epoch", exc)


def _percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    q = statistics.quantiles(values, n=100)
    return statistics.median(values), q[98]


def _report(stats: Stats, samples: list[tuple[float, int, int]], warmup: float,
            duration: float) -> int:
    during = [own for t, own, _ in samples if t <= warmup]
    tail = [own for t, own, _ in samples if t >= max(warmup, 0.75 * duration)]
    baseline = max(during) if during else 0
    final = int(statistics.median(tail)) if tail else 0
    growth = final / baseline - 1 if baseline else 0.0
    segments = max((shm for _, _, shm in samples), default=0)
    shm_bound = ServerConfig().shm_max_bytes  # the server runs with the defaults
    p50, p99 = _percentiles([s for _, s in stats.latencies])
    minutes: dict[int, list[float]] = {}
    t0 = stats.latencies[0][0] if stats.latencies else 0.0
    for t, s in stats.latencies:
        minutes.setdefault(int((t - t0) // 60), []).append(s)
    print(f"\nsoak: {duration / 60:g} min; calls {dict(sorted(stats.calls.items()))}")
    print(f"refused (expected under the server's bounds): {dict(sorted(stats.refused.items()))}")
    print(f"normal clients: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms; p99 per minute: "
          + ", ".join(f"{_percentiles(v)[1] * 1e3:.1f}" for _, v in sorted(minutes.items()))
          + " ms")
    print(f"server's own RSS: {baseline / 2**20:.1f} MiB at most during the warm-up, "
          f"{final / 2**20:.1f} MiB the median of the last quarter: {growth:+.1%} "
          f"(limit +{GROWTH_LIMIT:.0%} and +{GROWTH_FLOOR >> 20} MiB)")
    print(f"same-host segments' RSS: {segments / 2**20:.1f} MiB at most "
          f"(bound {shm_bound / 2**20:.0f} MiB)")
    print(f"errors: {len(stats.errors)}")
    for e in stats.errors[:20]:
        print(f"  {e}")
    grew = growth >= GROWTH_LIMIT and final - baseline >= GROWTH_FLOOR
    failed = bool(stats.errors) or grew or segments > shm_bound
    print("soak: FAILED" if failed else "soak: passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
