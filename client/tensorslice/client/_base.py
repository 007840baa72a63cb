"""What the sync and the async client share: channel settings, request building, validation
and result assembly. Nothing here performs I/O.

Every public call of a client is described by an operation (`Unary` or `Stream`): the
method, the request message and how to turn the response into a result. An operation runs
as a flow (`BaseClient._flow`): a generator of steps (`CallUnary`, `CallStream`,
`ReceiveBulk`) that holds the policy, such as the Fetch -> bulk -> stream fallback. `Client`
performs the steps with blocking gRPC calls and sockets, `AsyncClient` with `grpc.aio`;
both drive the same flows, so they build the same requests, fall back the same way and
return the same results.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from tensorslice.client._fork import forked_from_grpc
from tensorslice.client._receive import Assembler
from tensorslice.client._shm import Sessions
from tensorslice.core.codec import (
    DATA_HOST_KEY,
    DATA_PORT_KEY,
    DTYPE_NAMES,
    INSTANCE_KEY,
    UPLOAD_END,
    dtype_name,
    encode_upload_data,
    safetensors_header,
    split_chunk,
)
from tensorslice.core.credentials import Credentials, TlsConfig, resolve_tls, resolve_token
from tensorslice.core.endpoint import (
    READ_METHODS,
    SERVICE_NAME,
    balanced,
    check_replica,
    has_tcp_host,
    host_of,
    replicas_of,
)
from tensorslice.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidSelection,
    SelectionOutOfRange,
    ServerUnavailable,
    Status,
    TensorSliceError,
    VersionGone,
)
from tensorslice.core.results import SlicePlan, TensorInfo, WhereResult
from tensorslice.core.selection import (
    Combine,
    Ellipsis_,
    Full,
    NewAxis,
    Range,
    Selection,
    Selector,
    Threshold,
    is_plain,
    outer_selectors,
    selection_to_proto,
    selectors_from_index,
)
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = [
    "DEFAULT",
    "MAX_RETRIES",
    "SERVICE",
    "SESSION_METHODS",
    "TRANSPORTS",
    "BaseClient",
    "BaseRemoteTensor",
    "BulkUnreachable",
    "CallDirect",
    "CallSession",
    "CallStream",
    "CallUnary",
    "CallUpload",
    "Deadline",
    "Default",
    "Explainer",
    "Flow",
    "ReceiveBulk",
    "SendBulk",
    "Step",
    "Stream",
    "Unary",
    "Upload",
    "bulk_host",
    "channel_options",
    "index_key",
    "make_selection",
    "serialize",
]

SERVICE = SERVICE_NAME
HEALTH_SERVICE = "grpc.health.v1.Health"

R = TypeVar("R")


class Default(enum.Enum):
    """The type of `DEFAULT`: "use the client's own setting"."""

    DEFAULT = "default"


DEFAULT = Default.DEFAULT

Timeout = float | None | Default


MAX_RETRIES = 4
"""gRPC makes at most 5 attempts of a call: `retries` above 4 are refused."""


def channel_options(retries: int, round_robin: bool = False) -> list[tuple[str, Any]]:
    """Channel options: no receive limit; (for ``retries`` > 0) gRPC's own retry policy for
    the service's read methods (`READ_METHODS`: idempotent), on UNAVAILABLE only, never
    for put, append or drop; with `round_robin`, gRPC's ``round_robin`` load balancing (a
    retry then goes to the next replica). gRPC retries a streaming call only until the first
    response arrives; a stream cut later fails with ServerUnavailable."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", 256 << 20),
    ]
    config: dict[str, Any] = {}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE, "method": m} for m in READ_METHODS],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    options.append(("grpc.enable_retries", 1 if retries > 0 else 0))
    if config:
        options.append(("grpc.service_config", json.dumps(config)))
    return options


@dataclass(frozen=True)
class Unary(Generic[R]):
    """A unary call: method, request, response class, and the result it makes."""

    method: str
    request: Any
    response_cls: Any
    finish: Callable[[Any], R]
    service: str = SERVICE

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"


@dataclass(frozen=True)
class Stream(Generic[R]):
    """A call whose result is one safetensors file (`Slice`, `SliceMany`).

    Clients run it as its one-message twin first (`Fetch`, `FetchMany`: a small result
    inline, a large one over the bulk data plane), and as the gRPC stream when the server
    answers FAILED_PRECONDITION (a large result and no bulk listener)."""

    method: str
    request: Any
    finish: Callable[[Assembler], R]
    as_bytes: bool = False
    share_memory: bool = False
    fetch_request: bytes = b""
    """`request` serialized once, where the operation is run again as it is (a handle
    reading the same index again): the `Fetch` call sends these bytes."""

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.method}"

    @property
    def fetch_path(self) -> str:
        return f"/{SERVICE}/{self.method.replace('Slice', 'Fetch')}"

    def assembler(self) -> Assembler:
        return Assembler(as_bytes=self.as_bytes, share_memory=self.share_memory)


@dataclass(frozen=True)
class Upload(Generic[R]):
    """An upload (`Put`, `Append`): the client-streaming call's messages (made lazily, one
    slab of the tensor at a time), the response class and the result it makes; and the
    same upload over the bulk data plane: the `OpenUpload` request (the file's header)
    and the data that follows it (`nbytes`, made lazily)."""

    method: str
    messages: Callable[[], Iterator[bytes]]
    response_cls: Any
    finish: Callable[[Any], R]
    open_request: Any = None
    data: Callable[[], Iterator[memoryview]] | None = None
    nbytes: int = 0

    @property
    def path(self) -> str:
        return f"/{SERVICE}/{self.method}"


UPLOAD_CHUNK_BYTES = (1 << 20) - (64 << 10)
"""Bytes of the file in each upload message: under the smallest request-size limit a
server takes (1 MiB), with room for the message's other fields."""
BULK_UPLOAD_MIN_BYTES = 1 << 20
"""Uploads of this many data bytes and more go over the bulk data plane (where the server
has one and it can be reached); smaller ones take one gRPC call."""
_BULK_PIECE_BYTES = 16 << 20


def upload_tensor(tensor: object, verb: str) -> torch.Tensor:
    """`tensor` as an upload sends it: detached, contiguous, of a safetensors dtype."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidSelection(f"{verb} needs a torch.Tensor; got {type(tensor).__name__}")
    t = tensor.detach()
    if t.dtype not in _DTYPES:
        raise InvalidSelection(f"tensor of dtype {dtype_name(t.dtype)} has no safetensors "
                               f"encoding")
    return t if t.is_contiguous() else t.contiguous()


def tensor_pieces(t: torch.Tensor, piece_bytes: int) -> Iterator[memoryview]:
    """The bytes of `t` (contiguous), `piece_bytes` at a time: views of its memory on the
    host; a CUDA tensor is copied to the host one piece at a time."""
    nbytes = t.numel() * t.element_size()
    flat = t.reshape(-1).view(torch.uint8) if nbytes else None
    for start in range(0, nbytes, piece_bytes):
        end = min(start + piece_bytes, nbytes)
        if t.device.type == "cpu":
            yield memoryview((ctypes.c_char * (end - start)).from_address(
                t.data_ptr() + start)).cast("B")
        else:
            assert flat is not None
            piece = flat[start:end].cpu()
            view = memoryview((ctypes.c_char * (end - start)).from_address(
                piece.data_ptr())).cast("B")
            yield view  # `piece` is alive until the caller asks for the next one


def upload_messages(name: str, t: torch.Tensor, dim_names: Sequence[str] = (),
                    replace: bool = False) -> Iterator[bytes]:
    """The serialized `UploadChunk` messages of an upload of `t` (from `upload_tensor`):
    the first names the tensor, the rest carry the safetensors file (header, then the
    tensor's bytes, read from its memory a chunk at a time)."""
    header, _ = safetensors_header([("values", t.dtype, tuple(t.shape))])
    first = _pb.UploadChunk(name=name, replace=replace, dim_names=list(dim_names))
    yield first.SerializeToString()
    yield encode_upload_data(b"", header)
    for view in tensor_pieces(t, UPLOAD_CHUNK_BYTES):
        yield encode_upload_data(b"", view)


def make_upload(method: str, name: str, t: torch.Tensor, dim_names: Sequence[str],
                replace: bool) -> Upload[TensorInfo]:
    """The `Upload` of `t` (from `upload_tensor`) as `Put` or `Append`."""
    header, _ = safetensors_header([("values", t.dtype, tuple(t.shape))])
    opening = _pb.OpenUploadRequest(name=name, replace=replace, dim_names=list(dim_names),
                                    append=method == "Append", header=header)
    return Upload(method, lambda: upload_messages(name, t, dim_names, replace),
                  _pb.TensorInfo, TensorInfo.from_proto, opening,
                  lambda: tensor_pieces(t, _BULK_PIECE_BYTES), t.numel() * t.element_size())


def bulk_host(address: str) -> str | None:
    """The host of a gRPC target, where the bulk data plane listens too (see
    `tensorslice.core.endpoint.host_of`). A Unix socket (``unix:``, ``unix-abstract:``)
    is on this host: its server's bulk plane is reached on loopback (a client that cannot
    reach it there streams instead). None for a ``vsock:`` target: such a client streams
    large results over gRPC."""
    if has_tcp_host(address):
        return host_of(address) or "127.0.0.1"
    return "127.0.0.1" if address.startswith(("unix:", "unix-abstract:")) else None


class BulkUnreachable(Exception):
    """The bulk port could not be reached (a firewall, a proxy): the clients then stream
    that result over gRPC and stop asking for bulk transfers."""


# ---------------------------------------------------------------------------- steps
# A call is a flow: a generator that yields steps (what to do on the network) and receives
# each step's outcome (`send`) or its error (`throw`), as httpx's auth flows do. The clients
# drive flows and perform the steps, `Client` with blocking calls and `AsyncClient` with
# asyncio; the policy (which step comes next, and what an error means) is written once,
# here. A call has one deadline (`Deadline`), whatever path carries it: each step gets
# the time left when it starts, so a fallback never restarts the clock.


_clock = time.monotonic  # what `Deadline` reads (tests drive a clock of their own)


class Deadline:
    """The one deadline of a call: `timeout` seconds from its start (None: none). Each step
    of the call gets `left()`, the time that remains; none is left: DeadlineExceeded."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._at = None if timeout is None else _clock() + timeout

    def left(self) -> float | None:
        if self._at is None:
            return None
        left = self._at - _clock()
        if left <= 0:
            raise DeadlineExceeded(f"the call's deadline of {self.timeout} s has passed")
        return left


@dataclass(frozen=True)
class CallUnary:
    """A unary call; the outcome is its response (bytes where `response_cls` is None).
    `request` is a message, or one already serialized (bytes)."""

    path: str
    request: Any
    response_cls: Any
    timeout: float | None


@dataclass(frozen=True)
class CallStream:
    """A streaming call whose `SliceChunk` frames are fed to `sink`; no outcome."""

    path: str
    request: Any
    sink: Assembler
    timeout: float | None


@dataclass(frozen=True)
class ReceiveBulk:
    """The file a bulk ticket claims, received from ``host:port`` into `sink`: connect (at
    most `connect_timeout`; failure raises `BulkUnreachable`), send the token, receive
    `nbytes`. No outcome."""

    host: str
    port: int
    token: bytes
    nbytes: int
    sink: Assembler
    timeout: float | None
    connect_timeout: float
    shm: Sessions | None = None
    """Try a same-host session first (see `tensorslice.client._shm`). The outcome is the
    transport that carried the file: "shared_memory" or "bulk"."""
    instance: bytes = b""
    """The issuing server's instance id (`BulkTicket.instance`): a session is used only
    with the server that greets with it."""


@dataclass(frozen=True)
class CallDirect:
    """A whole call over the data plane, without gRPC (what a client in a process forked
    from a gRPC user does), to `sockaddr` of `family`: resolved in the parent, so that the
    child never calls `getaddrinfo` (whose locks a parent thread may hold at fork time).
    The outcome is the response's bytes; with a `sink`, the result file is received into
    it instead (outcome b""). `host` is the name the address was resolved from (what a TLS
    certificate names)."""

    family: int
    sockaddr: Any
    method: str
    request: Any
    sink: Assembler | None
    timeout: float | None
    host: str = ""
    shm: Sessions | None = None
    """Make the call over a same-host session first (see `tensorslice.client._shm`)."""
    instance: bytes = b""
    """The data plane's instance id, as announced (a session only with that server)."""



@dataclass(frozen=True)
class CallSession:
    """A whole call over a same-host session with the data plane on `port` whose greeting
    names `instance` (see `tensorslice.client._shm`): `request` (a message or its bytes)
    to `method`, a result file received into `sink` (None: the response's bytes). The
    outcome is None where no session could be had (nothing was sent: the flow calls over
    gRPC), else (whether the answer came in a segment, the response's bytes or b"")."""

    port: int
    instance: bytes
    method: str
    request: Any
    sink: Assembler | None
    timeout: float | None
    shm: Sessions


@dataclass(frozen=True)
class CallUpload:
    """A client-streaming call: `messages` (serialized) sent in order; the outcome is the
    response."""

    path: str
    messages: Iterator[bytes]
    response_cls: Any
    timeout: float | None


@dataclass(frozen=True)
class SendBulk:
    """An upload's data over the bulk data plane: connect to ``host:port`` (at most
    `connect_timeout`; failure raises `BulkUnreachable`), send the token, the `nbytes`
    bytes `data` yields and `UPLOAD_END`, and read the answer (``<BQ`` status and length,
    then the serialized `response_cls` or the error's message). The outcome is the
    response."""

    host: str
    port: int
    token: bytes
    nbytes: int
    data: Iterator[memoryview]
    response_cls: Any
    timeout: float | None
    connect_timeout: float
    end: bytes = UPLOAD_END


Step = CallUnary | CallStream | ReceiveBulk | CallDirect | CallSession | CallUpload | SendBulk

TRANSPORTS = ("inline", "bulk", "shared_memory", "session", "stream")
"""What can carry a result: inline in the `Fetch` answer, the bulk data plane over TCP, a
same-host shared segment, a same-host session's socket (a small result of a call made
over the session), the gRPC stream."""
SESSION_METHODS = frozenset({"ListTensors", "DescribeTensor", "Explain"})
"""The unary methods a client calls over a same-host session once it has one (besides
every read of a result); the others (writes, the health check) always go over gRPC."""
_COUNT_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_COUNT_LOCK=threading.Lock()))
Flow = Generator[Step, Any, R]

_BULK_CONNECT_SECONDS = 5.0


def serialize(message: Any) -> bytes:
    """A request's bytes: a message serialized, or bytes as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def unary_flow(op: Unary[R], deadline: Deadline) -> Flow[R]:
    """One call, one response."""
    response = yield CallUnary(op.path, op.request, op.response_cls, deadline.left())
    return op.finish(response)


def upload_flow(op: Upload[R], deadline: Deadline) -> Flow[R]:
    """One client stream, one response."""
    response = yield CallUpload(op.path, op.messages(), op.response_cls, deadline.left())
    return op.finish(response)


_OPEN_UPLOAD = f"/{SERVICE}/OpenUpload"


def make_selection(
    index: object,
    combine: Combine | str = Combine.VECTORIZED,
    dtype: str | None = None,
    max_bytes: int = 0,
    tensor: tuple[str, int] | None = None,
) -> Selection:
    """A `Selection` from a Python index (what ``x[...]`` receives); a `Selection` passes
    through unchanged. `tensor` (name, dimensions), where known, lets too many indices be
    reported before the items are read, as PyTorch does."""
    if isinstance(index, Selection):
        return index
    if type(combine) is not Combine:
        combine = Combine(combine)
    sels = (outer_selectors(index) if combine is Combine.OUTER
            else selectors_from_index(index, tensor))
    return Selection(sels, combine, dtype, max_bytes)


def _tensors(asm: Assembler) -> dict[str, torch.Tensor]:
    return asm.tensors()


def _file_bytes(asm: Assembler) -> bytes:
    return asm.file_bytes()


def _tensor_list(resp: Any) -> list[TensorInfo]:
    return [TensorInfo.from_proto(t) for t in resp.tensors]


class BaseClient:
    """Settings and operations of a client; the channel is created by the subclass, lazily,
    once per process (a client inherited across ``fork`` or unpickled opens its own).

    `timeout` (seconds, None for none) is the deadline of every call; each method takes
    ``timeout=`` to override it. `retries` is how many times gRPC itself retries a call
    that fails with UNAVAILABLE (0 disables retries). `token` is the bearer token sent with
    every call, `tls` the TLS settings (a `TlsConfig`, True for the system's CAs, a CA file's
    path, False for plaintext); left as None, both follow the environment
    (``TENSORSLICE_TOKEN``, ``TENSORSLICE_TLS_CA``, ...: see `tensorslice.client.TlsConfig`)."""

    def __init__(self, address: str | Sequence[str], *, timeout: float | None = 60.0,
                 retries: int = 3, token: str | None = None,
                 tls: TlsConfig | bool | str | None = None,
                 same_host: bool | None = None) -> None:
        if not 0 <= retries <= MAX_RETRIES:
            raise ValueError(
                f"retries must be between 0 and {MAX_RETRIES} (gRPC makes at most "
                f"{MAX_RETRIES + 1} attempts); got {retries}"
            )
        if not isinstance(address, str):
            address = tuple(address)
            if not address or not all(isinstance(a, str) and a for a in address):
                raise ValueError(f"a client needs one address or a list of addresses "
                                 f"(HOST:PORT); got {list(address)!r}")
            for a in address:
                check_replica(a)
            if len(address) == 1:
                address = address[0]
        self.address: str | tuple[str, ...] = address
        self.replicas = replicas_of(address)
        """The servers this client's channel spreads calls over (`balanced`), or the one
        address it calls."""
        self._spread = len(self.replicas) > 1 or balanced(address)  # over several servers
        self.timeout = timeout
        self.retries = retries
        self._credentials = Credentials(resolve_token(token), resolve_tls(tls))
        hosts = {bulk_host(a) for a in self.replicas}
        # where the bulk plane listens when a ticket names no host: the host every replica
        # shares (None: several hosts, so a ticket must name its own)
        self._bulk_host = hosts.pop() if len(hosts) == 1 else None
        # false once the bulk port proved unreachable, or where the target has no TCP host
        self._bulk_ok = all(bulk_host(a) is not None for a in self.replicas)
        self._bulk_uploads = True  # false once the server proved not to know OpenUpload
        if same_host is None:
            same_host = os.environ.get("TENSORSLICE_SAME_HOST", "1").strip().lower() not in (
                "0", "false", "no", "off")
        # Same-host sessions (never with TLS); `available` turns false once none could be
        # opened (another host, no such socket): TCP from then on.
        self._shm = Sessions() if same_host and self._credentials.tls is None else None
        self.transports: dict[str, int] = dict.fromkeys(TRANSPORTS, 0)
        """How many results each transport carried (`TRANSPORTS`), for this client."""
        self.last_transport = ""
        """The transport that carried this client's latest result (any thread's)."""
        self.uploads: dict[str, int] = {"bulk": 0, "stream": 0}
        """How many uploads (puts, appends) went over the bulk data plane and over the
        gRPC stream, for this client."""
        self._closed = False  # true once closed: a closed client makes no more calls
        self._data_port: int | None = None  # the server's data plane, once announced
        # every data plane announced (host, port) with its instance id (b"": none), and as
        # resolved: (host, port, family, sockaddr)
        self._announced: dict[tuple[str, int], bytes] = {}
        self._data_planes: list[tuple[str, int, int, Any]] = []
        self._discovered = 0  # the process whose client asked every replica for its plane
        self._direct_next = 0  # the data plane a forked client tries first
        self._channel: Any = None
        self._stubs: dict[tuple[str, str, Any], Any] = {}  # the channel's, by `_stub`
        self._pid = 0

    @property
    def _data_addr(self) -> tuple[int, Any] | None:
        """The first data plane as resolved, (family, sockaddr), or None."""
        return self._data_planes[0][2:] if self._data_planes else None

    @_data_addr.setter
    def _data_addr(self, value: tuple[int, Any] | None) -> None:
        self._data_planes = [] if value is None else [("", 0, *value)]

    @property
    def balanced(self) -> bool:
        """Whether calls spread over several servers (gRPC's ``round_robin``; see
        `tensorslice.core.endpoint.balanced`)."""
        return balanced(self.address)

    def _options(self) -> list[tuple[str, Any]]:
        return (channel_options(self.retries, self.balanced)
                + self._credentials.grpc_options())

    @property
    def tls(self) -> TlsConfig | None:
        """The TLS settings in use, or None for plaintext."""
        return self._credentials.tls

    def _connect_hint(self) -> str:
        """What to check when no connection can be made: the TLS setting on both ends."""
        if self._credentials.tls is None:
            return ("this client speaks plaintext: if the server uses TLS, give the client "
                    "tls= or TENSORSLICE_TLS_CA")
        return ("this client speaks TLS: the server may be plaintext (then tls=False), or "
                "its certificate not signed by a CA the client trusts")

    def _server_name(self) -> str | None:
        tls = self._credentials.tls
        return None if tls is None else tls.server_name

    def _tls_pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        return self._credentials.pem

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return self._credentials.metadata

    def _owned_channel(self) -> Any:
        """This process's channel, or None. A channel inherited across ``fork`` is never
        used, closed or released in the child (see `_orphan`)."""
        if self._channel is not None and self._pid != os.getpid():
            _orphan(self._channel)
            self._channel = None
        return self._channel

    def _set_channel(self, channel: Any) -> Any:
        self._channel = channel
        self._pid = os.getpid()
        self._stubs = {}
        return channel

    def _stub(self, kind: str, path: str, response_cls: Any) -> Any:
        """The channel's callable for `path` (``unary_unary`` or ``unary_stream``), made once
        per channel: making one costs about as much as a small call's own work. Requests
        go as messages or as bytes already serialized (`serialize`)."""
        channel = self._chan()
        key = (kind, path, response_cls)
        stub = self._stubs.get(key)
        if stub is None:
            deserialize = None if response_cls is None else response_cls.FromString
            stub = getattr(channel, kind)(path, request_serializer=serialize,
                                          response_deserializer=deserialize)
            self._stubs[key] = stub
        return stub

    def _chan(self) -> Any:
        raise NotImplementedError

    def _deadline(self, timeout: Timeout) -> float | None:
        return self.timeout if isinstance(timeout, Default) else timeout

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_channel"] = None
        state["_stubs"] = {}
        state["_pid"] = 0
        return state

    def __repr__(self) -> str:
        address = list(self.address) if isinstance(self.address, tuple) else self.address
        return f"{type(self).__name__}({address!r})"

    # ------------------------------------------------------------------ flows
    def _flow(self, op: Unary[R] | Stream[R] | Upload[R], timeout: Timeout) -> Flow[R]:
        """The steps of one call (see `CallUnary`); the subclasses drive them."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; a closed client makes no more calls")
        deadline = Deadline(self._deadline(timeout))
        if isinstance(op, Upload):
            if forked_from_grpc():
                raise RuntimeError(
                    f"{op.method.lower()} needs gRPC, which a process forked from a gRPC "
                    f"user cannot use: write from the parent, or start workers with spawn"
                )
            return self._upload_flow(op, deadline)
        if forked_from_grpc():
            return self._direct_flow(op, deadline)
        plane = self._session_plane()
        if plane is not None and (isinstance(op, Stream) or (
                op.service == SERVICE and op.method in SESSION_METHODS)):
            return self._session_flow(op, deadline, *plane)
        if isinstance(op, Unary):
            return unary_flow(op, deadline)
        return self._fetch_flow(op, deadline)

    def _session_plane(self) -> tuple[int, bytes] | None:
        """The data plane (port, instance id) this client calls over same-host sessions:
        the one its server announced, where it has one server, sessions are on, and the
        plane did not prove to have none for it; else None (gRPC)."""
        shm, announced = self._shm, self._announced
        if shm is None or len(announced) != 1 or len(self.replicas) != 1 or self.balanced:
            return None
        ((_, port), instance), = announced.items()
        return (port, instance) if shm.usable(port, instance) else None

    def _session_flow(self, op: Unary[R] | Stream[R], deadline: Deadline, port: int,
                      instance: bytes) -> Flow[R]:
        """A call over a same-host session with the server's data plane (the answer on
        the session's socket, or a large result in a segment); over gRPC where no session
        can be had, or the session broke during the call (a read: made again)."""
        assert self._shm is not None
        if isinstance(op, Unary):
            method, request, asm = op.method, op.request, None
        else:
            method = op.method.replace("Slice", "Fetch")  # counted as the gRPC call would be
            request, asm = op.fetch_request or op.request, op.assembler()
        try:
            got = yield CallSession(port, instance, method, request, asm, deadline.left(),
                                    self._shm)
        except ServerUnavailable:
            got = None  # the session broke (a restarted server): over gRPC, same deadline
        if got is None:
            if isinstance(op, Unary):
                return (yield from unary_flow(op, deadline))
            return (yield from self._fetch_flow(op, deadline))
        in_segment, data = got
        if isinstance(op, Unary):
            return op.finish(op.response_cls.FromString(data))
        assert asm is not None
        self._carried("shared_memory" if in_segment else "session")
        return op.finish(asm)

    def _carried(self, transport: str) -> None:
        with _COUNT_LOCK:
            self.transports[transport] += 1
            self.last_transport = transport

    def _fetch_flow(self, op: Stream[R], deadline: Deadline) -> Flow[R]:
        """A result that is one safetensors file: `Fetch` first (small results come inline,
        large ones as a ticket for the bulk data plane on the server's host); the gRPC
        stream where the server refuses (FAILED_PRECONDITION: large, and no bulk listener)
        or the bulk port cannot be reached (then this client asks for no more tickets)."""
        request = op.request
        first: Any = op.fetch_request or request
        if not self._bulk_ok:
            request = type(request)()
            request.CopyFrom(op.request)
            request.bulk = False
            first = request
        attempts = 1 + (self.retries if self._spread else 0)
        try:
            for attempt in range(attempts):
                frame = yield CallUnary(op.fetch_path, first, None, deadline.left())
                asm = op.assembler()
                data, raw_ticket = split_chunk(frame)
                if raw_ticket is None:
                    asm.feed(data)
                    self._carried("inline")
                    break
                ticket = _pb.BulkTicket.FromString(bytes(raw_ticket))
                host = ticket.host or self._bulk_host
                if not host:
                    raise BulkUnreachable(
                        "a bulk ticket names no host and this client's replicas are on "
                        "several: run them with serve --advertise-host")
                left = deadline.left()
                connect = (_BULK_CONNECT_SECONDS if left is None
                           else min(left, _BULK_CONNECT_SECONDS))
                # A same-host session only with the server that issued the ticket: the
                # session's greeting must name the ticket's instance.
                shm = (self._shm if self._shm is not None
                       and self._shm.usable(ticket.port, ticket.instance) else None)
                try:
                    carried = yield ReceiveBulk(host, ticket.port, ticket.token,
                                                ticket.nbytes, asm, left, connect, shm,
                                                ticket.instance)
                except ServerUnavailable:
                    # The replica that holds the result went away: the read is idempotent,
                    # and the next Fetch goes to another replica.
                    if attempt + 1 == attempts:
                        raise
                    continue
                self._carried(carried)
                break
        except (FailedPrecondition, BulkUnreachable) as exc:
            if isinstance(exc, VersionGone):
                raise
            if isinstance(exc, BulkUnreachable):
                self._bulk_ok = False
            asm = op.assembler()
            yield CallStream(op.path, request, asm, deadline.left())  # the same deadline
            self._carried("stream")
        return op.finish(asm)

    def _upload_flow(self, op: Upload[R], deadline: Deadline) -> Flow[R]:
        """An upload: a large one over the bulk data plane (`OpenUpload`, then the data over
        the bulk port); the client stream where the upload is small, the server has no bulk
        listener (FAILED_PRECONDITION) or does not know `OpenUpload`, or the bulk port
        cannot be reached (then this client asks for no more tickets; the server gives the
        unredeemed ticket's reservation back when it expires)."""
        if (op.open_request is not None and op.data is not None and self._bulk_ok
                and self._bulk_uploads and op.nbytes >= BULK_UPLOAD_MIN_BYTES):
            ticket = None
            try:
                ticket = yield CallUnary(_OPEN_UPLOAD, op.open_request, _pb.BulkTicket,
                                         deadline.left())
            except FailedPrecondition:
                self._bulk_uploads = False  # a server without a bulk listener
            except TensorSliceError as exc:
                if exc.status is not Status.UNIMPLEMENTED:
                    raise
                self._bulk_uploads = False  # a server that does not know OpenUpload
            if ticket is not None:
                if ticket.nbytes != op.nbytes:
                    raise TensorSliceError(
                        f"the server's upload ticket is for {ticket.nbytes} bytes, the "
                        f"upload has {op.nbytes}: refused"
                    )
                left = deadline.left()
                connect = (_BULK_CONNECT_SECONDS if left is None
                           else min(left, _BULK_CONNECT_SECONDS))
                host = ticket.host or self._bulk_host
                try:
                    if not host:
                        raise BulkUnreachable(
                            "an upload ticket names no host and this client's replicas are "
                            "on several: run them with serve --advertise-host")
                    response = yield SendBulk(host, ticket.port,
                                              ticket.token, op.nbytes, op.data(),
                                              op.response_cls, left, connect)
                    self._count_upload("bulk")
                    return op.finish(response)
                except BulkUnreachable:
                    self._bulk_ok = False
        result = yield from upload_flow(op, deadline)
        self._count_upload("stream")
        return result

    def _count_upload(self, transport: str) -> None:
        with _COUNT_LOCK:
            self.uploads[transport] += 1

    def _note_port(self, metadata: Any, fallback_host: str | None = None) -> None:
        """Remember the data plane a call's trailing metadata announces: its port, and its
        host where the server advertises one (else `fallback_host`, else the host of this
        client's target)."""
        fields = dict(metadata or ())
        if DATA_PORT_KEY not in fields:
            return
        port = int(fields[DATA_PORT_KEY])
        try:
            instance = bytes.fromhex(fields.get(INSTANCE_KEY, ""))
        except ValueError:
            instance = b""  # no session with it
        host = fields.get(DATA_HOST_KEY) or fallback_host or self._bulk_host
        if host is None:
            return  # several hosts, none advertised: unknown which replica answered
        self._data_port = port
        # resolved by `resolve_data_plane`
        if len(self.replicas) == 1 and not self.balanced:
            if self._announced.get((host, port)) != instance:
                # one server: a new plane replaces the old one (a new dict: a thread that
                # reads the old one sees it whole)
                self._announced = {(host, port): instance}
        else:
            self._announced[(host, port)] = instance

    def _planes_pending(self) -> bool:
        """Whether the data planes known need resolving (`resolve_data_plane`): replicas
        not yet asked in this process, or a plane announced and not resolved. A call whose
        trailing metadata announces nothing otherwise leaves them as they are."""
        return ((len(self.replicas) > 1 and self._discovered != os.getpid())
                or len(self._data_planes) != len(self._announced))

    def _direct_flow(self, op: Unary[R] | Stream[R], deadline: Deadline) -> Flow[R]:
        """In a process forked from a gRPC user: the call over the data plane, never gRPC
        (see `_fork`). Its address was announced to the parent (`list_tensors`,
        `describe`) and resolved there. A client with several replicas knows each one's
        data plane and, where one cannot be reached, makes the call (a read) on the next."""
        planes = list(self._data_planes)
        if not planes:
            raise FailedPrecondition(
                "this process was forked from one that uses gRPC, so this client calls "
                "over the server's data plane only, whose port it does not know: call "
                "list_tensors() or describe() before the fork (a dataset does), or start "
                "workers with spawn or forkserver"
            )
        first = self._direct_next % len(planes)
        self._direct_next += 1  # spread the calls over the replicas
        # Another service's method (the health check) is named with its service.
        method = (op.method if isinstance(op, Stream) or op.service == SERVICE
                  else f"{op.service}/{op.method}")
        shm = self._shm
        for i in range(len(planes)):
            host, port, family, sockaddr = planes[(first + i) % len(planes)]
            asm = None if isinstance(op, Unary) else op.assembler()
            try:
                data = yield CallDirect(family, sockaddr, method, op.request, asm,
                                        deadline.left(), host, shm,
                                        self._announced.get((host, port), b""))
            except ServerUnavailable:
                if i + 1 == len(planes):
                    raise
                continue  # that replica is gone: the next one
            if isinstance(op, Unary):
                return op.finish(op.response_cls.FromString(data))
            assert asm is not None
            return op.finish(asm)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ operations
    @staticmethod
    def _op_health(service: str) -> Unary[str]:
        from grpc_health.v1 import health_pb2

        def status(resp: Any) -> str:
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

        return Unary("Check", health_pb2.HealthCheckRequest(service=service),
                     health_pb2.HealthCheckResponse, status, service=HEALTH_SERVICE)

    @staticmethod
    def _op_list_tensors() -> Unary[list[TensorInfo]]:
        return Unary("ListTensors", _pb.ListTensorsRequest(), _pb.ListTensorsResponse,
                     _tensor_list)

    @staticmethod
    def _op_describe(name: str) -> Unary[TensorInfo]:
        return Unary("DescribeTensor", _pb.DescribeTensorRequest(name=name), _pb.TensorInfo,
                     TensorInfo.from_proto)

    @staticmethod
    def _op_explain(name: str, selection: object) -> Unary[SlicePlan]:
        return Unary("Explain", selection_to_proto(name, make_selection(selection)),
                     _pb.SlicePlan, SlicePlan.from_proto)

    @staticmethod
    def _op_slice(name: str, selection: object, version: int = 0, kept: bool = False
                  ) -> Stream[dict[str, torch.Tensor]]:
        """`Slice` (and `Fetch`); `kept`: an operation run again as it is, its request
        serialized once, here (see `Stream.fetch_request`)."""
        request = _bulk(selection_to_proto(name, make_selection(selection)))
        request.version = version
        return Stream("Slice", request, _tensors,
                      fetch_request=request.SerializeToString() if kept else b"")

    @staticmethod
    def _op_put(name: str, tensor: torch.Tensor, dim_names: Sequence[str] | None,
                replace: bool) -> Upload[TensorInfo]:
        return make_upload("Put", name, upload_tensor(tensor, "put"), dim_names or (),
                           replace)

    @staticmethod
    def _op_append(name: str, rows: torch.Tensor, dim_names: Sequence[str] | None
                   ) -> Upload[TensorInfo]:
        return make_upload("Append", name, upload_tensor(rows, "append"), dim_names or (),
                           False)

    @staticmethod
    def _op_drop(name: str) -> Unary[int]:
        return Unary("Drop", _pb.DropRequest(name=name), _pb.DropResponse,
                     lambda resp: int(resp.version))

    @staticmethod
    def _op_slice_bytes(
        name: str, index: object, combine: Combine | str, dtype: str | None, max_bytes: int
    ) -> Stream[bytes]:
        sel = make_selection(index, combine, dtype, max_bytes)
        return Stream("Slice", _bulk(selection_to_proto(name, sel)), _file_bytes,
                      as_bytes=True)

    @staticmethod
    def _op_slice_many(
        items: Mapping[str, tuple[str, object]], max_bytes: int, share_memory: bool = False
    ) -> Stream[dict[str, torch.Tensor]]:
        if not items:
            raise InvalidSelection("slice_many needs at least one item")
        named = []
        for key, item in items.items():
            if not key:
                raise InvalidSelection("slice_many: a key cannot be empty")
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise InvalidSelection(
                    f"slice_many: item {key!r} must be (tensor name, index or Selection); "
                    f"got {item!r}"
                )
            name, index = item
            request = selection_to_proto(name, make_selection(index))
            named.append(_pb.NamedSlice(key=key, request=request))
        return Stream("SliceMany",
                      _pb.SliceManyRequest(items=named, max_bytes=max_bytes, bulk=True),
                      _tensors, share_memory=share_memory)


def _bulk(request: _pb.SliceRequest) -> _pb.SliceRequest:
    request.bulk = True  # this client can collect large results over the bulk data plane
    return request


_DTYPES = frozenset(DTYPE_NAMES.values())
_ORPHANS: list[Any] = []


def _orphan(channel: Any) -> None:
    """Keep a channel inherited across ``fork`` alive, untouched, for the child's lifetime:
    closing or collecting it there would act on the parent's gRPC state."""
    _ORPHANS.append(channel)


# ---------------------------------------------------------------------------- tensors

C = TypeVar("C", bound=BaseClient)


class BaseRemoteTensor(Generic[C]):
    """Metadata and selection building of a remote tensor; `RemoteTensor` and
    `AsyncRemoteTensor` add the calls."""

    def __init__(
        self, client: C, info: TensorInfo, *, dtype: str | None = None, max_bytes: int = 0
    ) -> None:
        self.client = client
        self.info = info
        self._dtype = dtype
        self._max_bytes = max_bytes
        self._pinned = 0  # a version this handle reads (0: the newest)
        self._reads: dict[object, Stream[dict[str, torch.Tensor]]] = {}  # by `index_key`

    @property
    def version(self) -> int:
        """The tensor's version when this handle was made (or the one it is pinned to)."""
        return self._pinned or self.info.version

    def _pinned_to(self, version: int | None) -> Any:
        """A copy of this handle that reads only `version` (None: the one it describes)."""
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out._pinned = self.info.version if version is None else version
        out._reads = {}
        if out._pinned < 0:
            raise InvalidSelection(f"version must not be negative; got {out._pinned}")
        return out

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

    def numel(self) -> int:
        """Elements in the whole tensor (as `torch.Tensor.numel`)."""
        return math.prod(self.info.shape)

    def dim(self) -> int:
        return len(self.info.shape)

    def element_size(self) -> int:
        return self.info.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor on the server."""
        return self.numel() * self.info.dtype.itemsize

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        if not self.info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.info.shape[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, shape={list(self.shape)}, "
                f"dtype={self.dtype}, device={self.info.device!r})")

    def _cast(self, dtype: str | torch.dtype, max_bytes: int | None) -> Any:
        """A copy of this handle whose results the server casts to `dtype` (a pinned
        version stays pinned)."""
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out._dtype = dtype_name(dtype)
        out._reads = {}
        if max_bytes is not None:
            out._max_bytes = max_bytes
        return out

    # ------------------------------------------------------------------ selections
    def _read(self, index: object) -> Stream[dict[str, torch.Tensor]]:
        """The operation of ``self[index]``. An index of ints, slices, None and ``...``
        read again reuses it, its request serialized once (the request is a function of
        the index and the handle alone); any other index is read afresh."""
        key = index_key(index)
        op = None if key is None else self._reads.get(key)
        if op is None:
            sel = self._sel(index, Combine.VECTORIZED)
            op = BaseClient._op_slice(self.name, sel, self._pinned, kept=key is not None)
            if key is not None:
                if len(self._reads) >= _READS_KEPT:
                    self._reads.clear()
                self._reads[key] = op
        return op

    def _sel(self, index: object, combine: Combine) -> Selection:
        return make_selection(index, combine, self._dtype, self._max_bytes,
                              (self.name, self.ndim))

    def _by_name(self, by_name: Mapping[str, object]) -> Selection:
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
        return self._sel(tuple(index), Combine.OUTER)

    def _threshold(
        self,
        dim: int | str,
        stat: str,
        over: Sequence[int | str],
        op: str,
        value: float,
        scope: str,
        k: int,
        index: Sequence[object],
    ) -> Selection:
        d = self._dim(dim)
        # Names become numbers; numbers go as given (the server checks and normalizes them).
        over_dims = tuple(self._dim(o) if isinstance(o, str) else o for o in over)
        sels: list[Selector] = list(outer_selectors(tuple(index))) if index else []
        if any(isinstance(s, (Ellipsis_, NewAxis, Threshold)) for s in sels):
            raise InvalidSelection(
                "where: index takes one entry per dimension (ints, slices, lists, masks); "
                "no ..., None or threshold"
            )
        if len(sels) > d and sels[d] not in (Full(), Range(), Range(None, None, 1)):
            raise InvalidSelection(
                f"where: index entry {d} selects along {self._label(d)}, the threshold's own "
                f"dimension; the threshold chooses its positions (leave that entry ':')"
            )
        sels += [Full()] * (d + 1 - len(sels)) if len(sels) <= d else []
        sels[d] = Threshold(stat=stat, op=op, value=value, scope=scope, over=over_dims, k=k)
        return Selection(tuple(sels), Combine.OUTER, self._dtype, self._max_bytes)

    def _dim(self, dim: int | str) -> int:
        """A dimension given by name or number (negative: from the end), as a number."""
        if isinstance(dim, str):
            if dim not in self.info.dim_names:
                raise InvalidSelection(
                    f"tensor {self.name!r} has no dimension {dim!r}; its dimensions are "
                    f"{', '.join(self.info.dim_names) or 'unnamed'}"
                )
            return self.info.dim_names.index(dim)
        n = self.ndim
        if not -n <= dim < n:
            raise SelectionOutOfRange(
                f"dimension {dim} is out of range for tensor {self.name!r} of {n} dimensions "
                f"(expected {-n} to {n - 1})"
            )
        return dim + n if dim < 0 else dim

    def _label(self, d: int) -> str:
        names = self.info.dim_names
        return f"dimension {d} ({names[d]})" if d < len(names) else f"dimension {d}"


_READS_KEPT = 64  # indexes whose operations a handle keeps


def _key_item(item: object) -> object:
    if not is_plain(item):
        return _NO_KEY
    if type(item) is slice:
        return ("slice", item.start, item.stop, item.step)
    return item


_NO_KEY = object()


def index_key(index: object) -> object:
    """A hashable key that stands for `index` exactly, where it is made of ints (bools
    excluded), slices of ints, None and ``...`` (alone or in a tuple); None otherwise."""
    if type(index) is tuple:
        items = tuple(_key_item(i) for i in index)
        return None if _NO_KEY in items else ("tuple", *items)
    item = _key_item(index)
    return None if item is _NO_KEY else ("one", item)


def where_result(out: Mapping[str, torch.Tensor]) -> WhereResult:
    return WhereResult(out["values"], out["indices"], out.get("offsets"))


class Indexer(Generic[R]):
    """``remote.oindex[...]``: indexing calls a function."""

    def __init__(self, fn: Callable[[object], R]) -> None:
        self._fn = fn

    def __getitem__(self, index: object) -> R:
        return self._fn(index)


class Explainer(Generic[R]):
    """``remote.explain``: the plan of any access of a remote tensor, nothing executed.

    ``explain[idx]`` (PyTorch's indexing), ``explain.oindex[idx]``,
    ``explain.select(N=...)`` and ``explain.where(dim, stat, ...)`` take exactly what the
    access they explain takes."""

    def __init__(self, tensor: BaseRemoteTensor[Any], fn: Callable[[Selection], R]) -> None:
        self._tensor = tensor
        self._fn = fn

    def __getitem__(self, index: object) -> R:
        return self._fn(self._tensor._sel(index, Combine.VECTORIZED))

    @property
    def oindex(self) -> Indexer[R]:
        return Indexer(lambda index: self._fn(self._tensor._sel(index, Combine.OUTER)))

    def select(self, **by_name: object) -> R:
        return self._fn(self._tensor._by_name(by_name))

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
    ) -> R:
        return self._fn(self._tensor._threshold(dim, stat, over, op, value, scope, k, index))
