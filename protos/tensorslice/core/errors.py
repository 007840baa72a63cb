"""One error hierarchy for tensorslice, independent of any transport.

    TensorSliceError                      every error tensorslice raises
    ├── TensorNotFound        (LookupError)      NOT_FOUND
    ├── InvalidSelection      (ValueError)       INVALID_ARGUMENT
    │   ├── InvalidIndex      (IndexError)       INVALID_ARGUMENT
    │   ├── InvalidIndexType  (TypeError)        INVALID_ARGUMENT
    │   └── UnconvertibleIndex (RuntimeError)    INVALID_ARGUMENT
    ├── SelectionOutOfRange   (IndexError)       OUT_OF_RANGE
    ├── ResultTooLarge                           RESOURCE_EXHAUSTED
    ├── Unauthenticated                          UNAUTHENTICATED
    ├── ServerUnavailable     (ConnectionError)  UNAVAILABLE
    ├── DeadlineExceeded      (TimeoutError)     DEADLINE_EXCEEDED
    ├── FailedPrecondition                       FAILED_PRECONDITION
    │   └── VersionGone                          FAILED_PRECONDITION
    ├── TensorExists                             ALREADY_EXISTS
    ├── PermissionDenied                         PERMISSION_DENIED
    └── InternalServerError                      INTERNAL

Each class carries a `Status` of its own. The planner and the store raise these without
knowing about gRPC; the two boundaries translate: the server's servicer turns an error into
a gRPC status (`tensorslice.server._service`), the client turns a status back into the same
class (`tensorslice.client._errors.map_rpc_errors`). Status names are gRPC's, so the mapping
is by name.

An index that PyTorch refuses raises an error that is also the builtin class PyTorch
raises for the same index, so ``except IndexError:`` around ``x[idx]`` keeps working when
``x`` is remote: too many indices, a mask whose shape does not match, index arrays that do
not broadcast, a float as an index are `InvalidIndex` (an `IndexError`); a string, or a
slice bound that is not an integer, is `InvalidIndexType` (a `TypeError`); a sequence
PyTorch cannot turn into an index tensor is `UnconvertibleIndex` (a `RuntimeError`); step
0 and an integer beyond int64 are plain `InvalidSelection` (a `ValueError`, as in
PyTorch). All share INVALID_ARGUMENT, so the server names the class in the trailing
metadata key `ERROR_CLASS_KEY` and `error_from_status` takes it back (a name it does not
know falls back to the status's own class).
"""

from __future__ import annotations

import enum

__all__ = [
    "ERROR_CLASS_KEY",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalServerError",
    "InvalidClusterSpec",
    "InvalidIndex",
    "InvalidIndexType",
    "InvalidSelection",
    "NotSupportedAcrossShards",
    "PermissionDenied",
    "ResultTooLarge",
    "SelectionOutOfRange",
    "ServerUnavailable",
    "Status",
    "TensorExists",
    "TensorNotFound",
    "TensorSliceError",
    "Unauthenticated",
    "UnconvertibleIndex",
    "VersionGone",
    "error_class_name",
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


class InvalidIndex(InvalidSelection, IndexError):
    """The index does not fit the tensor or is no index at all, where PyTorch raises
    IndexError: too many indices, a mask whose shape does not match, index arrays that do
    not broadcast together, a float or a string (INVALID_ARGUMENT)."""


class InvalidIndexType(InvalidSelection, TypeError):
    """Part of the index has a type PyTorch refuses with TypeError: a slice bound that is
    not an integer, a list entry that is not a number (INVALID_ARGUMENT)."""


class UnconvertibleIndex(InvalidSelection, RuntimeError):
    """A sequence in the index cannot become an index tensor (``[obj, obj]`` of objects
    PyTorch cannot infer a dtype for), where PyTorch raises RuntimeError
    (INVALID_ARGUMENT)."""


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
    client handles it by streaming. It reaches users in one case: a client in a forked
    process that does not know the server's data plane (the message says what to do)."""

    status = Status.FAILED_PRECONDITION


class VersionGone(FailedPrecondition):
    """A read pinned to a version of a tensor (`RemoteTensor.at_version`) that the server
    no longer holds: it was replaced, grown or dropped, and no reader holds it any more
    (FAILED_PRECONDITION). Never answered with newer data."""


class TensorExists(TensorSliceError):
    """`put` of a name the server holds already, without ``replace=True``
    (ALREADY_EXISTS)."""

    status = Status.ALREADY_EXISTS


class PermissionDenied(TensorSliceError):
    """A write (`put`, `append`, `drop`) by a caller without write permission: the server
    is read-only, or the caller's token is not the write token (PERMISSION_DENIED)."""

    status = Status.PERMISSION_DENIED


class InternalServerError(TensorSliceError):
    """The server failed unexpectedly (INTERNAL); its log holds the traceback."""

    status = Status.INTERNAL


class InvalidClusterSpec(TensorSliceError, ValueError):
    """A cluster spec that cannot describe a sharded tensor: a gap or an overlap between
    row ranges, an unknown shard, a shard without addresses, or shards that disagree on a
    tensor's dtype or trailing shape (INVALID_ARGUMENT). Raised by the client."""

    status = Status.INVALID_ARGUMENT


class NotSupportedAcrossShards(TensorSliceError, NotImplementedError):
    """A request whose answer needs a merge the shards' partial results cannot give (a
    ``topk`` over dimension 0 of a sharded tensor) (UNIMPLEMENTED). Raised by the client."""

    status = Status.UNIMPLEMENTED


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
        TensorExists,
        PermissionDenied,
        InternalServerError,
    )
}


ERROR_CLASS_KEY = "tensorslice-error"
"""Trailing metadata key naming the error class where a status has several."""

_REFINED: dict[str, type[TensorSliceError]] = {
    cls.__name__: cls
    for cls in (InvalidIndex, InvalidIndexType, UnconvertibleIndex, VersionGone)
}


def error_class_name(exc: TensorSliceError) -> str | None:
    """What the server sends under `ERROR_CLASS_KEY`: the class name where the status
    alone does not say it, else None."""
    name = type(exc).__name__
    return name if _REFINED.get(name) is type(exc) else None


def error_from_status(
    status: Status, details: str, class_name: str | None = None
) -> TensorSliceError:
    """The error for a status (TensorSliceError for statuses without a class of their own);
    `class_name` (the server's `ERROR_CLASS_KEY`) picks a subclass of the same status."""
    refined = _REFINED.get(class_name or "")
    if refined is not None and refined.status is status:
        return refined(details)
    cls = _BY_STATUS.get(status, TensorSliceError)
    if cls is TensorSliceError:
        return TensorSliceError(f"{status.name}: {details}")
    return cls(details)
