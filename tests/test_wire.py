"""The wire: hand-made `SliceChunk` frames are protobuf's own; the chunks of a response are
one safetensors file that the reference implementation reads; the Assembler copes with
any split of the stream and refuses a short one."""

from __future__ import annotations

import gc
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from tensorslice.client import Client, TensorSliceError, Threshold
from tensorslice.client._receive import Assembler
from tensorslice.core.codec import (
    decode_chunk,
    encode_chunk,
    safetensors_header,
)
from tensorslice.core.endpoint import host_of
from tensorslice.server._payload import (
    BufferPool,
    ContiguousPayload,
    Payload,
    RowGatherPayload,
    StridedPayload,
)
from tensorslice.server._stream import WholeFile, frames
from tensorslice.v1 import tensorslice_pb2 as pb

ITEM_SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
              "U8": 1, "I8": 1, "BOOL": 1, "C64": 8, "U16": 2, "F8_E4M3FNUZ": 1}
SIZES = [0, 1, 127, 128, 300, 16383, 16384, 2**20 + 3]


def _payload(n: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(n))


@pytest.mark.unit
@pytest.mark.parametrize("n", SIZES)
def test_encode_chunk_is_protobufs_slice_chunk(n: int) -> None:
    b = _payload(n)
    frame = encode_chunk(b)
    assert pb.SliceChunk.FromString(frame).data == b
    assert frame == pb.SliceChunk(data=b).SerializeToString()
    # parts are concatenated into one frame
    half = n // 2
    assert encode_chunk(b[:half], memoryview(b[half:])) == frame


@pytest.mark.unit
@pytest.mark.parametrize("n", SIZES)
def test_decode_chunk_reads_protobufs_slice_chunk(n: int) -> None:
    b = _payload(n)
    data = decode_chunk(pb.SliceChunk(data=b).SerializeToString())
    assert isinstance(data, memoryview)
    assert bytes(data) == b


@pytest.mark.unit
def test_decode_chunk_skips_unknown_fields_and_refuses_truncation() -> None:
    b = _payload(300)
    extra = bytes([0x10, 0x96, 0x01]) + bytes([0x1A, 0x02]) + b"zz"  # field 2 varint, 3 bytes
    assert bytes(decode_chunk(extra + encode_chunk(b) + bytes([0x25, 1, 2, 3, 4]))) == b
    with pytest.raises(TensorSliceError, match=re.escape("truncated SliceChunk frame")):
        decode_chunk(encode_chunk(b)[:-1])
    with pytest.raises(TensorSliceError, match=re.escape("truncated varint in SliceChunk frame")):
        decode_chunk(bytes([0x0A, 0x80]))


# ---------------------------------------------------------------------------- files


def _file_of(payloads: list[Payload], *, chunk_bytes: int = 1 << 20,
             slab_bytes: int = 4 << 20) -> tuple[bytes, list[bytes]]:
    fr = list(frames(payloads, {"k": "v"}, chunk_bytes=chunk_bytes, slab_bytes=slab_bytes))
    return b"".join(bytes(decode_chunk(f)) for f in fr), fr


def _check_layout(data: bytes) -> dict[str, object]:
    (hlen,) = struct.unpack("<Q", data[:8])
    assert hlen % 8 == 0  # the data section starts 8-byte aligned
    header = json.loads(data[8 : 8 + hlen])
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % ITEM_SIZES[info["dtype"]] == 0, name
    assert 8 + hlen + max(
        (i["data_offsets"][1] for k, i in header.items() if k != "__metadata__"), default=0
    ) == len(data)
    return header  # type: ignore[no-any-return]


@pytest.mark.unit
def test_mixed_dtypes_load_with_safetensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "flag": torch.rand(7, generator=g) > 0.5,
        "u8": torch.randint(0, 255, (3, 5), generator=g, dtype=torch.uint8),
        "half": torch.randn(3, 3, generator=g).half(),
        "bf": torch.randn(5, generator=g).bfloat16(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "i64": torch.arange(-5, 6),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "c64": torch.complex(torch.randn(3, generator=g), torch.randn(3, generator=g)),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fnuz),
        "u16": torch.arange(6).to(torch.uint16),
    }
    payloads: list[Payload] = [ContiguousPayload(k, v) for k, v in tensors.items()]
    data, fr = _file_of(payloads, chunk_bytes=16, slab_bytes=32)
    assert len(fr) > 3
    assert all(pb.SliceChunk.FromString(f).data for f in fr)  # no empty frame on the wire
    _check_layout(data)  # largest item size first: each tensor aligned to its item size
    loaded = load(data)
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert _same(f.get_tensor(k), v)
    for k, v in tensors.items():
        assert _same(loaded[k], v)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (float8 has no `torch.equal`)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.mark.unit
def test_strided_payload_bytes_across_small_slabs() -> None:
    x = torch.randn(6, 7, 5)
    view = x[:, 1:6:2, ::2]
    data, _ = _file_of([StridedPayload("values", view)], chunk_bytes=40, slab_bytes=24)
    _check_layout(data)
    assert torch.equal(load(data)["values"], view)
    cast, _ = _file_of([StridedPayload("values", view, torch.bfloat16)], slab_bytes=16)
    assert torch.equal(load(cast)["values"], view.to(torch.bfloat16))


@pytest.mark.unit
@pytest.mark.parametrize("slab_bytes", [24, 4 << 20])
def test_a_whole_file_written_into_memory_is_the_file_its_pieces_make(slab_bytes: int
                                                                       ) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, 5, generator=g)
    rows = torch.tensor([7, 0, 39, 7, 12])
    src = x.view(40, 30)
    payloads: list[Payload] = [
        ContiguousPayload("c", x[3:9]),
        StridedPayload("s", x[:, 1:6:2, ::2]),
        StridedPayload("cast", x[:4, 2], torch.float16),
        RowGatherPayload("rows", src, rows, (5, 6, 5)),
        RowGatherPayload("rows16", src, rows, (5, 6, 5), torch.bfloat16),
        ContiguousPayload("flag", x[0, 0] > 0),
        ContiguousPayload("none", torch.empty(0, 3)),
    ]
    pool = BufferPool()
    file = WholeFile(payloads, {"k": "v"}, chunk_bytes=64, slab_bytes=slab_bytes, pool=pool)
    out = bytearray(b"\xee" * (file.nbytes + 100))  # more room than the file: left as it is
    file.write_into(memoryview(out))
    # everything went straight into `out`: only the gather with a cast took a slab buffer
    assert pool.allocations <= 1
    streamed = b"".join(bytes(p) for p in file)
    assert len(streamed) == file.nbytes
    assert bytes(out[: file.nbytes]) == streamed and out[file.nbytes :] == b"\xee" * 100
    loaded = load(streamed)
    assert torch.equal(loaded["rows"], x[rows]) and torch.equal(loaded["c"], x[3:9])
    assert torch.equal(loaded["rows16"], x[rows].to(torch.bfloat16))
    assert torch.equal(loaded["s"], x[:, 1:6:2, ::2]) and loaded["flag"].dtype == torch.bool
    with pytest.raises(ValueError, match="cannot hold"):
        file.write_into(memoryview(bytearray(file.nbytes - 1)))


@pytest.mark.unit
def test_header_matches_declared_entries() -> None:
    header, entries = safetensors_header(
        [("a", torch.float32, (2, 3)), ("b", torch.int64, (4,))], {"m": "1"}
    )
    assert len(header) % 8 == 0
    assert [(e.name, e.start, e.end) for e in entries] == [("a", 0, 24), ("b", 24, 56)]
    assert json.loads(header[8:])["__metadata__"] == {"m": "1"}


RESPONSES: list[tuple[tuple[object, ...], Callable[[torch.Tensor], torch.Tensor]]] = [
    ((slice(0, 10),), lambda x: x[0:10]),
    ((slice(None), [1, 3, 5]), lambda x: x[:, [1, 3, 5]]),
    (([0, 2, 5], [1, 4, 5]), lambda x: x[[0, 2, 5], [1, 4, 5]]),
    ((3, slice(None, None, -1)), lambda x: x[3].flip(0)),
    ((slice(0, 0),), lambda x: x[0:0]),
]


@pytest.mark.e2e
@pytest.mark.parametrize("index,ref", RESPONSES, ids=[repr(r[0]) for r in RESPONSES])
def test_response_bytes_load(client: Client, demo: torch.Tensor, tmp_path: Path,
                             index: tuple[object, ...],
                             ref: Callable[[torch.Tensor], torch.Tensor]) -> None:
    data = client.slice_bytes("demo", index)
    assert isinstance(data, bytes)
    header = _check_layout(data)
    meta = header["__metadata__"]
    assert isinstance(meta, dict)
    assert meta["tensorslice.tensor"] == "demo"
    want = ref(demo)
    assert torch.equal(load(data)["values"], want)
    path = tmp_path / "r.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        got = f.get_tensor("values")
        assert got.shape == want.shape
        assert torch.equal(got, want)
        assert f.metadata()["tensorslice.tensor"] == "demo"


@pytest.mark.e2e
def test_threshold_response_is_one_file(client: Client, demo: torch.Tensor,
                                        tmp_path: Path) -> None:
    data = client.slice_bytes(
        "demo", (slice(None), Threshold("mean", ">", 0.0, scope="per_sample")), combine="outer"
    )
    header = _check_layout(data)
    assert set(header) == {"__metadata__", "values", "offsets", "indices"}
    loaded = load(data)
    passed = demo.mean((2, 3)) > 0.0
    assert torch.equal(loaded["offsets"][1:], passed.sum(1).cumsum(0))
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("indices"), passed.nonzero()[:, 1])
        assert f.get_tensor("values").shape == (int(passed.sum()), 6, 5)


# ---------------------------------------------------------------------------- assembler


def _file() -> tuple[bytes, dict[str, torch.Tensor]]:
    tensors = {"values": torch.randn(4, 3), "indices": torch.arange(4), "flag": torch.ones(3) > 0}
    data, _ = _file_of([ContiguousPayload(k, v) for k, v in tensors.items()])
    return data, tensors


@pytest.mark.unit
@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("cut", [1, 3, 7, 8, 9, 20, 57])
def test_assembler_header_split_across_chunks(cut: int, as_bytes: bool) -> None:
    data, tensors = _file()
    asm = Assembler(as_bytes=as_bytes)
    pieces = [data[i : i + cut] for i in range(0, len(data), cut)]
    for i, piece in enumerate(pieces):
        assert not asm.complete
        asm.feed(memoryview(piece) if i % 2 else piece)
    assert asm.complete
    assert asm.metadata == {"k": "v"}
    out = asm.tensors()
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(out[k], v)
    assert asm.file_bytes() == data
    if as_bytes:
        assert type(asm.file_bytes()) is bytes


@pytest.mark.unit
def test_a_small_result_in_one_payload_is_its_own() -> None:
    # An inline answer comes whole: its tensors (NumPy's dtypes shaped by NumPy, bfloat16
    # by torch) live on a buffer of their own, writable, that outlives the assembler.
    tensors = {"values": torch.arange(12.0).reshape(1, 3, 4), "bf": torch.ones(2, 2).bfloat16(),
               "scalar": torch.tensor(7, dtype=torch.int16),
               "deep": torch.ones((1,) * 65)}  # more dimensions than NumPy takes
    data, _ = _file_of([ContiguousPayload(k, v) for k, v in tensors.items()])
    outs = []
    for _ in range(3):
        asm = Assembler()
        asm.feed(memoryview(data))
        outs.append(asm.tensors())
        del asm
    gc.collect()
    for out in outs:
        for k, v in tensors.items():
            assert out[k].dtype == v.dtype and torch.equal(out[k], v)
    outs[0]["values"][0, 0, 0] = -1.0  # each result on its own memory
    assert outs[1]["values"][0, 0, 0] == 0.0 and outs[2]["values"][0, 0, 0] == 0.0


@pytest.mark.unit
def test_assembler_refuses_a_truncated_stream() -> None:
    data, _ = _file()
    asm = Assembler()
    asm.feed(data[:-1])
    assert not asm.complete
    with pytest.raises(TensorSliceError, match=re.escape(
        f"stream ended early: {len(data) - 1} of {len(data)} bytes received"
    )):
        asm.tensors()
    head = Assembler(as_bytes=True)
    head.feed(data[:5])
    with pytest.raises(TensorSliceError, match=re.escape(
        "stream ended early: 5 of an unknown number of bytes received"
    )):
        head.file_bytes()
    with pytest.raises(TensorSliceError, match=re.escape("stream ended early: 0 of")):
        Assembler().tensors()


@pytest.mark.unit
def test_assembler_refuses_extra_bytes() -> None:
    data, _ = _file()
    asm = Assembler()
    asm.feed(data)
    with pytest.raises(TensorSliceError, match=re.escape(
        f"stream holds more bytes than its header announces ({len(data)})"
    )):
        asm.feed(b"x")


@pytest.mark.unit
@pytest.mark.parametrize("address,host", [
    ("127.0.0.1:50051", "127.0.0.1"),
    ("[::1]:50051", "::1"),
    ("[::]:0", "::"),
    ("dns:///example.org:443", "example.org"),
    ("localhost", "localhost"),
    (":50051", ""),
])
def test_host_of_one_rule_for_both_sides(address: str, host: str) -> None:
    assert host_of(address) == host
