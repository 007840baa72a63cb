"""Reading a subprocess's output with real timeouts (shared by the tests that start one)."""

from __future__ import annotations

import os
import queue
import re
import select
import subprocess
import threading
import time
from typing import IO


class OutputLines:
    """A subprocess's output lines, read by a thread, so that waiting for one has a real
    timeout (a bare ``readline()`` blocks for as long as the child stays silent)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)  # end of output

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        """The first group of the first line matching `pattern` within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m.group(1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got {seen!r}")


def first_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The first line a subprocess writes, within `timeout` seconds; no thread is left
    behind (for tests that fork afterwards)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line within {timeout} s; got {data!r}")
        more = os.read(fd, 4096)
        if not more:
            raise AssertionError(f"output ended before a line; got {data!r}")
        data += more
    return data.split(b"\n", 1)[0].decode()
