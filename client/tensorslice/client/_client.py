"""The synchronous client: `Client`, and `RemoteTensor`, which indexes like a torch.Tensor.

Requests, validation and results come from `_base` (shared with `AsyncClient`); this
module only runs the calls, with blocking gRPC.
"""

from __future__ import annotations

import contextlib
import os
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
    SERVICE,
    BaseClient,
    BaseRemoteTensor,
    BulkUnreachable,
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
    bulk_host,
    channel_options,
    serialize,
    where_result,
)
from tensorslice.client._errors import map_rpc_errors, rpc_error
from tensorslice.client._receive import recv_exact
from tensorslice.core.codec import DIRECT_MAGIC, decode_chunk
from tensorslice.core.endpoint import literal_target, split_host_port
from tensorslice.core.errors import (
    DeadlineExceeded,
    ServerUnavailable,
    Status,
    TensorSliceError,
    error_from_status,
)
from tensorslice.core.results import SlicePlan, TensorInfo, WhereResult
from tensorslice.core.selection import Combine
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["CHANNEL_OPTIONS", "Client", "DirectLines", "RemoteTensor", "call_direct",
           "call_session", "channel_target", "receive_bulk", "resolve_data_plane",
           "send_bulk"]

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
    ``timeout=`` to override it); gRPC retries reads that fail with UNAVAILABLE up to
    `retries` times.

    Replicas: a list of addresses (``Client(["h1:50051", "h2:50051"])``), an
    ``ipv4:``/``ipv6:`` list or a ``dns:///NAME:PORT`` target is one channel that spreads
    calls over every server with gRPC's ``round_robin``; a read that fails with
    UNAVAILABLE is retried on the next one, and a bulk ticket is collected from the host
    it names (the replica holding the result).
    """

    # ------------------------------------------------------------------ channel
    def _chan(self) -> grpc.Channel:
        channel: grpc.Channel | None = self._owned_channel()
        if channel is None:
            target = channel_target(self.address)
            if self.tls is None:
                channel = grpc.insecure_channel(target, options=self._options())
            else:
                ca, cert, key = self._tls_pem()
                creds = grpc.ssl_channel_credentials(ca, key, cert)
                channel = grpc.secure_channel(target, creds, options=self._options())
            channel = self._set_channel(channel)
        return channel

    def close(self) -> None:
        channel = self._owned_channel()
        if channel is not None:
            channel.close()
        if self._shm is not None:
            self._shm.close()
        self._channel = None
        self._stubs = {}
        self._lines.close()
        self._closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _lines(self) -> DirectLines:
        """This client's kept data-plane connections (direct calls, see `call_direct`)."""
        lines: DirectLines | None = self.__dict__.get("_direct_lines")
        if lines is None:
            lines = self.__dict__["_direct_lines"] = DirectLines()
        return lines

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
        if isinstance(step, CallUnary):  # first: every small read is one
            call = self._stub("unary_unary", step.path, step.response_cls)
            try:
                response, done = call.with_call(step.request, timeout=step.timeout,
                                                metadata=self._metadata)
            except grpc.RpcError as exc:
                raise rpc_error(exc, self._connect_hint()) from None
            trailing = done.trailing_metadata()
            if trailing or self._planes_pending():
                self._note_port(trailing)
                resolve_data_plane(self)
            return response
        if isinstance(step, ReceiveBulk):
            return receive_bulk(step, self._credentials.ssl_context(),
                                self._server_name() or self._bulk_host)
        if isinstance(step, CallDirect):
            return call_direct(step, self._metadata, self._credentials.ssl_context(),
                               self._server_name() or step.host or self._bulk_host,
                               self._lines)
        if isinstance(step, CallSession):
            return call_session(step, self._metadata)
        if isinstance(step, SendBulk):
            return send_bulk(step, self._credentials.ssl_context(),
                             self._server_name() or step.host)
        if isinstance(step, CallUpload):
            upload = self._chan().stream_unary(
                step.path, request_serializer=None,
                response_deserializer=step.response_cls.FromString)
            with map_rpc_errors():
                return upload(step.messages, timeout=step.timeout, metadata=self._metadata)
        stream = self._stub("unary_stream", step.path, None)
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
        return self.client._call(self._read(index), DEFAULT)["values"]

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
        got = step.shm.receive(step.port, step.instance, step.token, step.nbytes, step.sink,
                               step.timeout, step.connect_timeout)
        if got is not None:
            return "shared_memory" if got else "bulk"
    sock = _connect_bulk(step, tls, server_name)
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


def _connect_bulk(step: ReceiveBulk | SendBulk, tls: ssl.SSLContext | None,
                  server_name: str | None) -> socket.socket:
    """A connection to the ticket's bulk port (TLS with `tls`, verifying the certificate for
    `server_name` or the host)."""
    where = f"{step.host}:{step.port}"
    try:
        sock = socket.create_connection((step.host, step.port), timeout=step.connect_timeout)
    except OSError as exc:
        raise BulkUnreachable(f"bulk port {where} unreachable: {exc}") from None
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=server_name or step.host)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise ServerUnavailable(
                f"TLS handshake with the bulk port {where} failed: {exc}") from None
    return sock


def send_bulk(step: SendBulk, tls: ssl.SSLContext | None = None,
              server_name: str | None = None) -> Any:
    """Perform a `SendBulk` step: connect to the bulk data plane (TLS with `tls`, verifying
    the certificate for `server_name` or the host), send the token, the data straight from
    its memory and the end marker, and read the answer; the response, or the error the
    server answered. (Blocking; `AsyncClient` runs it in a thread.)"""
    where = f"{step.host}:{step.port}"
    sock = _connect_bulk(step, tls, server_name)
    deadline = None if step.timeout is None else time.monotonic() + step.timeout
    try:
        with sock:
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(step.timeout)
            sock.sendall(step.token)
            sent = 0
            for piece in step.data:
                for at in range(0, len(piece), _SEND_STEP):
                    if deadline is not None:  # one deadline for the whole upload
                        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                    sock.sendall(piece[at : at + _SEND_STEP])
                sent += len(piece)
            if sent != step.nbytes:
                raise TensorSliceError(f"the upload made {sent} bytes, not {step.nbytes}")
            sock.sendall(step.end)
            code, nbytes = struct.unpack("<BQ", recv_exact(sock, 9, deadline))
            body = recv_exact(sock, nbytes, deadline)
    except TimeoutError:
        raise DeadlineExceeded(
            f"bulk upload of {step.nbytes} bytes to {where} did not finish within "
            f"{step.timeout} s") from None
    except OSError as exc:
        raise ServerUnavailable(f"bulk upload to {where} failed: {exc}") from None
    if code:
        status = Status(code) if code in _STATUS_VALUES else Status.UNKNOWN
        raise error_from_status(status, body.decode("utf-8", "replace"))
    return step.response_cls.FromString(body)


_SEND_STEP = 16 << 20


def channel_target(address: str | Sequence[str]) -> str:
    """The gRPC target of a client's address: an address as it is; a list as one
    ``ipv4:``/``ipv6:`` list (names resolved here, once per channel: each name's first
    IPv4 address where every name has one, else its first IPv6 address), which the
    client's ``round_robin`` policy spreads calls over."""
    if isinstance(address, str):
        return address
    target = literal_target(address)
    if target is not None:
        return target
    found: list[tuple[str, dict[int, str]]] = []
    for a in address:
        host, port = split_host_port(a)
        try:
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ServerUnavailable(f"cannot resolve {a}: {exc}") from None
        ips: dict[int, str] = {}
        for family, _, _, _, sockaddr in info:
            ips.setdefault(int(family), str(sockaddr[0]))
        found.append((port, ips))
    for family, form in ((socket.AF_INET, "{}:{}"), (socket.AF_INET6, "[{}]:{}")):
        if all(family in ips for _, ips in found):
            target = literal_target([form.format(ips[family], port) for port, ips in found])
            assert target is not None
            return target
    raise ServerUnavailable(
        f"the addresses {', '.join(address)} resolve to IPv4 addresses for some and IPv6 "
        f"for others; one channel takes one family: list addresses of one")


def resolve_data_plane(client: BaseClient, discover: bool = True) -> None:
    """Resolve every data plane announced to the client (in the parent, before any fork:
    a forked client connects to the addresses, never resolving a name itself). With
    `discover`, a client with several replicas first asks each one (once per process) for
    its data plane, so that a forked client knows them all (see `_direct_flow`)."""
    if discover and len(client.replicas) > 1 and client._discovered != os.getpid():
        client._discovered = os.getpid()
        _discover(client)
    known = {(p[0], p[1]): p for p in client._data_planes}
    if list(known) == list(client._announced):
        return
    planes = []
    for host, port in client._announced:
        plane = known.get((host, port))
        if plane is None:
            try:
                info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                continue  # a forked client then says it does not know the data plane
            plane = (host, port, info[0][0], info[0][4])
        planes.append(plane)
    client._data_planes = planes


def _discover(client: BaseClient) -> None:
    """Ask every replica of the client, each over a channel of its own, for its data plane
    (`ListTensors` announces it). A replica that does not answer within a few seconds is
    left out."""
    timeout = _CONNECT_SECONDS if client.timeout is None else min(client.timeout,
                                                                   _CONNECT_SECONDS)
    options = channel_options(0) + client._credentials.grpc_options()
    for address in client.replicas:
        if client.tls is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            ca, cert, key = client._tls_pem()
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert),
                                          options=options)
        with channel:
            call = channel.unary_unary(f"/{SERVICE}/ListTensors",
                                       request_serializer=_pb.ListTensorsRequest.SerializeToString,
                                       response_deserializer=None)
            try:
                _, done = call.with_call(_pb.ListTensorsRequest(), timeout=timeout,
                                         metadata=client._metadata)
            except grpc.RpcError:
                continue
            client._note_port(done.trailing_metadata(), bulk_host(address))


class DirectLines:
    """Connections to the data plane kept between direct calls, for the process that made
    them (a DataLoader worker calls once per batch: no connection set up per batch). A
    connection is in use by one call at a time (`take` hands it out, `give` takes it back);
    one inherited across `fork`, or from a pickled client, is never used."""

    def __init__(self) -> None:
        self._free: list[tuple[int, object, socket.socket]] = []  # (pid, address, socket)

    def take(self, sockaddr: object) -> socket.socket | None:
        while True:
            try:
                pid, addr, sock = self._free.pop()  # atomic: one taker per connection
            except IndexError:
                return None
            if pid == os.getpid() and addr == sockaddr:
                return sock
            if pid == os.getpid():
                sock.close()

    def give(self, sockaddr: object, sock: socket.socket) -> None:
        if len(self._free) < _DIRECT_LINES_KEPT:
            self._free.append((os.getpid(), sockaddr, sock))
        else:
            sock.close()

    def close(self) -> None:
        while self._free:
            pid, _, sock = self._free.pop()
            if pid == os.getpid():
                sock.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"_free": []}


_DIRECT_LINES_KEPT = 4


def call_direct(step: CallDirect, metadata: tuple[tuple[str, str], ...] | None = None,
                tls: ssl.SSLContext | None = None, server_name: str | None = None,
                lines: DirectLines | None = None) -> bytes:
    """Perform a `CallDirect` step: one whole call over the data plane (see
    `tensorslice.server._bulk`), no gRPC and no name resolution; the call's token (from
    `metadata`) travels with it, over TLS with `tls`; over a same-host session first where
    the step has one (see `_shm`: the result comes in a shared segment). Every read waits
    at most until the call's deadline; a server that goes away raises ServerUnavailable,
    never a short result. With `lines`, a connection kept from an earlier call carries it
    (and is kept again once the answer is read whole); one the server closed meanwhile is
    replaced by a new one, and the call sent again (direct calls only read). (Blocking;
    `AsyncClient` runs it in a thread.)"""
    where = f"data plane {step.sockaddr[0]}:{step.sockaddr[1]}"
    deadline = None if step.timeout is None else time.monotonic() + step.timeout
    auth = dict(metadata or ()).get("authorization", "").encode()
    name = step.method.encode()
    request = step.request.SerializeToString()
    if step.shm is not None and tls is None:
        connect = (_CONNECT_SECONDS if step.timeout is None
                   else min(step.timeout, _CONNECT_SECONDS))
        got = step.shm.call(step.sockaddr[1], step.instance, auth, step.method, request,
                            step.sink, step.timeout, connect)
        if got is not None:
            return got[1]
    message = (DIRECT_MAGIC + struct.pack("<H", len(auth)) + auth
               + struct.pack("<H", len(name)) + name
               + struct.pack("<Q", len(request)) + request)
    kept = None if lines is None else lines.take(step.sockaddr)
    try:
        if kept is not None:
            try:
                kept.settimeout(step.timeout)
                kept.sendall(message)
                head = recv_exact(kept, 9, deadline)
            except TimeoutError:
                kept.close()
                raise
            except (OSError, ServerUnavailable):  # closed by the server while kept
                kept.close()
                kept = None
        sock = kept if kept is not None else _connect_direct(step, tls, server_name, where)
        with contextlib.ExitStack() as closing:
            closing.callback(sock.close)
            if kept is None:
                sock.settimeout(step.timeout)
                sock.sendall(message)
                head = recv_exact(sock, 9, deadline)
            code, nbytes = struct.unpack("<BQ", head)
            if code:
                status = Status(code) if code in _STATUS_VALUES else Status.UNKNOWN
                text = recv_exact(sock, nbytes, deadline).decode("utf-8", "replace")
                _keep(lines, step, sock, closing)
                raise error_from_status(status, text)
            if step.sink is None:
                data = recv_exact(sock, nbytes, deadline)
                _keep(lines, step, sock, closing)
                return data
            step.sink.receive(sock, nbytes, deadline)
            _keep(lines, step, sock, closing)
            return b""
    except TimeoutError:
        raise DeadlineExceeded(
            f"{step.method} over the {where} did not finish within {step.timeout} s"
        ) from None
    except OSError as exc:
        raise ServerUnavailable(f"{step.method} over the {where} failed: {exc}") from None


def call_session(step: CallSession, metadata: tuple[tuple[str, str], ...] | None = None
                 ) -> tuple[bool, bytes] | None:
    """Perform a `CallSession` step: the call, with its token (from `metadata`), over a
    same-host session (see `_shm`); None where no session could be had. (Blocking;
    `AsyncClient` runs it in a thread.)"""
    auth = b""
    for key, value in metadata or ():
        if key == "authorization":
            auth = value.encode()
    connect = (_CONNECT_SECONDS if step.timeout is None
               else min(step.timeout, _CONNECT_SECONDS))
    return step.shm.call(step.port, step.instance, auth, step.method,
                         serialize(step.request), step.sink, step.timeout, connect)


def _keep(lines: DirectLines | None, step: CallDirect, sock: socket.socket,
          closing: contextlib.ExitStack) -> None:
    """The answer was read whole: the connection may carry the next call."""
    if lines is not None:
        closing.pop_all()
        lines.give(step.sockaddr, sock)


def _connect_direct(step: CallDirect, tls: ssl.SSLContext | None, server_name: str | None,
                    where: str) -> socket.socket:
    connect = (_CONNECT_SECONDS if step.timeout is None
               else min(step.timeout, _CONNECT_SECONDS))
    sock = socket.socket(step.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(connect)
        sock.connect(step.sockaddr)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_name)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        sock.close()
        raise ServerUnavailable(f"{where} unreachable: {exc}") from None
    return sock


_CONNECT_SECONDS = 5.0
_STATUS_VALUES = {s.value for s in Status}
