"""tensorslice.ray on a real (small, local) Ray cluster: two nodes of one CPU each
(`ray.cluster_utils.Cluster`), one server actor per shard, spread over both nodes; a client
reads the tensor through the spec `start` returns, then `stop` takes everything down.
Starting the cluster and its workers takes tens of seconds: one module-scoped cluster."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from safetensors.torch import save_file

import tensorslice.ray as ts_ray
from tensorslice.client import Client, ClusterClient, ServerUnavailable
from tensorslice.ray import _launch

TIMEOUT = 180.0  # a loaded 2-core machine: worker processes import torch


@pytest.mark.unit
def test_bad_serve_arguments_are_refused_before_anything_starts() -> None:
    # ray is not even initialised: the arguments are checked first.
    with pytest.raises(ValueError, match=r"shard 's1': .*unrecognized arguments: --nope"):
        ts_ray.start({"s0": [], "s1": ["--nope"]})
    with pytest.raises(ValueError, match="replicas must be 1 or more"):
        ts_ray.start({"s0": []}, replicas=0)
    with pytest.raises(ValueError, match=r"without '\.'"):
        ts_ray.start({"s0": []}, name="a.b")
    assert not ray.is_initialized()


@pytest.mark.unit
def test_spec_lays_shards_out_in_order() -> None:
    def replica(address: str, rows: int) -> dict[str, object]:
        return {"address": address, "node": "n",
                "tensors": {"acts": {"shape": [rows, 3], "dtype": "float32"}}}

    spec = _launch._spec({"b": [replica("h:1", 6), replica("h:2", 6)], "a": [replica("h:3", 4)]})
    assert spec == {"shards": {"b": ["h:1", "h:2"], "a": ["h:3"]},
                    "tensors": {"acts": [{"shard": "b", "rows": [0, 6]},
                                         {"shard": "a", "rows": [6, 10]}]}}
    with pytest.raises(RuntimeError, match="replicas h:1 and h:2 hold different tensors"):
        _launch._spec({"b": [replica("h:1", 6), replica("h:2", 5)]})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own processes take the machine's address (a node given 127.0.0.1 announces
    # its GCS on the machine's address all the same, and no driver reaches it); the
    # tensorslice servers bind 127.0.0.1 (start(host=...)).
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes(timeout=TIMEOUT)
        ray.init(address=c.address, namespace=ts_ray.NAMESPACE)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.mark.e2e
def test_start_read_stop_on_two_nodes(cluster: Cluster, tmp_path: Path) -> None:
    x = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    save_file({"acts": x[:6].contiguous()}, tmp_path / "s0.safetensors")
    save_file({"acts": x[6:].contiguous()}, tmp_path / "s1.safetensors")
    spec = ts_ray.start({"s0": ["--tensor", f"acts={tmp_path}/s0.safetensors"],
                         "s1": ["--tensor", f"acts={tmp_path}/s1.safetensors"]},
                        name="t", host="127.0.0.1", timeout=TIMEOUT)
    try:
        assert spec["tensors"] == {"acts": [{"shard": "s0", "rows": [0, 6]},
                                            {"shard": "s1", "rows": [6, 10]}]}
        assert [len(a) for a in spec["shards"].values()] == [1, 1]
        nodes = {ray.get(ray.get_actor(ts_ray.actor_name("t", s, 0), namespace=ts_ray.NAMESPACE)
                         .describe.remote(), timeout=TIMEOUT)["node"] for s in ("s0", "s1")}
        assert len(nodes) == 2, "SPREAD put both servers on one node"
        assert all(a.startswith("127.0.0.1:") for (a,) in spec["shards"].values()), spec
        with ClusterClient(spec, timeout=30) as cc:  # a gather across both shards
            idx = [9, 0, 6, 5, 6, 2]
            assert torch.equal(cc.tensor("acts")[idx], x[idx])
        assert ts_ray.cluster_spec("t") == spec  # from the actors themselves
        with pytest.raises(ValueError, match="servers named 't' are running already"):
            ts_ray.start({"s0": ["--tensor", f"acts={tmp_path}/s0.safetensors"]}, name="t")
    finally:
        stopped = ts_ray.stop("t")
    assert stopped == 2
    assert _launch._named("t") == []
    with pytest.raises(LookupError, match="no tensorslice servers named 't'"):
        ts_ray.cluster_spec("t")
    for (address,) in spec["shards"].values():
        with Client(address, timeout=10, retries=0) as c, pytest.raises(ServerUnavailable):
            c.list_tensors()


@pytest.mark.e2e
def test_a_server_that_cannot_start_leaves_nothing_behind(
        cluster: Cluster, tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(RuntimeError, match=r"shard 's0' replica 0: the server did not start"
                                           r"(.|\n)*missing\.safetensors"):
        ts_ray.start({"s0": ["--tensor", f"acts={missing}"]}, name="bad", host="127.0.0.1",
                     timeout=TIMEOUT)
    assert _launch._named("bad") == []
    # Its placement group is gone too: both nodes' CPUs come back (Ray frees them
    # asynchronously).
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
