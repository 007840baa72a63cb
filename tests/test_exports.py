"""The public names of the packages, asserted exactly (like httpx's test_exported_members)."""

from __future__ import annotations

import json

import pytest

import tensorslice.client
import tensorslice.server

pytestmark = pytest.mark.unit

CLIENT = [
    "ActivationRecorder",
    "AsyncClient",
    "AsyncClusterClient",
    "AsyncRemoteTensor",
    "AsyncShardedTensor",
    "Client",
    "ClusterClient",
    "Combine",
    "DeadlineExceeded",
    "Ellipsis_",
    "Full",
    "Index",
    "Indices",
    "InternalServerError",
    "InvalidClusterSpec",
    "InvalidIndex",
    "InvalidIndexType",
    "InvalidSelection",
    "Mask",
    "NewAxis",
    "NotSupportedAcrossShards",
    "PermissionDenied",
    "PlanStep",
    "Range",
    "RemoteTensor",
    "RemoteTensorDataset",
    "RemoteTensorIterableDataset",
    "ResultTooLarge",
    "Selection",
    "SelectionOutOfRange",
    "ServerUnavailable",
    "ShardedPlan",
    "ShardedTensor",
    "SlicePlan",
    "TensorExists",
    "TensorInfo",
    "TensorNotFound",
    "TensorSliceError",
    "Threshold",
    "TlsConfig",
    "Unauthenticated",
    "UnconvertibleIndex",
    "VersionGone",
    "WhereResult",
]

SERVER = [
    "AddressInUse",
    "Entry",
    "Plan",
    "ServerConfig",
    "StartupError",
    "Step",
    "TensorMeta",
    "TensorSliceService",
    "TensorStore",
    "TlsFiles",
    "create_server",
    "demo_tensor",
    "execute",
    "plan",
]


def _public(module: object) -> set[str]:
    return {name for name in vars(module) if not name.startswith("_")}


def test_client_exports() -> None:
    assert tensorslice.client.__all__ == CLIENT
    # every public name is in __all__, and every name in __all__ exists
    assert _public(tensorslice.client) - {"annotations"} <= set(CLIENT) | _submodules(
        tensorslice.client
    )
    for name in CLIENT:
        module = getattr(tensorslice.client, name).__module__
        assert module.startswith(("tensorslice.client._", "tensorslice.core."))


def test_server_exports() -> None:
    assert tensorslice.server.__all__ == SERVER
    for name in SERVER:  # names load on first use
        getattr(tensorslice.server, name)
    assert _public(tensorslice.server) - {"annotations"} <= set(SERVER) | _submodules(
        tensorslice.server
    )
    for name in SERVER:
        assert getattr(tensorslice.server, name).__module__.startswith("tensorslice.server._")


def test_all_is_sorted() -> None:
    assert sorted(CLIENT) == CLIENT
    assert sorted(SERVER) == SERVER


def test_client_does_not_import_the_server() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tensorslice.client; "
        "print(any(m.startswith('tensorslice.server') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def _submodules(module: object) -> set[str]:
    return {name for name, value in vars(module).items()
            if type(value).__name__ == "module"}


def _imported_packages(modules: str) -> list[str]:
    """Which of grpc, the client and the server importing `modules` pulls in."""
    import subprocess
    import sys

    code = (
        f"import json, sys, {modules}; "
        "print(json.dumps(sorted({m.split('.')[0] if not m.startswith('tensorslice.') else "
        "'.'.join(m.split('.')[:2]) for m in sys.modules} & "
        "{'grpc', 'tensorslice.client', 'tensorslice.server'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    found: list[str] = json.loads(out.stdout)
    return found


def test_core_imports_neither_side_nor_grpc() -> None:
    assert _imported_packages(
        "tensorslice.core.errors, tensorslice.core.selection, tensorslice.core.codec, "
        "tensorslice.core.results, tensorslice.core.parse, tensorslice.core.endpoint, "
        "tensorslice.core.credentials, tensorslice.core.shards"
    ) == []


def test_planner_imports_neither_grpc_nor_the_client() -> None:
    # The server package itself is there, of course; the service and gRPC are not.
    assert _imported_packages(
        "tensorslice.server._plan, tensorslice.server._threshold, tensorslice.server._execute"
    ) == ["tensorslice.server"]
    import subprocess
    import sys

    code = ("import sys, tensorslice.server._plan; "
            "print('tensorslice.server._service' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_server_imports_no_private_client_module() -> None:
    import ast
    from pathlib import Path

    server = Path(tensorslice.server.__file__).parent
    private = [
        f"{path.name}: {node.module}"
        for path in sorted(server.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("tensorslice.client._")
    ]
    assert private == []


RAY = ["NAMESPACE", "ShardServer", "actor_name", "cluster_spec", "start", "stop"]


def test_ray_exports() -> None:
    import tensorslice.ray

    assert tensorslice.ray.__all__ == RAY == sorted(RAY)
    assert _public(tensorslice.ray) - {"annotations"} <= set(RAY) | _submodules(tensorslice.ray)


def test_only_tensorslice_ray_imports_ray() -> None:
    """Ray is an optional extra: the client, the server and the CLI load without it."""
    import subprocess
    import sys

    code = ("import sys, tensorslice.client, tensorslice.server, tensorslice.server._cli, "
            "tensorslice.server._server; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"
