"""The data directory: acknowledged writes survive a restart, and a `kill -9` in the middle
of an upload or an append loses nothing acknowledged and leaves the previous version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from _output import OutputLines

from tensorslice.client import Client, TensorNotFound, TensorSliceError, VersionGone
from tensorslice.server import TensorStore
from tensorslice.server._persist import DataDir


def _store(path: Path) -> TensorStore:
    store = TensorStore("cpu")
    store.persist = DataDir(path)
    store.restore()
    return store


@pytest.mark.unit
def test_restart_serves_what_was_acknowledged(tmp_path: Path) -> None:
    store = _store(tmp_path)
    s = store.allocate("x", torch.float32, (3, 2))
    s.tensor.copy_(torch.arange(6.0).reshape(3, 2))
    store.put("x", s, ("N", "C"))
    rows = [torch.full((i % 3 + 1, 2), float(i)) for i in range(40)]
    for r in rows:  # segments, compacted along the way
        store.append("x", r)
    store.append("y", torch.ones(2, 5))
    store.append("gone", torch.ones(1))
    store.drop("gone")
    s2 = store.allocate("z", torch.int64, (4,))
    s2.tensor.copy_(torch.arange(4))
    store.put("z", s2)
    s3 = store.allocate("z", torch.int64, (2,))
    s3.tensor.copy_(torch.tensor([7, 8]))
    store.put("z", s3, replace=True)
    want = {e.meta.name: (e.tensor.clone(), e.version, e.meta.dim_names)
            for e in store.entries()}
    again = _store(tmp_path)
    got = {e.meta.name: (e.tensor, e.version, e.meta.dim_names) for e in again.entries()}
    assert set(got) == {"x", "y", "z"}
    for name, (t, v, names) in want.items():
        assert torch.equal(got[name][0], t) and got[name][1] == v and got[name][2] == names
    # compaction keeps few files: appends are amortised on disk too
    assert len(list(DataDir(tmp_path)._folder("x").iterdir())) < 12
    e = again.append("x", torch.zeros(1, 2))
    assert e.version > max(v for _, v, _ in want.values())


def _serve(data: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorslice.server._cli", "serve", "--port", "0",
         "--data-dir", str(data), "--no-bulk"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    address = OutputLines(proc).wait_for(r"serving \d+ tensor\(s\) on (\S+)")
    return proc, address


@pytest.mark.e2e
def test_kill_9_mid_write_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Each round: a writer puts and appends as fast as it can; the server is killed with
    SIGKILL mid-stream; a restart must hold every acknowledged write, and the write in
    flight either whole or not at all."""
    acked: dict[str, torch.Tensor] = {}
    for round_ in range(3):  # bounded: three kills
        proc, address = _serve(tmp_path)
        try:
            with Client(address, timeout=30, retries=0) as c:
                for name, want in acked.items():  # the restart serves what was acknowledged
                    assert torch.equal(c.tensor(name).fetch(), want), (round_, name)
                stop = threading.Event()
                inflight: dict[str, torch.Tensor] = {}

                def writer(c: Client = c, stop: threading.Event = stop,
                           inflight: dict[str, torch.Tensor] = inflight,
                           round_: int = round_) -> None:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        try:
                            if i % 3 == 0:
                                t = torch.randn(256, 1024) + round_  # 1 MiB put
                                inflight["big"] = t
                                c.put("big", t, replace=True)
                                acked["big"] = t
                            else:
                                rows = torch.full((8, 4), float(round_ * 1000 + i))
                                prev = acked.get("rows")
                                new = rows if prev is None else torch.cat([prev, rows])
                                inflight["rows"] = new
                                c.append("rows", rows)
                                acked["rows"] = new
                        except TensorSliceError:
                            return

                th = threading.Thread(target=writer)
                th.start()
                stop.wait(0.3 + 0.2 * round_)  # let some writes land, then kill mid-write
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                stop.set()
                th.join(timeout=60)
                assert not th.is_alive()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # the write in flight may have reached the disk without its acknowledgement
        proc, address = _serve(tmp_path)
        try:
            with Client(address, timeout=30) as c:
                for name in ("big", "rows"):
                    if name not in acked and name not in inflight:
                        continue
                    try:
                        got = c.tensor(name).fetch()
                    except TensorNotFound:
                        assert name not in acked
                        continue
                    ok = [t for t in (acked.get(name), inflight.get(name)) if t is not None]
                    assert any(torch.equal(got, t) for t in ok), (round_, name)
                    acked[name] = got
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert "rows" in acked and acked["rows"].shape[0] > 0


@pytest.mark.e2e
def test_versions_are_never_reused_after_a_restart(tmp_path: Path) -> None:
    """A name dropped (or replaced) before a restart does not give its version numbers to
    another tensor after it: a reader pinned to an old version never reads other data."""
    issued: dict[int, torch.Tensor] = {}
    pinned: list[int] = []
    proc, address = _serve(tmp_path)
    try:
        with Client(address, timeout=30) as c:
            issued[c.put("keep", torch.zeros(2)).version] = torch.zeros(2)
            for i in range(3):
                t = torch.full((4,), float(i))
                issued[c.put("b", t, replace=True).version] = t
                pinned.append(c.tensor("b").version)
            issued[c.append("gone", torch.ones(1, 3)).version] = torch.ones(1, 3)
            c.drop("gone")
            c.drop("b")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    proc, address = _serve(tmp_path)
    try:
        with Client(address, timeout=30) as c:
            for i in range(8):  # more writes than the numbers the dropped names had
                t = torch.full((4,), 100.0 + i)
                v = c.put("b", t, replace=True).version
                assert v not in issued, f"version {v} issued twice"
                issued[v] = t
            for v in pinned:
                with pytest.raises(VersionGone, match=f"version {v} of tensor 'b' is gone"):
                    c.tensor("b").at_version(v).fetch()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
