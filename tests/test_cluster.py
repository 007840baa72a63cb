"""`tensorslice cluster` (N shards x R replicas of `serve`, as real processes), and the
proof that a DataLoader epoch survives losing a replica: `kill -9` of one server of a
2-replica pair mid-epoch, and every sample still arrives exactly once."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorslice.client import Client, RemoteTensorDataset
from tensorslice.server._cluster import ClusterError, split_rows

ROWS = 1000
WAIT = 120.0  # the bound of every wait for a process (a loaded 2-core machine is slow)


@pytest.mark.unit
def test_rows_split_evenly_or_at_cut_points() -> None:
    assert split_rows(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_rows(4000, 1) == [(0, 4000)]
    assert split_rows(4000, 3, [1000, 2500]) == [(0, 1000), (1000, 2500), (2500, 4000)]
    for rows, shards, cuts, message in [
        (2, 3, [], "2 rows cannot be split over 3 shards"),
        (10, 3, [5], "--rows-split gives 1 cut points; 3 shards need 2"),
        (10, 3, [5, 5], "cut points must increase strictly within (0, 10)"),
        (10, 2, [10], "cut points must increase strictly within (0, 10)"),
        (10, 0, [], "--shards must be at least 1; got 0"),
    ]:
        with pytest.raises(ClusterError, match=re.escape(message)):
            split_rows(rows, shards, cuts)


class Proc:
    """A command in a process of its own; its output read by a thread, so every wait for a
    line has a real timeout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorslice.server._cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TENSORSLICE_TEST_DEVICE": "cpu"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s; got "
                                     f"{''.join(self.seen)!r}") from None
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def output(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture()
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def acts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    t = torch.arange(ROWS * 6, dtype=torch.float32).reshape(ROWS, 6)
    path = tmp_path_factory.mktemp("cluster") / "acts.safetensors"
    save_file({"acts": t}, str(path))
    return path, t


@pytest.mark.e2e
def test_cluster_starts_shards_and_replicas_writes_the_spec_and_stops(
        acts: tuple[Path, torch.Tensor], tmp_path: Path, procs: list[Proc]) -> None:
    path, t = acts
    spec_path = tmp_path / "cluster.json"
    c = Proc("cluster", "--shards", "3", "--replicas", "2", "--tensor", f"acts={path}",
             "--spec-out", str(spec_path), "--rows-split", "100,700", "--max-calls", "8")
    procs.append(c)
    pids = [int(c.wait_for(r"starting s\d/r\d: rows \d+:\d+ \(pid (\d+)\)").group(1))
            for _ in range(6)]
    for k in range(1, 7):
        c.wait_for(rf"ready {k}/6: s\d/r\d on 127\.0\.0\.1:\d+")
    c.wait_for(r"tensorslice cluster ready: 6 server\(s\); spec written to ")
    spec = json.loads(spec_path.read_text())
    assert sorted(spec["shards"]) == ["s0", "s1", "s2"]
    assert all(len(a) == 2 for a in spec["shards"].values())
    assert spec["tensors"] == {"acts": [{"shard": "s0", "rows": [0, 100]},
                                        {"shard": "s1", "rows": [100, 700]},
                                        {"shard": "s2", "rows": [700, 1000]}]}
    for piece in spec["tensors"]["acts"]:
        start, stop = piece["rows"]
        for address in spec["shards"][piece["shard"]]:
            with Client(address, timeout=30) as client:
                remote = client.tensor("acts")
                assert remote.shape == (stop - start, 6)
                assert torch.equal(remote[[0, -1]], t[[start, stop - 1]])
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(timeout=WAIT) == 0
    assert "stopped 6 server(s)" in c.output()
    assert not any(_alive(p) for p in pids)


@pytest.mark.e2e
def test_cluster_exits_when_a_server_dies_naming_it(
        acts: tuple[Path, torch.Tensor], tmp_path: Path, procs: list[Proc]) -> None:
    path, _ = acts
    c = Proc("cluster", "--shards", "2", "--replicas", "1", "--tensor", f"acts={path}",
             "--spec-out", str(tmp_path / "c.json"))
    procs.append(c)
    pids = {}
    for _ in range(2):
        m = c.wait_for(r"starting (s\d/r\d): rows (\d+:\d+) \(pid (\d+)\)")
        pids[m.group(1)] = int(m.group(3))
        assert m.group(2) == {"s0/r0": "0:500", "s1/r0": "500:1000"}[m.group(1)]
    c.wait_for("tensorslice cluster ready")
    os.kill(pids["s1/r0"], signal.SIGKILL)
    assert c.proc.wait(timeout=WAIT) == 1
    out = c.output()
    assert re.search(rf"s1/r0 \(127\.0\.0\.1:\d+, pid {pids['s1/r0']}\) exited with status "
                     rf"-9; stopping the others", out), out
    assert not _alive(pids["s0/r0"])


@pytest.mark.e2e
def test_cluster_refuses_bad_options_before_starting_anything(
        acts: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    path, _ = acts
    other = tmp_path / "other.safetensors"
    save_file({"o": torch.zeros(7, 2)}, str(other))
    spec = str(tmp_path / "never.json")
    for args, message in [
        (["--tensor", f"acts={path}", "--tensor", f"o={other}"],
         "the tensors' rows (dimension 0) differ (acts 1000, o 7)"),
        (["--tensor", f"acts={path}", "--port", "5"], "--port: the cluster sets these"),
        (["--tensor", f"acts={path}", "--max-calls", "many"], "argument --max-calls"),
        (["--tensor", f"acts={path}", "--rows-split", "1,2"], "--rows-split gives 2 cut"),
        ([], "no tensors: give --tensor NAME=FILE or --dir DIR"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "tensorslice.server._cli", "cluster", "--shards", "2",
             "--spec-out", spec, *args],
            capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not Path(spec).exists()


# ---------------------------------------------------------------------------- the proof


N = 4096
BATCH = 32


def _serve(path: Path) -> Proc:
    return Proc("serve", "--host", "127.0.0.1", "--port", "0", "--tensor", f"ids={path}",
                "--no-progress")


@pytest.mark.e2e
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_dataloader_epoch_survives_kill_9_of_a_replica(
        tmp_path: Path, procs: list[Proc], start: str) -> None:
    """Two replicas of one shard; a DataLoader (2 workers, shuffled) over both; one replica
    is killed with SIGKILL after a tenth of the epoch. Every sample arrives exactly once:
    the calls that met the dead replica were retried on the other by the client itself
    (fork workers call over the data planes, spawn workers over gRPC)."""
    from torch.utils.data import DataLoader

    path = tmp_path / "ids.safetensors"
    save_file({"ids": torch.arange(N, dtype=torch.int64).reshape(N, 1).repeat(1, 4)},
              str(path))
    servers = [_serve(path), _serve(path)]
    procs.extend(servers)
    ports = [s.wait_for(r"serving .* on 127\.0\.0\.1:(\d+)").group(1) for s in servers]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    ds = RemoteTensorDataset(Client(addresses, timeout=60), "ids")
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2,
                        collate_fn=ds.collate, multiprocessing_context=start,
                        generator=torch.Generator().manual_seed(0), timeout=WAIT)
    got: list[int] = []
    killed_at = N // 10
    for batch in loader:
        assert batch.shape == (BATCH, 4) and bool((batch == batch[:, :1]).all())
        got.extend(batch[:, 0].tolist())
        if len(got) >= killed_at and servers[0].proc.poll() is None:
            servers[0].proc.send_signal(signal.SIGKILL)
            servers[0].proc.wait(timeout=30)
    assert servers[0].proc.returncode == -signal.SIGKILL
    assert len(got) == N and sorted(got) == list(range(N))  # none lost, none twice
    assert servers[1].proc.poll() is None
