"""The data directory (`serve --data-dir`): what was put, appended and dropped, on disk
before the call that did it returns, and served again after a restart.

Layout: one folder per tensor, named by a hash of its name (any name fits a file name),
holding safetensors files whose ``__metadata__`` names the tensor, its dimension names and
the version the file brings it to:

- ``base-VERSION.safetensors``: the whole tensor at that version (a put, a first append, a
  compaction);
- ``seg-VERSION.safetensors``: rows one append added, bringing the tensor to VERSION.

Every file is written to a temporary name, fsynced, renamed into place, and the folder
fsynced: a file is there whole or not at all. A restart takes the newest base and the
segments after it, in order; files an interrupted write left (temporaries, a base's
predecessors, a dropped folder) are removed. Segments are compacted into a new base once
their bytes reach the base's: appends cost amortised O(rows) on disk too. A drop renames
the folder away (one atomic step, fsynced), then deletes it.

Version numbers are never issued twice, across restarts too: the file ``versions`` holds a
number that every version issued so far is below or equal to (a lease, written as the files
are, before a version beyond it is issued), and a restarted server issues versions above
it. So a reader pinned to a version of a name that was dropped, replaced or loaded from a
file never meets another tensor under that number.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from safetensors import safe_open

from tensorslice.core.codec import safetensors_header

if TYPE_CHECKING:
    from tensorslice.server._store import Entry, Storage, TensorStore

__all__ = ["DataDir"]

log = logging.getLogger("tensorslice.server")

_WRITE_BYTES = 64 << 20
_DROPPED = ".dropped-"
_TMP = ".tmp-"
_VERSIONS = "versions"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensor(f: BinaryIO, t: torch.Tensor) -> None:
    """`t`'s bytes (contiguous) written from its memory, a slab at a time."""
    nbytes = t.numel() * t.element_size()
    if not nbytes:
        return
    flat = t.reshape(-1).view(torch.uint8)
    for start in range(0, nbytes, _WRITE_BYTES):
        end = min(start + _WRITE_BYTES, nbytes)
        piece = flat[start:end] if t.device.type == "cpu" else flat[start:end].cpu()
        f.write(memoryview((ctypes.c_char * (end - start)).from_address(piece.data_ptr())))


class DataDir:
    """A store's data directory (see the module's description)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def _folder(self, name: str) -> Path:
        return self.path / hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()

    def leased_versions(self) -> int:
        """The number no version issued so far exceeds (0: none leased yet)."""
        try:
            text = (self.path / _VERSIONS).read_text().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text.isdigit() else 0

    def lease_versions(self, upto: int) -> None:
        """Record, durably, that versions up to `upto` may be issued (before they are)."""
        tmp = self.path / f"{_TMP}{uuid.uuid4().hex}"
        with open(tmp, "w") as f:
            f.write(f"{upto}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / _VERSIONS)
        _fsync_dir(self.path)

    def _write(self, folder: Path, filename: str, t: torch.Tensor,
               metadata: dict[str, str]) -> None:
        new = not folder.exists()
        folder.mkdir(exist_ok=True)
        if new:
            _fsync_dir(self.path)
        header, _ = safetensors_header([("values", t.dtype, tuple(t.shape))], metadata)
        tmp = folder / f"{_TMP}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(header)
            _write_tensor(f, t.contiguous())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / filename)
        _fsync_dir(folder)

    @staticmethod
    def _metadata(entry: Entry) -> dict[str, str]:
        return {"tensorslice.name": entry.meta.name,
                "tensorslice.dim_names": json.dumps(list(entry.meta.dim_names)),
                "tensorslice.version": str(entry.version)}

    def write_base(self, entry: Entry) -> None:
        """The whole tensor at `entry`'s version; older files of it removed after."""
        folder = self._folder(entry.meta.name)
        self._write(folder, f"base-{entry.version:020d}.safetensors", entry.tensor,
                    self._metadata(entry))
        for p in folder.iterdir():
            if p.name.startswith(("base-", "seg-")) and _version_of(p) < entry.version:
                p.unlink()

    def write_rows(self, entry: Entry, rows: torch.Tensor, previous: int) -> None:
        """Rows an append added, bringing the tensor from version `previous` to `entry`'s;
        compacted into a new base once the segments weigh as much as the base."""
        folder = self._folder(entry.meta.name)
        metadata = self._metadata(entry) | {"tensorslice.after": str(previous)}
        self._write(folder, f"seg-{entry.version:020d}.safetensors", rows, metadata)
        segs = sum(p.stat().st_size for p in folder.glob("seg-*.safetensors"))
        base = sum(p.stat().st_size for p in folder.glob("base-*.safetensors"))
        if segs >= base:
            self.write_base(entry)

    def drop(self, name: str) -> None:
        folder = self._folder(name)
        if not folder.exists():
            return
        gone = self.path / f"{_DROPPED}{uuid.uuid4().hex}"
        os.replace(folder, gone)
        _fsync_dir(self.path)
        shutil.rmtree(gone, ignore_errors=True)

    def load(self, store: TensorStore) -> Iterator[tuple[str, Storage, tuple[str, ...], int]]:
        """(name, storage, dimension names, version) of every tensor held, as the last
        acknowledged write left it; leftovers of interrupted writes are removed."""
        for folder in sorted(self.path.iterdir()):
            if folder.name.startswith(_TMP) and folder.is_file():  # an unfinished lease
                folder.unlink()
                continue
            if folder.name.startswith(_DROPPED):
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if not folder.is_dir():
                continue
            for tmp in folder.glob(f"{_TMP}*"):
                tmp.unlink()
            bases = sorted(folder.glob("base-*.safetensors"), key=_version_of)
            if not bases:
                continue
            base = bases[-1]
            v0 = _version_of(base)
            segs = sorted((p for p in folder.glob("seg-*.safetensors") if _version_of(p) > v0),
                          key=_version_of)
            yield self._read(store, base, segs)

    @staticmethod
    def _read(store: TensorStore, base: Path, segs: list[Path]
              ) -> tuple[str, Storage, tuple[str, ...], int]:
        parts = []
        meta: dict[str, str] = {}
        for p in (base, *segs):
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                parts.append(f.get_tensor("values"))
        name = meta["tensorslice.name"]
        names = tuple(json.loads(meta.get("tensorslice.dim_names", "[]")))
        version = int(meta["tensorslice.version"])
        full = parts[0] if len(parts) == 1 else torch.cat(parts)
        storage = store.allocate(name, full.dtype, tuple(full.shape), "restoring")
        storage.tensor.copy_(full)
        log.info("restored %s: %s (version %d, %d segment(s))", name, list(full.shape),
                 version, len(segs))
        return name, storage, names, version


def _version_of(p: Path) -> int:
    return int(p.name.split("-", 1)[1].split(".", 1)[0])
