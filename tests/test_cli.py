"""The command line and the store's loading rules."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorslice.client import Client, InvalidSelection, TensorNotFound
from tensorslice.core.parse import parse_index
from tensorslice.server import TensorStore
from tensorslice.server._cli import main


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:10, [1,3,5]", (slice(0, 10), [1, 3, 5])),
        ("..., None, -1", (Ellipsis, None, -1)),
        ("::-2", (slice(None, None, -2),)),
        ("[[0, 1], [2, 3]], [True, False]", ([[0, 1], [2, 3]], [True, False])),
        ("", ()),
        ("3", (3,)),
    ],
)
def test_parse_index(text: str, expected: tuple[object, ...]) -> None:
    assert parse_index(text) == expected


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os')", "cannot parse index \"__import__('os')\": \"__import__('os')\" is "
                             "not an integer, range, list, ... or None"),
        ("1.5", "cannot parse index '1.5': '1.5' is not an integer, range, list, ... or None"),
        ("0:", None),
    ],
)
def test_parse_index_refuses(text: str, message: str | None) -> None:
    if message is None:
        assert parse_index(text) == (slice(0, None),)
        return
    with pytest.raises(InvalidSelection, match=re.escape(message)):
        parse_index(text)


@pytest.mark.e2e
def test_get_prints_shape_plan_and_writes_file(
    server: str, demo: torch.Tensor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["get", server, "demo", "0:3, [3, 1], ..., 0", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shape: [3, 2, 6]" in text
    assert "dtype: float32" in text
    assert "plan:" in text and "gather" in text
    assert torch.equal(load_file(str(out))["values"], demo[0:3, [3, 1], ..., 0])


@pytest.mark.e2e
def test_get_unknown_tensor_exits_1(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", server, "nope", "0"]) == 1
    assert "TensorNotFound: no tensor named 'nope'" in capsys.readouterr().err


@pytest.mark.e2e
def test_ls(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", server]) == 0
    out = capsys.readouterr().out
    assert re.search(r"demo\s+\[16, 12, 6, 5\]\s+float32\s+\S+\s+23040\s+N,C,H,W", out), out


@pytest.mark.unit
def test_store_file_rules(tmp_path: Path) -> None:
    a = torch.arange(12.0).reshape(3, 4)
    save_file({"a": a, "b": a * 2}, str(tmp_path / "multi.safetensors"))
    save_file({"x": a}, str(tmp_path / "one.safetensors"), metadata={"dim_names": "rows,cols"})
    store = TensorStore()
    with pytest.raises(InvalidSelection, match=re.escape("holds 2 tensors (a, b); name one")):
        store.load_file(tmp_path / "multi.safetensors")
    with pytest.raises(TensorNotFound, match="holds no tensor 'c'; it holds: a, b"):
        store.load_file(tmp_path / "multi.safetensors", "c")
    e = store.load_file(tmp_path / "multi.safetensors", "b", "bee")
    assert torch.equal(e.tensor, a * 2) and e.meta.name == "bee"
    e = store.load_file(tmp_path / "one.safetensors")
    assert e.meta.name == "x" and e.meta.dim_names == ("rows", "cols")
    with pytest.raises(TensorNotFound, match="no such file"):
        store.load_file(tmp_path / "missing.safetensors")


@pytest.mark.unit
def test_store_dir_names_clashes_by_file(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2), "y": torch.ones(3)}, str(tmp_path / "part1.safetensors"))
    save_file({"x": torch.ones(4)}, str(tmp_path / "part2.safetensors"))
    store = TensorStore()
    store.load_dir(tmp_path)
    names = sorted(e.meta.name for e in store.entries())
    assert names == ["part1/x", "part2/x", "y"]
    assert store.get("part2/x").meta.shape == (4,)


def _wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise AssertionError(f"no line matching {pattern!r}")


@pytest.mark.e2e
def test_serve_subprocess_demo_and_sigterm(tmp_path: Path) -> None:
    x = torch.randn(40, 3)
    path = tmp_path / "x.safetensors"
    save_file({"x": x}, str(path))
    port_probe = subprocess.run(
        [sys.executable, "-c", "import socket;s=socket.socket();s.bind(('127.0.0.1',0));"
         "print(s.getsockname()[1])"], capture_output=True, text=True, check=True)
    port = int(port_probe.stdout)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorslice.server._cli", "serve", "--port", str(port),
         "--tensor", f"x={path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = _wait_for_line(proc, r"serving 1 tensor\(s\) on (\S+)")
        with Client(address, timeout=10) as c:
            assert torch.equal(c.tensor("x")[5:9], x[5:9])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.e2e
def test_serve_without_tensors_serves_demo() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorslice.server._cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = _wait_for_line(proc, r"serving 1 tensor\(s\) on (\S+)")
        hint = _wait_for_line(proc, r"(no tensors given: serving a generated demo tensor)")
        assert hint
        with Client(address, timeout=10) as c:
            assert [t.name for t in c.list_tensors()] == ["demo"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
