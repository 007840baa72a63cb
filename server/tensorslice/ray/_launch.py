"""Starting, finding and stopping the server actors (see the package)."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

__all__ = ["NAMESPACE", "ShardServer", "actor_name", "cluster_spec", "start", "stop"]

NAMESPACE = "tensorslice"
"""The Ray namespace of the actors: another driver finds them there by name."""

_log = logging.getLogger("tensorslice.ray")


def actor_name(name: str, shard: str, replica: int) -> str:
    """The actor serving replica ``replica`` of shard ``shard`` of the servers ``name``."""
    return f"{name}.{shard}.{replica}"


def _serve_args(args: Sequence[str], host: str) -> list[str]:
    """serve's arguments for an actor: a free port on the node's address first, so that
    the caller's own `--host`, `--port` may replace them (the last one given counts)."""
    return ["--host", host, "--port", "0", "--no-progress", *args]


def _check_args(shard: str, args: Sequence[str]) -> None:
    """Refuse arguments `tensorslice serve` refuses, here, before any actor starts."""
    from tensorslice.server._cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(["serve", *_serve_args(args, "127.0.0.1")])
    except SystemExit:
        raise ValueError(f"shard {shard!r}: {err.getvalue().strip()}") from None


class ShardServer:
    """A tensorslice server inside a Ray actor: `tensorslice serve ARGS` on this node's
    address, started when the actor is created and stopped by `close`."""

    def __init__(self, args: list[str], host: str | None) -> None:
        from tensorslice.server._cli import _start, build_parser
        from tensorslice.server._hostmem import return_large_frees

        return_large_frees()  # the actor's process is the server's, as under `serve`
        self.host = host or ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        ns = build_parser().parse_args(["serve", *_serve_args(args, self.host)])
        self.server, port, self.store, _, _ = _start(ns)
        self.server.start()
        self.address = f"{self.host}:{port}"
        self.spec: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """Its address and its tensors' shapes and dtypes."""
        return {"address": self.address, "node": ray.get_runtime_context().get_node_id(),
                "tensors": {e.meta.name: {"shape": list(e.meta.shape),
                                          "dtype": str(e.meta.dtype).removeprefix("torch.")}
                            for e in self.store.entries()}}

    def placement_group(self) -> PlacementGroup | None:
        return get_current_placement_group()

    def remember(self, spec: dict[str, Any]) -> None:
        """Keep the cluster spec, for `cluster_spec` in another driver."""
        self.spec = spec

    def cluster_spec(self) -> dict[str, Any] | None:
        return self.spec

    def close(self, grace: float) -> None:
        self.server.stop(grace=grace).wait()


_ShardActor = ray.remote(ShardServer)


def _spec(shards: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """The cluster spec from each shard's replicas' descriptions: a tensor's pieces are
    the shards that hold it, in the order the shards were given, each holding the next
    rows; replicas of one shard must hold the same tensors."""
    spec: dict[str, Any] = {"shards": {}, "tensors": {}}
    starts: dict[str, int] = {}
    for shard, replicas in shards.items():
        spec["shards"][shard] = [r["address"] for r in replicas]
        first = replicas[0]["tensors"]
        for r in replicas[1:]:
            if r["tensors"] != first:
                raise RuntimeError(f"shard {shard!r}: replicas {replicas[0]['address']} and "
                                   f"{r['address']} hold different tensors: {first} and "
                                   f"{r['tensors']}")
        for tensor, info in first.items():
            rows = info["shape"][0] if info["shape"] else 0
            start = starts.get(tensor, 0)
            spec["tensors"].setdefault(tensor, []).append(
                {"shard": shard, "rows": [start, start + rows]})
            starts[tensor] = start + rows
    return spec


def start(
    shards: Mapping[str, Sequence[str]],
    *,
    replicas: int = 1,
    name: str = "tensorslice",
    num_cpus: float = 1,
    num_gpus: float = 0,
    strategy: str = "SPREAD",
    host: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Start ``replicas`` servers per shard and return the cluster spec.

    ``shards`` maps each shard's name to `tensorslice serve`'s arguments for it (e.g.
    ``["--tensor", "acts=/data/acts-0.safetensors"]``; every option of serve works). Each
    replica is a detached actor named `actor_name` (``NAME.SHARD.REPLICA``, in the Ray
    namespace `NAMESPACE`) reserving ``num_cpus`` CPUs and ``num_gpus`` GPUs (with GPUs,
    the server runs on ``--device cuda``, the GPU Ray gives it, unless the arguments say
    otherwise), all in one placement group with ``strategy`` (SPREAD: over as many nodes as
    there are). Each server listens on its node's address (``host`` to override) on a
    free port. The spec lists each shard's replicas' addresses; a tensor's rows are laid
    out in the order the shards are given (s0's rows first). Raises `ValueError` for
    arguments serve refuses, `TimeoutError` when the resources or the servers are not
    there within ``timeout`` seconds, `RuntimeError` when a server fails to start (its
    error included); nothing is left running then. Connects to Ray (``ray.init``, in
    `NAMESPACE`) where the caller has not."""
    if not shards:
        raise ValueError("no shards to start")
    if not name or "." in name:
        raise ValueError(f"name {name!r}: a non-empty name without '.' (actors are named "
                         f"NAME.SHARD.REPLICA)")
    if replicas < 1:
        raise ValueError(f"replicas must be 1 or more; got {replicas}")
    if strategy not in ("SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK"):
        raise ValueError(f"strategy {strategy!r}: expected SPREAD, STRICT_SPREAD, PACK or "
                         f"STRICT_PACK")
    for shard, args in shards.items():
        _check_args(shard, args)
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE)
    taken = _named(name)
    if taken:
        raise ValueError(f"servers named {name!r} are running already ({', '.join(taken)}); "
                         f"stop({name!r}) first, or give another name")
    bundle: dict[str, float] = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    count = len(shards) * replicas
    pg = placement_group([dict(bundle) for _ in range(count)], strategy=strategy,
                         lifetime="detached")
    actors: dict[str, list[Any]] = {}
    try:
        try:
            ray.get(pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"the cluster has no room for {count} actors of {bundle} ({strategy}) after "
                f"{timeout:g} s; the cluster has "
                f"{ray.cluster_resources()}"  # type: ignore[no-untyped-call]
            ) from None
        index = 0
        for shard, args in shards.items():
            serve_args = (["--device", "cuda"] if num_gpus else []) + list(args)
            for r in range(replicas):
                actors.setdefault(shard, []).append(_ShardActor.options(
                    name=actor_name(name, shard, r), namespace=NAMESPACE,
                    lifetime="detached", num_cpus=num_cpus, num_gpus=num_gpus,
                    max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=index),
                ).remote(serve_args, host))
                index += 1
        described = {shard: _describe(shard, group, timeout) for shard, group in actors.items()}
        spec = _spec(described)
        ray.get([a.remember.remote(spec) for group in actors.values() for a in group],
                timeout=timeout)
    except BaseException:
        _teardown(name, [actor_name(name, shard, r) for shard, group in actors.items()
                         for r in range(len(group))],
                  [a for group in actors.values() for a in group], pg, grace=0)
        raise
    _log.info("tensorslice on Ray: %s", spec["shards"])
    return spec


def _describe(shard: str, actors: list[Any], timeout: float) -> list[dict[str, Any]]:
    out = []
    for r, actor in enumerate(actors):
        try:
            out.append(ray.get(actor.describe.remote(), timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"shard {shard!r} replica {r}: no server after {timeout:g} s "
                               f"(still loading its tensors?)") from None
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"shard {shard!r} replica {r}: the server did not start: "
                               f"{exc}") from None
    return out


def _get(ref: Any, timeout: float) -> Any:
    """``ray.get`` of one object (its stubs type every answer as a list)."""
    return ray.get(ref, timeout=timeout)


def _named(name: str) -> list[str]:
    """The live actors of the servers ``name``, by actor name."""
    prefix = f"{name}."
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith(prefix))


def cluster_spec(name: str = "tensorslice", timeout: float = 60.0) -> dict[str, Any]:
    """The cluster spec `start` returned for the servers ``name`` (from any driver of the
    cluster: every actor keeps it). Raises `LookupError` when none is running."""
    for n in _named(name):
        with contextlib.suppress(ray.exceptions.RayError, ValueError):
            spec = _get(ray.get_actor(n, namespace=NAMESPACE).cluster_spec.remote(), timeout)
            if spec is not None:
                return spec
    raise LookupError(f"no tensorslice servers named {name!r} on this Ray cluster")


def stop(name: str = "tensorslice", grace: float = 5.0) -> int:
    """Stop the servers ``name`` (calls in flight get ``grace`` seconds), kill their actors
    and remove their placement group; returns how many servers were stopped."""
    names = _named(name)
    actors = [ray.get_actor(n, namespace=NAMESPACE) for n in names]
    pg = None
    for actor in actors:
        with contextlib.suppress(ray.exceptions.RayError):
            pg = _get(actor.placement_group.remote(), 30)
            break
    _teardown(name, names, actors, pg, grace)
    return len(actors)


def _teardown(name: str, names: list[str], actors: list[Any], pg: PlacementGroup | None,
              grace: float) -> None:
    """Stop the servers of ``actors`` (named ``names``), kill them, remove ``pg``."""
    closing = [a.close.remote(grace) for a in actors]
    if closing:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.wait(closing, num_returns=len(closing), timeout=grace + 10)
    for actor in actors:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(actor, no_restart=True)
    # ray.kill returns at once; a name is free again once its actor is dead.
    deadline = time.monotonic() + 30
    while names and time.monotonic() < deadline and set(names) & set(_named(name)):
        time.sleep(0.1)
    if pg is not None:
        with contextlib.suppress(ray.exceptions.RayError):
            remove_placement_group(pg)
