"""In-process gathers on a (256, 512, 32, 32) float32 tensor: samples × channels.

``article``: ``x[b][:, c]`` (copies every selected sample whole, then the channels);
``advanced``: ``x[b[:, None], c]``; ``row``: ``index_select`` of (sample, channel) rows of a
(256*512, 1024) view into a reused buffer; ``memcpy``: a copy of the result's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench._common import time_per_call
from bench._payload import pattern_tensor

SHAPE = (256, 512, 32, 32)
MAIN = (64, 128)
SHAPES = ((4, 8), (128, 4), (8, 256), (64, 128))


def make_tensor(shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """Resident float32 data (a cheap pattern, not untouched pages)."""
    return pattern_tensor(shape)


def pick(n_samples: int, n_channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sorted, distinct sample and channel indices (int64)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randperm(SHAPE[0], generator=g)[:n_samples].sort().values
    c = torch.randperm(SHAPE[1], generator=g)[:n_channels].sort().values
    return b, c


def article(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return x[b][:, c]


def advanced(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return x[b[:, None], c]


def flat_rows(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (b[:, None] * x.shape[1] + c[None, :]).flatten()


def row_gather(
    x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The row gather: one ``index_select`` over (sample, channel) rows, into ``out``."""
    rows = x.view(x.shape[0] * x.shape[1], -1)
    flat = flat_rows(x, b, c)
    if out is None:
        out = torch.empty((flat.numel(), rows.shape[1]), dtype=x.dtype)
    torch.index_select(rows, 0, flat, out=out.view(flat.numel(), rows.shape[1]))
    return out.view(b.numel(), c.numel(), *x.shape[2:])


@dataclass
class GatherTimes:
    """Median seconds per gather for one (samples, channels) shape."""

    samples: int
    channels: int
    nbytes: int
    article: float
    row: float
    advanced: float | None = None
    memcpy: float | None = None
    server: float | None = None


def measure(
    x: torch.Tensor, samples: int, channels: int, reps: int, full: bool = False
) -> GatherTimes:
    """Times article and row gather; with ``full`` also advanced indexing and memcpy."""
    from bench._tensorslice import server_gather  # the service's gather (the planner)

    b, c = pick(samples, channels)
    want = article(x, b, c)
    out = torch.empty_like(want)
    if not torch.equal(row_gather(x, b, c, out), want):
        raise AssertionError("row gather disagrees with x[b][:, c]")
    out2 = torch.empty_like(want)
    if server_gather(x, b, c, out2) != out2.numel() * 4 or not torch.equal(out2, want):
        raise AssertionError("server_gather disagrees with x[b][:, c]")
    t = GatherTimes(
        samples,
        channels,
        want.numel() * want.element_size(),
        article=time_per_call(lambda: article(x, b, c), reps),
        row=time_per_call(lambda: row_gather(x, b, c, out), reps),
        server=time_per_call(lambda: server_gather(x, b, c), reps),
    )
    if full:
        if not torch.equal(advanced(x, b, c), want):
            raise AssertionError("x[b[:, None], c] disagrees with x[b][:, c]")
        src = want.clone()
        t.advanced = time_per_call(lambda: advanced(x, b, c), reps)
        t.memcpy = time_per_call(lambda: out.copy_(src), reps)
    return t
