"""Link traces: a link's bandwidth and one-way delay over time, read from CSV files.

The format (`linkem/traces/README.md`): a header `time_s,bandwidth_mbit,delay_ms`, then one
row per step; a row holds from its `time_s` until the next row's.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TRACE_HEADER = ("time_s", "bandwidth_mbit", "delay_ms")
# The shipped trace the demo and the benchmarks use unless told otherwise.
DEFAULT_TRACE = "wan-varying.csv"


def shipped_traces() -> dict[str, Path]:
    """The traces that ship with wanps (linkem/traces/), by file name."""
    folder = Path(str(resources.files("wanps.linkem") / "traces"))
    return {path.name: path for path in sorted(folder.glob("*.csv"))}


def locate(path: str | Path) -> Path:
    """`path` if a file is there; else the shipped trace it names (with or without `.csv`).
    Raises FileNotFoundError naming both the path and the shipped traces."""
    given = Path(path)
    if given.is_file():
        return given
    shipped = shipped_traces()
    name = given.name if given.suffix == ".csv" else f"{given.name}.csv"
    if str(given.parent) == "." and name in shipped:
        return shipped[name]
    raise FileNotFoundError(f"no trace file at {str(path)!r}, and no shipped trace of that name "
                            f"(shipped: {', '.join(shipped)})")


@dataclass(frozen=True)
class TracePoint:
    """One trace row: from `time_s` on (until the next row) the link has these properties."""

    time_s: float
    bandwidth_mbit: float
    delay_ms: float


class LinkTrace:
    """Step-wise link properties over time: the row with the greatest `time_s <= t` holds.

    With `loop=True` the trace repeats with period `last time_s + (last time_s - previous
    time_s)`, i.e. the last row holds as long as the gap before it. A one-row trace is
    constant. With `loop=False` the last row holds forever.
    """

    def __init__(self, points: Sequence[TracePoint], loop: bool = True) -> None:
        points = list(points)
        _validate_points(points, source="trace")
        self._points = points
        self._times = [p.time_s for p in points]
        self.loop = loop
        if len(points) >= 2:
            self.period_s: float | None = points[-1].time_s + (points[-1].time_s - points[-2].time_s)
        else:
            self.period_s = None

    @classmethod
    def fixed(cls, bandwidth_mbit: float, delay_ms: float) -> LinkTrace:
        """A constant link."""
        return cls([TracePoint(0.0, float(bandwidth_mbit), float(delay_ms))])

    @classmethod
    def from_csv(cls, path: str | Path, loop: bool = True) -> LinkTrace:
        """A trace file, or where no file has that path, the shipped trace of that name
        (`wan-congested` or `wan-congested.csv`; `shipped_traces()`)."""
        path = locate(path)
        return cls.parse(path.read_text(encoding="utf-8"), loop=loop, source=str(path))

    @classmethod
    def parse(cls, text: str, loop: bool = True, source: str = "<trace>") -> LinkTrace:
        """Parse CSV text: header `time_s,bandwidth_mbit,delay_ms`, then one row per step.

        Blank lines and `#` comments (whole-line or trailing) are ignored.
        """
        header_seen = False
        points: list[TracePoint] = []
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = tuple(f.strip() for f in line.split(","))
            where = f"{source}:{lineno}"
            if not header_seen:
                if fields != TRACE_HEADER:
                    raise ValueError(f"{where}: expected header {','.join(TRACE_HEADER)!r}, got {line!r}")
                header_seen = True
                continue
            if len(fields) != 3:
                raise ValueError(f"{where}: expected 3 fields (time_s,bandwidth_mbit,delay_ms), got {len(fields)}: {line!r}")
            try:
                values = [float(f) for f in fields]
            except ValueError:
                raise ValueError(f"{where}: fields must be numbers, got {line!r}") from None
            points.append(TracePoint(*values))
            _validate_points(points, source=where, last_only=True)
        if not header_seen:
            raise ValueError(f"{source}: empty trace (no header {','.join(TRACE_HEADER)!r})")
        if not points:
            raise ValueError(f"{source}: trace has a header but no rows")
        return cls(points, loop=loop)

    @property
    def points(self) -> tuple[TracePoint, ...]:
        return tuple(self._points)

    def at(self, t: float) -> TracePoint:
        """The row in force `t` seconds after the trace started (t < 0 counts as 0)."""
        t = max(0.0, t)
        if self.loop and self.period_s is not None:
            t = math.fmod(t, self.period_s)
        index = bisect.bisect_right(self._times, t) - 1
        return self._points[max(index, 0)]

    def bandwidth_bps(self, t: float) -> float:
        return self.at(t).bandwidth_mbit * 1e6

    def delay_s(self, t: float) -> float:
        return self.at(t).delay_ms / 1e3

    def __repr__(self) -> str:
        if len(self._points) == 1:
            p = self._points[0]
            return f"LinkTrace.fixed(bandwidth_mbit={p.bandwidth_mbit}, delay_ms={p.delay_ms})"
        return f"LinkTrace({len(self._points)} rows, period_s={self.period_s}, loop={self.loop})"


def _validate_points(points: Sequence[TracePoint], source: str, last_only: bool = False) -> None:
    if not points:
        raise ValueError(f"{source}: a trace needs at least one row")
    checked: Iterable[int] = [len(points) - 1] if last_only else range(len(points))
    for i in checked:
        p = points[i]
        where = source if last_only else f"{source} row {i}"
        if not all(math.isfinite(v) for v in (p.time_s, p.bandwidth_mbit, p.delay_ms)):
            raise ValueError(f"{where}: values must be finite numbers, got {p}")
        if i == 0 and p.time_s != 0:
            raise ValueError(f"{where}: the first row must have time_s 0, got {p.time_s}")
        if i > 0 and p.time_s <= points[i - 1].time_s:
            raise ValueError(f"{where}: time_s must increase strictly, got {p.time_s} after {points[i - 1].time_s}")
        if p.bandwidth_mbit <= 0:
            raise ValueError(f"{where}: bandwidth_mbit must be > 0, got {p.bandwidth_mbit}")
        if p.delay_ms < 0:
            raise ValueError(f"{where}: delay_ms must be >= 0, got {p.delay_ms}")
