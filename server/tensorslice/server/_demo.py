"""`tensorslice demo`: a server and a client in one process, showing the article's three
patterns (narrow, index lists, threshold masks) with their plans and timings."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from tensorslice.client import Client
from tensorslice.core.selection import Combine, Selection, outer_selectors
from tensorslice.server._server import create_server
from tensorslice.server._store import DEMO_DIM_NAMES, TensorStore, demo_tensor


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _check(label: str, ok: bool) -> None:
    print(f"   {label}: {'identical' if ok else 'DIFFERENT'}")
    if not ok:
        raise SystemExit(f"demo: {label} differs")


def run_demo(*, quick: bool = False) -> int:
    shape = (64, 64, 16, 16) if quick else (256, 64, 32, 32)
    reps = 3 if quick else 7
    x = demo_tensor(shape)
    store = TensorStore()
    store.add("acts", x, dim_names=DEMO_DIM_NAMES, source="generated demo")
    server, port = create_server(store, "127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    mib = x.numel() * x.element_size() / 2**20
    print(f"tensorslice demo: serving 'acts' {list(shape)} float32 ({mib:.0f} MiB) on {address}\n")
    try:
        with Client(address) as c:
            acts = c.tensor("acts")
            print("1. narrow (contiguous blocks): acts[0:10] and acts[0:10, 10:20]")
            for label, idx in (("acts[0:10]", (slice(0, 10),)),
                               ("acts[0:10, 10:20]", (slice(0, 10), slice(10, 20)))):
                plan = acts.explain[idx]
                ms = _median_ms(functools.partial(acts.__getitem__, idx), reps)
                print(f"   {label}: {plan.summary}  ({ms:.2f} ms median)")
                _check(f"{label} vs local", torch.equal(acts[idx], x[idx]))

            b = [0, 2, 5, 7, 11, 13]
            ch = [1, 3, 5, 10]
            print("\n2. index lists: these samples x these channels")
            plan = c.explain("acts", _outer(b, ch))
            ms = _median_ms(lambda: acts.oindex[b, ch], reps)
            print(f"   acts.oindex[{b}, {ch}]: {plan.summary}  ({ms:.2f} ms median)")
            for step in plan.steps:
                print(f"     {step.order}. {step.kind} {step.detail}")
            art = x[torch.tensor(b)][:, torch.tensor(ch)]
            _check("vs the article's x[b][:, c]", torch.equal(acts.oindex[b, ch], art))
            vec = acts[[0, 2], [1, 3]]
            print(f"   acts[[0, 2], [1, 3]] (PyTorch semantics: pairs) -> shape "
                  f"{list(vec.shape)}")
            _check("vs local x[[0, 2], [1, 3]]", torch.equal(vec, x[[0, 2], [1, 3]]))

            t = 0.3
            print(f"\n3. threshold masks: channels whose spatial mean > {t}")
            m = x.mean(dim=(2, 3)) > t
            try:
                x[:, m, :, :]
                print("   the article's x[:, x.mean(dim=(2, 3)) > t]: ran (wrongly)")
            except IndexError as exc:
                print(f"   the article's x[:, x.mean(dim=(2, 3)) > t] fails: {exc}")
                print("   (its (B, C) mask would consume dimensions C and H)")
            for scope in ("any", "all", "per_sample", "topk"):
                k = 3 if scope == "topk" else 0
                where = functools.partial(acts.where, 1, "mean", op=">", value=t,
                                          scope=scope, k=k)
                ms = _median_ms(where, reps)
                r = acts.where(1, "mean", op=">", value=t, scope=scope, k=k)
                extra = f", offsets {list(r.offsets.shape)}" if r.offsets is not None else ""
                print(f"   scope {scope:<10}: values {list(r.values.shape)}, indices "
                      f"{list(r.indices.shape)}{extra}  ({ms:.2f} ms median)")
            any_ref = x[:, m.any(0)]
            r = acts.where(1, "mean", op=">", value=t, scope="any")
            _check("scope any vs x[:, mask.any(0)]", torch.equal(r.values, any_ref))
            r = acts.where(1, "mean", op=">", value=t, scope="per_sample")
            nested = r.to_nested()
            print(f"   per_sample as a jagged nested tensor: {nested.shape}")
            ok = all(torch.equal(rows, x[i][m[i]]) for i, rows in enumerate(r.per_sample()))
            _check("per_sample vs a per-sample loop", ok)
    finally:
        server.stop(grace=None)
    print("\ndemo finished")
    return 0


def _outer(b: list[int], ch: list[int]) -> Selection:
    return Selection(outer_selectors((b, ch)), Combine.OUTER)
