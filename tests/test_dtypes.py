"""Every dtype safetensors and torch share is served: complex64 and the float8 variants
included, loaded from files, uploaded, read over each transport, byte for byte."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorslice.client import Client, InvalidSelection
from tensorslice.server import ServerConfig, TensorStore, create_server

pytestmark = pytest.mark.e2e

_G = torch.Generator().manual_seed(5)
TENSORS = {
    "c64": torch.complex(torch.randn(40, 3, 4, generator=_G), torch.randn(40, 3, 4, generator=_G)),
    "e4m3fnuz": (torch.randn(40, 3, 4, generator=_G) * 4).to(torch.float8_e4m3fnuz),
    "e5m2fnuz": (torch.randn(40, 3, 4, generator=_G) * 4).to(torch.float8_e5m2fnuz),
    "e4m3fn": (torch.randn(40, 3, 4, generator=_G) * 4).to(torch.float8_e4m3fn),
    "u16": torch.randint(0, 1 << 16, (40, 3, 4), generator=_G).to(torch.uint16),
    "u32": torch.randint(0, 1 << 31, (40, 3, 4), generator=_G).to(torch.uint32),
}
INDICES = [
    (slice(2, 9),),  # a view
    ([0, 7, 7, 39], slice(None), 1),  # a gather
    (slice(None), torch.tensor([True, False, True]), slice(1, 3)),  # a mask
    (5, ..., [3, 0]),
]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (float8 and the wide unsigned types lack `torch.equal`)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def test_the_codes_are_safetensors_own() -> None:
    import json

    from safetensors.torch import save

    from tensorslice.core.codec import dtype_from_code

    for name, t in TENSORS.items():
        data = save({name: t})
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        assert dtype_from_code(header[name]["dtype"]) == t.dtype, name


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("dtypes")
    for name, t in TENSORS.items():
        save_file({name: t}, str(Path(directory) / f"{name}.safetensors"))
    store = TensorStore()
    store.load_dir(directory, progress=False)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig())
    srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(grace=None)


@pytest.mark.parametrize("same_host", [True, False], ids=["session", "tcp"])
@pytest.mark.parametrize("name", list(TENSORS))
def test_read_from_a_file(address: str, name: str, same_host: bool) -> None:
    local = TENSORS[name]
    with Client(address, same_host=same_host) as c:
        remote = c.tensor(name)
        assert remote.dtype == local.dtype
        for idx in INDICES:
            assert _same(remote[idx], local[idx]), idx


@pytest.mark.parametrize("rows", [8, 1 << 16], ids=["inline", "bulk"])
def test_put_and_read_back_complex(address: str, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    z = torch.complex(torch.randn(rows, 4, generator=g), torch.randn(rows, 4, generator=g))
    with Client(address) as c:
        c.put(f"z{rows}", z)
        got = c.tensor(f"z{rows}")[1:, [3, 0]]
        assert _same(got, z[1:, [3, 0]])
        c.drop(f"z{rows}")


def test_a_threshold_on_complex_values_is_refused(address: str) -> None:
    with Client(address) as c, pytest.raises(InvalidSelection) as err:
        c.tensor("c64").where(dim=1, stat="mean", op=">", value=0.0)
    assert "tensor 'c64' is complex64" in str(err.value)
    assert "abs()" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint32, torch.int64, torch.uint64])
def test_a_threshold_on_wide_integers_is_exact(dtype: torch.dtype) -> None:
    # 2**24 + 1 is no float32: its statistic in float32 would equal 2**24 and fail "> 2**24".
    x = torch.tensor([[1 << 24, (1 << 24) + 1, 3]]).to(dtype)
    store = TensorStore()
    store.add("x", x)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig())
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            r = c.tensor("x").where(dim=1, stat="max", op=">", value=float(1 << 24))
            assert r.indices.tolist() == [1]
            assert r.values.dtype == dtype and r.values.tolist() == [[(1 << 24) + 1]]
    finally:
        srv.stop(grace=None)


@pytest.mark.parametrize("name", list(TENSORS))
def test_a_handle_describes_itself_as_torch_does(address: str, name: str) -> None:
    local = TENSORS[name]
    with Client(address) as c:
        r = c.tensor(name)
        assert (r.shape, r.size(), r.size(-1), r.ndim, r.dim(), len(r)) == (
            local.shape, local.size(), local.size(-1), local.ndim, local.dim(), len(local))
        assert (r.dtype, r.numel(), r.element_size(), r.nbytes) == (
            local.dtype, local.numel(), local.element_size(), local.nbytes)
