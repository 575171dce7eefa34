"""A worker's I/O thread: one asyncio (uvloop) event loop on a daemon thread.

grpc.aio channels and calls belong to the loop they were created on, so every call is made
there; the training thread hands work over with `submit` (a future) or `call` (blocking).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from wanps.rpc.config import event_loop_factory

T = TypeVar("T")
log = logging.getLogger(__name__)


class IoLoop:
    def __init__(self, use_uvloop: bool = True, name: str = "wanps-worker-io") -> None:
        self.loop = event_loop_factory(use_uvloop)()
        # Background tasks, cancelled at close; a finished one leaves the set by itself.
        self._tasks: set[asyncio.Task] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, make: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run `make()` on the loop (gRPC calls must be created there) and await it."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def call(self, make: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        return self.submit(make).result(timeout)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Run `callback(*args)` on the loop, from any thread, without waiting."""
        self.loop.call_soon_threadsafe(callback, *args)

    def start_task(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """On the loop: run `coroutine` in the background until it ends or the loop closes."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """From any thread: start `factory()` as a background task on the loop."""

        async def start() -> None:
            self.start_task(factory())

        self.call(start)

    async def cancel_tasks(self) -> None:
        """On the loop: cancel every background task and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self, timeout: float = 10.0) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():  # a callback that never returns; the daemon thread is left behind
            log.warning("%s: the I/O loop did not stop within %.0f s", self._thread.name, timeout)
        # Not closed: grpc's poller thread may still post to every loop it has seen,
        # which on a closed loop raises "Event loop is closed" (harmless, but noise).
