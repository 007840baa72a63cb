"""`tensorslice cluster`: N shards x R replicas of `tensorslice serve` on this host, from one
command, for tests, benchmarks and a laptop (a cluster manager it is not: Kubernetes or Ray
place and restart servers elsewhere).

What it promises:
- The rows of dimension 0 of the tensors are split over the shards (evenly, or at the
  given cut points); every replica of a shard serves the same rows (`serve --rows`).
- The cluster spec (`--spec-out`, the format `ClusterClient` reads) is written only once
  every server answers its health check SERVING, and atomically (a temporary file, then a
  rename): a reader never sees a spec naming a server that is not up.
- SIGINT and SIGTERM are passed to every server, which stop cleanly; the launcher exits
  once they have (0). A server that exits by itself stops the others, and the launcher
  exits 1, naming it. A server still running 10 s after being told to stop is killed;
  on Linux every server gets SIGTERM when the launcher dies, however it dies.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Replica", "launch", "split_rows"]

_SERVING = re.compile(r"tensorslice serving .* on (\S+):(\d+) ")
_STOP_SECONDS = 10.0


class ClusterError(Exception):
    """A launch that cannot go on: printed as one line, exit status 1 (2 for usage)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def split_rows(rows: int, shards: int, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """The row ranges of `shards` shards over `rows` rows: at the cut points `cuts` where
    given (``shards - 1`` increasing numbers strictly inside ``(0, rows)``), else as even
    as can be (the first ``rows % shards`` shards hold one row more)."""
    if shards < 1:
        raise ClusterError(f"--shards must be at least 1; got {shards}", 2)
    if cuts:
        if len(cuts) != shards - 1:
            raise ClusterError(f"--rows-split gives {len(cuts)} cut points; {shards} shards "
                               f"need {shards - 1}", 2)
        bounds = [0, *cuts, rows]
        for a, b in itertools.pairwise(bounds):
            if not a < b:
                raise ClusterError(
                    f"--rows-split {','.join(map(str, cuts))}: cut points must increase "
                    f"strictly within (0, {rows}), the tensors' {rows} rows", 2)
        return list(itertools.pairwise(bounds))
    if rows < shards:
        raise ClusterError(f"{rows} rows cannot be split over {shards} shards "
                           f"(each needs one row at least)", 2)
    base, extra = divmod(rows, shards)
    out, start = [], 0
    for i in range(shards):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass
class Replica:
    """One server process of the cluster: shard `shard`, replica `index`."""

    shard: str
    index: int
    rows: tuple[int, int]
    port: int
    proc: subprocess.Popen[str] | None = None
    address: str = ""
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @property
    def label(self) -> str:
        return f"{self.shard}/r{self.index}"

    def describe(self) -> str:
        pid = self.proc.pid if self.proc is not None else "-"
        return f"{self.label} ({self.address or 'starting'}, pid {pid})"


def _tensor_rows(tensors: Sequence[str], dirs: Sequence[str]) -> tuple[dict[str, int], int]:
    """Every tensor the options name and its rows (dimension 0), read from the headers;
    every one must have the same rows, or the split would mean different things."""
    from safetensors import safe_open

    from tensorslice.server._cli import UsageError, plan_sources

    try:
        sources = plan_sources(tensors, dirs)
    except UsageError as exc:
        raise ClusterError(str(exc), 2) from None
    except Exception as exc:  # a missing directory, an unreadable file
        raise ClusterError(str(exc), 2) from None
    if not sources:
        raise ClusterError("no tensors: give --tensor NAME=FILE or --dir DIR", 2)
    found: dict[str, int] = {}
    for s in sources:
        if not s.path.is_file():
            raise ClusterError(f"no such file: {s.path} ({s.option})", 2)
        try:
            with safe_open(str(s.path), framework="pt") as f:
                keys = list(f.keys())
                key = s.key if s.key is not None else (keys[0] if len(keys) == 1 else None)
                if key is None or key not in keys:
                    raise ClusterError(f"{s.option}: {s.path} holds {', '.join(keys)}; "
                                       f"name one with {s.path}:KEY", 2)
                shape = f.get_slice(key).get_shape()
        except ClusterError:
            raise
        except Exception as exc:
            raise ClusterError(f"{s.path} is not a readable safetensors file: {exc}", 2) from None
        if not shape:
            raise ClusterError(f"tensor {s.name!r} ({s.option}) is 0-d: it has no rows to "
                               f"split", 2)
        found[s.name] = int(shape[0])
    sizes = set(found.values())
    if len(sizes) != 1:
        listed = ", ".join(f"{n} {r}" for n, r in found.items())
        raise ClusterError(f"the tensors' rows (dimension 0) differ ({listed}): one row "
                           f"split needs tensors of one length; run a cluster per length", 2)
    return found, sizes.pop()


def _spec(replicas: Sequence[Replica], names: Sequence[str]) -> dict[str, Any]:
    shards: dict[str, list[str]] = {}
    rows: dict[str, tuple[int, int]] = {}
    for r in replicas:
        shards.setdefault(r.shard, []).append(r.address)
        rows[r.shard] = r.rows
    return {
        "shards": shards,
        "tensors": {n: [{"shard": s, "rows": list(rows[s])} for s in shards] for n in names},
    }


def _die_with_parent() -> None:
    """In the child, before `exec`: SIGTERM when the launcher dies, even by SIGKILL
    (Linux; elsewhere nothing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


def _read_lines(r: Replica) -> None:
    assert r.proc is not None and r.proc.stdout is not None
    for line in r.proc.stdout:
        r.lines.put(line)
    r.lines.put(None)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def launch(args: argparse.Namespace, serve_args: Sequence[str]) -> int:
    """Run the cluster `args` describes until a signal or a server's exit (see the
    module's docstring). `serve_args` go to every server as they are."""
    names, total = _tensor_rows(args.tensor, args.dir)
    ranges = split_rows(total, args.shards, args.rows_split)
    if args.replicas < 1:
        raise ClusterError(f"--replicas must be at least 1; got {args.replicas}", 2)
    n = args.shards * args.replicas
    replicas = [
        Replica(f"s{i}", j, ranges[i],
                0 if args.base_port == 0 else args.base_port + 2 * (i * args.replicas + j))
        for i in range(args.shards) for j in range(args.replicas)
    ]
    stop = threading.Event()
    got: list[int] = []

    def _on_signal(signum: int, frame: object) -> None:
        got.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    print(f"tensorslice cluster: {args.shards} shard(s) x {args.replicas} replica(s) over "
          f"{total} rows of {', '.join(names)}", flush=True)
    try:
        for r in replicas:
            cmd = [sys.executable, "-m", "tensorslice.server._cli", "serve",
                   "--host", args.host, "--port", str(r.port), "--rows", f"{r.rows[0]}:{r.rows[1]}",
                   "--no-progress"]
            if r.port:
                cmd += ["--bulk-port", str(r.port + 1)]
            for t in args.tensor:
                cmd += ["--tensor", t]
            for d in args.dir:
                cmd += ["--dir", d]
            cmd += list(serve_args)
            r.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                preexec_fn=_die_with_parent)
            threading.Thread(target=_read_lines, args=(r,), daemon=True).start()
            print(f"  starting {r.label}: rows {r.rows[0]}:{r.rows[1]} (pid {r.proc.pid})",
                  flush=True)
        _wait_ready(replicas, stop, args.startup_timeout)
        if stop.is_set():
            return _shutdown(replicas, got)
        spec = _spec(replicas, list(names))
        text = json.dumps(spec, indent=2) + "\n"
        _write_atomically(Path(args.spec_out), text)
        print(f"tensorslice cluster ready: {n} server(s); spec written to {args.spec_out}",
              flush=True)
        for shard, addrs in spec["shards"].items():
            print(f"  {shard} rows {ranges[int(shard[1:])][0]}:{ranges[int(shard[1:])][1]}: "
                  f"{', '.join(addrs)}", flush=True)
        while not stop.wait(0.2):
            for r in replicas:
                _drain(r)
                if r.proc is not None and r.proc.poll() is not None:
                    raise ClusterError(f"{r.describe()} exited with status {r.proc.returncode}; "
                                       f"stopping the others")
        return _shutdown(replicas, got)
    except ClusterError:
        _shutdown(replicas, [signal.SIGTERM])
        raise
    except BaseException:
        _shutdown(replicas, [signal.SIGTERM])
        raise


def _drain(r: Replica, echo: bool = False) -> None:
    """Take the lines a server printed (shown with `echo`, or when they look like errors)."""
    while True:
        try:
            line = r.lines.get_nowait()
        except queue.Empty:
            return
        if line is None:
            r.lines.put(None)  # keep the end visible
            return
        if echo or "error" in line.lower() or "Traceback" in line:
            print(f"  [{r.label}] {line.rstrip()}", flush=True)


def _wait_ready(replicas: Sequence[Replica], stop: threading.Event, timeout: float) -> None:
    """Wait until each server printed its address and its health check answers SERVING;
    progress is printed as each one is ready. A server that exits, or the timeout, raises."""
    from tensorslice.server._probe import health_status

    deadline = time.monotonic() + timeout
    pending = list(replicas)
    ready = 0
    while pending and not stop.is_set():
        if time.monotonic() > deadline:
            raise ClusterError(f"not ready within {timeout:g} s (--startup-timeout): "
                               f"{', '.join(r.describe() for r in pending)}")
        for r in list(pending):
            assert r.proc is not None
            while not r.address:
                try:
                    line = r.lines.get(timeout=0.05)
                except queue.Empty:
                    break
                if line is None:
                    r.lines.put(None)
                    break
                m = _SERVING.search(line)
                if m:
                    r.address = f"{m.group(1)}:{m.group(2)}"
                elif "error" in line.lower():
                    print(f"  [{r.label}] {line.rstrip()}", flush=True)
            if r.proc.poll() is not None:
                _drain(r, echo=True)
                raise ClusterError(f"{r.describe()} exited with status {r.proc.returncode} "
                                   f"while starting; stopping the others")
            if not r.address:
                continue
            try:
                status = health_status(r.address, "", 2.0)
            except Exception:  # not answering yet
                continue
            if status == "SERVING":
                pending.remove(r)
                ready += 1
                print(f"  ready {ready}/{len(replicas)}: {r.label} on {r.address}", flush=True)


def _shutdown(replicas: Sequence[Replica], signals: Sequence[int]) -> int:
    """Pass the signal to every server still running, wait for them (killing one that
    takes over `_STOP_SECONDS`); 0."""
    sig = signals[0] if signals else signal.SIGTERM
    live = [r for r in replicas if r.proc is not None and r.proc.poll() is None]
    for r in live:
        assert r.proc is not None
        try:
            r.proc.send_signal(sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _STOP_SECONDS
    for r in live:
        assert r.proc is not None
        try:
            r.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait(timeout=5)
    if live:
        print(f"tensorslice cluster: stopped {len(live)} server(s)", flush=True)
    return 0
