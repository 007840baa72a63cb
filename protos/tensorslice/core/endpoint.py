"""Where the service is: its gRPC name (from the descriptor), the host of an address, and
the replicas a client's target names."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = [
    "READ_METHODS",
    "SERVICE_NAME",
    "balanced",
    "check_replica",
    "has_tcp_host",
    "host_of",
    "literal_target",
    "replicas_of",
    "split_host_port",
]

SERVICE_NAME: str = _pb.DESCRIPTOR.services_by_name["TensorSlice"].full_name
"""``tensorslice.v1.TensorSlice``."""

_WRITES = frozenset({"Put", "Append", "Drop"})
READ_METHODS: tuple[str, ...] = tuple(
    m.name for m in _pb.DESCRIPTOR.services_by_name["TensorSlice"].methods
    if m.name not in _WRITES)
"""The service's methods that only read (idempotent: safe to retry, on any replica)."""


def host_of(address: str) -> str:
    """The host of a gRPC address, without brackets: ``host:port``, ``[v6]:port``,
    ``dns:host:port``, ``dns:///host:port``, ``dns://authority/host:port``,
    ``ipv4:a.b.c.d:port``, ``ipv6:[v6]:port`` (the first address of a list). Empty where
    the address names none (``:50051``, or a ``unix:`` socket: see `has_tcp_host`)."""
    if not has_tcp_host(address):
        return ""
    return split_host_port(_targets(address)[0])[0]


def split_host_port(target: str) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port`` as (host without brackets, port); the port is ""
    where there is none."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, rest.removeprefix(":")
    if target.count(":") == 1:
        host, _, port = target.partition(":")
        return host, port
    return target.strip("[]"), ""  # a bare name, or an IPv6 address without a port


def has_tcp_host(address: str) -> bool:
    """False for a gRPC address that is no TCP endpoint (``unix:``, ``unix-abstract:``,
    ``vsock:``)."""
    return address.partition(":")[0] not in ("unix", "unix-abstract", "vsock")


def _targets(address: str) -> list[str]:
    """The ``host:port`` parts of a gRPC address (several for an ``ipv4:``/``ipv6:``
    list)."""
    scheme, sep, rest = address.partition(":")
    if not (sep and scheme in ("dns", "ipv4", "ipv6")):
        return [address]
    if rest.startswith("//"):  # dns://authority/host:port
        rest = rest[2:].partition("/")[2]
    return [t for t in rest.split(",") if t] or [""]


def replicas_of(address: str | Sequence[str]) -> tuple[str, ...]:
    """The replicas a client's target names, one ``HOST:PORT`` (or address) each: every
    address of a list, every address of an ``ipv4:``/``ipv6:`` list, else the address
    itself (a ``dns:`` name stands for every address it resolves to, which gRPC finds)."""
    if isinstance(address, str):
        scheme = address.partition(":")[0]
        if scheme in ("ipv4", "ipv6") and "," in address:
            return tuple(_targets(address))
        return (address,)
    return tuple(address)


def balanced(address: str | Sequence[str]) -> bool:
    """Whether a client's channel spreads calls over several servers (gRPC's
    ``round_robin``): a list of several addresses, an ``ipv4:``/``ipv6:`` list, or a
    ``dns:`` name (every address it resolves to). A plain ``HOST:PORT`` keeps gRPC's
    default, ``pick_first``."""
    if not isinstance(address, str):
        return len(address) > 1
    return address.startswith("dns:") or len(replicas_of(address)) > 1


def literal_target(addresses: Sequence[str]) -> str | None:
    """One gRPC target (``ipv4:`` or ``ipv6:`` list) for ``HOST:PORT`` addresses whose
    hosts are all IP literals of one family; None otherwise (names must be resolved
    first)."""
    families = set()
    parts = []
    for a in addresses:
        host, port = split_host_port(a)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if not port:
            return None
        families.add(ip.version)
        parts.append(f"{host}:{port}" if ip.version == 4 else f"[{host}]:{port}")
    if len(families) != 1:
        return None
    return f"ipv{families.pop()}:" + ",".join(parts)


def check_replica(address: str) -> str:
    """One address of a client's list: ``HOST:PORT`` or ``[V6]:PORT`` (a scheme such as
    ``dns:`` or ``unix:`` cannot be listed). Raises ValueError naming it otherwise."""
    host, port = split_host_port(address)
    if (not host or not port.isdigit() or address.partition(":")[0] in _SCHEMES):
        raise ValueError(
            f"{address!r} cannot be one of a client's addresses: each must be HOST:PORT or "
            f"[V6]:PORT (a dns:, ipv4:, ipv6: or unix: target is one address by itself)")
    return address


_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock"})
