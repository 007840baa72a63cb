"""The store: tensors held in memory (host or device), by name, with their metadata."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from tensorslice.core.codec import DTYPE_NAMES, dtype_from_code
from tensorslice.core.errors import InvalidSelection, ResultTooLarge, TensorNotFound
from tensorslice.server._limits import shorten
from tensorslice.server._model import TensorMeta

__all__ = [
    "DEMO_DIM_NAMES",
    "DEMO_NAME",
    "Entry",
    "TensorStore",
    "default_device_budget",
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


@dataclass(frozen=True)
class Entry:
    """A resident tensor: contiguous, on the store's device."""

    meta: TensorMeta
    tensor: torch.Tensor
    source: str
    version: int


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
        self, device: str | torch.device = "cpu", *, max_device_memory: int | None = None
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
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._version = 0
        self._used = 0  # bytes of the held tensors plus loads in progress

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
    def get(self, name: str) -> Entry:
        entry = self._entries.get(name)
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
        self._reserve(name, nbytes)
        try:
            if _same_device(tensor.device, self.device) and tensor.is_contiguous():
                t = tensor
            else:  # one allocation on the device, filled straight from the source's layout
                t = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
                t.copy_(tensor)
        except BaseException:
            self._unreserve(nbytes)
            raise
        return self._put(name, t, names, source)

    def _reserve(self, name: str, nbytes: int) -> None:
        """Count `nbytes` against the device budget, or refuse them (ResultTooLarge) when
        the tensors held plus the loads in progress would exceed it."""
        with self._lock:
            budget = self.max_device_memory
            if budget is not None and self._used + nbytes > budget:
                free = max(0, budget - self._used)
                raise ResultTooLarge(
                    f"loading {name!r} needs {nbytes} bytes on {self._device_label()} but only "
                    f"{free} of the {budget}-byte budget are free"
                )
            self._used += nbytes

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes

    def _put(self, name: str, t: torch.Tensor, names: tuple[str, ...], source: str) -> Entry:
        """Hold `t` (its bytes already reserved), replacing any tensor of that name."""
        with self._lock:
            old = self._entries.get(name)
            if old is not None:
                self._used -= old.meta.nbytes
            self._version += 1
            meta = TensorMeta(
                name=name,
                shape=tuple(t.shape),
                dtype=t.dtype,
                device=str(t.device),
                dim_names=names,
            )
            entry = Entry(meta, t, source, self._version)
            self._entries[name] = entry
        log.info("holding %s: %s %s on %s (%s)", name, list(t.shape),
                 meta.dtype, t.device, source)
        return entry

    def load_file(
        self, path: str | os.PathLike[str], key: str | None = None, name: str | None = None,
        *, progress: bool = True,
    ) -> Entry:
        """Load one tensor of a safetensors file; `key` may be omitted for one-tensor files."""
        path = Path(path)
        if not path.is_file():
            raise TensorNotFound(f"no such file: {path}")
        with _open(path) as f:
            keys = list(f.keys())
            if key is None:
                if len(keys) != 1:
                    raise InvalidSelection(
                        f"{path} holds {len(keys)} tensors ({', '.join(keys[:10])}); "
                        f"name one with {path}:KEY"
                    )
                key = keys[0]
            if key not in keys:
                raise TensorNotFound(f"{path} holds no tensor {key!r}; it holds: {', '.join(keys)}")
            meta = f.metadata()
            ndim = len(f.get_slice(key).get_shape())
            names = _dim_names_from(meta, key, ndim, path)
            t = self._read(f, key, f"{name or key}", progress)  # reserves its bytes
        return self._put(name or key, t, names, f"{path}:{key}")

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

    def _read(self, f: object, key: str, label: str, progress: bool) -> torch.Tensor:
        """Read a tensor slab by slab (at most `_LOAD_SLAB_BYTES` of host memory at a time)
        straight into a tensor on the store's device, its bytes reserved in the budget."""
        sl = f.get_slice(key)  # type: ignore[attr-defined]
        shape = tuple(sl.get_shape())
        dtype = dtype_from_code(sl.get_dtype())
        if dtype is None:
            raise InvalidSelection(f"tensor {key!r} has unsupported dtype {sl.get_dtype()}")
        nbytes = math.prod(shape) * dtype.itemsize
        self._reserve(label, nbytes)
        try:
            if not shape:
                t: torch.Tensor = f.get_tensor(key)  # type: ignore[attr-defined]
                return t.to(self.device)
            out = torch.empty(shape, dtype=dtype, device=self.device)
            if nbytes == 0:
                return out
            bar = tqdm(
                total=nbytes, unit="B", unit_scale=True, desc=f"loading {label}",
                disable=not progress or nbytes < _PROGRESS_MIN_BYTES, mininterval=0.5,
            )
            with bar:
                _read_into(sl, out, (), _LOAD_SLAB_BYTES, bar.update)
            return out
        except BaseException:
            self._unreserve(nbytes)
            raise


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
    done: Callable[[int], object],
) -> None:
    """Copy the region `prefix` of a safetensors slice into the same region of `out`, in
    reads of at most `slab_bytes` (down to one innermost run where a run is larger): the
    host never holds more than one slab, whatever the shape."""
    d = len(prefix)
    shape = out.shape
    row = math.prod(shape[d + 1 :]) * out.element_size()
    if row > slab_bytes and d + 1 < len(shape):
        for i in range(shape[d]):
            _read_into(sl, out, (*prefix, slice(i, i + 1)), slab_bytes, done)
        return
    step = max(1, slab_bytes // max(row, 1))
    for a in range(0, shape[d], step):
        idx = (*prefix, slice(a, min(a + step, shape[d])))
        piece = sl[idx]
        target = out[idx]
        target.copy_(piece.reshape(target.shape))
        done(piece.numel() * piece.element_size())
