"""The tensorslice client: slice tensors held by a tensorslice server, with PyTorch's
own indexing.

    from tensorslice.client import Client

    with Client("127.0.0.1:50051") as c:
        acts = c.tensor("acts")
        acts[0:10, [1, 3, 5]]          # exactly what a local tensor would return
"""

# First: sets gRPC's fork mode before gRPC loads (see `_fork`).
from tensorslice.client import _fork  # noqa: F401  # isort: skip
from tensorslice.client._async import AsyncClient, AsyncRemoteTensor
from tensorslice.client._client import Client, RemoteTensor
from tensorslice.client._cluster import (
    AsyncClusterClient,
    AsyncShardedTensor,
    ClusterClient,
    ShardedPlan,
    ShardedTensor,
)
from tensorslice.client._dataset import RemoteTensorDataset, RemoteTensorIterableDataset
from tensorslice.client._record import ActivationRecorder
from tensorslice.core.credentials import TlsConfig
from tensorslice.core.errors import (
    DeadlineExceeded,
    InternalServerError,
    InvalidClusterSpec,
    InvalidIndex,
    InvalidIndexType,
    InvalidSelection,
    NotSupportedAcrossShards,
    PermissionDenied,
    ResultTooLarge,
    SelectionOutOfRange,
    ServerUnavailable,
    TensorExists,
    TensorNotFound,
    TensorSliceError,
    Unauthenticated,
    UnconvertibleIndex,
    VersionGone,
)
from tensorslice.core.results import PlanStep, SlicePlan, TensorInfo, WhereResult
from tensorslice.core.selection import (
    Combine,
    Ellipsis_,
    Full,
    Index,
    Indices,
    Mask,
    NewAxis,
    Range,
    Selection,
    Threshold,
)

__all__ = [
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
