"""What every benchmark reports the same way: the machine it ran on, text tables, JSON files."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
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
