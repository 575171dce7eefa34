"""An observer replica: follows the model through the update stream, never pushes.

Used for evaluation off the critical path (the demo's accuracy curve) and monitoring.
It binds a model's parameters to its own flat replica, exactly like a worker.
"""
from __future__ import annotations

import socket
import time

import torch

from wanps.worker.optimizer import bind_to_flat, model_fingerprint
from wanps.worker.replica import Replica
from wanps.rpc.auth import ClientSecurity
from wanps.worker.recovery import ConnectionLost
from wanps.worker.session import WorkerSession


class Observer:
    def __init__(self, model: torch.nn.Module, server: str, *, controller: str | None = None, name: str | None = None,
                 keep_deltas: bool = False, join_timeout_s: float = 600.0, use_uvloop: bool = True,
                 security: ClientSecurity | None = None, recover_timeout_s: float = 600.0) -> None:
        self.model = model
        self.recover_timeout_s = recover_timeout_s  # poll() gives up reconnecting after this
        params = list(model.parameters())
        flat = bind_to_flat(params)
        self.fingerprint = model_fingerprint(params)
        # With a controller, the observer also follows decisions (to show tau and delta), reporting nothing.
        self.session = WorkerSession(server, controller, use_uvloop=use_uvloop, security=security)
        try:
            reply = self.session.join(flat.numel(), self.fingerprint,
                                      name or f"observer@{socket.gethostname()}", observer=True)
            self.worker_id = reply.worker_id
            pulled = self.session.pull(join_timeout_s)
            flat.copy_(pulled.values)
            self.replica = Replica(flat, pulled.version)
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

    def poll(self) -> int:
        """Apply every delta received so far. Returns the version.

        A lost connection is recovered first, as a worker does (docs/operations.md), except
        that an observer has no pushes to send again and rejoins as an observer."""
        while True:
            try:
                return self.replica.catch_up(self.session.deltas, 0)
            except ConnectionLost:
                self._recover(self.recover_timeout_s)

    def wait_for_version(self, version: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.replica.catch_up(self.session.deltas, version, deadline=deadline)
            except ConnectionLost:
                self._recover(max(1.0, deadline - time.monotonic()))

    def _recover(self, timeout_s: float) -> None:
        def wait_for(version: int) -> None:
            self.replica.catch_up(self.session.deltas, version)

        recovery = self.session.recover(self.replica, wait_for, tau_max=0, next_round=0, timeout=timeout_s)
        if recovery.rejoined:
            self.worker_id = self.session.worker_id

    def close(self) -> None:
        try:
            self.session.leave()
        except Exception:  # the server may already be gone at teardown
            pass
        self.session.close()
