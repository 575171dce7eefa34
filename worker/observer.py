"""An observer replica: follows the model through the update stream, never pushes.

Used for evaluation off the critical path (the demo's accuracy curve) and monitoring.
It binds a model to its own flat replica exactly like a worker (wanps.worker.layout,
wanps.worker.binding): given a module, every parameter and persistent buffer; given
parameters, only those. After each poll the model holds the replica's values: float32
parameters are views of it, low-precision parameters and buffers are copied from it.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from wanps.proto.wire import MAX_NAME_CHARS
from wanps.worker.binding import ModelBinding
from wanps.worker.layout import collect_module, collect_parameters, layout_of
from wanps.rpc.auth import ClientSecurity
from wanps.worker.recovery import ConnectionLost
from wanps.worker.shards import open_session, replica_for


class Observer:
    def __init__(self, model: nn.Module | Iterable[torch.Tensor], server: str | Sequence[str], *,
                 controller: str | None = None, name: str | None = None, keep_deltas: bool = False,
                 join_timeout_s: float = 600.0, use_uvloop: bool = True, security: ClientSecurity | None = None,
                 recover_timeout_s: float = 600.0, downlink_delta: float | None = None) -> None:
        """`model`: the module (follows every parameter and persistent buffer, as
        `Optimizer(model)` replicates them) or parameters (only those, as `Optimizer(params)`).
        A cluster of workers that passed parameters of a model without buffers can be followed
        with the module too: unnamed tensors match any name. `server`: one address, or every
        shard's in shard order ("A,B,C" or a list), as for the Optimizer. `downlink_delta`: the
        Optimizer's (a compressed downlink; the replica is then the model minus a residual)."""
        self.model = model
        self.recover_timeout_s = recover_timeout_s  # poll() gives up reconnecting after this
        if isinstance(model, nn.Module):
            tensors = collect_module(model)
        else:
            tensors = collect_parameters([{"params": list(model)}])
        self.layout, ordered = layout_of(tensors)
        self._binding = ModelBinding(self.layout, ordered)
        flat = self._binding.flat
        self.fingerprint = self.layout.fingerprint()
        # With a controller, the observer also follows decisions (to show tau and delta), reporting nothing.
        self.session = open_session(server, controller, use_uvloop=use_uvloop, security=security,
                                    downlink_delta=downlink_delta)
        try:
            name = name or f"observer@{socket.gethostname()}"[:MAX_NAME_CHARS]
            reply = self.session.first_join(flat.numel(), self.fingerprint, name,
                                            join_timeout_s, observer=True, structure=self.layout.structure,
                                            trainable_params=self.layout.trainable)
            self.worker_id = reply.worker_id
            pulled = self.session.first_pull(join_timeout_s)
            flat.copy_(pulled.values)
            self._show(frozen=True)
            self.replica = replica_for(self.session, flat, pulled)
            if keep_deltas:
                self.replica.applied = []
            self.initial_version = pulled.version
            self.initial_values = pulled.values.clone()
            self.session.follow_updates(pulled.version)
            self.session.follow_decisions(report_samples=False)
        except BaseException:
            self.session.close()
            raise

    @property
    def version(self) -> int:
        return self.replica.version

    def _show(self, frozen: bool = False) -> None:
        """The model holds the replica: low-precision parameters and buffers copied from it."""
        self._binding.refresh_parameters(frozen=frozen)
        self._binding.load_buffers()

    def poll(self) -> int:
        """Apply every delta received so far. Returns the version.

        A lost connection is recovered first, as a worker does (docs/operations.md), except
        that an observer has no pushes to send again and rejoins as an observer."""
        while True:
            try:
                before = self.replica.version
                version = self.replica.catch_up(self.session.deltas, 0)
                if version != before:
                    self._show()
                return version
            except ConnectionLost:
                self._recover(self.recover_timeout_s)

    def wait_for_version(self, version: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reached = self.replica.catch_up(self.session.deltas, version, deadline=deadline)
                self._show()
                return reached
            except ConnectionLost:
                self._recover(max(1.0, deadline - time.monotonic()))

    def _recover(self, timeout_s: float) -> None:
        def wait_for(version: int) -> None:
            self.replica.catch_up(self.session.deltas, version)

        recovery = self.session.recover(self.replica, wait_for, tau_max=0, next_round=0, timeout=timeout_s)
        self._show(frozen=True)
        if recovery.rejoined:
            self.worker_id = self.session.worker_id

    def close(self) -> None:
        try:
            self.session.leave()
        except Exception:  # the server may already be gone at teardown
            pass
        self.session.close()
