"""What a call does between its request message and its answer: plans (cached), the results
of one selection and of many (`SliceMany`), and the transport, chosen from the plan's size
before any data moves (inline, a bulk ticket, or a refusal).

Protocol-neutral apart from the request messages it reads: errors are `TensorSliceError`s,
which the service turns into status codes.
"""

from __future__ import annotations

import enum
import json
import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

from tensorslice.core.codec import encode_chunk, split_chunk
from tensorslice.core.errors import (
    FailedPrecondition,
    InvalidIndex,
    InvalidSelection,
    PermissionDenied,
    ResultTooLarge,
    TensorExists,
    TensorSliceError,
)
from tensorslice.core.selection import selection_from_proto
from tensorslice.server._bulk import BulkServer
from tensorslice.server._bulk_upload import BulkUpload
from tensorslice.server._config import ServerConfig
from tensorslice.server._execute import execute, materialized_bytes, view_bytes
from tensorslice.server._limits import ByteBudget, Hold, shorten
from tensorslice.server._model import Mode, Plan
from tensorslice.server._payload import Payload
from tensorslice.server._plan import combined_limit, plan
from tensorslice.server._store import (
    MAX_NAME_CHARS,
    Entry,
    Storage,
    TensorStore,
    check_dim_names,
    check_name,
)
from tensorslice.server._stream import WholeFile, file_header, file_nbytes, frames
from tensorslice.server._upload import MAX_HEADER_BYTES, Upload, parse_upload_header, receive
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["ANSWER_CACHE_BYTES", "ANSWER_MAX_BYTES", "MAX_NAME_CHARS", "AnswerCache", "Calls",
           "Frames", "Planned", "Transport", "choose_transport"]
_BULK_PIECE_BYTES = 16 << 20
_PLAN_CACHE_SIZE = 1024
_PLAN_CACHE_KEY_BYTES = 4096  # requests with large index lists are planned afresh
ANSWER_CACHE_BYTES = 16 << 20
"""Bytes of small inline answers kept for requests seen again (requests and answers)."""
ANSWER_MAX_BYTES = 64 << 10
"""The largest inline answer kept."""



class Transport(enum.Enum):
    """How a one-message call (`Fetch`, `FetchMany`) answers."""

    INLINE = "inline"  # the file in the response message
    BULK = "bulk"  # a ticket; the file goes over the bulk data plane
    REFUSE = "refuse"  # FAILED_PRECONDITION: the client streams it instead


# As module globals: an enum member lookup costs a descriptor call per use (Python 3.11).
_INLINE, _BULK, _REFUSE = Transport.INLINE, Transport.BULK, Transport.REFUSE


def choose_transport(
    size: int, config: ServerConfig, bulk_requested: bool, bulk: BulkServer | None
) -> Transport:
    """The transport of a file of `size` bytes."""
    if size <= config.unary_max_bytes:
        return _INLINE
    if bulk_requested and bulk is not None:
        return _BULK
    return _REFUSE


class _Item(NamedTuple):  # (a tuple: made on every call, cheaper than a frozen dataclass)
    name: str  # what the result's ``values`` is called in the file
    entry: Entry
    plan: Plan
    asked: int = 0  # the version the request asked for (0: the newest)


class Planned(NamedTuple):
    """A planned result: every item validated, nothing executed yet. Immutable; a tuple,
    since one is made on every call."""

    items: tuple[_Item, ...]
    metadata: Mapping[str, str]
    many: bool  # several items (`SliceMany`): the names are the keys
    limit: int  # bytes, for the executed total of several items; 0 means none

    def data_nbytes(self) -> int:
        """The size of the tensors' data, or -1 where the data decides (a threshold)."""
        sizes = [i.plan.result_nbytes for i in self.items]
        return -1 if min(sizes) < 0 else sum(sizes)

    def file_nbytes(self) -> int:
        """The size of the file, or -1 where the data decides (a threshold)."""
        if self.data_nbytes() < 0:
            return -1
        tensors = [(i.name, i.plan.result_dtype, i.plan.result_shape) for i in self.items]
        return file_nbytes(tensors, self.metadata)

    def materialized_bytes(self, slab_bytes: int) -> int:
        """What executing builds in memory (threshold items, which the data sizes, not
        counted)."""
        return sum(materialized_bytes(i.plan, slab_bytes) for i in self.items
                   if i.plan.mode is not Mode.THRESHOLD)

    def execute(self, hold: Hold, slab_bytes: int) -> list[Payload]:
        """The payloads of the file (producing their bytes lazily), the memory they need
        reserved in `hold` first (released here if execution fails). A threshold item's
        ``indices``/``offsets`` become ``KEY.indices``/``KEY.offsets`` among several."""
        try:
            if not self.many:
                item = self.items[0]
                return execute(item.plan, item.entry.tensor, hold, slab_bytes=slab_bytes)
            payloads = [
                p.renamed(item.name if p.name == "values" else f"{item.name}.{p.name}")
                for item in self.items
                for p in execute(item.plan, item.entry.tensor, hold, slab_bytes=slab_bytes)
            ]
            _check_total(sum(x.nbytes for x in payloads), self.limit)
            return payloads
        except BaseException:
            hold.release()
            raise


class Frames:
    """A streamed answer: its `SliceChunk` frames, and the memory it holds until it ends.
    `release` is idempotent; the service calls it too when the call ends, since a
    cancelled stream's generator may never be resumed."""

    def __init__(self, frames: Iterator[bytes], hold: Hold, planned: Planned | None = None
                 ) -> None:
        self._frames = frames
        self._hold = hold
        self._planned = planned  # the versions it reads stay held while it streams

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._frames
        finally:
            self._hold.release()

    def release(self) -> None:
        self._hold.release()
        self._planned = None


class _Answer(NamedTuple):
    reads: tuple[tuple[str, int, int], ...]  # (tensor, version asked for, version read)
    frame: bytes


class AnswerCache:
    """Inline answers (`Fetch`, `FetchMany`) by the request's exact bytes, for requests
    seen again (a dashboard polling, a client re-reading a window): no parsing, planning
    or copying. An answer is valid while every tensor it read would be read again at the
    same version; versions are never reused and a version's data never changes, so a
    valid answer is the one the call would make. Bounded in bytes (requests and answers
    together, least recently used dropped first); holds no tensor memory."""

    def __init__(self, max_bytes: int = ANSWER_CACHE_BYTES,
                 max_answer: int = ANSWER_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_answer = max_answer
        self._answers: OrderedDict[tuple[str, bytes], _Answer] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0  # answers served from the cache (metrics)

    def get(self, method: str, raw: bytes, store: TensorStore) -> bytes | None:
        """The answer kept for `raw`, if every tensor it read is still at that version
        (a version no longer held, or a tensor gone: no answer; the call then says why)."""
        key = (method, raw)
        with self._lock:
            hit = self._answers.get(key)
            if hit is None:
                return None
            self._answers.move_to_end(key)
        try:
            for name, asked, read in hit.reads:
                if store.get(name, asked).version != read:
                    return None
        except TensorSliceError:
            return None
        with self._lock:
            self.hits += 1
        return hit.frame

    def put(self, method: str, raw: bytes, planned: Planned, frame: bytes) -> None:
        """Keep `frame`, the inline answer to `raw` (a ticket or a large answer is not
        kept: a ticket is redeemed once)."""
        size = len(raw) + len(frame)
        if len(frame) > self.max_answer or len(raw) > _PLAN_CACHE_KEY_BYTES:
            return
        if size > self.max_bytes or split_chunk(frame)[1] is not None:
            return
        reads = tuple((i.entry.meta.name, i.asked, i.entry.version) for i in planned.items)
        key = (method, raw)
        with self._lock:
            old = self._answers.pop(key, None)
            if old is not None:
                self._bytes -= len(raw) + len(old.frame)
            self._answers[key] = _Answer(reads, frame)
            self._bytes += size
            while self._bytes > self.max_bytes:
                (_, old_raw), dropped = self._answers.popitem(last=False)
                self._bytes -= len(old_raw) + len(dropped.frame)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)


class Calls:
    """The calls of the service over a store: what `TensorSliceService` translates to."""

    def __init__(self, store: TensorStore, config: ServerConfig,
                 bulk: BulkServer | None = None) -> None:
        self.store = store
        self.config = config
        self.bulk = bulk
        self.budget = ByteBudget(config.max_materialized_bytes,
                                 "max_materialized_bytes, serve --max-materialized-bytes")
        # Plans are pure functions of (tensor metadata, request): a request seen again (a
        # dashboard polling, a client re-reading a window) skips parsing and planning. An
        # entry is valid for the tensor version it was planned against.
        self._plans: OrderedDict[bytes, tuple[int, Plan]] = OrderedDict()
        self._plans_lock = threading.Lock()
        self.answers = AnswerCache()
        self.plan_hits = 0  # plans found in the cache (metrics)
        self.plan_misses = 0  # plans made afresh

    # ------------------------------------------------------------------ planning
    def plan(self, request: _pb.SliceRequest, seen: dict[str, Entry] | None = None,
             raw: bytes | None = None) -> tuple[Entry, Plan]:
        """The tensor a request names (the version it pins, else the newest; the one in
        `seen` where a call has read that tensor already) and the plan of its selection
        (cached, by `raw`, the bytes the request was parsed from, where the call has them:
        the same bytes parse to the same request; else by its serialization)."""
        if len(request.tensor) > MAX_NAME_CHARS:
            raise InvalidSelection(
                f"tensor name of {len(request.tensor)} characters is longer than any the "
                f"server holds (at most {MAX_NAME_CHARS})"
            )
        if request.version < 0:
            raise InvalidSelection(f"version must not be negative; got {request.version}")
        known = None if seen is None else seen.get(request.tensor)
        if known is not None and request.version in (0, known.version):
            entry = known
        else:
            entry = self.store.get(request.tensor, request.version)
            if seen is not None and not request.version:
                seen[request.tensor] = entry
        key = raw if raw is not None else request.SerializeToString(deterministic=True)
        if len(key) > _PLAN_CACHE_KEY_BYTES:
            return entry, self._plan_fresh(entry, request)
        with self._plans_lock:
            hit = self._plans.get(key)
            if hit is not None and hit[0] == entry.version:
                self._plans.move_to_end(key)
                self.plan_hits += 1
                return entry, hit[1]
        p = self._plan_fresh(entry, request)
        with self._plans_lock:
            self.plan_misses += 1
            self._plans[key] = (entry.version, p)
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return entry, p

    def _plan_fresh(self, entry: Entry, request: _pb.SliceRequest) -> Plan:
        _check_sizes(entry, request, self.config.max_result_bytes)
        selection = selection_from_proto(request)
        return plan(entry.meta, selection, limit=self.config.max_result_bytes)

    def planned(self, request: _pb.SliceRequest, raw: bytes | None = None) -> Planned:
        entry, p = self.plan(request, raw=raw)
        metadata = {
            "tensorslice.tensor": entry.meta.name,
            "tensorslice.version": str(entry.version),
            "tensorslice.plan": p.summary(),
        }
        return Planned((_Item("values", entry, p, request.version),), metadata, many=False,
                       limit=0)

    def planned_many(self, request: _pb.SliceManyRequest) -> Planned:
        """Several selections as one file. Every item is planned (validated) before any
        data moves; each item's ``values`` is named by its key."""
        if not request.items:
            raise InvalidSelection("SliceMany needs at least one item")
        if request.max_bytes < 0:
            raise InvalidSelection(f"max_bytes must not be negative; got {request.max_bytes}")
        items: list[_Item] = []
        seen: dict[str, Entry] = {}  # one version of each tensor for the whole call
        reserved: set[str] = set()
        for pos, named in enumerate(request.items):
            key = named.key
            if not key:
                raise InvalidSelection(f"item {pos} of SliceMany has an empty key")
            if key == "__metadata__" or len(key) > MAX_NAME_CHARS:
                raise InvalidSelection(
                    f"item {pos} of SliceMany: key {shorten(key, 80)!r} cannot name a tensor "
                    f"of a safetensors file ('__metadata__' is reserved; at most "
                    f"{MAX_NAME_CHARS} characters)"
                )
            entry, p = self.plan(named.request, seen)
            names = {key}
            if p.mode is Mode.THRESHOLD:
                names |= {f"{key}.indices", f"{key}.offsets"}
            clash = names & reserved
            if clash:
                raise InvalidSelection(
                    f"item {pos} of SliceMany: result name {sorted(clash)[0]!r} is not unique"
                )
            reserved |= names
            items.append(_Item(key, entry, p, named.request.version))
        limit = combined_limit(request.max_bytes, self.config.max_result_bytes)
        _check_total(sum(max(i.plan.result_nbytes, 0) for i in items), limit)
        metadata = {
            "tensorslice.tensors": json.dumps({i.name: i.entry.meta.name for i in items}),
            "tensorslice.versions": json.dumps({i.name: i.entry.version for i in items}),
            "tensorslice.plans": json.dumps({i.name: i.plan.summary() for i in items}),
        }
        return Planned(tuple(items), metadata, many=True, limit=limit)

    # ------------------------------------------------------------------ answering
    def frames(self, planned: Planned) -> Frames:
        """The `Slice`/`SliceMany` answer: the file as a stream of `SliceChunk` frames."""
        hold = self.budget.hold()
        payloads = planned.execute(hold, self.config.slab_bytes)
        return Frames(frames(payloads, planned.metadata, chunk_bytes=self.config.chunk_bytes,
                             slab_bytes=self.config.slab_bytes), hold, planned)

    def one_message(self, planned: Planned, bulk_requested: bool) -> bytes:
        """The `Fetch`/`FetchMany` answer: a whole result as one serialized `SliceChunk`,
        inline when small, else a ticket for the bulk data plane. A result too large for
        either is refused from its plan, before any work."""
        large = planned.data_nbytes() > self.config.unary_max_bytes
        if not (bulk_requested and self.bulk is not None):  # a large result is refused
            if large:
                raise self._refusal(planned.file_nbytes(), bulk_requested)
        elif large:
            # Bound for a ticket: refused from the plan if tickets are full, before any work.
            self.bulk.check_room(planned.materialized_bytes(self.config.slab_bytes))
        if not (planned.many or large):
            # A zero-copy view of a CPU tensor (what most small reads are): its bytes read
            # where they lie, framed with the header, nothing executed or held.
            item = planned.items[0]
            data = view_bytes(item.plan, item.entry.tensor)
            if data is not None:
                head = file_header(
                    (("values", item.plan.result_dtype, item.plan.result_shape),),
                    planned.metadata)
                if self._transport(len(head) + len(data), bulk_requested) is _INLINE:
                    return encode_chunk(head, data)
        hold = self.budget.hold()
        payloads = planned.execute(hold, self.config.slab_bytes)
        try:
            # One message or a socket: no framing to bound, so large pieces (fewer sendall
            # calls).
            file = WholeFile(payloads, planned.metadata, chunk_bytes=_BULK_PIECE_BYTES,
                             slab_bytes=self.config.slab_bytes, keep=planned)
            size = file.nbytes
            transport = self._transport(size, bulk_requested)
            if transport is _INLINE:
                # A piece may be a view of a reused buffer: copy each before the next is made.
                return encode_chunk(*(bytes(p) if isinstance(p, memoryview) else p
                                      for p in file))
            if transport is _BULK:
                assert self.bulk is not None
                # The ticket owns what the result holds until it is sent or expires; a
                # same-host session has the file written straight into a segment.
                token = self.bulk.offer(file, size, hold.move())
                ticket = _pb.BulkTicket(port=self.bulk.port, token=token, nbytes=size,
                                        host=self.bulk.advertised_host,
                                        instance=self.bulk.instance)
                return _pb.SliceChunk(ticket=ticket).SerializeToString()
            raise self._refusal(size, bulk_requested)
        finally:
            hold.release()  # nothing left once a ticket took it

    def whole_file(self, planned: Planned) -> tuple[WholeFile, int, Hold]:
        """A direct request's answer (`BulkServer`): the whole file (its pieces, or written
        into a same-host segment), its size, and the memory it holds until sent (the caller
        releases it)."""
        hold = self.budget.hold()
        payloads = planned.execute(hold, self.config.slab_bytes)
        try:
            file = WholeFile(payloads, planned.metadata, chunk_bytes=_BULK_PIECE_BYTES,
                             slab_bytes=self.config.slab_bytes, keep=planned)
        except BaseException:
            hold.release()
            raise
        return file, file.nbytes, hold

    # ------------------------------------------------------------------ writes
    def _writable(self) -> None:
        if self.config.read_only:
            raise PermissionDenied(
                "this server is read-only (serve --read-only): put, append and drop are "
                "refused"
            )

    def _check_new(self, name: str, replace: bool) -> None:
        if not replace and name in self.store:
            raise TensorExists(
                f"the server already holds a tensor named {shorten(name, 80)!r}; "
                f"put(..., replace=True) replaces it"
            )

    def _allocate_put(self, name: str, up: Upload) -> Storage:
        return self.store.allocate(name, up.dtype, up.shape, "storing")

    def _allocate_rows(self, name: str, up: Upload, what: str) -> Storage:
        """Storage for rows to append to `name`: refused before any byte is stored when
        their dtype or trailing shape do not match the tensor's."""
        if name in self.store:
            m = self.store.get(name).meta
            if up.dtype != m.dtype or up.shape[1:] != m.shape[1:] or not up.shape:
                raise InvalidSelection(
                    f"{what}: rows of dtype {str(up.dtype).removeprefix('torch.')} and "
                    f"shape {list(up.shape)} do not match the tensor's dtype "
                    f"{str(m.dtype).removeprefix('torch.')} and shape {list(m.shape)}"
                )
        return self.store.allocate(name, up.dtype, up.shape, "appending to")

    def put(self, chunks: Iterable[_pb.UploadChunk]) -> Entry:
        """`Put`: the uploaded file's tensor published under the first chunk's name."""
        self._writable()
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            raise InvalidSelection("put: the upload carried no message")
        name = check_name(first.name)
        self._check_new(name, first.replace)
        _, storage = receive(_data(first, it), lambda up: self._allocate_put(name, up),
                             f"put {shorten(name, 80)!r}")
        return self.store.put(name, storage, first.dim_names, replace=first.replace)

    def append(self, chunks: Iterable[_pb.UploadChunk]) -> Entry:
        """`Append`: the uploaded file's tensor added as rows of the first chunk's name."""
        self._writable()
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            raise InvalidSelection("append: the upload carried no message")
        name = check_name(first.name)
        what = f"append to {shorten(name, 80)!r}"
        _, rows = receive(_data(first, it), lambda up: self._allocate_rows(name, up, what),
                          what)
        return self.store.append(name, rows.tensor, first.dim_names)

    def open_upload(self, request: _pb.OpenUploadRequest, answer: Callable[[Entry], bytes]
                    ) -> _pb.BulkTicket:
        """`OpenUpload`: a put or append whose data comes over the bulk data plane. Checked
        and its storage allocated (counted in the budget) before any data moves; the
        ticket's connection receives the data into that storage, commits it (persisted
        where the store persists) and answers `answer(entry)`."""
        self._writable()
        if self.bulk is None:
            raise FailedPrecondition(
                "this server has no bulk data plane (serve --no-bulk): upload with Put or "
                "Append (streaming)"
            )
        name = check_name(request.name)
        if request.append:
            what = f"append to {shorten(name, 80)!r}"
        else:
            what = f"put {shorten(name, 80)!r}"
            self._check_new(name, request.replace)
        up = _upload_header(request.header, what)
        dim_names = tuple(request.dim_names)
        if not (request.append and name in self.store):
            check_dim_names(name, dim_names, len(up.shape))
        self.bulk.check_room(0)  # a full ticket table refuses before the allocation
        if request.append:
            storage = self._allocate_rows(name, up, what)

            def commit(filled: Storage) -> bytes:
                try:
                    return answer(self.store.append(name, filled.tensor, dim_names))
                finally:
                    filled.free()  # the rows were copied into the tensor's own storage
        else:
            storage = self._allocate_put(name, up)
            replace = request.replace

            def commit(filled: Storage) -> bytes:
                return answer(self.store.put(name, filled, dim_names, replace=replace))

        token = self.bulk.offer_upload(BulkUpload(storage, up.nbytes, commit, what),
                                       up.nbytes)
        return _pb.BulkTicket(port=self.bulk.port, token=token, nbytes=up.nbytes,
                              host=self.bulk.advertised_host)

    def drop(self, name: str) -> int:
        """`Drop`: the version dropped."""
        self._writable()
        if len(name) > MAX_NAME_CHARS:
            raise InvalidSelection(
                f"tensor name of {len(name)} characters is longer than any the server "
                f"holds (at most {MAX_NAME_CHARS})"
            )
        return self.store.drop(name)

    def _transport(self, size: int, bulk_requested: bool) -> Transport:
        return choose_transport(size, self.config, bulk_requested, self.bulk)

    def _refusal(self, size: int, bulk_requested: bool) -> FailedPrecondition:
        no_bulk = " and the server has no bulk listener" if bulk_requested else ""
        return FailedPrecondition(
            f"result of {size} bytes is larger than the {self.config.unary_max_bytes}-byte "
            f"limit of a single response{no_bulk}; use Slice (streaming)"
        )


def _upload_header(raw: bytes, what: str) -> Upload:
    """The tensor an `OpenUpload`'s header declares (its 8-byte length, then the JSON)."""
    if len(raw) < 8:
        raise InvalidSelection(
            f"{what}: the header of {len(raw)} bytes is shorter than its 8-byte length"
        )
    (hlen,) = struct.unpack_from("<Q", raw)
    if hlen > MAX_HEADER_BYTES:
        raise InvalidSelection(
            f"{what}: a safetensors header of {hlen} bytes is larger than the "
            f"{MAX_HEADER_BYTES}-byte limit of an upload"
        )
    if len(raw) != 8 + hlen:
        raise InvalidSelection(
            f"{what}: the header says its JSON is {hlen} bytes but {len(raw) - 8} follow"
        )
    return parse_upload_header(raw[8:], what)


def _data(first: _pb.UploadChunk, rest: Iterator[_pb.UploadChunk]) -> Iterator[bytes]:
    """The file's bytes: every chunk's `data`, in order."""
    if first.data:
        yield first.data
    for chunk in rest:
        if chunk.data:
            yield chunk.data


def _check_sizes(entry: Entry, request: _pb.SliceRequest, limit: int) -> None:
    """Refuse masks and index lists too large for the tensor or the result limit before
    they are converted (their conversion costs memory in proportion to their size)."""
    meta = entry.meta
    numel = math.prod(meta.shape)
    # A mask's shape is a run of the tensor's dimensions: a size-0 dimension elsewhere
    # does not shrink it (a mask of 3 fits dimension 0 of a (3, 0) tensor).
    most = math.prod(max(s, 1) for s in meta.shape)
    for pos, sel in enumerate(request.selectors):
        kind = sel.WhichOneof("kind")
        if kind == "mask":
            n = len(sel.mask.values)
            if n > most:
                raise InvalidIndex(  # a shape mismatch, an IndexError as in PyTorch
                    f"selector {pos}: mask of {n} values is larger than tensor "
                    f"{meta.name!r} of shape {list(meta.shape)} ({numel} elements)"
                )
        elif kind == "indices" and limit:
            n = len(sel.indices.values)
            # Each position selects at least one element (of at least one byte if cast).
            least = n * (1 if request.dtype else meta.dtype.itemsize)
            if numel and least > limit:
                raise ResultTooLarge(
                    f"selector {pos}: an index list of {n} positions makes a result of at "
                    f"least {least} bytes, more than the limit of {limit} bytes"
                )


def _check_total(total: int, limit: int) -> None:
    if limit and total > limit:
        raise ResultTooLarge(
            f"results of {total} bytes in all exceed the limit of {limit} bytes"
        )
