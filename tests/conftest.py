"""Shared fixtures: real services on 127.0.0.1, port 0, in a background event loop."""
from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from wanps.controller.policy import PolicyConfig
from wanps.controller.service import ControllerConfig, start_controller
from wanps.rpc.auth import ServerSecurity
from wanps.rpc.config import event_loop_factory
from wanps.rpc.limits import Limits
from wanps.server.service import ServerConfig, start_server


@pytest.fixture(autouse=True)
def _quiet_readonly_buffer_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        yield


def join_threads(threads: Sequence[threading.Thread], timeout_s: float, errors: Sequence[BaseException] = ()) -> None:
    """Join every thread within one shared `timeout_s` (a bound on a hang, not a speed). A
    thread still running fails the test naming it, with the stack it is stuck in and the
    errors the threads reported so far (a join with a timeout alone says nothing)."""
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread for thread in threads if thread.is_alive()]
    if stuck:
        frames = sys._current_frames()
        stacks = "\n".join(f"--- {thread.name} is at:\n" + "".join(traceback.format_stack(frames[thread.ident]))
                           for thread in stuck if thread.ident in frames)
        raise AssertionError(f"{len(stuck)} of {len(threads)} threads still running after {timeout_s:g} s "
                             f"(errors so far: {list(errors)!r}):\n{stacks}")


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 60.0, poll_s: float = 0.01) -> None:
    """Poll `condition` until it is true; `timeout_s` only bounds a hang."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


class OptimizerInThread:
    """An Optimizer built on a thread of its own: its constructor joins and pulls, which may
    wait. `optimizer` is set as soon as construction begins, so a test can interrupt() it
    while it waits; `errors` holds what construction raised; `join()` waits (bounded)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from wanps.worker import Optimizer

        self.optimizer: Any = None
        self.errors: list[BaseException] = []
        holder = self

        class Recording(Optimizer):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                holder.optimizer = self
                super().__init__(*args, **kwargs)

        def construct() -> None:
            try:
                Recording(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - what the test checks
                self.errors.append(exc)

        self.thread = threading.Thread(target=construct, name="optimizer-in-thread")
        self.thread.start()

    def join(self, timeout_s: float) -> None:
        join_threads([self.thread], timeout_s)


class LoopThread:
    """An event loop on its own thread, to host gRPC services next to blocking test code."""

    def __init__(self) -> None:
        self.loop = event_loop_factory(True)()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        join_threads([self.thread], 10)  # closing a loop that still runs would raise anyway
        self.loop.close()


class Cluster:
    """A parameter server and a controller, started for real, with their registries."""

    def __init__(self, loop: LoopThread, server_config: ServerConfig, controller_config: ControllerConfig | None):
        self.loop = loop
        self.server_registry = CollectorRegistry()
        self.server = loop.run(start_server(server_config, self.server_registry))
        self.controller = None
        self.controller_registry = CollectorRegistry()
        if controller_config is not None:
            self.controller = loop.run(start_controller(controller_config, self.controller_registry))

    @property
    def server_address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def controller_address(self) -> str | None:
        return f"127.0.0.1:{self.controller.port}" if self.controller else None

    @property
    def core(self):
        return self.server.service.core

    def stop(self) -> None:
        if self.controller is not None:
            self.loop.run(self.controller.stop(0.5))
        self.loop.run(self.server.stop(0.5))


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def make_cluster(loop_thread: LoopThread):
    started: list[Cluster] = []

    def make(*, tau_max: int = 4, min_workers: int = 1, policy: str | None = "static", tau: int = 1,
             delta: float = 0.1, history_rounds: int = 64, security: ServerSecurity = ServerSecurity(),
             limits: Limits = Limits(), max_message_bytes: int = ServerConfig.max_message_bytes,
             controller_streams: int = ControllerConfig.max_streams_per_worker,
             history_mb: float = ServerConfig.history_mb, lease_s: float = ServerConfig.lease_s,
             **policy_options) -> Cluster:
        server_config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, tau_max=tau_max,
                                     min_workers=min_workers, history_rounds=history_rounds, history_mb=history_mb,
                                     lease_s=lease_s,
                                     security=security,
                                     limits=limits, max_message_bytes=max_message_bytes,
                                     check_core_thread=True)  # the servicer must not touch its core off its thread
        controller_config = None
        if policy is not None:
            controller_config = ControllerConfig(host="127.0.0.1", port=0, metrics_port=0,
                                                 policy=PolicyConfig(name=policy, tau=tau, delta=delta,
                                                                     **policy_options),
                                                 security=security, max_streams_per_worker=controller_streams)
        cluster = Cluster(loop_thread, server_config, controller_config)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()
    for cluster in started:
        assert cluster.server.service.core_thread_violations == []
