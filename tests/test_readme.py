"""The README runs itself: every shell and Python block of it, against a live server on
127.0.0.1, so that it cannot drift from the code; and `serve --help` and the README list
the same options with the same defaults.

A block that cannot run here (it needs CUDA, files under /data, certificates, or it runs
this very suite) is preceded by ``<!-- not-run: REASON -->``; there are few of them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _output import OutputLines
from safetensors.torch import save_file

from tensorslice.server._cli import build_parser

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parent.parent / "README.md"
README_ADDRESS = "127.0.0.1:50051"
# Blocks that need what no test machine has: the whole suite, /data and CUDA, certificates,
# Docker (scripts/docker-smoke runs it), a Kubernetes cluster, a Ray cluster.
MAX_NOT_RUN = 7
BLOCK_SECONDS = 180


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    not_run: str | None  # the reason, where the block is marked not to run

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def blocks(text: str) -> list[Block]:
    """Every fenced block, with the ``<!-- not-run: ... -->`` comment on the line above."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        note = re.fullmatch(r"<!-- not-run: (.+?) -->", before.strip())
        out.append(Block(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2),
                         note.group(1) if note else None))
    return out


BLOCKS = blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.lang in ("bash", "python") and b.not_run is None]


def test_blocks_are_marked_and_few_are_skipped() -> None:
    langs = {b.lang for b in BLOCKS}
    assert langs <= {"bash", "python", "text", ""}, langs
    not_run = [b for b in BLOCKS if b.not_run is not None]
    assert all(b.lang in ("bash", "python") for b in not_run)
    assert len(not_run) <= MAX_NOT_RUN, [str(b) for b in not_run]
    assert len(re.findall(r"^<!-- not-run:", README.read_text(), re.M)) == len(not_run)
    assert sum(b.lang == "python" for b in RUNNABLE) >= 4
    assert sum(b.lang == "bash" for b in RUNNABLE) >= 1


def test_every_shell_block_pastes() -> None:
    """Run or not, each shell block is what a shell would read as written: no line of it
    (continuations joined) starts with an option, as a line missing its ``\\`` would."""
    for b in BLOCKS:
        if b.lang != "bash":
            continue
        for line in b.code.replace("\\\n", " ").splitlines():
            assert not line.strip().startswith("-"), f"{b}: {line.strip()!r}"
        check = subprocess.run(["bash", "-n", "-c", b.code], capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, f"{b}: {check.stderr}"


# ---------------------------------------------------------------------------- the server


def _files(root: Path) -> list[str]:
    """The tensors the README's blocks use, as `serve` options."""
    g = torch.Generator().manual_seed(0)
    acts = root / "acts.safetensors"
    save_file({"acts": torch.randn(64, 32, 16, 16, generator=g)}, str(acts),
              metadata={"dim_names": "N,C,H,W"})
    data = root / "data.safetensors"
    n = 2048
    save_file({"x": torch.randn(n, 8, generator=g), "y": torch.arange(n),
               "features": torch.randn(100, 4, generator=g),
               "labels": torch.arange(100)}, str(data))
    return ["--tensor", f"acts={acts}", *[a for k in ("x", "y", "features", "labels")
                                          for a in ("--tensor", f"{k}={data}:{k}")]]


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("readme-data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorslice.server._cli", "serve", "--port", "0",
         "--no-progress", *_files(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield OutputLines(proc).wait_for(r"serving 5 tensor\(s\) on (\S+)", timeout=120)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_block_runs(block: Block, address: str, tmp_path: Path) -> None:
    code = block.code.replace(README_ADDRESS, address)
    bin_dir = str(Path(sys.executable).parent)  # where the `tensorslice` command is
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = ([sys.executable, "-c", code] if block.lang == "python"
           else ["bash", "-e", "-o", "pipefail", "-c", code])
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=BLOCK_SECONDS, stdin=subprocess.DEVNULL)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{block} failed:\n{output}"
    assert "Traceback" not in output, f"{block}:\n{output}"


# ---------------------------------------------------------------------------- serve --help


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve: argparse.ArgumentParser = sub.choices["serve"]
    return serve


def _serve_options() -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in _serve_parser()._actions
            if a.option_strings and a.option_strings[-1].startswith("--")
            and a.dest not in ("help", "log_level")}


def _readme_synopsis() -> set[str]:
    block = next(b.code for b in BLOCKS if b.lang == "text" and "tensorslice serve [" in b.code)
    start = block.index("tensorslice serve")
    serve = block[start:block.index("\ntensorslice ", start)]
    return set(re.findall(r"\[(--[a-z-]+)", serve)) | set(re.findall(r" (--[a-z-]+) ", serve))


def _readme_rows() -> dict[str, str]:
    """Each option's table row in the README: ``| `--opt ARG` | meaning | default |``."""
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| `(--[a-z-]+)[^`]*`(?: \([^)]*\))? \|(.*)", line.strip())
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_serve_synopsis_lists_every_option() -> None:
    assert _readme_synopsis() == set(_serve_options())


def test_serve_help_and_readme_give_the_same_defaults() -> None:
    rows = _readme_rows()
    help_text = " ".join(_serve_parser().format_help().split())
    text = " ".join(README.read_text().split())
    for option, action in _serve_options().items():
        assert option in text, f"{option} is not in the README"
        if isinstance(action, argparse._StoreTrueAction) or action.default in (None, []):
            continue
        shown = str(action.default)
        assert f"default: {shown}" in help_text, f"{option}: --help hides its default"
        row = rows.get(option, "")
        plain = shown.removesuffix(".0")
        assert re.search(rf"(?<![\d.]){re.escape(plain)}(\.0)?( s|GiB| MiB|\b|`)", row), (
            f"{option}: README row {row!r} does not give the default {shown}")
