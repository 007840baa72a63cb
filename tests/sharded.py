"""A sharded cluster for tests: 3 in-process servers on 127.0.0.1 (port 0), each holding its
rows of every tensor under the tensor's own name, cut in 3 uneven pieces."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from tensorslice.server import ServerConfig, TensorStore, create_server

SHARDS = ("s0", "s1", "s2")


def cuts(n: int) -> list[tuple[int, int]]:
    """Three uneven row ranges covering [0, n): the middle one the largest; for fewer than
    3 rows, the last pieces are empty."""
    if n >= 3:
        first, third = max(1, n // 5), max(1, n // 3)
        sizes = [first, n - first - third, third]
    else:
        sizes = [min(n, 1), max(n - 1, 0), 0]
    out, at = [], 0
    for s in sizes:
        out.append((at, at + s))
        at += s
    return out


def spec_for(tensors: Mapping[str, torch.Tensor], addresses: Sequence[str]) -> dict[str, Any]:
    return {
        "shards": {s: [a] for s, a in zip(SHARDS, addresses, strict=True)},
        "tensors": {
            name: [{"shard": s, "rows": [a, b]}
                   for s, (a, b) in zip(SHARDS, cuts(t.shape[0]), strict=True)]
            for name, t in tensors.items()
        },
    }


@contextmanager
def serve_sharded(
    tensors: Mapping[str, torch.Tensor],
    device: str = "cpu",
    dim_names: Mapping[str, Sequence[str]] | None = None,
    config: ServerConfig | None = None,
) -> Iterator[dict[str, Any]]:
    """Start the 3 servers; yield the cluster spec (a dict) naming them."""
    stores = [TensorStore(device=device) for _ in SHARDS]
    for name, t in tensors.items():
        pieces = cuts(t.shape[0])
        for k, (a, b) in enumerate(pieces):
            if b > a or (k == 0 and not t.shape[0]):
                names = (dim_names or {}).get(name)
                stores[k].add(name, t[a:b].clone(), dim_names=names or ())
    with ExitStack() as stack:
        addresses = []
        for store in stores:
            srv, port = create_server(store, "127.0.0.1:0", config or ServerConfig())
            srv.start()
            stack.callback(srv.stop, None)
            addresses.append(f"127.0.0.1:{port}")
        yield spec_for(tensors, addresses)
