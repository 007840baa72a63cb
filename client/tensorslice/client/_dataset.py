"""PyTorch datasets over remote tensors: one RPC and one server-side gather per batch.

    ds = RemoteTensorDataset("127.0.0.1:50051", ["x", "y"])      # aligned along dim 0
    loader = DataLoader(ds, batch_size=256, shuffle=True, num_workers=2,
                        collate_fn=ds.collate)
    for x, y in loader: ...

`DataLoader` calls ``ds.__getitems__(batch_indices)``: the dataset fetches the rows of every
tensor in one `SliceMany` call (an index-list gather on the server, straight into the
response). `collate` returns those batched tensors as they are; PyTorch's default collate
also works (the batch then holds per-sample views that it stacks: one more copy).

Both datasets hold a `Client`, whose channel is created lazily in each process and dropped
on pickling: they work under DataLoader workers started with fork, spawn or forkserver.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

# A DataLoader worker seeds NumPy's generator at start-up and imports numpy.random for it;
# imported here, in the parent, so that a forked worker imports nothing at start. A module
# import in a child forked while another thread of the parent was importing can fail on the
# import lock it inherited (KeyError inside importlib).
import numpy.random  # noqa: F401
import torch
import torch.utils.data
from torch.utils.data import get_worker_info

from tensorslice.client._client import Client
from tensorslice.client._cluster import ClusterClient
from tensorslice.core.codec import dtype_name
from tensorslice.core.results import TensorInfo
from tensorslice.core.selection import Combine, Full, Index, Indices, Range, Selection, Selector

__all__ = ["Batch", "RemoteTensorDataset", "RemoteTensorIterableDataset"]


class Batch(list[Any]):
    """What `RemoteTensorDataset.__getitems__` returns: ``collated``, the batched tensors
    (a tensor, or a tuple for several names), which `collate` returns as they are; and, as
    a list, the batch's samples (views of those tensors) for PyTorch's default collate.

    The per-sample views are made on first use as a list (``batch[0]``, ``len``, iteration:
    what `default_collate` does first), so that `collate` never pays for them."""

    def __init__(self, collated: Any, single: bool) -> None:
        super().__init__()
        self.collated = collated
        self._single = single
        self._filled = False

    def _fill(self) -> None:
        if self._filled:
            return
        self._filled = True
        if self._single:
            super().extend(self.collated.unbind(0))
        else:
            super().extend(zip(*(t.unbind(0) for t in self.collated), strict=True))

    def __getitem__(self, index: Any) -> Any:
        self._fill()
        return super().__getitem__(index)

    def __len__(self) -> int:
        self._fill()
        return super().__len__()

    def __iter__(self) -> Iterator[Any]:
        self._fill()
        return super().__iter__()

    def __reduce__(self) -> Any:
        return (Batch, (self.collated, self._single))


class _Columns:
    """Tensors aligned along one dimension, fetched together in one `SliceMany` call."""

    def __init__(
        self,
        source: str | Sequence[str] | Client | ClusterClient,
        names: str | Sequence[str],
        dim: int,
        timeout: float | None,
        dtype: str | torch.dtype | None,
    ) -> None:
        self.client = (source if isinstance(source, (Client, ClusterClient))
                       else Client(source, timeout=timeout))
        self.single = isinstance(names, str)
        self.names: tuple[str, ...] = (names,) if isinstance(names, str) else tuple(names)
        if not self.names:
            raise ValueError("a dataset needs at least one tensor name")
        self.dim = dim
        self.dtype = None if dtype is None else dtype_name(dtype)
        self.infos: tuple[TensorInfo, ...] = tuple(self.client.describe(n) for n in self.names)
        sizes = []
        for info in self.infos:
            if not 0 <= dim < len(info.shape):
                raise ValueError(
                    f"tensor {info.name!r} of shape {list(info.shape)} has no dimension {dim}"
                )
            sizes.append(info.shape[dim])
        if len(set(sizes)) != 1:
            listed = ", ".join(f"{n!r}: {s}" for n, s in zip(self.names, sizes, strict=True))
            raise ValueError(f"tensors differ in size along dimension {dim}: {listed}")
        self.length = sizes[0]

    def fetch(self, selector: Selector) -> tuple[torch.Tensor, ...]:
        """Every tensor at `selector` on the aligned dimension, in one call."""
        sels: tuple[Selector, ...] = (Full(),) * self.dim + (selector,)
        sel = Selection(sels, Combine.OUTER, self.dtype)
        # In a DataLoader worker, receive into shared memory: the batch then reaches the
        # main process without another copy (as default_collate does for local data).
        out = self.client.slice_many({str(i): (n, sel) for i, n in enumerate(self.names)},
                                     share_memory=get_worker_info() is not None)
        return tuple(out[str(i)] for i in range(len(self.names)))

    def batch_first(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        """The batched tensors with the aligned dimension first (views), as one item."""
        if self.dim:
            tensors = tuple(t.movedim(self.dim, 0) for t in tensors)
        return tensors[0] if self.single else tensors


class RemoteTensorDataset(torch.utils.data.Dataset[Any]):
    """A map-style dataset over one remote tensor (``names="x"``: items are tensors) or
    several aligned along `dim` (``names=["x", "y"]``: items are tuples).

    ``ds[i]`` is one sample; ``ds[[i, j, ...]]`` (a list, tensor or slice) and
    ``ds.__getitems__(indices)`` fetch a batch in one RPC. Use
    ``DataLoader(ds, batch_size=B, collate_fn=ds.collate)`` to get the fetched batch as
    is (the batch dimension first), with no further copy.

    `source` is an address, a list of replicas' addresses (see `Client`), a `Client` (its
    timeout then applies) or a `ClusterClient` (sharded tensors); `dtype` asks the server
    to cast (e.g. ``"float16"``).
    """

    def __init__(
        self,
        source: str | Sequence[str] | Client | ClusterClient,
        names: str | Sequence[str],
        dim: int = 0,
        *,
        timeout: float | None = 60.0,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.columns = _Columns(source, names, dim, timeout, dtype)

    @property
    def client(self) -> Client | ClusterClient:
        return self.columns.client

    def __len__(self) -> int:
        return self.columns.length

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> Any:
        cols = self.columns
        if isinstance(index, slice):
            return cols.batch_first(cols.fetch(Range(index.start, index.stop, index.step)))
        if isinstance(index, (Sequence, torch.Tensor)):
            return self.__getitems__(index).collated
        out = cols.fetch(Index(operator.index(index)))
        return out[0] if cols.single else out

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """One batch, in one RPC: a `Batch` of per-sample views over the batched tensors."""
        cols = self.columns
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return Batch(cols.batch_first(cols.fetch(Indices(idx))), cols.single)

    @staticmethod
    def collate(batch: Any) -> Any:
        """The batch `__getitems__` fetched, as is (no copy); anything else goes through
        PyTorch's default collate."""
        if isinstance(batch, Batch):
            return batch.collated
        return torch.utils.data.default_collate(batch)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank,
                dist.get_world_size() if world_size is None else world_size)
    return (rank or 0), (world_size or 1)


class RemoteTensorIterableDataset(torch.utils.data.IterableDataset[Any]):
    """Sequential epochs over remote tensors, in contiguous blocks.

    The rows along `dim` are cut into one contiguous shard per (rank, worker): rank and
    world size from the arguments, else from `torch.distributed` when initialized, else
    (0, 1); the worker from `get_worker_info()`. Each shard is streamed in batches of
    `batch_size` rows, each one range slice: a zero-copy view on the server when
    ``dim == 0``. Items are batches (a tensor, or a tuple for several names), so use
    ``DataLoader(ds, batch_size=None, num_workers=N)``.
    """

    def __init__(
        self,
        source: str | Sequence[str] | Client | ClusterClient,
        names: str | Sequence[str],
        dim: int = 0,
        *,
        batch_size: int = 256,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        timeout: float | None = 60.0,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.columns = _Columns(source, names, dim, timeout, dtype)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size

    @property
    def client(self) -> Client | ClusterClient:
        return self.columns.client

    def shard(self) -> range:
        """The rows this process (rank and DataLoader worker) reads."""
        rank, world = _rank_and_world(self.rank, self.world_size)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not within world size {world}")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = world * workers
        s = rank * workers + worker
        n = self.columns.length
        return range(n * s // shards, n * (s + 1) // shards)

    def batches(self) -> Iterator[range]:
        """The row ranges of this shard's batches, in order."""
        rows = self.shard()
        for start in range(rows.start, rows.stop, self.batch_size):
            stop = min(start + self.batch_size, rows.stop)
            if self.drop_last and stop - start < self.batch_size:
                return
            yield range(start, stop)

    def __iter__(self) -> Iterator[Any]:
        cols = self.columns
        for r in self.batches():
            yield cols.batch_first(cols.fetch(Range(r.start, r.stop)))

    def num_batches(self) -> int:
        """How many batches this process's shard yields."""
        n = len(self.shard())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
