"""The synchronous client: `Client`, and `RemoteTensor`, which indexes like a torch.Tensor."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import torch

from tensorslice.client._errors import InvalidSelection, map_rpc_errors
from tensorslice.client._results import SlicePlan, TensorInfo, WhereResult
from tensorslice.client._selection import (
    Combine,
    Full,
    Selection,
    Selector,
    Threshold,
    outer_selectors,
    selection_to_proto,
    selectors_from_index,
)
from tensorslice.client._wire import Assembler, decode_chunk
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["Client", "RemoteTensor"]

_SERVICE = _pb.DESCRIPTOR.services_by_name["TensorSlice"].full_name

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", 256 << 20),
]


class Client:
    """A connection to a tensorslice server.

    The channel is created lazily, once per process: a client inherited across `fork`, or
    unpickled in a DataLoader worker, opens its own channel on first use.
    """

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel: grpc.Channel | None = None
        self._pid = 0

    # ------------------------------------------------------------------ channel
    def _chan(self) -> grpc.Channel:
        if self._channel is None or self._pid != os.getpid():
            self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._pid = os.getpid()
        return self._channel

    def close(self) -> None:
        if self._channel is not None and self._pid == os.getpid():
            self._channel.close()
        self._channel = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_channel"] = None
        state["_pid"] = 0
        return state

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    def _unary(self, method: str, request: Any, response_cls: Any) -> Any:
        call = self._chan().unary_unary(
            f"/{_SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        with map_rpc_errors():
            return call(request, timeout=self.timeout)

    # ------------------------------------------------------------------ metadata
    def list_tensors(self) -> list[TensorInfo]:
        """Every tensor the server holds."""
        resp = self._unary("ListTensors", _pb.ListTensorsRequest(), _pb.ListTensorsResponse)
        return [TensorInfo.from_proto(t) for t in resp.tensors]

    def describe(self, name: str) -> TensorInfo:
        """One tensor's metadata; TensorNotFound if the server holds none of that name."""
        msg = self._unary("DescribeTensor", _pb.DescribeTensorRequest(name=name), _pb.TensorInfo)
        return TensorInfo.from_proto(msg)

    def tensor(self, name: str) -> RemoteTensor:
        """A handle that indexes the remote tensor like a local one."""
        return RemoteTensor(self, self.describe(name))

    # ------------------------------------------------------------------ slicing
    def _stream(self, request: _pb.SliceRequest) -> Iterator[memoryview]:
        call = self._chan().unary_stream(
            f"/{_SERVICE}/Slice",
            request_serializer=_pb.SliceRequest.SerializeToString,
            response_deserializer=None,
        )
        with map_rpc_errors():
            for frame in call(request, timeout=self.timeout):
                yield decode_chunk(frame)

    def _fetch(self, request: _pb.SliceRequest, *, as_bytes: bool = False) -> Assembler:
        asm = Assembler(as_bytes=as_bytes)
        for payload in self._stream(request):
            asm.feed(payload)
        return asm

    def slice(self, name: str, selection: Selection) -> dict[str, torch.Tensor]:
        """The tensors of the result of one selection (``values``, plus ``indices`` and
        ``offsets`` for threshold masks), built on the received buffer without a copy."""
        return self._fetch(selection_to_proto(name, selection)).tensors()

    def slice_bytes(
        self,
        name: str,
        index: object = (),
        *,
        combine: Combine | str = Combine.VECTORIZED,
        dtype: str | None = None,
        max_bytes: int = 0,
    ) -> bytes:
        """The result as safetensors bytes (loadable with `safetensors.torch.load`)."""
        sel = _selection(index, Combine(combine), dtype, max_bytes)
        return self._fetch(selection_to_proto(name, sel), as_bytes=True).file_bytes()

    def explain(self, name: str, selection: Selection) -> SlicePlan:
        """The plan the server would follow; nothing is executed."""
        msg = self._unary("Explain", selection_to_proto(name, selection), _pb.SlicePlan)
        return SlicePlan.from_proto(msg)


def _selection(index: object, combine: Combine, dtype: str | None, max_bytes: int) -> Selection:
    sels = outer_selectors(index) if combine is Combine.OUTER else selectors_from_index(index)
    return Selection(sels, combine, dtype, max_bytes)


class _Indexer:
    """`remote.oindex[...]` and `remote.explain[...]`."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __getitem__(self, index: object) -> Any:
        return self._fn(index)


class RemoteTensor:
    """A tensor held by the server. Indexing returns a local `torch.Tensor`:

    - ``remote[idx]`` follows PyTorch's indexing exactly (advanced indexing included);
    - ``remote.oindex[idx]`` combines index lists orthogonally (``x[b][:, c]``);
    - ``remote.select(N=..., C=...)`` picks by dimension name;
    - ``remote.where(...)`` keeps positions whose statistic passes a threshold;
    - ``remote.explain[idx]`` returns the plan without executing it.
    """

    def __init__(
        self, client: Client, info: TensorInfo, *, dtype: str | None = None, max_bytes: int = 0
    ) -> None:
        self.client = client
        self.info = info
        self._dtype = dtype
        self._max_bytes = max_bytes
        self.oindex = _Indexer(lambda idx: self._get(idx, Combine.OUTER))
        self.explain = _Indexer(
            lambda idx: self.client.explain(self.name, self._sel(idx, Combine.VECTORIZED))
        )

    # ------------------------------------------------------------------ metadata
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.info.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    @property
    def ndim(self) -> int:
        return len(self.info.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        if not self.info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.info.shape[0]

    def __repr__(self) -> str:
        return (f"RemoteTensor(name={self.name!r}, shape={list(self.shape)}, "
                f"dtype={self.dtype}, device={self.info.device!r})")

    def astype(self, dtype: str | torch.dtype, *, max_bytes: int | None = None) -> RemoteTensor:
        """The same remote tensor whose results the server casts to `dtype`."""
        name = str(dtype).removeprefix("torch.")
        mb = self._max_bytes if max_bytes is None else max_bytes
        return RemoteTensor(self.client, self.info, dtype=name, max_bytes=mb)

    # ------------------------------------------------------------------ slicing
    def _sel(self, index: object, combine: Combine) -> Selection:
        return _selection(index, combine, self._dtype, self._max_bytes)

    def _get(self, index: object, combine: Combine) -> torch.Tensor:
        return self.client.slice(self.name, self._sel(index, combine))["values"]

    def __getitem__(self, index: object) -> torch.Tensor:
        return self._get(index, Combine.VECTORIZED)

    def fetch(self) -> torch.Tensor:
        """The whole tensor."""
        return self._get((), Combine.VECTORIZED)

    def select(self, **by_name: object) -> torch.Tensor:
        """Orthogonal selection by dimension name: ``select(N=slice(0, 10), C=[1, 3])``."""
        names = self.info.dim_names
        if not names:
            raise InvalidSelection(f"tensor {self.name!r} has no dimension names")
        index: list[object] = [slice(None)] * len(names)
        for key, value in by_name.items():
            if key not in names:
                raise InvalidSelection(
                    f"tensor {self.name!r} has no dimension {key!r}; its dimensions are "
                    f"{', '.join(names)}"
                )
            index[names.index(key)] = value
        return self._get(tuple(index), Combine.OUTER)

    def where(
        self,
        dim: int | str,
        stat: str,
        *,
        over: Sequence[int | str] = (),
        op: str = ">",
        value: float = 0.0,
        scope: str = "any",
        k: int = 0,
        index: Sequence[object] = (),
    ) -> WhereResult:
        """Keep the positions of `dim` whose statistic (mean, max, min, sum, abs_mean, l2,
        over the dimensions `over`; default: all but the batch and `dim`) passes
        ``op value``; scope any, all, per_sample or topk (with k). `index` optionally
        selects along the other dimensions first (orthogonally), one entry per dimension."""
        d = self._dim(dim)
        over_dims = tuple(self._dim(o) for o in over)
        sels: list[Selector] = list(outer_selectors(tuple(index))) if index else []
        sels += [Full()] * (d + 1 - len(sels)) if len(sels) <= d else []
        sels[d] = Threshold(stat=stat, op=op, value=value, scope=scope, over=over_dims, k=k)
        out = self.client.slice(self.name, Selection(tuple(sels), Combine.OUTER,
                                                      self._dtype, self._max_bytes))
        return WhereResult(out["values"], out["indices"], out.get("offsets"))

    def _dim(self, dim: int | str) -> int:
        if isinstance(dim, str):
            if dim not in self.info.dim_names:
                raise InvalidSelection(
                    f"tensor {self.name!r} has no dimension {dim!r}; its dimensions are "
                    f"{', '.join(self.info.dim_names) or 'unnamed'}"
                )
            return self.info.dim_names.index(dim)
        return dim
