"""Bad requests, through a real client: the error class, the gRPC status and the exact
message (naming the dimension, the value and the size); the server keeps serving after."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load

from tensorslice.client import (
    Client,
    InvalidIndex,
    InvalidIndexType,
    InvalidSelection,
    RemoteTensor,
    ResultTooLarge,
    SelectionOutOfRange,
    TensorNotFound,
    TensorSliceError,
    UnconvertibleIndex,
)
from tensorslice.core.codec import DTYPE_NAMES
from tensorslice.core.errors import (
    ERROR_CLASS_KEY,
    Status,
    error_class_name,
    error_from_status,
)
from tensorslice.server import ServerConfig, TensorStore, create_server
from tensorslice.v1 import tensorslice_pb2 as pb
from tensorslice.v1 import tensorslice_pb2_grpc as pb_grpc

DTYPES = ", ".join(sorted(DTYPE_NAMES))
B = torch.ones(3, dtype=torch.bool)


class _Opaque:
    """Neither a number nor a sequence: PyTorch cannot make a tensor of it."""

    def __repr__(self) -> str:
        return "<opaque>"


# (id, call on the 'demo' RemoteTensor (16, 12, 6, 5) N,C,H,W, error class, exact message)
CASES: list[tuple[str, Callable[[RemoteTensor], Any], type[TensorSliceError], str]] = [
    ("step0-N", lambda r: r[::0], InvalidSelection,
     "slice step cannot be zero (for dimension 0 (N) of size 16)"),
    ("step0-W", lambda r: r[..., 1:3:0], InvalidSelection,
     "slice step cannot be zero (for dimension 3 (W) of size 5)"),
    ("mask-len-N", lambda r: r[B], InvalidIndex,
     "mask of length 3 does not match dimension 0 (N) of size 16"),
    ("mask-len-C", lambda r: r[:, torch.ones(13, dtype=torch.bool)], InvalidIndex,
     "mask of length 13 does not match dimension 1 (C) of size 12"),
    ("mask-len-oindex", lambda r: r.oindex[:, :, [True, False]], InvalidIndex,
     "mask of length 2 does not match dimension 2 (H) of size 6"),
    ("mask-2d-shape", lambda r: r[torch.ones(16, 11, dtype=torch.bool)], InvalidIndex,
     "mask of shape [16, 11] does not match dimensions 0, 1 of shape [16, 12]"),
    ("index-N", lambda r: r[16], SelectionOutOfRange,
     "index 16 is out of bounds for dimension 0 (N) of size 16"),
    ("index-N-neg", lambda r: r[-17], SelectionOutOfRange,
     "index -17 is out of bounds for dimension 0 (N) of size 16"),
    ("index-C", lambda r: r[:, 20], SelectionOutOfRange,
     "index 20 is out of bounds for dimension 1 (C) of size 12"),
    ("index-H", lambda r: r[0, 0, 6], SelectionOutOfRange,
     "index 6 is out of bounds for dimension 2 (H) of size 6"),
    ("index-W", lambda r: r[..., -6], SelectionOutOfRange,
     "index -6 is out of bounds for dimension 3 (W) of size 5"),
    ("indices-N", lambda r: r[[0, 99, 1]], SelectionOutOfRange,
     "index 99 is out of bounds for dimension 0 (N) of size 16"),
    ("indices-C", lambda r: r[:, [1, 20]], SelectionOutOfRange,
     "index 20 is out of bounds for dimension 1 (C) of size 12"),
    ("indices-C-oindex", lambda r: r.oindex[[0, 1], [3, -13]], SelectionOutOfRange,
     "index -13 is out of bounds for dimension 1 (C) of size 12"),
    ("indices-H-2d", lambda r: r[:, :, [[0, 1], [6, 2]]], SelectionOutOfRange,
     "index 6 is out of bounds for dimension 2 (H) of size 6"),
    ("indices-W", lambda r: r[..., [4, 5]], SelectionOutOfRange,
     "index 5 is out of bounds for dimension 3 (W) of size 5"),
    ("two-ellipses", lambda r: r[..., ..., 0], InvalidIndex,
     "too many indices for tensor 'demo' of 4 dimensions: 7 dimensions indexed "
     "(with several '...', each stands for 3)"),
    ("float", lambda r: r[0, 1.5], InvalidIndex,
     "only integers, slices (`:`), ellipsis (`...`), None, sequences and long, int, byte or "
     "bool tensors are valid indices; got float"),
    ("float-tensor", lambda r: r[torch.tensor([0.0])], InvalidIndex,
     "tensors used as indices must be long, int, byte or bool tensors; got torch.float32"),
    ("string", lambda r: r["0"], InvalidIndexType,
     "cannot use '0' as an index: new(): invalid data type 'str'"),
    ("slice-float", lambda r: r[0.0:2], InvalidIndexType,
     "slice indices must be integers or None or have an __index__ method; slice start is 0.0"),
    ("no-dtype", lambda r: r[[_Opaque(), 1]], UnconvertibleIndex,
     "cannot use [<opaque>, 1] as an index: Could not infer dtype of _Opaque"),
    ("int-overflow", lambda r: r[1 << 64], InvalidSelection,
     "index 18446744073709551616 does not fit in int64 (overflow)"),
    ("list-overflow", lambda r: r[[1 << 64]], InvalidSelection,
     "cannot use [18446744073709551616] as an index: Overflow when unpacking long long"),
    ("too-many", lambda r: r[0, 0, 0, 0, 0], InvalidIndex,
     "too many indices for tensor 'demo' of 4 dimensions: 5 dimensions indexed"),
    ("too-many-mask", lambda r: r[0, :, torch.ones(6, 5, 1, dtype=torch.bool)], InvalidIndex,
     "too many indices for tensor 'demo' of 4 dimensions: 5 dimensions indexed"),
    ("broadcast", lambda r: r[[0, 1, 2], [0, 1]], InvalidIndex,
     "shape mismatch: indexing tensors could not be broadcast together with shapes [3], [2]"),
    ("max-bytes", lambda r: r.astype("float32", max_bytes=100)[0:10], ResultTooLarge,
     "result of 14400 bytes (shape [10, 12, 6, 5], float32) exceeds the limit of 100 bytes"),
    ("max-bytes-cast", lambda r: r.astype("float16", max_bytes=700)[0], ResultTooLarge,
     "result of 720 bytes (shape [12, 6, 5], float16) exceeds the limit of 700 bytes"),
    ("max-bytes-where", lambda r: r.astype("float32", max_bytes=64).where(1, "mean", value=-9),
     ResultTooLarge,
     "result of 23136 bytes (values shape [16, 12, 6, 5], float32) exceeds the limit of 64 bytes"),
    ("dtype", lambda r: r.astype("float7")[0], InvalidSelection,
     f"unknown dtype 'float7'; expected one of {DTYPES}"),
    ("stat-client", lambda r: r.where(1, "median"), InvalidSelection,
     "unknown statistic 'median'; expected one of mean, max, min, sum, abs_mean, l2"),
    ("op-client", lambda r: r.where(1, "mean", op="=="), InvalidSelection,
     "unknown comparison '=='; expected one of >, >=, <, <="),
    ("topk-k", lambda r: r.where("C", "max", scope="topk", k=13), SelectionOutOfRange,
     "k 13 is out of range for dimension 1 (C) of size 12"),
    ("per-sample-dim0", lambda r: r.where(0, "max", scope="per_sample"), InvalidSelection,
     "scope per_sample needs a batch dimension 0 to keep positions per sample; "
     "the threshold is on it"),
    ("over-out-of-range", lambda r: r.where(1, "mean", over=(4,)), InvalidSelection,
     "statistic dimension 4 is out of range for a tensor of 4 dimensions"),
    ("explain-index", lambda r: r.explain[:, 12], SelectionOutOfRange,
     "index 12 is out of bounds for dimension 1 (C) of size 12"),
    ("max-bytes-negative",
     lambda r: r.client.slice_bytes("demo", (0,), max_bytes=-1), InvalidSelection,
     "max_bytes must not be negative; got -1"),
    ("slice-bytes-limit",
     lambda r: r.client.slice_bytes("demo", (slice(0, 2),), max_bytes=2879), ResultTooLarge,
     "result of 2880 bytes (shape [2, 12, 6, 5], float32) exceeds the limit of 2879 bytes"),
    ("unknown-tensor", lambda r: r.client.tensor("nope"), TensorNotFound,
     "no tensor named 'nope'; the server holds: demo"),
    ("unknown-tensor-slice", lambda r: r.client.slice_bytes("nope", (0,)), TensorNotFound,
     "no tensor named 'nope'; the server holds: demo"),
]


@pytest.fixture()
def remote(client: Client) -> RemoteTensor:
    return client.tensor("demo")


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore::UserWarning")  # a string is a sequence read as a tuple
@pytest.mark.parametrize("call,cls,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(
    remote: RemoteTensor, demo: torch.Tensor, call: Callable[[RemoteTensor], Any],
    cls: type[TensorSliceError], message: str,
) -> None:
    with pytest.raises(cls, match=f"^{re.escape(message)}$") as info:
        call(remote)
    assert type(info.value) is cls
    assert str(info.value) == message
    # The server keeps serving.
    assert torch.equal(remote[3, [1, 2]].cpu(), demo[3, [1, 2]])


# ---------------------------------------------------------------------------- raw gRPC

SLICE = "/tensorslice.v1.TensorSlice/Slice"


def _raw_slice(address: str, request: pb.SliceRequest) -> list[pb.SliceChunk]:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream(
            SLICE,
            request_serializer=pb.SliceRequest.SerializeToString,
            response_deserializer=pb.SliceChunk.FromString,
        )
        return list(call(request, timeout=30))


def _threshold_request(**kw: Any) -> pb.SliceRequest:
    t = pb.Threshold(stat=pb.Threshold.MEAN, op=pb.Threshold.GT, scope=pb.Threshold.ANY)
    for k, v in kw.items():
        setattr(t, k, v)
    return pb.SliceRequest(
        tensor="demo", selectors=[pb.Selector(full=pb.Full()), pb.Selector(threshold=t)]
    )


RAW: list[tuple[str, pb.SliceRequest, grpc.StatusCode, str]] = [
    ("unknown-stat", _threshold_request(stat=99), grpc.StatusCode.INVALID_ARGUMENT,
     "selector 1: unknown statistic 99"),
    ("unset-stat", _threshold_request(stat=0), grpc.StatusCode.INVALID_ARGUMENT,
     "selector 1: unknown statistic 0"),
    ("unknown-op", _threshold_request(op=7), grpc.StatusCode.INVALID_ARGUMENT,
     "selector 1: unknown comparison 7"),
    ("unknown-scope", _threshold_request(scope=9), grpc.StatusCode.INVALID_ARGUMENT,
     "selector 1: unknown scope 9"),
    ("negative-max-bytes", pb.SliceRequest(tensor="demo", max_bytes=-5),
     grpc.StatusCode.INVALID_ARGUMENT, "max_bytes must not be negative; got -5"),
    ("unknown-tensor", pb.SliceRequest(tensor="acts"), grpc.StatusCode.NOT_FOUND,
     "no tensor named 'acts'; the server holds: demo"),
    ("out-of-range", pb.SliceRequest(tensor="demo", selectors=[
        pb.Selector(full=pb.Full()), pb.Selector(index=pb.Index(index=20))]),
     grpc.StatusCode.OUT_OF_RANGE, "index 20 is out of bounds for dimension 1 (C) of size 12"),
    ("too-large", pb.SliceRequest(tensor="demo", max_bytes=1), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "result of 23040 bytes (shape [16, 12, 6, 5], float32) exceeds the limit of 1 bytes"),
    ("mask-bytes", pb.SliceRequest(tensor="demo", selectors=[
        pb.Selector(mask=pb.Mask(values=bytes([0, 2] * 8)))]),
     grpc.StatusCode.INVALID_ARGUMENT, "selector 0: mask values must be 0 or 1"),
    ("indices-shape", pb.SliceRequest(tensor="demo", selectors=[
        pb.Selector(indices=pb.Indices(values=[1, 2, 3], shape=[2, 2]))]),
     grpc.StatusCode.INVALID_ARGUMENT, "selector 0: index list shape [2, 2] does not hold its 3 "
     "values"),
    ("empty-selector", pb.SliceRequest(tensor="demo", selectors=[pb.Selector()]),
     grpc.StatusCode.INVALID_ARGUMENT, "selector 0 is empty"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("request_,code,message", [c[1:] for c in RAW], ids=[c[0] for c in RAW])
def test_raw_status(server: str, demo: torch.Tensor, request_: pb.SliceRequest,
                    code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _raw_slice(server, request_)
    err: Any = info.value
    assert err.code() == code
    assert err.details() == message
    # Still serving, and the generated code reads the hand-framed chunks.
    ok = pb.SliceRequest(tensor="demo", selectors=[pb.Selector(index=pb.Index(index=1))])
    data = b"".join(c.data for c in _raw_slice(server, ok))
    assert torch.equal(load(data)["values"], demo[1])


@pytest.mark.e2e
def test_generated_stub_status_codes(server: str) -> None:
    with grpc.insecure_channel(server) as ch:
        stub = pb_grpc.TensorSliceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.DescribeTensor(pb.DescribeTensorRequest(name="missing"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        bad = pb.SliceRequest(tensor="demo", selectors=[pb.Selector(index=pb.Index())] * 5)
        with pytest.raises(grpc.RpcError) as info:
            stub.Explain(bad, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert info.value.details() == (  # type: ignore[attr-defined]
            "too many indices for tensor 'demo' of 4 dimensions: 5 dimensions indexed"
        )
        # The class travels beside the status, for clients that raise PyTorch's classes.
        assert (ERROR_CLASS_KEY, "InvalidIndex") in info.value.trailing_metadata()  # type: ignore[attr-defined]
        plan = stub.Explain(pb.SliceRequest(tensor="demo"), timeout=30)
        assert list(plan.result_shape) == [16, 12, 6, 5]
        assert plan.zero_copy


@pytest.mark.unit
def test_error_classes_carry_their_status_codes() -> None:
    assert TensorNotFound.status.name == grpc.StatusCode.NOT_FOUND.name
    assert InvalidSelection.status.name == grpc.StatusCode.INVALID_ARGUMENT.name
    assert SelectionOutOfRange.status.name == grpc.StatusCode.OUT_OF_RANGE.name
    assert ResultTooLarge.status.name == grpc.StatusCode.RESOURCE_EXHAUSTED.name
    assert issubclass(SelectionOutOfRange, IndexError)
    assert issubclass(InvalidSelection, ValueError)
    assert issubclass(TensorNotFound, LookupError)


@pytest.mark.unit
@pytest.mark.parametrize("cls,builtin", [
    (InvalidIndex, IndexError), (InvalidIndexType, TypeError), (UnconvertibleIndex, RuntimeError),
])
def test_index_errors_are_also_torchs_classes(cls: type[TensorSliceError], builtin: type) -> None:
    """Each is an InvalidSelection (INVALID_ARGUMENT) and the builtin PyTorch raises; the
    class travels by name beside the status and comes back as itself."""
    assert issubclass(cls, InvalidSelection) and issubclass(cls, builtin)
    assert cls.status is Status.INVALID_ARGUMENT
    name = error_class_name(cls("m"))
    assert name == cls.__name__
    back = error_from_status(Status.INVALID_ARGUMENT, "m", name)
    assert type(back) is cls and str(back) == "m"
    # A name for another status, or an unknown one, falls back to the status's class.
    assert type(error_from_status(Status.OUT_OF_RANGE, "m", name)) is SelectionOutOfRange
    assert type(error_from_status(Status.INVALID_ARGUMENT, "m", "Nope")) is InvalidSelection
    assert error_class_name(InvalidSelection("m")) is None


# ---------------------------------------------------------------------------- server limit


@pytest.fixture(scope="module")
def small_server(device: str) -> Iterator[str]:
    store = TensorStore(device=device)
    store.add("x", torch.arange(1000, dtype=torch.float32).reshape(10, 100))
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(max_result_bytes=2000))
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(grace=None)


@pytest.mark.e2e
def test_server_limit(small_server: str) -> None:
    with Client(small_server, timeout=30) as c:
        r = c.tensor("x")
        with pytest.raises(ResultTooLarge, match=re.escape(
            "result of 2400 bytes (shape [6, 100], float32) exceeds the limit of 2000 bytes"
        )):
            r[0:6]
        # The caller's max_bytes can lower the limit, never raise it.
        with pytest.raises(ResultTooLarge, match=re.escape("exceeds the limit of 2000 bytes")):
            r.astype("float32", max_bytes=10_000)[0:6]
        with pytest.raises(ResultTooLarge, match=re.escape("exceeds the limit of 1000 bytes")):
            r.astype("float32", max_bytes=1000)[0:4]
        assert torch.equal(r[0:5].cpu(), torch.arange(500, dtype=torch.float32).reshape(5, 100))
