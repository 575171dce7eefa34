"""Resource limits of the services: what one caller may make a service hold or do.

Pure bookkeeping, no network code. Each refusal is a `ResourceExhausted` (wanps.rpc.errors),
which every servicer maps to RESOURCE_EXHAUSTED with the message (the limit, its value,
what to change).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from wanps.rpc.errors import ResourceExhausted


@dataclass(frozen=True)
class Limits:
    # Elements of one payload: a model's parameters (Join, SeedModel) and one push's count.
    # 2**27 float32 = 512 MiB per model copy; the server holds a few copies (model, open rounds).
    max_payload_elements: int = 2**27
    # Open streams (Push, PullModel, Updates; Decisions on the controller) per worker id at once.
    # A worker needs tau_max + 1 pushes in flight, one update stream and sometimes a pull.
    max_streams_per_worker: int = 32
    # Joins: a token bucket refilled at join_rate_per_s, holding at most join_burst. The burst
    # lets a whole cluster (re)join at once, e.g. after a server restart.
    join_rate_per_s: float = 20.0
    join_burst: int = 128

    def __post_init__(self) -> None:
        if self.max_payload_elements < 1 or self.max_streams_per_worker < 1:
            raise ValueError("max_payload_elements and max_streams_per_worker must be >= 1")
        if not self.join_rate_per_s > 0 or self.join_burst < 1:
            raise ValueError("join_rate_per_s must be > 0 and join_burst >= 1")

    def check_elements(self, what: str, count: int) -> None:
        if count > self.max_payload_elements:
            raise ResourceExhausted(f"{what}: {count} elements exceeds the server's limit of "
                                    f"{self.max_payload_elements} per payload (--max-payload-elements)")


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take()` spends one or refuses."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, what: str) -> None:
        self._refill()
        if self._tokens < 1.0:
            wait = (1.0 - self._tokens) / self.rate
            raise ResourceExhausted(f"{what} rate limit: at most {self.rate:g}/s (burst {self.burst}); "
                                    f"retry in {wait:.2f} s")
        self._tokens -= 1.0


class StreamLimiter:
    """Counts open streams per worker id; `open(worker_id, rpc)` refuses one over the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[int, int] = {}

    def count(self, worker_id: int) -> int:
        return self._open.get(worker_id, 0)

    def acquire(self, worker_id: int, rpc: str) -> None:
        current = self._open.get(worker_id, 0)
        if current >= self.limit:
            raise ResourceExhausted(f"{rpc}: worker {worker_id} already has {current} open streams "
                                    f"(limit {self.limit}, --max-streams-per-worker)")
        self._open[worker_id] = current + 1

    def release(self, worker_id: int) -> None:
        left = self._open[worker_id] - 1
        if left:
            self._open[worker_id] = left
        else:
            del self._open[worker_id]  # ids come and go: keep no entry per id ever seen

    @contextmanager
    def open(self, worker_id: int, rpc: str) -> Iterator[None]:
        self.acquire(worker_id, rpc)
        try:
            yield
        finally:
            self.release(worker_id)
