"""The tensorslice server: a store of resident tensors, the planner, and the gRPC service.

Names load on first use (PEP 562), so ``import tensorslice.server._plan`` (the planner)
pulls in neither gRPC nor the service.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from tensorslice.server._auth import StartupError, TlsFiles
    from tensorslice.server._config import ServerConfig
    from tensorslice.server._execute import execute
    from tensorslice.server._model import Plan, Step, TensorMeta
    from tensorslice.server._plan import plan
    from tensorslice.server._server import AddressInUse, create_server
    from tensorslice.server._service import TensorSliceService
    from tensorslice.server._store import Entry, TensorStore, demo_tensor

__all__ = [
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

_WHERE = {
    "AddressInUse": "_server",
    "Entry": "_store",
    "Plan": "_model",
    "ServerConfig": "_config",
    "StartupError": "_auth",
    "TlsFiles": "_auth",
    "Step": "_model",
    "TensorMeta": "_model",
    "TensorSliceService": "_service",
    "TensorStore": "_store",
    "create_server": "_server",
    "demo_tensor": "_store",
    "execute": "_execute",
    "plan": "_plan",
}


def __getattr__(name: str) -> _typing.Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
