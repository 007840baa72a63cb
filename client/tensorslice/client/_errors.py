"""One error hierarchy for tensorslice, each class tied to its gRPC status code.

The server raises these from its pure core; the servicer turns them into a status;
the client turns a status back into the same class, in one place (`map_rpc_errors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalServerError",
    "InvalidSelection",
    "ResultTooLarge",
    "SelectionOutOfRange",
    "ServerUnavailable",
    "TensorNotFound",
    "TensorSliceError",
    "Unauthenticated",
]


class TensorSliceError(Exception):
    """Base of every error tensorslice raises."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TensorNotFound(TensorSliceError, LookupError):
    """The server holds no tensor of that name (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidSelection(TensorSliceError, ValueError):
    """The request is malformed: step 0, wrong mask length, two ellipses... (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class SelectionOutOfRange(TensorSliceError, IndexError):
    """An index lies outside its dimension (OUT_OF_RANGE)."""

    code = grpc.StatusCode.OUT_OF_RANGE


class ResultTooLarge(TensorSliceError):
    """The result exceeds `max_bytes` or a server limit (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(TensorSliceError):
    """The server refused the caller's credentials (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ServerUnavailable(TensorSliceError, ConnectionError):
    """The server cannot be reached (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TensorSliceError, TimeoutError):
    """The call did not finish within its timeout (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(TensorSliceError):
    """The call does not apply in the server's state: a `Fetch` whose result is too large
    for one message and cannot go over the bulk data plane (FAILED_PRECONDITION). The
    client handles it by streaming; it does not reach users."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InternalServerError(TensorSliceError):
    """The server failed unexpectedly (INTERNAL); its log holds the traceback."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[TensorSliceError]] = {
    cls.code: cls
    for cls in (
        TensorNotFound,
        InvalidSelection,
        SelectionOutOfRange,
        ResultTooLarge,
        Unauthenticated,
        ServerUnavailable,
        DeadlineExceeded,
        FailedPrecondition,
        InternalServerError,
    )
}


def error_from_status(code: grpc.StatusCode, details: str) -> TensorSliceError:
    """The error class for a status code (TensorSliceError for codes without their own)."""
    cls = _BY_CODE.get(code, TensorSliceError)
    if cls is TensorSliceError:
        return TensorSliceError(f"{code.name}: {details}")
    return cls(details)


@contextlib.contextmanager
def map_rpc_errors() -> Iterator[None]:
    """Translate a `grpc.RpcError` raised inside the block into a `TensorSliceError`."""
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise error_from_status(code, details or code.name) from None
