"""Shared helpers: timing, result rows, child processes, machine description."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
HOST = "127.0.0.1"

# Every child process is started with "spawn": no inherited threads, no inherited gRPC state.
SPAWN = mp.get_context("spawn")


@dataclass(frozen=True)
class Goal:
    """A goal on a ratio: ``op`` is ">=" or "<=" with ``threshold`` the bound, or "yes" (the
    value itself must be true)."""

    op: str
    threshold: float = 1.0

    def met(self, ratio: float | None) -> bool | None:
        if ratio is None:
            return None
        if self.op == "yes":
            return bool(ratio)
        return ratio >= self.threshold if self.op == ">=" else ratio <= self.threshold

    def __str__(self) -> str:
        if self.op == "yes":
            return "yes"
        return f"{'≥' if self.op == '>=' else '≤'}{self.threshold:g}×"


@dataclass
class Row:
    """One line of the table. ``ratio`` is ``value / peer_value`` unless given."""

    figure: str
    value: float | None
    unit: str
    peer: str = "—"
    peer_value: float | None = None
    peer_unit: str = ""
    ratio: float | None = None
    goal: Goal | None = None
    note: str = ""
    group: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.peer_value:
            self.ratio = self.value / self.peer_value

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.goal.met(self.value if self.goal.op == "yes" else self.ratio)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["goal"] = str(self.goal) if self.goal is not None else None
        d["met"] = self.met
        return d


@dataclass
class Figures:
    """Named measured values shared between groups (e.g. peer numbers used by service rows)."""

    values: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> float | None:
        return self.values.get(key)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def time_reps(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall time of ``fn()`` for ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_per_call(fn: Callable[[], object], reps: int, min_time: float = 0.02) -> float:
    """Median seconds per call, each repetition looping until ``min_time`` has passed."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(100_000, int(min_time / one)))
    samples: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return median(samples)


class Child:
    """A spawned child process that reports once on a pipe that it is ready (e.g. its port).

    ``target(conn, *args)`` must send one message on ``conn`` when ready; afterwards the pipe
    is free for a control protocol (see ``bench._rss``).
    """

    def __init__(self, target: Callable[..., None], *args: Any, ready_timeout: float = 300.0):
        parent, child = SPAWN.Pipe()
        self.conn: multiprocessing.connection.Connection = parent
        self.proc = SPAWN.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        if not parent.poll(ready_timeout):
            self.close()
            raise RuntimeError(f"child {target.__name__} not ready after {ready_timeout:.0f} s")
        msg = parent.recv()
        if isinstance(msg, BaseException):
            self.close()
            raise RuntimeError(f"child {target.__name__} failed: {msg!r}")
        self.ready: Any = msg

    def request(self, msg: Any, timeout: float = 60.0) -> Any:
        self.conn.send(msg)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"child did not answer {msg!r} within {timeout:.0f} s")
        return self.conn.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        pass
    for mod in ("torch", "grpc", "pyarrow", "numpy"):
        try:
            info[mod if mod != "grpc" else "grpcio"] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info
