"""The host side of scripts/docker-smoke: a client against the container, as a user runs
one. Arguments: ADDRESS METRICS_URL SCRATCH_DIR. Exits non-zero at the first failure."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from tensorslice.client import Client, ServerUnavailable, TlsConfig, Unauthenticated


def check(what: str, ok: bool) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        raise SystemExit(1)


def main() -> None:
    address, metrics_url, scratch = sys.argv[1:4]
    token = open(os.path.join(scratch, "token")).read().strip()
    ca = os.path.join(scratch, "certs", "ca.pem")
    x = load_file(os.path.join(scratch, "data", "x.safetensors"))["x"]

    with Client(address, timeout=30, token=token, tls=ca) as c:
        infos = {i.name: i for i in c.list_tensors()}
        check(f"list: {sorted(infos)}", set(infos) == {"x"} and infos["x"].shape == x.shape)
        remote = c.tensor("x")
        check("slice x[0:256] (1 MiB+: the bulk data plane, over TLS)",
              torch.equal(remote[0:256], x[0:256]))
        check("slice x[3:5, 10:20] (inline)", torch.equal(remote[3:5, 10:20], x[3:5, 10:20]))
        idx = [7, 1, 300, 1]
        check("gather x[[7, 1, 300, 1], ::3]", torch.equal(remote[idx, ::3], x[idx, ::3]))
        check("health: SERVING", c.health() == "SERVING")

    with Client(address, timeout=10, retries=0, tls=ca) as c:
        try:
            c.list_tensors()
            refused = False
        except Unauthenticated:
            refused = True
        check("a call without the token is refused (UNAUTHENTICATED)", refused)
        check("health needs no token", c.health() == "SERVING")

    for what, tls in (("a plaintext client", False), ("a client trusting another CA",
                                                        TlsConfig(ca=os.path.join(
                                                            scratch, "certs", "other-ca.pem")))):
        with Client(address, timeout=10, retries=0, token=token, tls=tls) as c:
            try:
                c.list_tensors()
                refused = False
            except ServerUnavailable:
                refused = True
            check(f"TLS verified: {what} is refused", refused)

    env = dict(os.environ, TENSORSLICE_TLS_CA=ca)
    cli = os.path.join(os.path.dirname(sys.executable), "tensorslice")
    rc = subprocess.run([cli, "health", address],
                        env=env, capture_output=True, text=True, timeout=60).returncode
    check("`tensorslice health` from the host exits 0", rc == 0)

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    fetch_ok = sum(v for (n, labels), v in samples.items()
                   if n == "tensorslice_grpc_server_handled_total"
                   and ("grpc_method", "Fetch") in labels and ("grpc_code", "OK") in labels)
    refused = sum(v for (n, labels), v in samples.items()
                  if n == "tensorslice_grpc_server_handled_total"
                  and ("grpc_code", "UNAUTHENTICATED") in labels)
    bulk = samples.get(("tensorslice_sent_bytes_total", (("transport", "bulk"),)), 0)
    held = samples.get(("tensorslice_tensor_bytes", (("device", "cpu"),)), 0)
    check(f"metrics parsed: {len(samples)} samples, Fetch OK {fetch_ok:.0f}, "
          f"UNAUTHENTICATED {refused:.0f}, bulk bytes {bulk:.0f}, tensor bytes {held:.0f}",
          fetch_ok >= 3 and refused >= 1 and bulk >= 256 * x[0].nbytes
          and held == x.nbytes)


if __name__ == "__main__":
    main()
