"""Value objects the client returns: tensor metadata, plans, threshold results."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from tensorslice.core.codec import dtype_from_name
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["PlanStep", "SlicePlan", "TensorInfo", "WhereResult"]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor the server holds."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    nbytes: int
    dim_names: tuple[str, ...]
    version: int = 0
    """Changes with every put, append and replace of the tensor."""

    @classmethod
    def from_proto(cls, msg: _pb.TensorInfo) -> TensorInfo:
        return cls(
            name=msg.name,
            shape=tuple(msg.shape),
            dtype=dtype_from_name(msg.dtype),
            device=msg.device,
            nbytes=msg.nbytes,
            dim_names=tuple(msg.dim_names),
            version=msg.version,
        )


@dataclass(frozen=True)
class PlanStep:
    """One step of a plan: view, reduce, gather, cast or copy."""

    kind: str
    dim: int
    detail: str
    bytes_moved: int
    order: int


@dataclass(frozen=True)
class SlicePlan:
    """What the server would do for a request (nothing executed)."""

    steps: tuple[PlanStep, ...]
    result_shape: tuple[int, ...]
    result_dtype: str
    result_nbytes: int
    zero_copy: bool
    summary: str

    @classmethod
    def from_proto(cls, msg: _pb.SlicePlan) -> SlicePlan:
        return cls(
            steps=tuple(
                PlanStep(s.kind, s.dim, s.detail, s.bytes_moved, s.order) for s in msg.steps
            ),
            result_shape=tuple(msg.result_shape),
            result_dtype=msg.result_dtype,
            result_nbytes=msg.result_nbytes,
            zero_copy=msg.zero_copy,
            summary=msg.summary,
        )

    def __str__(self) -> str:
        lines = [self.summary]
        for s in self.steps:
            where = f"dim {s.dim}" if s.dim >= 0 else "dims *"
            moved = f"{s.bytes_moved} B" if s.bytes_moved >= 0 else "data-dependent"
            lines.append(f"  {s.order}. {s.kind:<6} {where:<7} {s.detail} [{moved}]")
        return "\n".join(lines)


@dataclass(frozen=True)
class WhereResult:
    """The result of a threshold selection.

    scope any/all: ``values`` dense, ``indices`` the kept positions (K,).
    scope topk: ``values`` (B, k, ...) in place of the dimension, ``indices`` (B, k).
    scope per_sample: jagged: ``values`` (all kept rows packed), ``offsets`` (B + 1,),
    ``indices`` the kept positions; ``to_nested()`` gives a jagged nested tensor.
    """

    values: torch.Tensor
    indices: torch.Tensor
    offsets: torch.Tensor | None = None

    def to_nested(self) -> torch.Tensor:
        if self.offsets is None:
            raise ValueError("only a per_sample result is jagged")
        _quiet_fx_warning()
        return torch.nested.nested_tensor_from_jagged(self.values, self.offsets)

    def per_sample(self) -> list[torch.Tensor]:
        """The rows kept for each sample (per_sample scope)."""
        if self.offsets is None:
            raise ValueError("only a per_sample result is jagged")
        o = self.offsets.tolist()
        return [self.values[o[i] : o[i + 1]] for i in range(len(o) - 1)]


def _drop_fx_tracing_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("is_fx_tracing will return true")


@functools.cache
def _quiet_fx_warning() -> None:
    """Building a jagged nested tensor makes torch log a warning about its own internals
    (``is_fx_tracing will return true ...``) that says nothing to a caller: drop that one
    message, nothing else."""
    logging.getLogger("torch.fx._symbolic_trace").addFilter(_drop_fx_tracing_warning)
