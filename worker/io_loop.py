"""A worker's I/O thread: one asyncio (uvloop) event loop on a daemon thread.

grpc.aio channels and calls belong to the loop they were created on, so every call is made
there; the training thread hands work over with `submit` (a future) or `call` (blocking).
A blocking `call` that times out, or whose caller is interrupted, cancels its coroutine
(and with it the gRPC call), so nothing keeps running, or downloading, behind the caller's
back. `interrupt()` (from any thread, a signal handler included) cancels every blocking call
in progress and makes later ones raise `Interrupted`: how `wanps worker` stops within a few
seconds of SIGTERM whatever it is waiting for.
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


class Interrupted(Exception):
    """The worker was asked to stop (Optimizer.interrupt(), SIGTERM/SIGINT in `wanps worker`):
    whatever it was waiting for was given up."""


class IoLoop:
    def __init__(self, use_uvloop: bool = True, name: str = "wanps-worker-io") -> None:
        self.loop = event_loop_factory(use_uvloop)()
        # Background tasks, cancelled at close; a finished one leaves the set by itself.
        self._tasks: set[asyncio.Task] = set()
        # Blocking calls in progress (what interrupt() cancels), and whether it was called.
        self._calls: set[concurrent.futures.Future] = set()
        self._calls_lock = threading.Lock()
        self.interrupted = False
        self._on_interrupt: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    def submit(self, make: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run `make()` on the loop (gRPC calls must be created there) and await it."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def call(self, make: Callable[[], Awaitable[T]], timeout: float | None = None, *,
             interruptible: bool = True) -> T:
        """`make()` on the loop, waited for up to `timeout`. On a timeout (TimeoutError) or any
        other way out of the wait, the coroutine is cancelled: a gRPC call ends with it.
        `interruptible=False`: for the few calls a stopping worker still makes (its Leave)."""
        future = self.submit(make)
        if interruptible:
            with self._calls_lock:  # registered before the flag is read: interrupt() cannot miss it
                self._calls.add(future)
        try:
            if interruptible and self.interrupted:
                raise Interrupted("the worker is stopping")
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            if interruptible and self.interrupted:
                raise Interrupted("the worker is stopping") from None
            raise
        finally:
            future.cancel()  # no-op when done; otherwise the call must not outlive its caller
            if interruptible:
                with self._calls_lock:
                    self._calls.discard(future)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Run `callback(*args)` on the loop, from any thread, without waiting."""
        self.loop.call_soon_threadsafe(callback, *args)

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop when interrupt() is called (the session wakes its waiters)."""
        self._on_interrupt.append(callback)

    def interrupt(self) -> None:
        """Give up every blocking call, now and from now on. Safe from any thread and from a
        signal handler: it sets a flag and hands the rest to the loop."""
        self.interrupted = True
        self.loop.call_soon_threadsafe(self._interrupt_on_loop)

    def _interrupt_on_loop(self) -> None:
        with self._calls_lock:
            calls = list(self._calls)
        for future in calls:
            future.cancel()
        for callback in self._on_interrupt:
            callback()

    def raise_if_interrupted(self) -> None:
        if self.interrupted:
            raise Interrupted("the worker is stopping")

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
