"""`serve`'s malloc setting: large blocks freed go back to the system, not to a heap that a
small long-lived block pins (`tensorslice.server._hostmem.return_large_frees`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self"),
                       reason="glibc's mallopt and /proc"),
]

# Raises glibc's dynamic threshold with one 16 MiB block, then allocates 32 blocks of 2 MiB,
# each followed by a smaller block (256 KiB) that stays, frees the large ones and prints how much of
# them is still resident (MiB).
_PROGRAM = r"""
import ctypes, re, sys
from pathlib import Path
from tensorslice.server._hostmem import return_large_frees
print(return_large_frees() if sys.argv[1] == "set" else None)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def anon():
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+)", text).group(1)) << 10
first = libc.malloc(16 << 20)
ctypes.memset(first, 1, 16 << 20)
libc.free(first)
base = anon()
blocks, pins = [], []
for _ in range(32):
    block = libc.malloc(2 << 20)
    ctypes.memset(block, 1, 2 << 20)
    blocks.append(block)
    pins.append(libc.malloc(256 << 10))
for block in blocks:
    libc.free(block)
print((anon() - base) >> 20)
"""


def _run(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], env={**environ, **env},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    setting, resident = out.split()
    return setting, int(resident)


def test_large_frees_return_to_the_system() -> None:
    setting, resident = _run("set")
    assert setting == "True"
    assert resident < 8, f"{resident} MiB of 64 MiB freed still resident"


def test_without_it_a_small_block_pins_freed_memory() -> None:
    # Why `serve` sets it: glibc's default keeps the freed 64 MiB resident here.
    _, resident = _run("default")
    assert resident >= 48, resident


def test_an_operators_setting_is_kept() -> None:
    setting, resident = _run("set", MALLOC_MMAP_THRESHOLD_=str(32 << 20))
    assert setting == "False"  # not overridden ...
    assert resident >= 48, resident  # ... and in effect: 2 MiB blocks stay in the heap
