"""Recording a model's activations: forward hooks that append each batch's outputs to
named tensors on the server, sent by a background thread while the next forward runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Any

import torch

from tensorslice.client._client import Client

__all__ = ["ActivationRecorder"]

_STOP = object()


class ActivationRecorder:
    """Appends the output of each chosen module of a model, batch by batch, to a tensor of
    the server (``{tensor name: module}``), optionally cast to `dtype`. The hook takes a
    detached copy of the output (so the model may reuse its buffers) and queues it; one
    thread sends the queue in order, so sending overlaps the next forward. The queue holds
    at most `max_pending` batches: a forward waits when the server is slower than the
    model. Use it as a context manager, or call `close` (hooks removed, the queue sent, the
    first sending error raised)::

        with ActivationRecorder(client, {"acts.fc1": model.fc1}, dtype=torch.float16):
            for x, _ in loader:
                model(x)
    """

    def __init__(self, client: Client, modules: Mapping[str, torch.nn.Module], *,
                 dtype: torch.dtype | None = None, max_pending: int = 8) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1; got {max_pending}")
        self.client = client
        self.dtype = dtype
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._handles = [m.register_forward_hook(self._hook(name))
                         for name, m in modules.items()]
        self._thread = threading.Thread(target=self._send, name="tensorslice-record",
                                        daemon=True)
        self._thread.start()
        self.batches = 0
        """Batches sent so far (one per module per forward)."""

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self._error is not None:
                return  # stop queueing once sending failed; `close` raises it
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"module recorded as {name!r} returned "
                                f"{type(output).__name__}, not a tensor")
            out = output.detach()
            out = out.to(self.dtype, copy=True) if self.dtype is not None else out.clone()
            self._queue.put((name, out))

        return hook

    def _send(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue
            name, rows = item
            try:
                self.client.append(name, rows if rows.ndim else rows.reshape(1))
                self.batches += 1
            except BaseException as exc:  # kept for `close`
                self._error = exc

    def close(self) -> None:
        """Remove the hooks, wait until every queued batch is sent, and raise the first
        error sending met (if any)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> ActivationRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
