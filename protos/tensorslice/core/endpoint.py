"""Where the service is: its gRPC name (from the descriptor) and the host of an address."""

from __future__ import annotations

from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["SERVICE_NAME", "has_tcp_host", "host_of"]

SERVICE_NAME: str = _pb.DESCRIPTOR.services_by_name["TensorSlice"].full_name
"""``tensorslice.v1.TensorSlice``."""


def host_of(address: str) -> str:
    """The host of a gRPC address, without brackets: ``host:port``, ``[v6]:port``,
    ``dns:host:port``, ``dns:///host:port``, ``dns://authority/host:port``,
    ``ipv4:a.b.c.d:port``, ``ipv6:[v6]:port`` (the first address of a list). Empty where
    the address names none (``:50051``, or a ``unix:`` socket: see `has_tcp_host`)."""
    if not has_tcp_host(address):
        return ""
    target = address
    scheme, sep, rest = address.partition(":")
    if sep and scheme in ("dns", "ipv4", "ipv6"):
        target = rest
        if target.startswith("//"):  # dns://authority/host:port
            target = target[2:].partition("/")[2]
        target = target.split(",", 1)[0]
    if target.startswith("["):
        return target[1:].partition("]")[0]
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return host.strip("[]")


def has_tcp_host(address: str) -> bool:
    """False for a gRPC address that is no TCP endpoint (``unix:``, ``unix-abstract:``,
    ``vsock:``)."""
    return address.partition(":")[0] not in ("unix", "unix-abstract", "vsock")
