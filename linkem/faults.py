"""Link faults on a schedule: `reset@5,stall@8:3` (seconds after the emulator started).

A reset aborts every proxied connection with a TCP RST on both sides; a stall lets no new
byte onto the link in either direction for its duration (bytes already on the wire still
arrive), i.e. the bandwidth drops to zero. `LinkEmulator.schedule_faults` runs them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    kind: str  # "reset" or "stall"
    at_s: float  # seconds after the emulator started
    duration_s: float = 0.0  # stall only


FAULT_KINDS = ("reset", "stall")


def parse_faults(text: str) -> tuple[Fault, ...]:
    """`reset@5,stall@8:3` -> a reset 5 s after start, a 3 s stall 8 s after start."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, at, rest = item.partition("@")
        if kind not in FAULT_KINDS or not at:
            raise ValueError(f"fault {item!r}: expected reset@SECONDS or stall@SECONDS:DURATION")
        at_text, _, duration_text = rest.partition(":")
        try:
            at_s = float(at_text)
            duration_s = float(duration_text) if duration_text else 0.0
        except ValueError:
            raise ValueError(f"fault {item!r}: times must be numbers") from None
        if not (math.isfinite(at_s) and at_s >= 0 and math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError(f"fault {item!r}: times must be finite and >= 0")
        if kind == "stall" and duration_s <= 0:
            raise ValueError(f"fault {item!r}: a stall needs a duration (stall@SECONDS:DURATION)")
        faults.append(Fault(kind, at_s, duration_s))
    return tuple(sorted(faults, key=lambda f: f.at_s))
