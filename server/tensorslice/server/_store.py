"""The store: tensors held in memory (host or device), by name, with their metadata."""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from tensorslice.core.codec import DTYPE_NAMES, dtype_from_code
from tensorslice.core.errors import (
    InvalidSelection,
    ResultTooLarge,
    SelectionOutOfRange,
    TensorExists,
    TensorNotFound,
    VersionGone,
)
from tensorslice.server._hostmem import MIN_RECYCLED_BYTES, HostMemory
from tensorslice.server._limits import machine_memory, shorten
from tensorslice.server._model import TensorMeta

__all__ = [
    "DEMO_DIM_NAMES",
    "DEMO_NAME",
    "MAX_NAME_CHARS",
    "VERSION_LEASE",
    "Entry",
    "Storage",
    "TensorStore",
    "check_dim_names",
    "check_name",
    "default_device_budget",
    "default_host_budget",
    "demo_tensor",
]

log = logging.getLogger("tensorslice.server")

DEMO_NAME = "demo"
DEMO_DIM_NAMES = ("N", "C", "H", "W")
_PROGRESS_MIN_BYTES = 64 << 20
_LOAD_SLAB_BYTES = 64 << 20
_GiB = 1 << 30


def default_device_budget(device: torch.device) -> int | None:
    """The default `max_device_memory`: on a CUDA device, what is free on it now minus a
    margin of 1 GiB or 10% of its memory, whichever is larger (room for gathers, statistics
    and staging); elsewhere no budget (None)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(_GiB, total // 10))


MAX_NAME_CHARS = 1024
"""Longest tensor name (or SliceMany key) a request may carry."""

VERSION_LEASE = 1024
"""Version numbers a persisting store leases from its data directory at a time (one fsynced
write per lease): after a restart, versions go on from the end of the last lease."""


def default_host_budget() -> int:
    """The default `max_memory` (host bytes the tensors of a CPU store may occupy): half
    of the machine's memory (the rest is for results, staging and the process itself)."""
    return machine_memory() // 2


def check_name(name: str) -> str:
    """`name` when a tensor may be stored under it: non-empty, at most `MAX_NAME_CHARS`
    characters, no ``/`` (kept for ``FILE/KEY`` names of `--dir`) and no NUL or other
    control character; InvalidSelection naming the problem else."""
    if not name:
        raise InvalidSelection("a tensor name cannot be empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidSelection(
            f"tensor name of {len(name)} characters is too long (at most {MAX_NAME_CHARS})"
        )
    bad = next((c for c in name if c == "/" or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InvalidSelection(
            f"tensor name {shorten(name, 80)!r} contains {bad!r} at position "
            f"{name.index(bad)}; names cannot contain '/' or control characters"
        )
    return name


class Storage:
    """The memory of a tensor and of the versions appends grow from it: `tensor` has room
    for `capacity` rows along dimension 0, of which the first `rows` are written. A
    version is (storage, its row count): rows appended later lie beyond what an older
    version sees, so growing in place never changes an older version; growing beyond the
    capacity copies into a new storage. Its bytes are counted in the store's budget until
    the last version (and the last reader) lets it go."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.rows = tensor.shape[0] if tensor.ndim else 0
        self._release: Callable[[], object] | None = None

    def free(self) -> None:
        """Give the memory back now (an upload that failed: nothing references it)."""
        self.tensor = self.tensor.new_empty((0,))
        if self._release is not None:
            self._release()

    @property
    def capacity(self) -> int:
        return self.tensor.shape[0] if self.tensor.ndim else 0


@dataclass(frozen=True)
class Entry:
    """A resident tensor, one version of it: contiguous, on the store's device, immutable
    (a reader that holds the entry reads that version to the end)."""

    meta: TensorMeta
    tensor: torch.Tensor
    source: str
    version: int
    storage: Storage | None = field(default=None, repr=False, compare=False)


def demo_tensor(shape: tuple[int, ...] = (64, 32, 16, 16), seed: int = 0) -> torch.Tensor:
    """A deterministic activation-like tensor: channel c has mean (c - C/2) / C."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    c = shape[1]
    offset = (torch.arange(c, dtype=torch.float32) - c / 2) / c
    return x + offset.reshape(1, c, *([1] * (len(shape) - 2)))


def _dim_names_from(
    metadata: dict[str, str] | None, key: str, ndim: int, path: Path
) -> tuple[str, ...]:
    """Dimension names a file declares: `__metadata__` key `dim_names.KEY` (or `dim_names`
    for every tensor), a comma-separated list with one name per dimension (any other
    count is refused, naming the file, the key and both counts)."""
    if not metadata:
        return ()
    field = f"dim_names.{key}" if f"dim_names.{key}" in metadata else "dim_names"
    raw = metadata.get(field)
    if not raw:
        return ()
    names = tuple(n.strip() for n in raw.split(","))
    if len(names) != ndim:
        raise InvalidSelection(
            f"{path}: {field} {raw!r} names {len(names)} dimensions but tensor {key!r} has "
            f"{ndim}"
        )
    return names


class TensorStore:
    """Named tensors resident on one device, within a budget of device memory.

    `max_device_memory` (bytes) caps what the store's tensors may occupy together: a load
    that would exceed it is refused with `ResultTooLarge` before anything is allocated, and
    the store stays as it was. It applies to any device when given; 0 means no budget; when
    None, a CUDA store takes `default_device_budget` and a CPU store has no budget.
    """

    def __init__(
        self, device: str | torch.device = "cpu", *, max_device_memory: int | None = None,
        max_memory: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidSelection(f"device {self.device} requested but CUDA is not available")
        if max_device_memory is not None and max_device_memory < 0:
            raise InvalidSelection(f"max_device_memory must be >= 0; got {max_device_memory}")
        self.max_device_memory = (
            default_device_budget(self.device) if max_device_memory is None
            else max_device_memory or None  # 0: no budget
        )
        if max_memory is not None and max_memory < 0:
            raise InvalidSelection(f"max_memory must be >= 0; got {max_memory}")
        self.max_memory = (
            default_host_budget() if max_memory is None else max_memory or None
        )
        """Host bytes the tensors of a CPU store may occupy (None: no budget)."""
        self._entries: dict[str, Entry] = {}
        # Every version some reader still holds, by number (pinned reads find it here).
        self._versions: weakref.WeakValueDictionary[int, Entry] = (
            weakref.WeakValueDictionary())
        # Reentrant: a storage's finalizer gives its bytes back under it, and may run while
        # this thread holds it (the last reference dropped by a replacement).
        self._lock = threading.RLock()
        self._write = threading.Lock()  # one put/append/drop commits at a time
        self._version = 0
        self._leased = 0  # where the store persists: versions up to this may be issued
        self._used = 0  # bytes of live storages (old versions still read included)
        self.persist: Any = None
        """Where acknowledged writes go before they are published (`_persist.DataDir`)."""
        budget, _ = self._budget()
        self.host_memory: HostMemory | None = (
            HostMemory(min(_GiB, budget // 2) if budget else _GiB)
            if self.device.type == "cpu" else None)
        """Where a CPU store's large tensors live: memory recycled between versions."""

    @property
    def device_memory_used(self) -> int:
        """Bytes the store's tensors (and loads in progress) occupy on its device."""
        with self._lock:
            return self._used

    def _device_label(self) -> str:
        if self.device.type == "cuda" and self.device.index is None:
            return f"cuda:{torch.cuda.current_device()}"
        return str(self.device)

    # ------------------------------------------------------------------ access
    def get(self, name: str, version: int = 0) -> Entry:
        """The newest version of `name`, or version `version` while it is held (the newest,
        or an older one a reader still holds); VersionGone once it is not."""
        entry = self._entries.get(name)
        if version:
            old = self._versions.get(version)
            if old is not None and old.meta.name == name:
                return old
            newest = f"; the newest is {entry.version}" if entry is not None else ""
            raise VersionGone(
                f"version {version} of tensor {shorten(name, 80)!r} is gone (replaced, "
                f"grown or dropped, and no reader holds it){newest}"
            )
        if entry is None:
            names = sorted(self._entries)
            held = ", ".join(shorten(n, 80) for n in names[:20]) or "none"
            if len(names) > 20:
                held += f" and {len(names) - 20} more"
            raise TensorNotFound(
                f"no tensor named {shorten(name, 80)!r}; the server holds: {held}"
            )
        return entry

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ adding
    def add(
        self,
        name: str,
        tensor: torch.Tensor,
        *,
        dim_names: Iterable[str] = (),
        source: str = "memory",
    ) -> Entry:
        """Hold `tensor` under `name` (moved to the store's device, made contiguous)."""
        if tensor.dtype not in DTYPE_NAMES.values():
            raise InvalidSelection(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        names = tuple(dim_names)
        if names and len(names) != tensor.ndim:
            raise InvalidSelection(
                f"tensor {name!r} has {tensor.ndim} dimensions but {len(names)} names"
            )
        nbytes = tensor.numel() * tensor.element_size()
        if _same_device(tensor.device, self.device) and tensor.is_contiguous():
            self._reserve(name, nbytes)
            storage = self._track(Storage(tensor), nbytes)
        else:  # one allocation on the device, filled straight from the source's layout
            storage = self.allocate(name, tensor.dtype, tuple(tensor.shape), "loading")
            storage.tensor.copy_(tensor)
        return self._put(name, storage, names, source)

    def _budget(self) -> tuple[int | None, str]:
        """The budget the store's tensors count against, and how to name it."""
        device, host = self.max_device_memory, self.max_memory
        if self.device.type != "cpu" or host is None:
            return device, "budget"
        if device is None or host < device:
            return host, "host budget (serve --max-memory)"
        return device, "budget"

    def _reserve(self, name: str, nbytes: int, verb: str = "loading") -> None:
        """Count `nbytes` against the budget, or refuse them (ResultTooLarge) when the
        storages alive (old versions still read included) plus this would exceed it."""
        with self._lock:
            budget, what = self._budget()
            pool = self.host_memory
            if budget is not None and pool is not None and pool.kept:
                # Recycled memory kept for reuse counts too: unmapped where it is in the way.
                pool.trim(self._used + nbytes + pool.kept - budget)
            if budget is not None and self._used + nbytes > budget:
                free = max(0, budget - self._used)
                raise ResultTooLarge(
                    f"{verb} {shorten(name, 80)!r} needs {nbytes} bytes on "
                    f"{self._device_label()} but only {free} of the {budget}-byte {what} "
                    f"are free"
                )
            self._used += nbytes

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes

    def _track(self, storage: Storage, nbytes: int) -> Storage:
        """Give `nbytes` back to the budget when `storage` is no longer referenced."""
        storage._release = weakref.finalize(storage, self._unreserve, nbytes)
        return storage

    def allocate(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                 verb: str = "storing") -> Storage:
        """A new storage of this shape on the store's device, its bytes counted in the
        budget first (ResultTooLarge, nothing allocated, when they do not fit)."""
        nbytes = math.prod(shape) * dtype.itemsize
        self._reserve(name, nbytes, verb)
        try:
            if self.host_memory is not None and nbytes >= MIN_RECYCLED_BYTES:
                t = self.host_memory.empty(shape, dtype)
            else:
                t = torch.empty(shape, dtype=dtype, device=self.device)
        except BaseException:
            self._unreserve(nbytes)
            raise
        return self._track(Storage(t), nbytes)

    def _entry(self, name: str, storage: Storage, names: tuple[str, ...], source: str,
               version: int) -> Entry:
        t = storage.tensor
        if t.ndim and storage.rows != storage.capacity:
            t = t[: storage.rows]
        meta = TensorMeta(name=name, shape=tuple(t.shape), dtype=t.dtype,
                          device=str(t.device), dim_names=names)
        return Entry(meta, t, source, version, storage)

    def _publish(self, entry: Entry) -> None:
        with self._lock:
            self._entries[entry.meta.name] = entry
            self._versions[entry.version] = entry

    def _next_version(self) -> int:
        """A version number never issued before: where the store persists, not even before
        a restart (numbers are leased from the data directory, `VERSION_LEASE` at a time)."""
        with self._lock:
            if self.persist is not None and self._version >= self._leased:
                if not self._leased:  # the first since the data directory was opened
                    self._version = max(self._version, self.persist.leased_versions())
                self.persist.lease_versions(self._version + VERSION_LEASE)
                self._leased = self._version + VERSION_LEASE
            self._version += 1
            return self._version

    def _put(self, name: str, storage: Storage, names: tuple[str, ...], source: str,
             version: int | None = None) -> Entry:
        """Hold `storage` (its bytes already counted), replacing any tensor of that name."""
        with self._write:
            entry = self._entry(name, storage, names, source, version or self._next_version())
            self._publish(entry)
        log.info("holding %s: %s %s on %s (%s)", name, list(entry.meta.shape),
                 entry.meta.dtype, entry.tensor.device, source)
        return entry

    # ------------------------------------------------------------------ writes
    def put(self, name: str, storage: Storage, dim_names: Iterable[str] = (), *,
            replace: bool = False) -> Entry:
        """Publish an uploaded tensor (`storage`, from `allocate`, filled) as the newest
        version of `name`: on disk first where the store persists, then visible to new
        reads; readers of the version it replaces finish on that version."""
        check_name(name)
        names = check_dim_names(name, tuple(dim_names), storage.tensor.ndim)
        with self._write:
            if not replace and name in self._entries:
                raise TensorExists(
                    f"the server already holds a tensor named {shorten(name, 80)!r} "
                    f"(version {self._entries[name].version}); put(..., replace=True) "
                    f"replaces it"
                )
            entry = self._entry(name, storage, names, "put", self._next_version())
            if self.persist is not None:
                self.persist.write_base(entry)
            self._publish(entry)
        return entry

    def append(self, name: str, rows: torch.Tensor, dim_names: Iterable[str] = ()) -> Entry:
        """Add `rows` (on the store's device) along dimension 0 of `name`, creating it when
        missing. Amortised O(rows): the storage grows geometrically and older versions keep
        seeing their own rows. dtype and trailing shape must match the tensor's."""
        check_name(name)
        if rows.ndim == 0:
            raise InvalidSelection(
                f"append to {shorten(name, 80)!r}: rows must have at least one dimension "
                f"(dimension 0 is the one that grows); got a scalar"
            )
        with self._write:
            old = self._entries.get(name)
            if old is None:
                names = check_dim_names(name, tuple(dim_names), rows.ndim)
                storage = self.allocate(name, rows.dtype, tuple(rows.shape), "appending to")
                storage.tensor.copy_(rows)
                entry = self._entry(name, storage, names, "append", self._next_version())
                if self.persist is not None:
                    self.persist.write_base(entry)
                self._publish(entry)
                return entry
            m = old.meta
            if rows.dtype != m.dtype or tuple(rows.shape[1:]) != m.shape[1:] or not m.shape:
                raise InvalidSelection(
                    f"append to {shorten(name, 80)!r}: rows of dtype "
                    f"{str(rows.dtype).removeprefix('torch.')} and shape {list(rows.shape)} "
                    f"do not match the tensor's dtype {str(m.dtype).removeprefix('torch.')} "
                    f"and shape {list(m.shape)} (rows need shape [n, "
                    f"{', '.join(map(str, m.shape[1:]))}])".replace("[n, ]", "[n]")
                )
            have, n = m.shape[0], rows.shape[0]
            current = old.storage
            storage = (self._grow(old, have + n) if current is None or current.rows != have
                       or have + n > current.capacity else current)
            storage.tensor[have : have + n].copy_(rows)
            rows_before = storage.rows
            storage.rows = have + n
            try:
                entry = self._entry(name, storage, m.dim_names, "append",
                                    self._next_version())
                if self.persist is not None:
                    self.persist.write_rows(entry, rows, old.version)
            except BaseException:
                storage.rows = rows_before
                raise
            self._publish(entry)
            return entry

    def _grow(self, old: Entry, need: int) -> Storage:
        """A new storage for `need` rows and more (double the capacity, or exactly `need`
        where the double does not fit the budget), holding `old`'s rows."""
        m = old.meta
        row_shape = m.shape[1:]
        cap = old.storage.capacity if old.storage is not None else m.shape[0]
        try:
            storage = self.allocate(m.name, m.dtype, (max(need, 2 * cap, 16), *row_shape),
                                    "appending to")
        except ResultTooLarge:
            storage = self.allocate(m.name, m.dtype, (need, *row_shape), "appending to")
        storage.tensor[: m.shape[0]].copy_(old.tensor)
        storage.rows = m.shape[0]
        return storage

    def drop(self, name: str) -> int:
        """Remove `name` (on disk first where the store persists); its memory is freed when
        its last reader ends. The version dropped; TensorNotFound when missing."""
        with self._write:
            entry = self.get(name)
            if self.persist is not None:
                self.persist.drop(name)
            with self._lock:
                del self._entries[name]
        log.info("dropped %s (version %d)", name, entry.version)
        return entry.version

    def restore(self) -> list[Entry]:
        """Hold what the store's data directory holds, as it was acknowledged."""
        assert self.persist is not None
        out = []
        for name, tensor, names, version in self.persist.load(self):
            out.append(self._put(name, tensor, names, "data-dir", version))
            with self._lock:
                self._version = max(self._version, version)
        return out

    def load_file(
        self, path: str | os.PathLike[str], key: str | None = None, name: str | None = None,
        *, progress: bool = True, rows: tuple[int, int] | None = None,
    ) -> Entry:
        """Load one tensor of a safetensors file; `key` may be omitted for one-tensor files.
        `rows` (start, stop) loads only those rows of dimension 0 (a shard of the tensor),
        read slab by slab from the file: the rest is never read."""
        path = Path(path)
        if not path.is_file():
            raise TensorNotFound(f"no such file: {path}")
        with _open(path) as f:
            keys = list(f.keys())
            if key is None:
                if not keys:
                    raise InvalidSelection(f"{path} holds no tensors")
                if len(keys) != 1:
                    raise InvalidSelection(
                        f"{path} holds {len(keys)} tensors ({', '.join(keys[:10])}); "
                        f"name one with {path}:KEY"
                    )
                key = keys[0]
            if key not in keys:
                raise TensorNotFound(f"{path} holds no tensor {key!r}; it holds: {', '.join(keys)}")
            meta = f.metadata()
            shape = f.get_slice(key).get_shape()
            names = _dim_names_from(meta, key, len(shape), path)
            source = f"{path}:{key}"
            if rows is not None:
                _check_rows(name or key, path, shape, rows)
                source += f" rows {rows[0]}:{rows[1]}"
            storage = self._read(f, key, f"{name or key}", progress, rows)  # reserves bytes
        return self._put(name or key, storage, names, source)

    def load_dir(self, directory: str | os.PathLike[str], *, progress: bool = True) -> list[Entry]:
        """Load every tensor of every `.safetensors` file in `directory`, named as
        `dir_sources` names them."""
        return [self.load_file(path, key, name, progress=progress)
                for name, path, key in self.dir_sources(directory)]

    @staticmethod
    def dir_sources(directory: str | os.PathLike[str]) -> list[tuple[str, Path, str]]:
        """(name, file, key) of every tensor of every `.safetensors` file in `directory`,
        nothing loaded. A tensor is named by its key; a key found in several files is named
        `FILESTEM/KEY` instead, in every file that has it."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TensorNotFound(f"no such directory: {directory}")
        keys: dict[Path, list[str]] = {}
        owners: dict[str, int] = {}
        for fp in sorted(directory.glob("*.safetensors")):
            with _open(fp) as f:
                keys[fp] = list(f.keys())
            for k in keys[fp]:
                owners[k] = owners.get(k, 0) + 1
        return [(k if owners[k] == 1 else f"{fp.stem}/{k}", fp, k)
                for fp, ks in keys.items() for k in ks]

    def _read(self, f: object, key: str, label: str, progress: bool,
              rows: tuple[int, int] | None = None) -> Storage:
        """Read a tensor (or `rows` of its dimension 0) slab by slab (at most
        `_LOAD_SLAB_BYTES` of host memory at a time) straight into a storage on the store's
        device, its bytes counted in the budget."""
        sl = f.get_slice(key)  # type: ignore[attr-defined]
        shape = tuple(sl.get_shape())
        first = 0
        if rows is not None:
            first, shape = rows[0], (rows[1] - rows[0], *shape[1:])
        dtype = dtype_from_code(sl.get_dtype())
        if dtype is None:
            raise InvalidSelection(f"tensor {key!r} has unsupported dtype {sl.get_dtype()}")
        storage = self.allocate(label, dtype, shape, "loading")
        out = storage.tensor
        nbytes = out.numel() * out.element_size()
        if not shape:  # (never with rows: a 0-d tensor has no dimension 0)
            out.copy_(f.get_tensor(key))  # type: ignore[attr-defined]
            return storage
        if nbytes == 0:
            return storage
        bar = tqdm(
            total=nbytes, unit="B", unit_scale=True, desc=f"loading {label}",
            disable=not progress or nbytes < _PROGRESS_MIN_BYTES, mininterval=0.5,
        )
        with bar:
            _read_into(sl, out, (), _LOAD_SLAB_BYTES, bar.update, first)
        return storage


def _check_rows(name: str, path: Path, shape: Sequence[int], rows: tuple[int, int]) -> None:
    """Refuse rows that are not within dimension 0 of the file's tensor, naming both."""
    start, stop = rows
    if not shape:
        raise InvalidSelection(
            f"rows {start}:{stop} of tensor {shorten(name, 80)!r} ({path}): a 0-d tensor has "
            f"no dimension 0 to take rows of")
    if not 0 <= start <= stop <= shape[0]:
        raise SelectionOutOfRange(
            f"rows {start}:{stop} of tensor {shorten(name, 80)!r} ({path}) are out of range "
            f"for dimension 0 of size {shape[0]}")


def check_dim_names(name: str, names: tuple[str, ...], ndim: int) -> tuple[str, ...]:
    if names and len(names) != ndim:
        raise InvalidSelection(
            f"tensor {shorten(name, 80)!r} has {ndim} dimensions but {len(names)} names "
            f"were given ({', '.join(shorten(n, 40) for n in names[:8])})"
        )
    return names


def _open(path: Path) -> Any:
    """`safe_open` of a file; a file that is not safetensors is refused, naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors' own error type: the header does not parse
        raise InvalidSelection(f"{path} is not a readable safetensors file: {exc}") from None


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda" or (a.index is not None and b.index is not None):
        return a == b
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current)


def _read_into(
    sl: Any, out: torch.Tensor, prefix: tuple[slice, ...], slab_bytes: int,
    done: Callable[[int], object], first: int = 0,
) -> None:
    """Copy the region `prefix` of a safetensors slice into the same region of `out`, in
    reads of at most `slab_bytes` (down to one innermost run where a run is larger): the
    host never holds more than one slab, whatever the shape. Row ``i`` of `out` is row
    ``first + i`` of the file's tensor."""
    d = len(prefix)
    shape = out.shape
    row = math.prod(shape[d + 1 :]) * out.element_size()
    if row > slab_bytes and d + 1 < len(shape):
        for i in range(shape[d]):
            _read_into(sl, out, (*prefix, slice(i, i + 1)), slab_bytes, done, first)
        return
    step = max(1, slab_bytes // max(row, 1))
    for a in range(0, shape[d], step):
        idx = (*prefix, slice(a, min(a + step, shape[d])))
        lead = idx[0]
        piece = sl[(slice(lead.start + first, lead.stop + first), *idx[1:])]
        target = out[idx]
        target.copy_(piece.reshape(target.shape))
        done(piece.numel() * piece.element_size())
