"""Shared fixtures: an in-process server on a free port, on the test device.

The device is `TENSORSLICE_TEST_DEVICE` when set, else `cuda` where CUDA is present, else
`cpu`: on a GPU machine the whole suite runs against device-resident tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

from tensorslice.client import Client
from tensorslice.server import ServerConfig, TensorStore, create_server, demo_tensor

# CI runs the same examples every time (a failure there is reproducible); people running
# the suite locally explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _test_device() -> str:
    env = os.environ.get("TENSORSLICE_TEST_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


TEST_DEVICE = _test_device()


def pytest_report_header(config: pytest.Config) -> str:
    return f"tensorslice test device: {TEST_DEVICE}"


LAYERS = ("unit", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test names its layer (`unit`: no server, no network; `e2e`: a server and the
    # network), so `scripts/test -m unit` and `-m e2e` together run the whole suite.
    unlayered = [item.nodeid for item in items
                 if sum(item.get_closest_marker(m) is not None for m in LAYERS) != 1]
    if unlayered:
        raise pytest.UsageError(
            "tests must be marked exactly one of unit or e2e: " + ", ".join(unlayered)
        )
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    return TEST_DEVICE


@pytest.fixture(scope="session")
def demo() -> torch.Tensor:
    """The tensor the `server` fixture holds as 'demo' (a CPU copy, for references)."""
    return demo_tensor((16, 12, 6, 5))


@pytest.fixture(scope="session")
def store(demo: torch.Tensor) -> TensorStore:
    s = TensorStore(device=TEST_DEVICE)
    s.add("demo", demo, dim_names=("N", "C", "H", "W"))
    return s


@pytest.fixture(scope="session")
def server(store: TensorStore) -> Iterator[str]:
    """Address of a running in-process server over `store`."""
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(max_result_bytes=64 << 20))
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(grace=None)


@pytest.fixture()
def client(server: str) -> Iterator[Client]:
    with Client(server, timeout=30) as c:
        yield c
