"""Malformed requests, as a hostile or broken client sends them (raw bytes, int64 extremes,
unknown enum values, huge names): each gets INVALID_ARGUMENT, OUT_OF_RANGE or another
precise status with a bounded message, never INTERNAL or UNKNOWN, and the server answers
the next good request."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorslice.client import Client, RemoteTensor
from tensorslice.core.codec import decode_chunk
from tensorslice.core.endpoint import SERVICE_NAME
from tensorslice.v1 import tensorslice_pb2 as pb

pytestmark = pytest.mark.e2e

I64 = (-(2**63), 2**63 - 1)
UNARY = ("ListTensors", "DescribeTensor", "Explain", "Fetch", "FetchMany")
STREAMS = ("Slice", "SliceMany")
MANY = ("FetchMany", "SliceMany")


@pytest.fixture(scope="module")
def channel(server: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
            server, options=[("grpc.max_receive_message_length", -1)]) as ch:
        yield ch


@pytest.fixture()
def remote(client: Client) -> RemoteTensor:
    return client.tensor("demo")


def _call(ch: grpc.Channel, method: str, data: bytes) -> None:
    """Send raw request bytes to `method`; consume the whole answer."""
    path = f"/{SERVICE_NAME}/{method}"
    if method in STREAMS:
        for _ in ch.unary_stream(path, request_serializer=None,
                                 response_deserializer=None)(data, timeout=30):
            pass
    else:
        ch.unary_unary(path, request_serializer=None, response_deserializer=None)(
            data, timeout=30)


def _status(ch: grpc.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        _call(ch, method, data)
    except grpc.RpcError as exc:
        err: Any = exc
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _good(ch: grpc.Channel, demo: torch.Tensor) -> None:
    req = pb.SliceRequest(tensor="demo", selectors=[pb.Selector(index=pb.Index(index=3))])
    frame = ch.unary_unary(f"/{SERVICE_NAME}/Fetch", request_serializer=None,
                           response_deserializer=None)(req.SerializeToString(), timeout=30)
    assert torch.equal(safetensors.torch.load(bytes(decode_chunk(frame)))["values"].cpu(),
                       demo[3])


def _many(req: pb.SliceRequest, key: str = "a", max_bytes: int = 0) -> pb.SliceManyRequest:
    return pb.SliceManyRequest(items=[pb.NamedSlice(key=key, request=req)],
                               max_bytes=max_bytes)


def _sel(**kind: Any) -> pb.Selector:
    return pb.Selector(**kind)


def _req(*selectors: pb.Selector, **fields: Any) -> pb.SliceRequest:
    return pb.SliceRequest(tensor=fields.pop("tensor", "demo"), selectors=list(selectors),
                           **fields)


BAD: list[tuple[str, str, bytes, grpc.StatusCode, str]] = [
    ("undecodable", "Fetch", b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT,
     "malformed tensorslice.v1.SliceRequest (3 bytes): "),
    ("truncated", "Slice", _req(_sel(index=pb.Index(index=1))).SerializeToString()[:-1],
     grpc.StatusCode.INVALID_ARGUMENT, "malformed tensorslice.v1.SliceRequest"),
    ("undecodable-many", "SliceMany", b"\x0a\x05\x0a", grpc.StatusCode.INVALID_ARGUMENT,
     "malformed tensorslice.v1.SliceManyRequest (3 bytes): "),
    ("undecodable-describe", "DescribeTensor", b"\x0a\xff", grpc.StatusCode.INVALID_ARGUMENT,
     "malformed tensorslice.v1.DescribeTensorRequest (2 bytes): "),
    ("combine-77", "Fetch", _req(combine=77).SerializeToString(),  # type: ignore[arg-type]
     grpc.StatusCode.INVALID_ARGUMENT,
     "unknown combine 77; expected OUTER (0) or VECTORIZED (1)"),
    ("negative-max-bytes-many", "FetchMany", _many(_req(), max_bytes=-5).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT, "max_bytes must not be negative; got -5"),
    ("metadata-key", "FetchMany", _many(_req(), key="__metadata__").SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT,
     "item 0 of SliceMany: key '__metadata__' cannot name a tensor of a safetensors file"),
    ("wrapping-shape", "Fetch",
     _req(_sel(indices=pb.Indices(values=[], shape=[2**32, 2**32]))).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT,
     "selector 0: index list shape [4294967296, 4294967296] does not hold its 0 values"),
    ("wrapping-mask", "Fetch",
     _req(_sel(mask=pb.Mask(values=b"", shape=[2**62, 4]))).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT,
     "selector 0: mask shape [4611686018427387904, 4] does not hold its 0 values"),
    ("mask-larger-than-tensor", "Fetch",
     _req(_sel(mask=pb.Mask(values=bytes(6000)))).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT,
     "selector 0: mask of 6000 values is larger than tensor 'demo' of shape "
     "[16, 12, 6, 5] (5760 elements)"),
    ("huge-name", "Fetch", _req(tensor="n" * 1_000_000).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT,
     "tensor name of 1000000 characters is longer than any the server holds (at most 1024)"),
    ("huge-describe", "DescribeTensor",
     pb.DescribeTensorRequest(name="n" * 1_000_000).SerializeToString(),
     grpc.StatusCode.NOT_FOUND, "no tensor named 'nnnn"),
    ("huge-dtype", "Fetch", _req(dtype="f" * 100_000).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT,
     "unknown dtype of 100000 characters; a dtype is a name such as 'float16'"),
    ("index-min", "Fetch", _req(_sel(index=pb.Index(index=I64[0]))).SerializeToString(),
     grpc.StatusCode.OUT_OF_RANGE,
     "index -9223372036854775808 is out of bounds for dimension 0 (N) of size 16"),
    ("k-max", "Fetch", _req(_sel(full=pb.Full()), _sel(threshold=pb.Threshold(
        stat=pb.Threshold.MEAN, op=pb.Threshold.GT, scope=pb.Threshold.TOPK, k=I64[1])))
     .SerializeToString(), grpc.StatusCode.OUT_OF_RANGE,
     "k 9223372036854775807 is out of range for dimension 1 (C) of size 12"),
    ("stat-77", "Fetch", _req(_sel(threshold=pb.Threshold(stat=77)))  # type: ignore[arg-type]
     .SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT,
     "selector 0: unknown statistic 77"),
]


@pytest.mark.parametrize(("method", "data", "code", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_malformed_request(channel: grpc.Channel, demo: torch.Tensor, method: str,
                           data: bytes, code: grpc.StatusCode, message: str) -> None:
    got, details = _status(channel, method, data)
    assert got == code, details
    assert details.startswith(message), details
    assert len(details) <= 1000
    _good(channel, demo)


@pytest.mark.parametrize("step", [2**63 - 1, 2**47, -(2**63), -(2**47)])
def test_huge_steps_select_one_position(channel: grpc.Channel, demo: torch.Tensor,
                                        step: int) -> None:
    req = _req(_sel(full=pb.Full()), _sel(range=pb.Range(step=step)))
    frame = channel.unary_unary(f"/{SERVICE_NAME}/Fetch", request_serializer=None,
                                response_deserializer=None)(req.SerializeToString(),
                                                            timeout=30)
    got = safetensors.torch.load(bytes(decode_chunk(frame)))["values"].cpu()
    assert torch.equal(got, demo[:, 0:1] if step > 0 else demo[:, -1:])


def test_huge_step_from_the_client(remote: RemoteTensor, demo: torch.Tensor) -> None:
    assert torch.equal(remote[:: 2**47].cpu(), demo[:: 2**47])
    assert torch.equal(remote[3:, :: 2**62].cpu(), demo[3:, 0:1])  # torch itself overflows


# ------------------------------------------------------------------ fuzz

_ints = st.one_of(st.sampled_from([*I64, -1, 0, 1, 2**31, -(2**31), 2**47, 16, -17]),
                  st.integers(*I64))
_small_ints = st.lists(_ints, max_size=6)


@st.composite
def _selector(draw: st.DrawFn) -> pb.Selector:
    kind = draw(st.sampled_from(["full", "range", "index", "indices", "mask", "threshold",
                                 "new_axis", "ellipsis", "empty"]))
    if kind == "range":
        r = pb.Range()
        for name in ("start", "stop", "step"):
            if draw(st.booleans()):
                setattr(r, name, draw(_ints))
        return _sel(range=r)
    if kind == "index":
        return _sel(index=pb.Index(index=draw(_ints)))
    if kind == "indices":
        return _sel(indices=pb.Indices(values=draw(_small_ints), shape=draw(_small_ints)))
    if kind == "mask":
        return _sel(mask=pb.Mask(values=draw(st.binary(max_size=24)),
                                 shape=draw(_small_ints)))
    if kind == "threshold":
        enum = st.integers(-3, 9)
        return _sel(threshold=pb.Threshold(
            stat=draw(enum), op=draw(enum), scope=draw(enum), k=draw(_ints),
            over=draw(_small_ints),
            value=draw(st.floats(allow_nan=True, allow_infinity=True))))
    if kind == "empty":
        return pb.Selector()
    return _sel(**{kind: getattr(pb, {"full": "Full", "new_axis": "NewAxis",
                                      "ellipsis": "Ellipsis"}[kind])()})


@st.composite
def _request(draw: st.DrawFn) -> pb.SliceRequest:
    return pb.SliceRequest(
        # Mostly well-formed around the selectors, so that most examples reach the planner.
        tensor=draw(st.sampled_from(["demo"] * 6 + ["", "nope", "d" * 2000])),
        selectors=draw(st.lists(_selector(), max_size=6)),
        combine=draw(st.sampled_from([0, 0, 1, 1, 1, 2, 77, -1])),
        dtype=draw(st.sampled_from([""] * 6 + ["float16", "int64", "bool", "float17",
                                              "x" * 500])),
        max_bytes=draw(st.sampled_from([0] * 6 + [-1, 1, 64, *I64])),
        bulk=draw(st.booleans()),
    )


@st.composite
def _wire(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(UNARY + STREAMS))
    how = draw(st.sampled_from(["valid", "truncated", "random"]))
    if how == "random":
        return method, draw(st.binary(max_size=64))
    req = draw(_request())
    if method in MANY:
        keys = st.sampled_from(["a", "b", "", "__metadata__", "a.indices"])
        msg: Any = pb.SliceManyRequest(
            items=[pb.NamedSlice(key=draw(keys), request=req)
                   for _ in range(draw(st.integers(0, 3)))],
            max_bytes=draw(st.sampled_from([0, -1, 100, *I64])))
    elif method == "DescribeTensor":
        msg = pb.DescribeTensorRequest(name=req.tensor)
    elif method == "ListTensors":
        msg = pb.ListTensorsRequest()
    else:
        msg = req
    data = msg.SerializeToString()
    if how == "truncated" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return method, data


@settings(max_examples=int(os.environ.get("TENSORSLICE_FUZZ_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(case=_wire())
def test_fuzz_never_internal(channel: grpc.Channel, demo: torch.Tensor,
                             case: tuple[str, bytes]) -> None:
    method, data = case
    code, details = _status(channel, method, data)
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method, details)
    assert len(details) <= 1000
    if code != grpc.StatusCode.OK:
        assert re.search(r"\S", details), (method, code)
    _good(channel, demo)
