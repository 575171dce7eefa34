"""What every benchmark reports the same way: the machine it ran on, text tables, JSON files."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        # Other processes compete for the same cores; the load says how much they did.
        "loadavg": os.getloadavg(),
    }


def _best_seconds_on_one_thread(run, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `run` with torch on one thread (after one
    untimed call that touches the pages)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return best


def copy_bandwidth(num_floats: int = 64 * 2**20, repeats: int = 5) -> float:
    """GB/s of a float32 copy on one thread (bytes read + bytes written), best of `repeats`."""
    src = torch.ones(num_floats)
    dst = torch.empty(num_floats)
    return 2 * 4 * num_floats / _best_seconds_on_one_thread(lambda: dst.copy_(src), repeats) / 1e9


SORT_RATE_ELEMENTS = 800_000


def sort_milliseconds(elements: int = SORT_RATE_ELEMENTS, repeats: int = 5) -> float:
    """ms of `torch.sort` of `elements` random int64 on one thread, best of `repeats`: with
    `copy_bandwidth`, how fast this machine is at the server's work, so figures from two
    machines can be read against each other (800K: a round of 8 pushes of 100K pairs)."""
    keys = torch.randint(0, 1 << 30, (elements,), generator=torch.Generator().manual_seed(0))
    return _best_seconds_on_one_thread(lambda: torch.sort(keys), repeats) * 1e3


def machine_rates() -> dict[str, float]:
    """The two rates benchmarks print in their header: memory copy (GB/s) and sort (ms)."""
    return {"copy_gb_per_s": copy_bandwidth(), "sort_800k_int64_ms": sort_milliseconds()}


def rates_summary(rates: dict[str, float]) -> str:
    return (f"memory copy {rates['copy_gb_per_s']:.1f} GB/s (float32, one thread, read + write); "
            f"torch.sort of {SORT_RATE_ELEMENTS // 1000}K int64 {rates['sort_800k_int64_ms']:.1f} ms (one thread)")


def load_summary(machine: dict[str, Any]) -> str:
    """`load average 1m 5m 15m on N CPUs`, from `machine_info()`."""
    one, five, fifteen = machine["loadavg"]
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {machine['cpus']} CPUs"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left_aligned: bool = False) -> str:
    """Columns as wide as their widest cell, two spaces apart, a rule under the header."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if left_aligned else c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, result: Any, announce: bool = True) -> None:
    """Write `result` (dataclasses included) as JSON, creating the folder; say so unless told not to."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_dataclass_as_dict) + "\n")
    if announce:
        print(f"wrote {path}")


def _dataclass_as_dict(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
