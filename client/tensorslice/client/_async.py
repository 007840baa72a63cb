"""The asynchronous client: `AsyncClient` and `AsyncRemoteTensor`, over `grpc.aio`.

They mirror `Client` and `RemoteTensor` method for method, with ``await``:

    async with AsyncClient("127.0.0.1:50051") as c:
        acts = await c.tensor("acts")
        await acts[0:10, [1, 3]]          # indexing returns a coroutine
        await acts.oindex[[0, 2], [1, 3]]
        await acts.explain[0:10]

Requests, validation and results come from `_base`, shared with the sync client. An index
is validated when the coroutine is created (``acts[True]`` raises at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
import torch

from tensorslice.client._base import (
    DEFAULT,
    BaseClient,
    BaseRemoteTensor,
    CallDirect,
    CallSession,
    CallUnary,
    CallUpload,
    Explainer,
    Flow,
    Indexer,
    ReceiveBulk,
    SendBulk,
    Step,
    Stream,
    Timeout,
    Unary,
    Upload,
    where_result,
)
from tensorslice.client._client import (
    call_direct,
    call_session,
    channel_target,
    receive_bulk,
    resolve_data_plane,
    send_bulk,
)
from tensorslice.client._errors import map_rpc_errors
from tensorslice.core.codec import decode_chunk
from tensorslice.core.credentials import TlsConfig
from tensorslice.core.results import SlicePlan, TensorInfo, WhereResult
from tensorslice.core.selection import Combine

__all__ = ["AsyncClient", "AsyncRemoteTensor"]

R = TypeVar("R")


class AsyncClient(BaseClient):
    """An asyncio connection to a tensorslice server (`Client`'s methods, awaitable).

    The channel is created lazily, once per process and event loop (a `grpc.aio` channel
    belongs to the loop that created it); `close()` is a coroutine (``async with`` closes
    it). Pickling drops the channel, as for `Client`.
    """

    def __init__(self, address: str | Sequence[str], *, timeout: float | None = 60.0,
                 retries: int = 3,
                 token: str | None = None, tls: TlsConfig | bool | str | None = None,
                 same_host: bool | None = None) -> None:
        super().__init__(address, timeout=timeout, retries=retries, token=token, tls=tls,
                         same_host=same_host)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ channel
    def _chan(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        channel: grpc.aio.Channel | None = self._owned_channel()
        if channel is not None and self._loop is not loop:
            channel = None  # its loop is gone or another one: leave it to the collector
        if channel is None:
            if self.tls is None:
                channel = grpc.aio.insecure_channel(channel_target(self.address),
                                                     options=self._options())
            else:
                ca, cert, key = self._tls_pem()
                creds = grpc.ssl_channel_credentials(ca, key, cert)
                channel = grpc.aio.secure_channel(channel_target(self.address), creds,
                                                   options=self._options())
            channel = self._set_channel(channel)
            self._loop = loop
        return channel

    async def close(self) -> None:
        channel: grpc.aio.Channel | None = self._owned_channel()
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close(None)
        if self._shm is not None:
            self._shm.close()
        self._channel = None
        self._loop = None
        self._closed = True

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_loop"] = None
        return state

    # ------------------------------------------------------------------ running calls
    async def _run(self, flow: Flow[R]) -> R:
        """Drive a flow: perform each step, send back its outcome or throw in its error."""
        outcome: Any = None
        error: Exception | None = None
        while True:
            try:
                step = flow.send(outcome) if error is None else flow.throw(error)
            except StopIteration as done:
                result: R = done.value
                return result
            outcome, error = None, None
            try:
                outcome = await self._perform(step)
            except Exception as exc:
                error = exc

    async def _perform(self, step: Step) -> Any:
        if isinstance(step, ReceiveBulk):
            # The socket part blocks: run it off the event loop.
            return await asyncio.to_thread(receive_bulk, step, self._credentials.ssl_context(),
                                           self._server_name() or self._bulk_host)
        if isinstance(step, CallSession):
            return await asyncio.to_thread(call_session, step, self._metadata)
        if isinstance(step, SendBulk):
            return await asyncio.to_thread(send_bulk, step, self._credentials.ssl_context(),
                                           self._server_name() or step.host)
        if isinstance(step, CallDirect):
            return await asyncio.to_thread(call_direct, step, self._metadata,
                                           self._credentials.ssl_context(),
                                           self._server_name() or step.host or self._bulk_host)
        if isinstance(step, CallUpload):
            upload = self._chan().stream_unary(
                step.path, request_serializer=None,
                response_deserializer=step.response_cls.FromString)
            with map_rpc_errors():
                return await upload(step.messages, timeout=step.timeout,
                                    metadata=self._metadata)
        if isinstance(step, CallUnary):
            call = self._stub("unary_unary", step.path, step.response_cls)
            with map_rpc_errors(self._connect_hint()):
                pending = call(step.request, timeout=step.timeout, metadata=self._metadata)
                response = await pending
                self._note_port(await pending.trailing_metadata())
            resolve_data_plane(self, discover=False)
            return response
        stream = self._stub("unary_stream", step.path, None)
        with map_rpc_errors(self._connect_hint()):
            async for chunk in stream(step.request, timeout=step.timeout,
                                      metadata=self._metadata):
                step.sink.feed(decode_chunk(chunk))
        return None

    async def _call(self, op: Unary[R] | Stream[R] | Upload[R], timeout: Timeout) -> R:
        return await self._run(self._flow(op, timeout))

    # ------------------------------------------------------------------ metadata
    async def health(self, service: str = "", *, timeout: Timeout = DEFAULT) -> str:
        """As `Client.health`."""
        return await self._call(self._op_health(service), timeout)

    async def list_tensors(self, *, timeout: Timeout = DEFAULT) -> list[TensorInfo]:
        """Every tensor the server holds."""
        return await self._call(self._op_list_tensors(), timeout)

    async def describe(self, name: str, *, timeout: Timeout = DEFAULT) -> TensorInfo:
        """One tensor's metadata; TensorNotFound if the server holds none of that name."""
        return await self._call(self._op_describe(name), timeout)

    async def tensor(self, name: str, *, timeout: Timeout = DEFAULT) -> AsyncRemoteTensor:
        """A handle that indexes the remote tensor: ``await remote[idx]``."""
        return AsyncRemoteTensor(self, await self.describe(name, timeout=timeout))

    # ------------------------------------------------------------------ slicing
    async def slice(
        self, name: str, selection: object, *, version: int = 0, timeout: Timeout = DEFAULT
    ) -> dict[str, torch.Tensor]:
        """As `Client.slice`."""
        return await self._call(self._op_slice(name, selection, version), timeout)

    # ------------------------------------------------------------------ writing
    async def put(self, name: str, tensor: torch.Tensor,
                  dim_names: Sequence[str] | None = None, *, replace: bool = False,
                  timeout: Timeout = DEFAULT) -> TensorInfo:
        """As `Client.put`."""
        return await self._call(self._op_put(name, tensor, dim_names, replace), timeout)

    async def append(self, name: str, rows: torch.Tensor,
                     dim_names: Sequence[str] | None = None, *,
                     timeout: Timeout = DEFAULT) -> TensorInfo:
        """As `Client.append`."""
        return await self._call(self._op_append(name, rows, dim_names), timeout)

    async def drop(self, name: str, *, timeout: Timeout = DEFAULT) -> int:
        """As `Client.drop`."""
        return await self._call(self._op_drop(name), timeout)

    async def slice_bytes(
        self,
        name: str,
        index: object = (),
        *,
        combine: Combine | str = Combine.VECTORIZED,
        dtype: str | None = None,
        max_bytes: int = 0,
        timeout: Timeout = DEFAULT,
    ) -> bytes:
        """As `Client.slice_bytes`."""
        return await self._call(
            self._op_slice_bytes(name, index, combine, dtype, max_bytes), timeout
        )

    async def slice_many(
        self,
        items: Mapping[str, tuple[str, object]],
        *,
        max_bytes: int = 0,
        share_memory: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> dict[str, torch.Tensor]:
        """As `Client.slice_many`."""
        return await self._call(self._op_slice_many(items, max_bytes, share_memory),
                                  timeout)

    async def explain(
        self, name: str, selection: object, *, timeout: Timeout = DEFAULT
    ) -> SlicePlan:
        """As `Client.explain`."""
        return await self._call(self._op_explain(name, selection), timeout)


class AsyncRemoteTensor(BaseRemoteTensor[AsyncClient]):
    """`RemoteTensor` for `AsyncClient`: every access returns a coroutine.

    ``await remote[idx]``, ``await remote.oindex[idx]``, ``await remote.explain[idx]``,
    ``await remote.select(...)``, ``await remote.where(...)``, ``await remote.fetch()``,
    ``await remote.explain.where(...)``.
    """

    @property
    def oindex(self) -> Indexer[Coroutine[Any, Any, torch.Tensor]]:
        """``remote.oindex[idx]``: index lists and masks combine orthogonally."""
        return Indexer(lambda idx: self._values(self._sel(idx, Combine.OUTER)))

    @property
    def explain(self) -> Explainer[Coroutine[Any, Any, SlicePlan]]:
        """``remote.explain[idx]``, ``.explain.oindex[idx]``, ``.explain.select(...)``,
        ``.explain.where(...)``: the plan, nothing executed."""
        return Explainer(self, lambda sel: self.client.explain(self.name, sel))

    def astype(
        self, dtype: str | torch.dtype, *, max_bytes: int | None = None
    ) -> AsyncRemoteTensor:
        """The same remote tensor whose results the server casts to `dtype`."""
        cast: AsyncRemoteTensor = self._cast(dtype, max_bytes)
        return cast

    async def _values(self, selection: object) -> torch.Tensor:
        return (await self.client.slice(self.name, selection, version=self._pinned))["values"]

    def at_version(self, version: int | None = None) -> AsyncRemoteTensor:
        """As `RemoteTensor.at_version`."""
        pinned: AsyncRemoteTensor = self._pinned_to(version)
        return pinned

    def __getitem__(self, index: object) -> Coroutine[Any, Any, torch.Tensor]:
        return self._read_values(self._read(index))

    async def _read_values(self, op: Stream[dict[str, torch.Tensor]]) -> torch.Tensor:
        return (await self.client._call(op, DEFAULT))["values"]

    def fetch(self) -> Coroutine[Any, Any, torch.Tensor]:
        """The whole tensor."""
        return self._values(self._sel((), Combine.VECTORIZED))

    def select(self, **by_name: object) -> Coroutine[Any, Any, torch.Tensor]:
        """As `RemoteTensor.select`."""
        return self._values(self._by_name(by_name))

    async def where(
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
        """As `RemoteTensor.where`."""
        sel = self._threshold(dim, stat, over, op, value, scope, k, index)
        return where_result(await self.client.slice(self.name, sel, version=self._pinned))
