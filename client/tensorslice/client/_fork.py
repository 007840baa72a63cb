"""The client and `fork`: what a forked process may do, set before gRPC loads.

gRPC cannot be used in a process forked while another thread of the parent was inside
gRPC (a pending `channel_ready_future`, a stream consumed in a thread, an asyncio client's
loop): gRPC then skips its fork handlers ("Other threads are currently calling into gRPC,
skipping fork() handlers") and the child crashes in it. Hence:

- A process forked from one that loaded this package never calls gRPC: its clients call
  over the server's data plane (`forked_from_grpc`).
- gRPC's own fork handling is then of no use, and with `GRPC_ENABLE_FORK_SUPPORT` unset
  gRPC starts threads in the child that crash there; this module sets it to ``0`` (no fork
  handlers) unless it is set already. gRPC reads it when it loads: importing
  `tensorslice.client` before `grpc` makes that so (`GRPC_FORK_SUPPORT_SET` says whether
  it is set for this process's gRPC).
"""

from __future__ import annotations

import os
import sys

__all__ = ["GRPC_FORK_SUPPORT_SET", "forked_from_grpc"]

GRPC_FORK_SUPPORT_SET = "grpc" not in sys.modules or "GRPC_ENABLE_FORK_SUPPORT" in os.environ
"""Whether gRPC loads (or loaded) with `GRPC_ENABLE_FORK_SUPPORT` set: false when `grpc`
was imported before this package with the variable unset."""
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

_FORKED_FROM_GRPC = False


def _forked() -> None:
    global _FORKED_FROM_GRPC
    _FORKED_FROM_GRPC = True


os.register_at_fork(after_in_child=_forked)


def forked_from_grpc() -> bool:
    """Whether this process was forked from one that had loaded the client (and gRPC)."""
    return _FORKED_FROM_GRPC
