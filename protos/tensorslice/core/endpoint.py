"""Where the service is: its gRPC name (from the descriptor) and the host of an address."""

from __future__ import annotations

from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["SERVICE_NAME", "host_of"]

SERVICE_NAME: str = _pb.DESCRIPTOR.services_by_name["TensorSlice"].full_name
"""``tensorslice.v1.TensorSlice``."""


def host_of(address: str) -> str:
    """The host of a gRPC address (``host:port``, ``[v6]:port``, ``dns:///host:port``),
    without brackets; empty where the address names none (``:50051``)."""
    target = address.split("///", 1)[-1]
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return host.strip("[]")
