"""The synchronous client: `Client`, and `RemoteTensor`, which indexes like a torch.Tensor.

Requests, validation and results come from `_base` (shared with `AsyncClient`); this
module only runs the calls, with blocking gRPC.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import grpc
import torch

from tensorslice.client._base import (
    DEFAULT,
    BaseClient,
    BaseRemoteTensor,
    BulkUnreachable,
    CallDirect,
    CallUnary,
    CallUpload,
    Explainer,
    Flow,
    Indexer,
    ReceiveBulk,
    Step,
    Stream,
    Timeout,
    Unary,
    Upload,
    channel_options,
    where_result,
)
from tensorslice.client._errors import map_rpc_errors
from tensorslice.client._receive import recv_exact
from tensorslice.core.codec import DIRECT_MAGIC, decode_chunk
from tensorslice.core.errors import (
    DeadlineExceeded,
    ServerUnavailable,
    Status,
    error_from_status,
)
from tensorslice.core.results import SlicePlan, TensorInfo, WhereResult
from tensorslice.core.selection import Combine

__all__ = ["CHANNEL_OPTIONS", "Client", "RemoteTensor", "call_direct", "receive_bulk",
           "resolve_data_plane"]

CHANNEL_OPTIONS = channel_options(3)
"""The options of a client's channel with the default settings."""

R = TypeVar("R")


class Client(BaseClient):
    """A connection to a tensorslice server.

    The channel is created lazily, once per process: a client unpickled in a DataLoader
    worker opens its own channel on first use. In a process forked from one that loaded
    the client (a DataLoader worker under fork), gRPC is never used: every call goes over
    the server's data plane, whose port the client learned from `list_tensors` or
    `describe` before the fork. `timeout` is every call's deadline (each method takes
    ``timeout=`` to override it); gRPC retries calls that fail with UNAVAILABLE up to
    `retries` times.
    """

    # ------------------------------------------------------------------ channel
    def _chan(self) -> grpc.Channel:
        channel: grpc.Channel | None = self._owned_channel()
        if channel is None:
            if self.tls is None:
                channel = grpc.insecure_channel(self.address, options=self._options())
            else:
                ca, cert, key = self._tls_pem()
                creds = grpc.ssl_channel_credentials(ca, key, cert)
                channel = grpc.secure_channel(self.address, creds, options=self._options())
            channel = self._set_channel(channel)
        return channel

    def close(self) -> None:
        channel = self._owned_channel()
        if channel is not None:
            channel.close()
        if self._shm is not None:
            self._shm.close()
        self._channel = None
        self._closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ running calls
    def _run(self, flow: Flow[R]) -> R:
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
                outcome = self._perform(step)
            except Exception as exc:
                error = exc

    def _perform(self, step: Step) -> Any:
        if isinstance(step, ReceiveBulk):
            return receive_bulk(step, self._credentials.ssl_context(), self._server_name())
        if isinstance(step, CallDirect):
            return call_direct(step, self._metadata, self._credentials.ssl_context(),
                               self._server_name() or self._bulk_host)
        if isinstance(step, CallUpload):
            upload = self._chan().stream_unary(
                step.path, request_serializer=None,
                response_deserializer=step.response_cls.FromString)
            with map_rpc_errors():
                return upload(step.messages, timeout=step.timeout, metadata=self._metadata)
        serialize = type(step.request).SerializeToString
        if isinstance(step, CallUnary):
            deserialize = None if step.response_cls is None else step.response_cls.FromString
            call = self._chan().unary_unary(step.path, request_serializer=serialize,
                                            response_deserializer=deserialize)
            with map_rpc_errors(self._connect_hint()):
                response, done = call.with_call(step.request, timeout=step.timeout,
                                                metadata=self._metadata)
            self._note_port(done.trailing_metadata())
            resolve_data_plane(self)
            return response
        stream = self._chan().unary_stream(step.path, request_serializer=serialize,
                                           response_deserializer=None)
        with map_rpc_errors(self._connect_hint()):
            for chunk in stream(step.request, timeout=step.timeout, metadata=self._metadata):
                step.sink.feed(decode_chunk(chunk))
        return None

    def _call(self, op: Unary[R] | Stream[R] | Upload[R], timeout: Timeout) -> R:
        return self._run(self._flow(op, timeout))

    # ------------------------------------------------------------------ metadata
    def health(self, service: str = "", *, timeout: Timeout = DEFAULT) -> str:
        """The server's health status by the standard gRPC health protocol: ``SERVING``,
        ``NOT_SERVING``, ...; `service` "" for the server as a whole. Needs no token."""
        return self._call(self._op_health(service), timeout)

    def list_tensors(self, *, timeout: Timeout = DEFAULT) -> list[TensorInfo]:
        """Every tensor the server holds."""
        return self._call(self._op_list_tensors(), timeout)

    def describe(self, name: str, *, timeout: Timeout = DEFAULT) -> TensorInfo:
        """One tensor's metadata; TensorNotFound if the server holds none of that name."""
        return self._call(self._op_describe(name), timeout)

    def tensor(self, name: str, *, timeout: Timeout = DEFAULT) -> RemoteTensor:
        """A handle that indexes the remote tensor like a local one."""
        return RemoteTensor(self, self.describe(name, timeout=timeout))

    # ------------------------------------------------------------------ slicing
    def slice(
        self, name: str, selection: object, *, version: int = 0, timeout: Timeout = DEFAULT
    ) -> dict[str, torch.Tensor]:
        """The tensors of the result of one selection (``values``, plus ``indices`` and
        ``offsets`` for threshold masks), built on the received buffer without a copy.
        `selection` is a `Selection` or a Python index (PyTorch's meaning). `version`
        reads that version of the tensor (`VersionGone` once the server no longer holds
        it); 0 reads the newest."""
        return self._call(self._op_slice(name, selection, version), timeout)

    # ------------------------------------------------------------------ writing
    def put(self, name: str, tensor: torch.Tensor, dim_names: Sequence[str] | None = None,
            *, replace: bool = False, timeout: Timeout = DEFAULT) -> TensorInfo:
        """Store `tensor` under `name` (sent as a safetensors file, a chunk at a time, from
        the tensor's memory); with `replace`, atomically replace a tensor of that name
        (`TensorExists` without it). Readers of the replaced version finish on it. The new
        version's metadata."""
        return self._call(self._op_put(name, tensor, dim_names, replace), timeout)

    def append(self, name: str, rows: torch.Tensor, dim_names: Sequence[str] | None = None,
               *, timeout: Timeout = DEFAULT) -> TensorInfo:
        """Add `rows` along dimension 0 of `name` (created from them when missing; dtype
        and trailing shape must match, InvalidSelection naming both otherwise). The new
        version's metadata."""
        return self._call(self._op_append(name, rows, dim_names), timeout)

    def drop(self, name: str, *, timeout: Timeout = DEFAULT) -> int:
        """Remove `name` (TensorNotFound when missing); reads already running finish. The
        version dropped."""
        return self._call(self._op_drop(name), timeout)

    def slice_bytes(
        self,
        name: str,
        index: object = (),
        *,
        combine: Combine | str = Combine.VECTORIZED,
        dtype: str | None = None,
        max_bytes: int = 0,
        timeout: Timeout = DEFAULT,
    ) -> bytes:
        """The result as safetensors bytes (loadable with `safetensors.torch.load`)."""
        return self._call(self._op_slice_bytes(name, index, combine, dtype, max_bytes),
                            timeout)

    def slice_many(
        self,
        items: Mapping[str, tuple[str, object]],
        *,
        max_bytes: int = 0,
        share_memory: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> dict[str, torch.Tensor]:
        """Several selections in one call and one file: ``{key: (tensor name, index or
        Selection)}`` gives ``{key: tensor}`` (a threshold selection adds ``KEY.indices``,
        and ``KEY.offsets`` for per_sample). The server validates every item before any
        data moves; `max_bytes` bounds all results together. With `share_memory` the
        result is received straight into shared memory (as a DataLoader worker wants it)."""
        return self._call(self._op_slice_many(items, max_bytes, share_memory), timeout)

    def explain(self, name: str, selection: object, *, timeout: Timeout = DEFAULT) -> SlicePlan:
        """The plan the server would follow; nothing is executed."""
        return self._call(self._op_explain(name, selection), timeout)


class RemoteTensor(BaseRemoteTensor[Client]):
    """A tensor held by the server. Indexing returns a local `torch.Tensor`:

    - ``remote[idx]`` follows PyTorch's indexing exactly (advanced indexing included);
    - ``remote.oindex[idx]`` combines index lists orthogonally (``x[b][:, c]``);
    - ``remote.select(N=..., C=...)`` picks by dimension name;
    - ``remote.where(...)`` keeps positions whose statistic passes a threshold;
    - ``remote.explain[idx]`` returns the plan without executing it (and
      ``remote.explain.oindex[idx]``, ``.explain.select(...)``, ``.explain.where(...)``).
    """

    @property
    def oindex(self) -> Indexer[torch.Tensor]:
        """``remote.oindex[idx]``: index lists and masks combine orthogonally."""
        return Indexer(lambda idx: self._values(self._sel(idx, Combine.OUTER)))

    @property
    def explain(self) -> Explainer[SlicePlan]:
        """``remote.explain[idx]``, ``.explain.oindex[idx]``, ``.explain.select(...)``,
        ``.explain.where(...)``: the plan, nothing executed."""
        return Explainer(self, lambda sel: self.client.explain(self.name, sel))

    def astype(self, dtype: str | torch.dtype, *, max_bytes: int | None = None) -> RemoteTensor:
        """The same remote tensor whose results the server casts to `dtype`."""
        cast: RemoteTensor = self._cast(dtype, max_bytes)
        return cast

    def _values(self, selection: object) -> torch.Tensor:
        return self.client.slice(self.name, selection, version=self._pinned)["values"]

    def at_version(self, version: int | None = None) -> RemoteTensor:
        """This tensor pinned to `version` (default: the version this handle describes):
        every read returns that version's data, or raises `VersionGone` (FAILED_PRECONDITION)
        once the server no longer holds it; never newer data."""
        pinned: RemoteTensor = self._pinned_to(version)
        return pinned

    def __getitem__(self, index: object) -> torch.Tensor:
        return self._values(self._sel(index, Combine.VECTORIZED))

    def fetch(self) -> torch.Tensor:
        """The whole tensor."""
        return self._values(self._sel((), Combine.VECTORIZED))

    def select(self, **by_name: object) -> torch.Tensor:
        """Orthogonal selection by dimension name: ``select(N=slice(0, 10), C=[1, 3])``."""
        return self._values(self._by_name(by_name))

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
        sel = self._threshold(dim, stat, over, op, value, scope, k, index)
        return where_result(self.client.slice(self.name, sel, version=self._pinned))


def receive_bulk(step: ReceiveBulk, tls: ssl.SSLContext | None = None,
                 server_name: str | None = None) -> str:
    """Perform a `ReceiveBulk` step: over a same-host session where the step has one and
    the server is on this host (see `_shm`), else a TCP connection to the bulk data plane
    (TLS with `tls`, verifying the certificate for `server_name` or the host), the token
    sent, the file read straight into the step's buffer. The transport that carried it.
    (Blocking; `AsyncClient` runs it in a thread.)"""
    if step.shm is not None:
        got = step.shm.receive(step.port, step.token, step.nbytes, step.sink, step.timeout,
                               step.connect_timeout)
        if got is not None:
            return "shared_memory" if got else "bulk"
    try:
        sock = socket.create_connection((step.host, step.port), timeout=step.connect_timeout)
    except OSError as exc:
        raise BulkUnreachable(f"bulk port {step.host}:{step.port} unreachable: {exc}") from None
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=server_name or step.host)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise ServerUnavailable(
                f"TLS handshake with the bulk port {step.host}:{step.port} failed: {exc}"
            ) from None
    deadline = None if step.timeout is None else time.monotonic() + step.timeout
    try:
        with sock:
            sock.settimeout(step.timeout)
            sock.sendall(step.token)
            step.sink.receive(sock, step.nbytes, deadline)
    except TimeoutError:
        raise DeadlineExceeded(
            f"bulk transfer of {step.nbytes} bytes from {step.host}:{step.port} did not "
            f"finish within {step.timeout} s"
        ) from None
    except OSError as exc:
        raise ServerUnavailable(
            f"bulk transfer from {step.host}:{step.port} failed: {exc}"
        ) from None
    return "bulk"


def resolve_data_plane(client: BaseClient) -> None:
    """Resolve the data plane's address once its port is known (in the parent, before any
    fork: a forked client connects to the address, never resolving a name itself)."""
    host = client._bulk_host
    if client._data_port is not None and client._data_addr is None and host is not None:
        try:
            info = socket.getaddrinfo(host, client._data_port,
                                      type=socket.SOCK_STREAM)
        except OSError:
            return  # a forked client then says it does not know the data plane
        client._data_addr = (info[0][0], info[0][4])


def call_direct(step: CallDirect, metadata: tuple[tuple[str, str], ...] | None = None,
                tls: ssl.SSLContext | None = None, server_name: str | None = None) -> bytes:
    """Perform a `CallDirect` step: one whole call over the data plane (see
    `tensorslice.server._bulk`), no gRPC and no name resolution; the call's token (from
    `metadata`) travels with it, over TLS with `tls`; over a same-host session first where
    the step has one (see `_shm`: the result comes in a shared segment). Every read waits
    at most until the call's deadline; a server that goes away raises ServerUnavailable,
    never a short result. (Blocking; `AsyncClient` runs it in a thread.)"""
    where = f"data plane {step.sockaddr[0]}:{step.sockaddr[1]}"
    deadline = None if step.timeout is None else time.monotonic() + step.timeout
    connect = (_CONNECT_SECONDS if step.timeout is None
               else min(step.timeout, _CONNECT_SECONDS))
    auth = dict(metadata or ()).get("authorization", "").encode()
    request = step.request.SerializeToString()
    if step.shm is not None and tls is None:
        got = step.shm.call(step.sockaddr[1], auth, step.method, request, step.sink,
                            step.timeout, connect)
        if got is not None:
            return got
    sock = socket.socket(step.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(connect)
        sock.connect(step.sockaddr)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_name)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        sock.close()
        raise ServerUnavailable(f"{where} unreachable: {exc}") from None
    name = step.method.encode()
    try:
        with sock:
            sock.settimeout(step.timeout)
            sock.sendall(DIRECT_MAGIC + struct.pack("<H", len(auth)) + auth
                         + struct.pack("<H", len(name)) + name
                         + struct.pack("<Q", len(request)) + request)
            code, nbytes = struct.unpack("<BQ", recv_exact(sock, 9, deadline))
            if code:
                status = Status(code) if code in _STATUS_VALUES else Status.UNKNOWN
                message = recv_exact(sock, nbytes, deadline).decode("utf-8", "replace")
                raise error_from_status(status, message)
            if step.sink is None:
                return recv_exact(sock, nbytes, deadline)
            step.sink.receive(sock, nbytes, deadline)
            return b""
    except TimeoutError:
        raise DeadlineExceeded(
            f"{step.method} over the {where} did not finish within {step.timeout} s"
        ) from None
    except OSError as exc:
        raise ServerUnavailable(f"{step.method} over the {where} failed: {exc}") from None


_CONNECT_SECONDS = 5.0
_STATUS_VALUES = {s.value for s in Status}
