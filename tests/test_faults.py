"""Faults with a real server process (`tensorslice serve`): killed with SIGKILL during a
streamed and during a bulk transfer, stopped with SIGTERM under load, restarted at once on
the same ports.

Each transfer in flight is made to wait, mid-way, until the fault has happened (the
client's reads are held at a checkpoint), so no outcome depends on timing. The tensor is
128 MiB: large enough to be many chunks and reads, small enough to keep the suite quick (the
checkpoint, not the size, puts the fault mid-transfer).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorslice.client import Client, ServerUnavailable, _receive

pytestmark = pytest.mark.e2e

ROWS, COLS = 2048, 16384  # 2048 rows of 64 KiB: 128 MiB of float32
TIMEOUT = 30.0  # every call's deadline: a failure must come well within it


def _rows() -> torch.Tensor:
    return torch.arange(ROWS, dtype=torch.float32).reshape(ROWS, 1).expand(ROWS, COLS) + 0.5


@pytest.fixture(scope="module")
def tensor_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "big.safetensors"
    save_file({"big": _rows().contiguous()}, str(path))
    return path


class Served:
    """`tensorslice serve` in a subprocess; its output read by a thread, so every wait
    for a line has a real timeout."""

    def __init__(self, tensor_file: Path, *extra: str, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorslice.server._cli", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--tensor", f"big={tensor_file}", "--no-progress", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TENSORSLICE_TEST_DEVICE": "cpu"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        serving = self.wait_for(r"tensorslice serving .* on 127\.0\.0\.1:(\d+)")
        self.port = int(serving.group(1))
        self.bulk_port = 0
        if "--no-bulk" not in extra:
            self.bulk_port = int(self.wait_for(r"bulk data plane on port (\d+)").group(1))
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s; "
                                     f"got {''.join(seen)!r}") from None
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture()
def serve(tensor_file: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*extra: str, port: int = 0) -> Served:
        started.append(Served(tensor_file, *extra, port=port))
        return started[-1]

    yield start
    for s in started:
        s.close()


class Checkpoint:
    """Holds the client's reads mid-transfer: in each thread, the `after`-th read waits for
    `go` (set once the fault has happened); `reached` is set once `parties` threads wait."""

    def __init__(self, after: int, parties: int = 1) -> None:
        self.after = after
        self.parties = parties
        self.local = threading.local()
        self.lock = threading.Lock()
        self.waiting = 0
        self.reached = threading.Event()
        self.go = threading.Event()

    def tick(self) -> None:
        count = getattr(self.local, "count", 0) + 1
        self.local.count = count
        if count != self.after:
            return
        with self.lock:
            self.waiting += 1
            if self.waiting == self.parties:
                self.reached.set()
        assert self.go.wait(TIMEOUT)


def _hold_stream_reads(monkeypatch: pytest.MonkeyPatch, cp: Checkpoint) -> None:
    feed = _receive.Assembler.feed

    def held(self: _receive.Assembler, payload: bytes | memoryview) -> None:
        cp.tick()
        feed(self, payload)

    monkeypatch.setattr(_receive.Assembler, "feed", held)


def _hold_socket_reads(monkeypatch: pytest.MonkeyPatch, cp: Checkpoint) -> None:
    settle = _receive._settle

    def held(sock: object, deadline: float | None) -> None:
        cp.tick()
        settle(sock, deadline)  # type: ignore[arg-type]

    monkeypatch.setattr(_receive, "_settle", held)


def _slice_in_thread(address: str, index: object) -> tuple[threading.Thread, list[object]]:
    """`big[index]` in a thread: the outcome (a tensor or an exception) lands in the list."""
    out: list[object] = []

    def run() -> None:
        with Client(address, timeout=TIMEOUT, retries=0) as c:
            try:
                out.append(c.tensor("big")[index])
            except Exception as exc:
                out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.mark.parametrize("path", ["stream", "bulk"])
def test_sigkill_mid_transfer_raises_server_unavailable(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.setenv("TENSORSLICE_SAME_HOST", "0")  # the TCP bulk plane's faults
    server = serve("--no-bulk") if path == "stream" else serve()
    cp = Checkpoint(after=4)
    (_hold_stream_reads if path == "stream" else _hold_socket_reads)(monkeypatch, cp)
    thread, out = _slice_in_thread(server.address, slice(None))  # the whole 128 MiB
    assert cp.reached.wait(TIMEOUT), "the transfer never started"
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    cp.go.set()
    thread.join(TIMEOUT + 10)
    assert not thread.is_alive()
    (outcome,) = out
    assert isinstance(outcome, ServerUnavailable), repr(outcome)  # never a short tensor


def test_sigterm_lets_transfers_in_flight_finish_then_restarts_on_the_same_ports(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORSLICE_SAME_HOST", "0")  # the TCP bulk plane's faults
    server = serve()
    rows = _rows()
    # Two bulk transfers and a gRPC stream, each held mid-way until SIGTERM is sent.
    cp = Checkpoint(after=4, parties=2)  # each bulk transfer, at its 4th socket read
    _hold_socket_reads(monkeypatch, cp)
    stream_cp = Checkpoint(after=3)
    _hold_stream_reads(monkeypatch, stream_cp)
    calls = [_slice_in_thread(server.address, slice(0, 1024)),
             _slice_in_thread(server.address, slice(512, 2048))]
    assert cp.reached.wait(TIMEOUT)

    streamed: list[object] = []

    def stream() -> None:
        with Client(server.address, timeout=TIMEOUT) as c:
            try:
                streamed.append(_streamed_slice(c))
            except Exception as exc:
                streamed.append(exc)

    stream_thread = threading.Thread(target=stream)
    stream_thread.start()
    assert stream_cp.reached.wait(TIMEOUT)
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for("SIGTERM received")
    cp.go.set()
    stream_cp.go.set()
    for thread, _ in calls:
        thread.join(TIMEOUT + 10)
    stream_thread.join(TIMEOUT + 10)
    assert server.proc.wait(timeout=30) == 0
    (first,), (second,) = (out for _, out in calls)
    assert isinstance(first, torch.Tensor), repr(first)
    assert isinstance(second, torch.Tensor), repr(second)
    assert torch.equal(first, rows[0:1024]) and torch.equal(second, rows[512:2048])
    (got,) = streamed
    assert isinstance(got, torch.Tensor), repr(got)
    assert torch.equal(got, rows[100:300])

    monkeypatch.undo()
    again = serve("--bulk-port", str(server.bulk_port), port=server.port)
    assert (again.port, again.bulk_port) == (server.port, server.bulk_port)
    with Client(again.address, timeout=TIMEOUT) as c:
        assert torch.equal(c.tensor("big")[7:600], rows[7:600])  # over the bulk plane


def _streamed_slice(c: Client) -> torch.Tensor:
    """Rows 100:300 over the gRPC stream (`Slice`), not `Fetch`."""
    from tensorslice.client._base import CallStream, make_selection
    from tensorslice.core.selection import selection_to_proto

    request = selection_to_proto("big", make_selection(slice(100, 300)))
    sink = _receive.Assembler()
    c._perform(CallStream("/tensorslice.v1.TensorSlice/Slice", request, sink, TIMEOUT))
    return sink.tensors()["values"]


def test_sigkill_then_immediate_restart_on_the_same_ports(
    serve: Callable[..., Served]
) -> None:
    server = serve()
    with Client(server.address, timeout=TIMEOUT) as c:
        assert c.describe("big").shape == (ROWS, COLS)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    again = serve("--bulk-port", str(server.bulk_port), port=server.port)
    with Client(again.address, timeout=TIMEOUT) as c:
        assert torch.equal(c.tensor("big")[5:100], _rows()[5:100])
