"""The store: tensors held in memory (host or device), by name, with their metadata."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from tensorslice.client._errors import InvalidSelection, TensorNotFound
from tensorslice.client._wire import DTYPE_NAMES, dtype_from_code
from tensorslice.server._planner import TensorMeta

__all__ = ["DEMO_DIM_NAMES", "DEMO_NAME", "Entry", "TensorStore", "demo_tensor"]

log = logging.getLogger("tensorslice.server")

DEMO_NAME = "demo"
DEMO_DIM_NAMES = ("N", "C", "H", "W")
_PROGRESS_MIN_BYTES = 64 << 20
_LOAD_SLAB_BYTES = 64 << 20


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


def _dim_names_from(metadata: dict[str, str] | None, key: str, ndim: int) -> tuple[str, ...]:
    """Dimension names a file declares: `__metadata__` key `dim_names.KEY` (or `dim_names`
    for every tensor), a comma-separated list with one name per dimension."""
    if not metadata:
        return ()
    raw = metadata.get(f"dim_names.{key}", metadata.get("dim_names"))
    if not raw:
        return ()
    names = tuple(n.strip() for n in raw.split(","))
    return names if len(names) == ndim else ()


class TensorStore:
    """Named tensors resident on one device."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidSelection(f"device {self.device} requested but CUDA is not available")
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._version = 0

    # ------------------------------------------------------------------ access
    def get(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            held = ", ".join(sorted(self._entries)) or "none"
            raise TensorNotFound(f"no tensor named {name!r}; the server holds: {held}")
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
        self._reserve(name, tensor.numel() * tensor.element_size())
        t = tensor.to(self.device).contiguous()
        return self._put(name, t, names, source)

    def _reserve(self, name: str, nbytes: int) -> None:
        """Refuse a tensor the device cannot hold (overridden by device accounting)."""
        del name, nbytes

    def _put(self, name: str, t: torch.Tensor, names: tuple[str, ...], source: str) -> Entry:
        with self._lock:
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
        with safe_open(str(path), framework="pt") as f:
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
            t = self._read(f, key, f"{name or key}", progress)
        names = _dim_names_from(meta, key, t.ndim)
        return self._put(name or key, t, names, f"{path}:{key}")

    def load_dir(self, directory: str | os.PathLike[str], *, progress: bool = True) -> list[Entry]:
        """Load every tensor of every `.safetensors` file in `directory`. A tensor is named
        by its key; keys found in several files are named `FILESTEM/KEY` instead."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TensorNotFound(f"no such directory: {directory}")
        files = sorted(directory.glob("*.safetensors"))
        owners: dict[str, list[Path]] = {}
        for fp in files:
            with safe_open(str(fp), framework="pt") as f:
                for k in f.keys():
                    owners.setdefault(k, []).append(fp)
        out = []
        for fp in files:
            with safe_open(str(fp), framework="pt") as f:
                keys = list(f.keys())
            for k in keys:
                nm = k if len(owners[k]) == 1 else f"{fp.stem}/{k}"
                out.append(self.load_file(fp, k, nm, progress=progress))
        return out

    def _read(self, f: object, key: str, label: str, progress: bool) -> torch.Tensor:
        """Read a tensor slab by slab straight into a tensor on the store's device."""
        sl = f.get_slice(key)  # type: ignore[attr-defined]
        shape = tuple(sl.get_shape())
        dtype = dtype_from_code(sl.get_dtype())
        if dtype is None:
            raise InvalidSelection(f"tensor {key!r} has unsupported dtype {sl.get_dtype()}")
        nbytes = math.prod(shape) * dtype.itemsize
        self._reserve(label, nbytes)
        if not shape or shape[0] == 0:
            return f.get_tensor(key).to(self.device).contiguous()  # type: ignore[attr-defined,no-any-return]
        out = torch.empty(shape, dtype=dtype, device=self.device)
        row = max(1, nbytes // shape[0])
        step = max(1, _LOAD_SLAB_BYTES // row)
        bar = tqdm(
            total=nbytes, unit="B", unit_scale=True, desc=f"loading {label}",
            disable=not progress or nbytes < _PROGRESS_MIN_BYTES, mininterval=0.5,
        )
        with bar:
            for a in range(0, shape[0], step):
                piece = sl[a : a + step]
                out[a : a + piece.shape[0]].copy_(piece)
                bar.update(piece.numel() * dtype.itemsize)
        return out

