"""Reading a subprocess's output with real timeouts (shared by the tests that start one)."""

from __future__ import annotations

import queue
import re
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
