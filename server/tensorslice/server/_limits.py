"""Resource bounds of the server: what a caller can make it hold, and for how long.

Guarantees (each bound is a `ServerConfig` setting and a `tensorslice serve` flag):

- At most `max_calls` calls of the TensorSlice service run at once; a call beyond that is
  refused at once with UNAVAILABLE (gRPC clients retry it). The health service is not
  counted and has threads of its own, so a saturated server still answers health checks.
- A stream whose reader stops taking messages for `send_timeout` seconds is cancelled by
  a watchdog (gRPC's sync server blocks the handler's thread in the send; cancelling the
  call wakes it), so a stalled client gives back its thread and its slot.
- Bytes materialised at once by all calls (gather results, threshold statistics, results
  held by pending bulk tickets) stay within `max_materialized_bytes`: every call reserves
  what it will materialise *before* doing it, and gives it back when its response is sent
  (or its ticket redeemed or expired). A reservation larger than the whole budget is
  refused with RESOURCE_EXHAUSTED; one that does not fit beside the others with
  UNAVAILABLE and retry advice.

Defaults follow the machine: memory from physical RAM (or the cgroup's limit, when lower),
concurrency from the CPUs this process may run on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorslice.core.errors import ResultTooLarge, ServerUnavailable

__all__ = [
    "ByteBudget",
    "CallGate",
    "Hold",
    "StreamWatchdog",
    "machine_cpus",
    "machine_memory",
    "shorten",
    "trim_heap",
]

log = logging.getLogger("tensorslice.server")


def machine_memory() -> int:
    """Bytes of memory this process may use: physical RAM, or the cgroup limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def machine_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_TRIM_AFTER = 64 << 20


def trim_heap() -> bool:
    """Return the C heap's free memory to the kernel (glibc's `malloc_trim`); False where
    there is no such call."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_trim = libc.malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None


def shorten(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text)} characters)"
    return text[: max(limit - len(note), 0)] + note


class CallGate:
    """Calls in progress, at most `limit` (0: no limit). A call beyond it waits up to `wait`
    seconds for a slot, with at most `limit` others waiting; then it is refused. Waiting
    holds a thread, so a pool of 2 * `limit` threads plus a few never runs out for the
    calls the gate does not count (health checks) or for refusals."""

    def __init__(self, limit: int, setting: str = "max_calls", *, wait: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.setting = setting
        self.wait = wait
        self._clock = clock
        self._cond = threading.Condition()
        self.active = 0
        self.waiting = 0
        self.refused = 0

    def enter(self) -> None:
        """Take a slot (waiting up to `wait` seconds for one) or raise ServerUnavailable
        (UNAVAILABLE: retry shortly)."""
        with self._cond:
            if not self.limit or self.active < self.limit:
                self.active += 1
                return
            if self.wait > 0 and self.waiting < self.limit:
                self.waiting += 1
                try:
                    deadline = self._clock() + self.wait
                    while self.active >= self.limit:
                        left = deadline - self._clock()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self.active < self.limit:
                        self.active += 1
                        return
                finally:
                    self.waiting -= 1
            self.refused += 1
            raise ServerUnavailable(
                f"server busy: {self.active} calls in progress, the limit of "
                f"{self.limit} ({self.setting}); retry shortly"
            )

    def leave(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify()


class ByteBudget:
    """Bytes materialised at once by every call together, at most `limit` (0: no limit)."""

    def __init__(self, limit: int, setting: str = "max_materialized_bytes") -> None:
        self.limit = limit
        self.setting = setting
        self._lock = threading.Lock()
        self.used = 0
        self.peak = 0
        self._freed = 0  # bytes given back since the last trim

    def hold(self) -> Hold:
        """An empty reservation that a call grows as it materialises."""
        return Hold(self)

    def _take(self, nbytes: int, what: str) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            if self.limit and nbytes > self.limit:
                raise ResultTooLarge(
                    f"{what} needs {nbytes} bytes in memory at once, more than the "
                    f"server's limit of {self.limit} bytes ({self.setting})"
                )
            if self.limit and self.used + nbytes > self.limit:
                raise ServerUnavailable(
                    f"server busy: {what} needs {nbytes} bytes in memory and other calls hold "
                    f"{self.used} of the {self.limit} bytes allowed ({self.setting}); "
                    f"retry shortly"
                )
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def _give(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            self.used -= nbytes
            self._freed += nbytes
            trim = self.used == 0 and self._freed >= _TRIM_AFTER
            if trim:
                self._freed = 0
        if trim:
            # Idle after a burst: hand the freed memory back to the kernel, so that the
            # server's resident memory follows what it holds (glibc keeps freed blocks of
            # up to 32 MiB in its heaps otherwise).
            trim_heap()


class Hold:
    """Bytes one call holds against a `ByteBudget`; given back, once, by `release`."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self._lock = threading.Lock()
        self.nbytes = 0
        self._released = False

    def add(self, nbytes: int, what: str) -> None:
        """Reserve `nbytes` more, before materialising them; raises when they do not fit."""
        with self._lock:
            if self._released:
                raise RuntimeError("hold already released")
            self._budget._take(nbytes, what)
            self.nbytes += max(nbytes, 0)

    def drop(self, nbytes: int) -> None:
        """Give back `nbytes` of what is held (an intermediate freed early)."""
        with self._lock:
            n = min(max(nbytes, 0), self.nbytes)
            self.nbytes -= n
            self._budget._give(n)

    def move(self) -> Hold:
        """A new hold that owns what this one held; this one is left empty and released
        (so that its owner's `release` gives nothing back twice)."""
        other = Hold(self._budget)
        with self._lock:
            other.nbytes, self.nbytes = self.nbytes, 0
            self._released = True
        return other

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            self._budget._give(self.nbytes)
            self.nbytes = 0


class StreamWatchdog:
    """Cancels streams whose current message has waited longer than `timeout` seconds for
    the reader. A stream calls `sending(key, cancel)` before it hands a message over and
    `sent(key)` once asked for the next one; `done(key)` when it ends."""

    def __init__(self, timeout: float, *, period: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._period = period if period is not None else max(0.05, min(1.0, timeout / 4))
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: dict[object, tuple[float, Callable[[], object]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cancelled = 0

    def start(self) -> None:
        if self.timeout > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stream-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def sending(self, key: object, cancel: Callable[[], object]) -> None:
        with self._lock:
            self._waiting[key] = (self._clock(), cancel)

    def sent(self, key: object) -> None:
        with self._lock:
            self._waiting.pop(key, None)

    done = sent

    def check(self) -> int:
        """Cancel every stream stalled past the timeout; how many."""
        now = self._clock()
        with self._lock:
            stale = [(k, c) for k, (t, c) in self._waiting.items() if now - t > self.timeout]
            for k, _ in stale:
                del self._waiting[k]
        for _, cancel in stale:
            cancel()
        if stale:
            self.cancelled += len(stale)
            log.info("cancelled %d stream(s) whose reader stopped for %gs (send_timeout)",
                     len(stale), self.timeout)
        return len(stale)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.check()
