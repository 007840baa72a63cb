"""The scripts say plainly what they could not do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_says_when_torch_does_not_import(tmp_path: Path) -> None:
    (tmp_path / "torch.py").write_text("raise ImportError('no torch in this environment')\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path),
           "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (f"gpu-check: torch does not import for {sys.executable} "
            "(no torch in this environment)") in proc.stdout
    assert "nothing was checked" in proc.stdout
    assert "no CUDA device" not in proc.stdout
