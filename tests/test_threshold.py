"""Threshold masks: the article's third example is wrong; the service's `where` is right.

`x[:, x.mean(dim=(2, 3)) > t]` with a (B, C) mask does not select channels: a k-D mask
consumes k dimensions, here C *and* H. The service keeps positions of one dimension, with
the mask's batch dimension handled by an explicit scope (any, all, per_sample, topk).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from tensorslice.client import Client, InvalidSelection, RemoteTensor, WhereResult
from tensorslice.server import demo_tensor

STATS: dict[str, Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]] = {
    "mean": lambda x, d: x.mean(d),
    "max": lambda x, d: x.amax(d),
    "min": lambda x, d: x.amin(d),
    "sum": lambda x, d: x.sum(d),
    "abs_mean": lambda x, d: x.abs().mean(d),
    "l2": lambda x, d: torch.linalg.vector_norm(x, 2, d),
}
OPS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    ">": torch.gt,
    ">=": torch.ge,
    "<": torch.lt,
    "<=": torch.le,
}


def _safe_threshold(stat: torch.Tensor, q: float = 0.5) -> float:
    """A threshold near quantile `q` of `stat` that no value comes close to, so that the
    device's own reduction order cannot move a position across it."""
    v = stat.reshape(-1).sort().values.double()
    i = min(max(int(q * (v.numel() - 1)), 0), v.numel() - 2)
    for j in sorted(range(v.numel() - 1), key=lambda j: abs(j - i)):
        if v[j + 1] - v[j] > 1e-3 * max(1.0, float(v.abs().max())):
            return float((v[j] + v[j + 1]) / 2)
    raise AssertionError("no gap in the statistic")


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(got, want)


@pytest.fixture()
def remote(client: Client) -> RemoteTensor:
    return client.tensor("demo")


# ---------------------------------------------------------------------------- the mistake


@pytest.mark.unit
def test_article_mask_raises_when_batch_differs_from_channels() -> None:
    x = demo_tensor((4, 6, 5, 3))  # B=4, C=6, H=5
    m = x.mean(dim=(2, 3)) > 0.0  # (B, C)
    with pytest.raises(IndexError, match=re.escape(
        "The shape of the mask [4, 6] at index 0 does not match the shape of the indexed "
        "tensor [4, 6, 5, 3] at index 1"  # mask dim 0 (B=4) laid against C (6)
    )):
        x[:, m]


@pytest.mark.unit
def test_article_mask_silently_wrong_when_batch_channels_and_height_agree() -> None:
    x = demo_tensor((5, 5, 5, 3))  # B == C == H
    m = x.mean(dim=(2, 3)) > 0.0
    wrong = x[:, m]
    # It ran, but consumed C and H: (B, nnz, W), and rows are (c, h) pairs, not channels.
    assert wrong.shape == (5, int(m.sum()), 3)
    assert wrong.ndim == 3
    c_idx, h_idx = m.nonzero(as_tuple=True)  # read as (channel, height)
    assert torch.equal(wrong, x[:, c_idx, h_idx])
    # What was meant, per channel (any sample): a 4-D result of whole feature maps.
    meant = x[:, m.any(0)]
    assert meant.ndim == 4
    assert meant.shape[2:] == (5, 3)
    assert wrong.shape != meant.shape


@pytest.mark.e2e
def test_service_does_not_repeat_the_mistake(remote: RemoteTensor, demo: torch.Tensor) -> None:
    m = demo.mean(dim=(2, 3)) > 0.0  # (16, 12)
    with pytest.raises(IndexError):  # the article's line, locally
        demo[:, m]
    r = remote.where(1, "mean", op=">", value=0.0, scope="any")
    assert r.values.ndim == 4
    _same(r.values, demo[:, m.any(0)])


# ---------------------------------------------------------------------------- scopes


@pytest.mark.e2e
@pytest.mark.parametrize("stat", list(STATS))
@pytest.mark.parametrize("op", list(OPS))
def test_any_and_all(remote: RemoteTensor, demo: torch.Tensor, stat: str, op: str) -> None:
    s = STATS[stat](demo, (2, 3))
    hi = op in (">", ">=")
    # Thresholds that keep some channels and drop others, for each scope.
    t = _safe_threshold(s, 0.9 if hi else 0.1)
    m = OPS[op](s, t)
    assert 0 < int(m.any(0).sum()) < 12
    r = remote.where(1, stat, op=op, value=t, scope="any")
    _same(r.values, demo[:, m.any(0)])
    _same(r.indices, m.any(0).nonzero().reshape(-1))
    ta = _safe_threshold(s, 0.1 if hi else 0.9)
    ma = OPS[op](s, ta).all(0)
    assert 0 < int(ma.sum()) < 12
    ra = remote.where("C", stat, op=op, value=ta, scope="all")
    _same(ra.values, demo[:, ma])
    _same(ra.indices, ma.nonzero().reshape(-1))


def _per_sample_reference(
    x: torch.Tensor, passed: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    rows, idx, offsets = [], [], [0]
    for b in range(x.shape[0]):
        keep = passed[b].nonzero().reshape(-1)
        rows.append(x[b, keep])
        idx.append(keep)
        offsets.append(offsets[-1] + keep.numel())
    return rows, torch.cat(idx), torch.tensor(offsets, dtype=torch.int64)


@pytest.mark.e2e
@pytest.mark.parametrize("stat", list(STATS))
@pytest.mark.parametrize("op", list(OPS))
def test_per_sample(remote: RemoteTensor, demo: torch.Tensor, stat: str, op: str) -> None:
    s = STATS[stat](demo, (2, 3))
    t = _safe_threshold(s, 0.6)
    passed = OPS[op](s, t)
    rows, idx, offsets = _per_sample_reference(demo, passed)
    r = remote.where(1, stat, over=(2, 3), op=op, value=t, scope="per_sample")
    assert r.offsets is not None
    _same(r.offsets, offsets)
    _same(r.indices, idx)
    _same(r.values, torch.cat(rows))
    assert len(set(offsets.diff().tolist())) > 1  # really jagged
    per = r.per_sample()
    assert len(per) == demo.shape[0]
    for got, want in zip(per, rows, strict=True):
        _same(got, want)
    nt = r.to_nested()
    assert nt.is_nested
    assert nt.size(0) == demo.shape[0]
    for got, want in zip(nt.unbind(), rows, strict=True):
        _same(got, want)
    ref_nt = torch.nested.nested_tensor_from_jagged(torch.cat(rows), offsets)
    for got, want in zip(nt.unbind(), ref_nt.unbind(), strict=True):
        _same(got, want)


@pytest.mark.e2e
@pytest.mark.parametrize("stat", list(STATS))
@pytest.mark.parametrize("k", [1, 3, 12])
def test_topk(remote: RemoteTensor, demo: torch.Tensor, stat: str, k: int) -> None:
    s = STATS[stat](demo, (2, 3))
    want_idx = torch.topk(s, k, dim=1).indices  # (B, k)
    want = torch.stack([demo[b, want_idx[b]] for b in range(demo.shape[0])])
    r = remote.where(1, stat, scope="topk", k=k)
    _same(r.indices, want_idx)
    _same(r.values, want)
    assert r.values.shape == (16, k, 6, 5)
    assert r.offsets is None


@pytest.mark.e2e
def test_explicit_over_matches_default(remote: RemoteTensor, demo: torch.Tensor) -> None:
    s = demo.abs().mean((2, 3))
    t = _safe_threshold(s)
    a = remote.where(1, "abs_mean", value=t)
    b = remote.where(1, "abs_mean", over=(2, 3), value=t)
    c = remote.where("C", "abs_mean", over=("W", "H"), value=t)
    d = remote.where(1, "abs_mean", over=(-1, -2), value=t)
    want = demo[:, (s > t).any(0)]
    for r in (a, b, c, d):
        _same(r.values, want)


@pytest.mark.e2e
def test_over_part_of_the_rest_with_an_index(remote: RemoteTensor, demo: torch.Tensor) -> None:
    """`over` W alone, with H fixed by the index: the statistic of one row per channel."""
    x = demo[:, :, 2]  # (B, C, W)
    s = x.amax(2)
    t = _safe_threshold(s)
    m = s > t
    r = remote.where(1, "max", over=(3,), value=t, index=(slice(None), slice(None), 2))
    _same(r.values, x[:, m.any(0)])
    rp = remote.where(1, "max", over=(3,), value=t, scope="per_sample",
                      index=(slice(0, 8), slice(None), 2))
    rows, idx, offsets = _per_sample_reference(x[:8], m[:8])
    assert rp.offsets is not None
    _same(rp.values, torch.cat(rows))
    _same(rp.indices, idx)
    _same(rp.offsets, offsets)


@pytest.mark.e2e
def test_over_must_cover_the_rest(remote: RemoteTensor) -> None:
    with pytest.raises(InvalidSelection, match=re.escape(
        "the statistic must reduce every dimension but the batch (0) and the threshold's "
        "dimension 1 (C); dimension 2 (H) of size 6 is neither"
    )):
        remote.where(1, "mean", over=(3,))
    with pytest.raises(InvalidSelection, match=re.escape(
        "statistic cannot reduce dimension 1 (C): the threshold selects along it"
    )):
        remote.where(1, "mean", over=(1, 2, 3))


@pytest.mark.e2e
@pytest.mark.parametrize("stat", list(STATS))
def test_threshold_on_dim_0(remote: RemoteTensor, demo: torch.Tensor, stat: str) -> None:
    s = STATS[stat](demo, (1, 2, 3))  # one value per sample
    t = _safe_threshold(s)
    m = s > t
    for scope in ("any", "all"):
        r = remote.where(0, stat, value=t, scope=scope)
        _same(r.values, demo[m])
        _same(r.indices, m.nonzero().reshape(-1))
    top = remote.where("N", stat, scope="topk", k=4)
    want_idx = torch.topk(s, 4).indices
    _same(top.indices, want_idx)
    _same(top.values, demo[want_idx])
    with pytest.raises(InvalidSelection, match=re.escape(
        "scope per_sample needs a batch dimension 0 to keep positions per sample; "
        "the threshold is on it"
    )):
        remote.where(0, stat, scope="per_sample")


@pytest.mark.e2e
def test_threshold_with_view_selectors(remote: RemoteTensor, demo: torch.Tensor) -> None:
    """The statistic is computed on the region the other selectors leave."""
    x = demo[2:10, :, 1:4]
    s = x.mean((2, 3))
    t = _safe_threshold(s)
    m = (s > t).any(0)
    r = remote.where(1, "mean", value=t, index=(slice(2, 10), slice(None), slice(1, 4)))
    _same(r.values, x[:, m])
    _same(r.indices, m.nonzero().reshape(-1))


@pytest.mark.e2e
def test_where_result_of_dense_scope_is_not_jagged(remote: RemoteTensor) -> None:
    r = remote.where(1, "mean", scope="any")
    assert isinstance(r, WhereResult)
    with pytest.raises(ValueError, match=re.escape("only a per_sample result is jagged")):
        r.to_nested()
