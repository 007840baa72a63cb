"""The client's one translation point from gRPC statuses to tensorslice errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from tensorslice.core.errors import ERROR_CLASS_KEY, Status, TensorSliceError, error_from_status

__all__ = ["map_rpc_errors", "rpc_error", "status_of"]


def status_of(code: grpc.StatusCode) -> Status:
    """The tensorslice status of a gRPC status code (the names are the same)."""
    return Status[code.name]


@contextlib.contextmanager
def map_rpc_errors(connect_hint: str = "") -> Iterator[None]:
    """Translate a `grpc.RpcError` raised inside the block into a `TensorSliceError`;
    `connect_hint` is added to the message when no connection could be made."""
    try:
        yield
    except grpc.RpcError as exc:
        raise rpc_error(exc, connect_hint) from None


def rpc_error(exc: grpc.RpcError, connect_hint: str = "") -> TensorSliceError:
    """The `TensorSliceError` a `grpc.RpcError` stands for (what `map_rpc_errors` raises)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if connect_hint and code is grpc.StatusCode.UNAVAILABLE and details \
            and "failed to connect" in details:
        details = f"{details} ({connect_hint})"
    return error_from_status(status_of(code), details or code.name, _class_name(exc))


def _class_name(exc: grpc.RpcError) -> str | None:
    """The error class the server named in the trailing metadata, if any."""
    trailing = getattr(exc, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == ERROR_CLASS_KEY:
            return value if isinstance(value, str) else value.decode()
    return None

