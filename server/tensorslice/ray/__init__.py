"""Tensorslice servers on a Ray cluster: one detached named actor per shard replica, each
running `tensorslice serve` in its own worker process on its node, in one placement group
that spreads them over the nodes. `start` returns the cluster spec (the JSON format of
`tensorslice cluster`, addresses the actors advertise) that clients open; `stop` takes the
servers down. Needs the `ray` extra (``pip install 'tensorslice[ray]'``); clients never
import ray, only the spec.

    import ray, json
    from tensorslice.ray import start, stop

    ray.init(address="auto")
    spec = start({"s0": ["--tensor", "acts=/data/acts-0.safetensors"],
                  "s1": ["--tensor", "acts=/data/acts-1.safetensors"]}, replicas=2)
    json.dump(spec, open("cluster.json", "w"))
    ...
    stop()
"""

from __future__ import annotations

from tensorslice.ray._launch import (
    NAMESPACE,
    ShardServer,
    actor_name,
    cluster_spec,
    start,
    stop,
)

__all__ = ["NAMESPACE", "ShardServer", "actor_name", "cluster_spec", "start", "stop"]
