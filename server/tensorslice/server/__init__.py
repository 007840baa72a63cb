"""The tensorslice server: a store of resident tensors, the planner, and the gRPC service."""

from tensorslice.server._planner import Plan, Step, TensorMeta, execute, plan
from tensorslice.server._service import ServerConfig, TensorSliceService, create_server
from tensorslice.server._store import Entry, TensorStore, demo_tensor

__all__ = [
    "Entry",
    "Plan",
    "ServerConfig",
    "Step",
    "TensorMeta",
    "TensorSliceService",
    "TensorStore",
    "create_server",
    "demo_tensor",
    "execute",
    "plan",
]
