"""Peak RSS growth of a child process while it sends or receives N bytes.

Linux only: the peak (VmHWM) is reset by writing "5" to /proc/self/clear_refs, so the growth
is ``VmHWM after - VmRSS at reset``, with the reset taken after imports and setup. Where the
reset is not allowed the growth is measured against the peak reached before (an underestimate
of nothing: the peak before is at least the RSS then), and ``exact`` is False.

Server children call :func:`control_loop` in their main thread; the parent drives it with
``("rss_reset",)`` and ``("rss_peak",)`` (see :func:`measure_transfer`). Client children are
started by :func:`measure_transfer` from a ``"module:function"`` spec (see ``ClientSpec``).
"""

from __future__ import annotations

import importlib
import multiprocessing.connection
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench._common import Child

_FIELD = re.compile(r"^(VmHWM|VmRSS):\s+(\d+)\s+kB", re.MULTILINE)


def rss_status() -> dict[str, int]:
    """Current ``VmRSS`` and peak ``VmHWM`` in bytes (zeros where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            text = f.read()
    except OSError:
        return {"VmRSS": 0, "VmHWM": 0}
    return {k: int(v) * 1024 for k, v in _FIELD.findall(text)}


def reset_peak() -> tuple[int, bool]:
    """Reset the peak RSS where the kernel allows it; returns (baseline bytes, exact)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss_status()["VmRSS"], True
    except OSError:
        s = rss_status()
        return s["VmHWM"], False


def peak_growth(baseline: int) -> int:
    return max(0, rss_status()["VmHWM"] - baseline)


def control_loop(
    conn: multiprocessing.connection.Connection,
    handlers: dict[str, Callable[..., Any]] | None = None,
    max_messages: int = 100_000,
) -> None:
    """Answer control messages from the parent until ``("stop",)`` or the pipe closes."""
    handlers = handlers or {}
    baseline = 0
    for _ in range(max_messages):
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op = msg[0]
        if op == "stop":
            return
        try:
            if op == "rss_reset":
                baseline, exact = reset_peak()
                conn.send((baseline, exact))
            elif op == "rss_peak":
                conn.send(peak_growth(baseline))
            elif op in handlers:
                conn.send(handlers[op](*msg[1:]))
            else:
                conn.send(ValueError(f"unknown control message {op!r}"))
        except Exception as e:  # report to the parent instead of dying silently
            conn.send(RuntimeError(f"{e!r}\n{traceback.format_exc()}"))


@dataclass(frozen=True)
class ClientSpec:
    """How a client child receives: ``setup(port, nbytes) -> state`` then ``receive(state)``.

    Both are named as ``"module:function"`` so that a spawned child can import them.
    ``setup`` should connect and make one small request, so that lazily created channel
    state is part of the baseline rather than the growth.
    """

    setup: str
    receive: str


def _resolve(name: str) -> Callable[..., Any]:
    mod, fn = name.split(":")
    return getattr(importlib.import_module(mod), fn)  # type: ignore[no-any-return]


def _client_child(
    conn: multiprocessing.connection.Connection, spec: ClientSpec, port: int, nbytes: int
) -> None:
    try:
        state = _resolve(spec.setup)(port, nbytes)
        receive = _resolve(spec.receive)
    except Exception as e:
        conn.send(RuntimeError(f"{e!r}\n{traceback.format_exc()}"))
        return
    conn.send("ready")
    if not conn.poll(300):
        return
    conn.recv()
    try:
        baseline, exact = reset_peak()
        receive(state)
        conn.send((peak_growth(baseline), exact))
    except Exception as e:
        conn.send(RuntimeError(f"{e!r}\n{traceback.format_exc()}"))


@dataclass
class RssResult:
    nbytes: int
    client_growth: int
    server_growth: int
    exact: bool

    @property
    def client_ratio(self) -> float:
        return self.client_growth / self.nbytes

    @property
    def server_ratio(self) -> float:
        return self.server_growth / self.nbytes


def measure_transfer(server: Child, port: int, spec: ClientSpec, nbytes: int) -> RssResult:
    """Peak RSS growth of a fresh client child receiving ``nbytes`` from ``server``, and of
    the server sending them. The server must run :func:`control_loop`."""
    with Child(_client_child, spec, port, nbytes) as client:
        s_base = server.request(("rss_reset",))
        if isinstance(s_base, BaseException):
            raise s_base
        _, s_exact = s_base
        got = client.request(("go",), timeout=600)
        if isinstance(got, BaseException):
            raise got
        c_growth, c_exact = got
        s_growth = server.request(("rss_peak",))
        if isinstance(s_growth, BaseException):
            raise s_growth
    return RssResult(nbytes, int(c_growth), int(s_growth), bool(c_exact and s_exact))
