"""The Kubernetes manifests (deploy/kubernetes/) against the code they configure: every
container's args parse with `tensorslice serve`'s own parser, the probes and ports are the
ones the args bind, Services select their StatefulSet's pods, and the cluster spec's
addresses are those Services' DNS names. No cluster runs here: this is what can be checked
without one."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tensorslice.client._cluster import load_spec
from tensorslice.server._cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"

pytestmark = pytest.mark.unit


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return loaded


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == kind}


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve: argparse.ArgumentParser = sub.choices["serve"]
    return serve


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args, from the container's env (a variable taken
    from the pod, such as its IP, stands as a placeholder value)."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"args use $({m.group(1)}), which env does not define"
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def _serve_args(container: dict[str, Any]) -> argparse.Namespace:
    env = {e["name"]: e.get("value", "10.0.0.1") for e in container.get("env", [])}
    args = [_expand(str(a), env) for a in container["args"]]
    try:
        return _serve_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"container {container['name']}: tensorslice serve refuses {args}")


def _port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named, f"{container['name']}: no port named {port!r}"
    return int(named[port])


def test_kustomization_lists_every_manifest() -> None:
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(_kustomization()["resources"]) == files
    namespace = _kustomization()["namespace"]
    assert _of_kind("Namespace").keys() == {namespace}


def test_the_image_runs_serve() -> None:
    """The containers give only serve's options: the image's entrypoint must be serve."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tensorslice", "serve"]' in dockerfile


def test_container_args_are_serve_options_and_ports_match() -> None:
    sets = _of_kind("StatefulSet")
    assert sets, "no StatefulSet in deploy/kubernetes"
    for name, sts in sets.items():
        pod = sts["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = _serve_args(container)
        assert args.host == "0.0.0.0", f"{name}: must listen on the pod's interfaces"
        assert args.read_only, f"{name}: replicas of a shard must refuse writes"
        assert args.max_connection_age > 0, f"{name}: clients would never find new pods"
        assert not args.no_bulk and args.bulk_port != 0, (
            f"{name}: the bulk port must be fixed (tickets name it)")
        declared = {p["containerPort"] for p in container["ports"]}
        assert {args.port, args.bulk_port, args.metrics_port} == declared, name
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, (
                f"{name} {kind}: not the gRPC health service")
            assert _port(container, probe["grpc"]["port"]) == args.port, f"{name} {kind}"
            assert probe["grpc"].get("service", "") in ("", "tensorslice.v1.TensorSlice")
        # Every file served lies on a mounted volume.
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for spec in args.tensor:
            path = spec.split("=", 1)[1]
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{name}: {path} is on no volume")
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in container["volumeMounts"]} <= volumes, name
        token = {e["name"]: e.get("value") for e in container["env"]}["TENSORSLICE_TOKEN_FILE"]
        assert any(token.startswith(m + "/") for m in mounts), f"{name}: token file unmounted"
        # The server's memory defaults follow the container's limit: one must be set.
        assert "memory" in container["resources"]["limits"], name
        assert pod["terminationGracePeriodSeconds"] > 5, f"{name}: less than serve's grace"


def test_services_are_headless_and_select_their_statefulset() -> None:
    services, sets = _of_kind("Service"), _of_kind("StatefulSet")
    assert services.keys() == {s["spec"]["serviceName"] for s in sets.values()}
    for name, sts in sets.items():
        service = services[sts["spec"]["serviceName"]]
        assert service["spec"]["clusterIP"] == "None", f"{name}: not headless"
        labels = sts["spec"]["template"]["metadata"]["labels"]
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), f"{name}: the Service selects no pod"
        assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for other, o in sets.items():  # ... and no other StatefulSet's pods
            if other != name:
                others = o["spec"]["template"]["metadata"]["labels"]
                assert not selector.items() <= others.items(), f"{name} selects {other}"
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            assert _port(container, port["targetPort"]) == port["port"], (
                f"{name}: Service port {port['name']} reaches another container port")
        assert sts["spec"]["replicas"] >= 2, f"{name}: a shard with one replica"


def test_cluster_spec_names_the_services() -> None:
    (config,) = _of_kind("ConfigMap").values()
    spec = json.loads(config["data"]["cluster.json"])
    namespace = _kustomization()["namespace"]
    services, sets = _of_kind("Service"), _of_kind("StatefulSet")
    for shard, addresses in spec["shards"].items():
        (address,) = addresses
        m = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)",
                         address)
        assert m, f"shard {shard}: {address} is not a Service's dns:/// name"
        service, ns, port = m.group(1), m.group(2), int(m.group(3))
        assert ns == namespace and service in services, f"shard {shard}: {address}"
        assert port in {p["port"] for p in services[service]["spec"]["ports"]
                        if p["name"] == "grpc"}, f"shard {shard}: {address}"
        sts = next(s for s in sets.values() if s["spec"]["serviceName"] == service)
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        args = _serve_args(container)
        assert args.port == port
        (piece,) = [p for p in spec["tensors"]["acts"] if p["shard"] == shard]
        assert list(args.rows) == piece["rows"], f"shard {shard}: --rows is not the spec's"
        assert args.advertise_host, f"shard {shard}: tickets would name the Service"
    served = {s["spec"]["serviceName"] for s in sets.values()}
    named = {a.split("/")[3].split(".")[0] for addrs in spec["shards"].values() for a in addrs}
    assert named == served, "a StatefulSet that no shard of the spec names, or the reverse"
    load_spec(spec)  # what the client checks: pieces cover the rows, shards exist
