"""Device memory accounting (on any device, with an explicit budget), loading without a
full host copy, and the CUDA path (`gpu`-marked: runs only where CUDA is)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import tensorslice.server._store as store_mod
from tensorslice.client import Client, ResultTooLarge, SelectionOutOfRange
from tensorslice.server import ServerConfig, TensorStore, create_server, demo_tensor
from tensorslice.server._cli import main
from tensorslice.server._staging import pinned_pool, stage_bytes_for
from tensorslice.server._store import _read_into, default_device_budget
from tensorslice.server._stream import CHUNK_BYTES


def _label(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(d)


@pytest.fixture()
def serving() -> Iterator[Callable[[TensorStore], Client]]:
    """Start a server over a store; give a client to it."""
    servers: list[Any] = []
    clients: list[Client] = []

    def start(store: TensorStore) -> Client:
        srv, port = create_server(store, "127.0.0.1:0", ServerConfig(max_result_bytes=1 << 30))
        srv.start()
        servers.append(srv)
        c = Client(f"127.0.0.1:{port}", timeout=60)
        clients.append(c)
        return c

    yield start
    for c in clients:
        c.close()
    for s in servers:
        s.stop(grace=None)


# ------------------------------------------------------------------------- accounting


@pytest.mark.unit
def test_budget_refuses_a_load_with_the_sizes(device: str) -> None:
    store = TensorStore(device, max_device_memory=1000)
    store.add("a", torch.zeros(200))  # 800 bytes
    assert store.device_memory_used == 800
    msg = (f"loading 'b' needs 400 bytes on {_label(device)} but only 200 of the "
           f"1000-byte budget are free")
    with pytest.raises(ResultTooLarge, match=f"^{re.escape(msg)}$"):
        store.add("b", torch.zeros(100))
    assert "b" not in store and store.device_memory_used == 800
    store.add("c", torch.zeros(50))  # what fits still loads
    assert store.device_memory_used == 1000


@pytest.mark.unit
def test_budget_counts_replacements_and_frees_on_failure(device: str) -> None:
    store = TensorStore(device, max_device_memory=1000)
    store.add("a", torch.zeros(100))
    store.add("a", torch.zeros(150))  # the old 400 bytes are given back on replacement
    assert store.device_memory_used == 600
    # while a replacement loads, the old tensor is still held: both must fit
    with pytest.raises(ResultTooLarge, match=r"needs 800 bytes .* only 400 of the 1000-byte"):
        store.add("a", torch.zeros(200))
    assert store.get("a").meta.shape == (150,)


@pytest.mark.unit
def test_load_file_is_refused_and_unreserved(
    device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_file({"x": torch.arange(300.0)}, str(tmp_path / "x.safetensors"))
    store = TensorStore(device, max_device_memory=1000)
    with pytest.raises(ResultTooLarge, match=re.escape(
            f"loading 'xx' needs 1200 bytes on {_label(device)} but only 1000 of the "
            f"1000-byte budget are free")):
        store.load_file(tmp_path / "x.safetensors", name="xx")
    assert store.device_memory_used == 0 and len(store) == 0

    def broken(*args: object) -> None:
        raise OSError("disk gone")

    store = TensorStore(device, max_device_memory=10_000)
    monkeypatch.setattr(store_mod, "_read_into", broken)
    with pytest.raises(OSError, match="disk gone"):
        store.load_file(tmp_path / "x.safetensors")
    assert store.device_memory_used == 0  # a failed load gives its reservation back


@pytest.mark.unit
def test_default_budget() -> None:
    assert default_device_budget(torch.device("cpu")) is None
    assert TensorStore("cpu").max_device_memory is None
    with pytest.raises(Exception, match="max_device_memory must be >= 0"):
        TensorStore("cpu", max_device_memory=-1)


@pytest.mark.e2e
def test_server_keeps_serving_after_a_refused_load(
    device: str, serving: Callable[[TensorStore], Client], demo: torch.Tensor
) -> None:
    store = TensorStore(device, max_device_memory=demo.nbytes + 100)
    store.add("demo", demo, dim_names=("N", "C", "H", "W"))
    c = serving(store)
    assert torch.equal(c.tensor("demo")[0:2, [1, 3]], demo[0:2, [1, 3]])
    with pytest.raises(ResultTooLarge, match=r"needs 4096 bytes .* only 100 of the"):
        store.add("big", torch.zeros(1024))
    infos = c.list_tensors()
    assert [i.name for i in infos] == ["demo"]
    assert infos[0].nbytes == demo.nbytes and infos[0].device == _label(device)
    assert torch.equal(c.tensor("demo")[3:5, :, 2], demo[3:5, :, 2])


@pytest.mark.e2e
def test_cli_refuses_what_does_not_fit(
    device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_file({"x": torch.zeros(64)}, str(tmp_path / "x.safetensors"))
    rc = main(["serve", "--port", "0", "--device", device, "--max-device-memory", "100",
               "--tensor", f"x={tmp_path / 'x.safetensors'}", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert (f"loading 'x' needs 256 bytes on {_label(device)} but only 100 of the "
            f"100-byte budget are free") in err


# ------------------------------------------------------------------------- loading


class _RecordingSlice:
    """A safetensors slice over a tensor that records the size of each read."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.reads: list[int] = []

    def __getitem__(self, idx: tuple[slice, ...]) -> torch.Tensor:
        piece = self.t[idx].clone()
        self.reads.append(piece.nbytes)
        return piece


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(2, 3, 40), (1, 100), (50, 2), (7,), (3, 0, 2), (1, 1, 33)])
def test_read_into_never_holds_more_than_a_slab(device: str, shape: tuple[int, ...]) -> None:
    x = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.float32)
    x = x[: torch.Size(shape).numel()].reshape(shape)
    sl = _RecordingSlice(x)
    out = torch.full(shape, -1.0, device=device)
    done: list[int] = []
    _read_into(sl, out, (), 64, done.append)
    assert torch.equal(out.cpu(), x)
    assert max(sl.reads, default=0) <= 64  # however large a row, reads stay within a slab
    assert sum(done) == x.nbytes


@pytest.mark.unit
def test_load_file_onto_the_store_device(
    device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "_LOAD_SLAB_BYTES", 256)
    x = torch.randn(3, 5, 40)  # rows of 800 bytes: read in runs of 160 bytes
    save_file({"x": x, "s": torch.tensor(2.5)}, str(tmp_path / "x.safetensors"))
    store = TensorStore(device)
    e = store.load_file(tmp_path / "x.safetensors", "x")
    assert e.tensor.device.type == torch.device(device).type and e.tensor.is_contiguous()
    assert torch.equal(e.tensor.cpu(), x)
    s = store.load_file(tmp_path / "x.safetensors", "s")
    assert s.tensor.item() == 2.5 and s.tensor.device == e.tensor.device


# ------------------------------------------------------------------------- CUDA


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Client, Client, torch.Tensor]]:
    """The same tensor served from a CPU store and from a CUDA store."""
    x = demo_tensor((24, 16, 8, 8), seed=3)
    out = []
    servers = []
    for device in ("cpu", "cuda"):
        s = TensorStore(device)
        s.add("x", x, dim_names=("N", "C", "H", "W"))
        # small chunks and slabs: many pieces, buffers reused within every request
        srv, port = create_server(s, "127.0.0.1:0", ServerConfig(chunk_bytes=8192,
                                                                 slab_bytes=32768))
        srv.start()
        servers.append(srv)
        out.append(Client(f"127.0.0.1:{port}", timeout=60))
    yield out[0], out[1], x
    for c in out:
        c.close()
    for srv in servers:
        srv.stop(grace=None)


_VIEWS: list[tuple[Callable[[Any], Any], Callable[[torch.Tensor], torch.Tensor]]] = [
    (lambda r: r[:], lambda x: x[:]),
    (lambda r: r[3:9], lambda x: x[3:9]),
    (lambda r: r[:, 2:7], lambda x: x[:, 2:7]),
    (lambda r: r[::2, ::3, 1], lambda x: x[::2, ::3, 1]),
    (lambda r: r[5, :, 2:4], lambda x: x[5, :, 2:4]),
    (lambda r: r[::-1, 0], lambda x: x.flip(0)[:, 0]),
    (lambda r: r[[0, 5, 5, 23]], lambda x: x[[0, 5, 5, 23]]),
    (lambda r: r[:, [1, 3, 15]], lambda x: x[:, [1, 3, 15]]),
    (lambda r: r[[1, 2], :, [3, 4]], lambda x: x[[1, 2], :, [3, 4]]),
    (lambda r: r.oindex[[0, 7, 3], [2, 9]], lambda x: x[[0, 7, 3]][:, [2, 9]]),
    (lambda r: r.oindex[[0, 7, 3], :, [1, 2]], lambda x: x[[0, 7, 3]][:, :, [1, 2]]),
    (lambda r: r[torch.arange(24) % 3 == 0], lambda x: x[torch.arange(24) % 3 == 0]),
    (lambda r: r.astype("float16")[:, [1, 3]], lambda x: x[:, [1, 3]].half()),
    (lambda r: r.astype("bfloat16")[2:4, 1:3], lambda x: x[2:4, 1:3].bfloat16()),
]


@pytest.mark.e2e
@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(_VIEWS)))
def test_cuda_results_equal_cpu_results(pair: tuple[Client, Client, torch.Tensor],
                                        case: int) -> None:
    cpu, cuda, x = pair
    remote, local = _VIEWS[case]
    a = remote(cpu.tensor("x"))
    b = remote(cuda.tensor("x"))
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)
    assert torch.equal(b, local(x))


_WHERE = [
    dict(dim=1, stat="mean", op=">", value=0.0, scope="any"),
    dict(dim=1, stat="max", op=">=", value=1.5, scope="all"),
    dict(dim=1, stat="l2", op=">", value=8.0, scope="per_sample"),
    dict(dim=1, stat="abs_mean", scope="topk", k=3),
    dict(dim=0, stat="sum", op="<", value=0.0, scope="any"),
    dict(dim=1, stat="min", op="<=", value=-1.0, scope="any", index=(slice(0, 6), slice(None),
                                                                     slice(0, 4))),
]


@pytest.mark.e2e
@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(_WHERE)))
def test_cuda_thresholds_equal_cpu(pair: tuple[Client, Client, torch.Tensor], case: int
                                   ) -> None:
    cpu, cuda, _ = pair
    kw: Any = _WHERE[case]
    a = cpu.tensor("x").where(**kw)
    b = cuda.tensor("x").where(**kw)
    assert torch.equal(a.indices, b.indices)
    # reductions may differ in the last bit between devices: values are gathered the same
    assert a.values.shape == b.values.shape and torch.equal(a.values, b.values)
    if a.offsets is not None:
        assert b.offsets is not None and torch.equal(a.offsets, b.offsets)


_BAD: list[tuple[Callable[[Any], Any], str]] = [
    (lambda r: r[24], "index 24 is out of bounds for dimension 0 (N) of size 24"),
    (lambda r: r[:, [1, 99]], "index 99 is out of bounds for dimension 1 (C) of size 16"),
    (lambda r: r.oindex[[-25], [0]], "index -25 is out of bounds for dimension 0 (N) of size 24"),
    (lambda r: r[[0, 1], :, [0, 8]], "index 8 is out of bounds for dimension 2 (H) of size 8"),
    (lambda r: r.where(dim=1, stat="mean", scope="topk", k=17),
     "k 17 is out of range for dimension 1 (C) of size 16"),
]


@pytest.mark.e2e
@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(_BAD)))
def test_cuda_bad_index_is_refused_before_any_kernel(
    pair: tuple[Client, Client, torch.Tensor], case: int
) -> None:
    _, cuda, x = pair
    fn, msg = _BAD[case]
    with pytest.raises(SelectionOutOfRange, match=f"^{re.escape(msg)}$"):
        fn(cuda.tensor("x"))
    torch.cuda.synchronize()  # a device-side assert would surface here
    assert torch.equal(cuda.tensor("x")[[0, 23], 2], x[[0, 23], 2])


@pytest.mark.e2e
@pytest.mark.gpu
def test_cuda_pinned_pool_reused_across_requests(pair: tuple[Client, Client, torch.Tensor]
                                                 ) -> None:
    _, cuda, x = pair
    pool = pinned_pool(stage_bytes_for(8192))
    cuda.tensor("x")[:, 1:5]  # warm up
    before = pool.allocations
    for _ in range(5):
        assert torch.equal(cuda.tensor("x")[:, 1:5], x[:, 1:5])
        assert torch.equal(cuda.tensor("x")[:], x)
    assert pool.allocations == before and pool.pin
    assert pool.cached == pool.allocations


@pytest.mark.unit
@pytest.mark.gpu
def test_cuda_store_reports_device_and_budget(tmp_path: Path) -> None:
    store = TensorStore("cuda")
    free, _ = torch.cuda.mem_get_info()
    budget = store.max_device_memory
    assert budget is not None and 0 <= budget <= free
    e = store.add("d", demo_tensor())
    assert e.meta.device == _label("cuda") and store.device_memory_used == e.meta.nbytes
    assert pinned_pool(stage_bytes_for(CHUNK_BYTES)).pin
