"""One error hierarchy for tensorslice, independent of any transport.

    TensorSliceError                      every error tensorslice raises
    ├── TensorNotFound        (LookupError)      NOT_FOUND
    ├── InvalidSelection      (ValueError)       INVALID_ARGUMENT
    ├── SelectionOutOfRange   (IndexError)       OUT_OF_RANGE
    ├── ResultTooLarge                           RESOURCE_EXHAUSTED
    ├── Unauthenticated                          UNAUTHENTICATED
    ├── ServerUnavailable     (ConnectionError)  UNAVAILABLE
    ├── DeadlineExceeded      (TimeoutError)     DEADLINE_EXCEEDED
    ├── FailedPrecondition                       FAILED_PRECONDITION
    └── InternalServerError                      INTERNAL

Each class carries a `Status` of its own. The planner and the store raise these without
knowing about gRPC; the two boundaries translate: the server's servicer turns an error into
a gRPC status (`tensorslice.server._service`), the client turns a status back into the same
class (`tensorslice.core.errors.map_rpc_errors`). Status names are gRPC's, so the mapping
is by name.
"""

from __future__ import annotations

import enum

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalServerError",
    "InvalidSelection",
    "ResultTooLarge",
    "SelectionOutOfRange",
    "ServerUnavailable",
    "Status",
    "TensorNotFound",
    "TensorSliceError",
    "Unauthenticated",
    "error_from_status",
]


class Status(enum.Enum):
    """The outcome classes of a call; names and numbers are gRPC's status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TensorSliceError(Exception):
    """Base of every error tensorslice raises."""

    status: Status = Status.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TensorNotFound(TensorSliceError, LookupError):
    """The server holds no tensor of that name (NOT_FOUND)."""

    status = Status.NOT_FOUND


class InvalidSelection(TensorSliceError, ValueError):
    """The request is malformed: step 0, wrong mask length, two ellipses... (INVALID_ARGUMENT)."""

    status = Status.INVALID_ARGUMENT


class SelectionOutOfRange(TensorSliceError, IndexError):
    """An index lies outside its dimension (OUT_OF_RANGE)."""

    status = Status.OUT_OF_RANGE


class ResultTooLarge(TensorSliceError):
    """The result exceeds `max_bytes` or a server limit (RESOURCE_EXHAUSTED)."""

    status = Status.RESOURCE_EXHAUSTED


class Unauthenticated(TensorSliceError):
    """The server refused the caller's credentials (UNAUTHENTICATED)."""

    status = Status.UNAUTHENTICATED


class ServerUnavailable(TensorSliceError, ConnectionError):
    """The server cannot be reached (UNAVAILABLE)."""

    status = Status.UNAVAILABLE


class DeadlineExceeded(TensorSliceError, TimeoutError):
    """The call did not finish within its timeout (DEADLINE_EXCEEDED)."""

    status = Status.DEADLINE_EXCEEDED


class FailedPrecondition(TensorSliceError):
    """The call does not apply in the server's state: a `Fetch` whose result is too large
    for one message and cannot go over the bulk data plane (FAILED_PRECONDITION). The
    client handles it by streaming; it does not reach users."""

    status = Status.FAILED_PRECONDITION


class InternalServerError(TensorSliceError):
    """The server failed unexpectedly (INTERNAL); its log holds the traceback."""

    status = Status.INTERNAL


_BY_STATUS: dict[Status, type[TensorSliceError]] = {
    cls.status: cls
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


def error_from_status(status: Status, details: str) -> TensorSliceError:
    """The error class for a status (TensorSliceError for statuses without their own)."""
    cls = _BY_STATUS.get(status, TensorSliceError)
    if cls is TensorSliceError:
        return TensorSliceError(f"{status.name}: {details}")
    return cls(details)
