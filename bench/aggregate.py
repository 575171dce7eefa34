"""`wanps bench aggregate`: the server's mean over a round, path by path, at real sizes.

For each (parameters d, workers W, delta): W random sparse updates of delta * d sorted
distinct pairs each (bench/payload.py), then the round's mean (server/aggregate.py) by
each path, best of --repeat:

- `sort`: the path before this benchmark existed, kept here as the baseline: the union by
  `torch.unique` of all pairs (a full sort) and one scatter-add through the inverse;
- `pieces`: `pieces_mean`, the same per cache-sized piece of the index space;
- `blocked`: `blocked_mean`, block by block through a block-sized scratch and mask;
- `auto`: `aggregate` as the server calls it (the path by density), on one thread and,
  with a one-thread executor, split over two.

Single-thread paths are timed in thread CPU time (`time.thread_time`), which other load on
the machine inflates far less than wall time; the two-thread row in wall time and process
CPU. Every path's result is checked against the first's to the bit. The header has the machine's
memory-copy and sort rates (bench/report.py), to read figures from other machines against.

    wanps bench aggregate                                  # 124M x 4 workers x delta 0.001, 0.01, 0.1
    wanps bench aggregate --params 10M --workers 8 --deltas 0.01   # the `bench push` round (8 x 100K)
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from wanps.bench.payload import random_update
from wanps.bench.report import load_summary, machine_info, machine_rates, rates_summary, text_table, write_json
from wanps.bench.scale import parse_count
from wanps.proto.codec import Update
from wanps.server.aggregate import aggregate, blocked_mean, pieces_mean

PATHS = ("sort", "pieces", "blocked", "auto", "auto x2")


@dataclass
class AggregateRow:
    params: int
    workers: int
    delta: float
    pairs: int
    union: int
    ms: dict[str, float] = field(default_factory=dict)  # path -> best time (thread CPU; wall for "auto x2")
    cpu_ms_two_threads: float = 0.0  # process CPU of the best "auto x2" run


def sort_mean(updates: Sequence[Update], divisor: int) -> Update:
    """The sort path the server had before: torch.unique of every pair, scatter-add through the inverse."""
    union, slot = torch.unique(torch.cat([u.indices for u in updates]), sorted=True, return_inverse=True)
    values = torch.zeros(union.numel(), dtype=torch.float32)
    values.index_add_(0, slot, torch.cat([u.values for u in updates]))
    return Update(values=values.div_(divisor), indices=union.to(torch.int32))


def _best(run: Callable[[], Update], repeat: int, clock: Callable[[], float]) -> tuple[float, Update]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = clock()
        result = run()
        best = min(best, clock() - started)
    assert result is not None
    return best, result


def run_row(d: int, workers: int, delta: float, repeat: int, executor: ThreadPoolExecutor) -> AggregateRow:
    pairs = max(1, int(delta * d))
    updates = [random_update(d, pairs, seed) for seed in range(workers)]
    runs: dict[str, Callable[[], Update]] = {
        "sort": lambda: sort_mean(updates, workers),
        "pieces": lambda: pieces_mean(updates, workers),
        "blocked": lambda: blocked_mean(updates, workers, d),
        "auto": lambda: aggregate(updates, workers, d),
    }
    row = AggregateRow(params=d, workers=workers, delta=delta, pairs=pairs * workers, union=0)
    expected: Update | None = None
    for path, run in runs.items():
        seconds, result = _best(run, repeat, time.thread_time)
        row.ms[path] = seconds * 1e3
        expected = expected or result
        _check(path, result, expected)
        del result
    best_wall, best_cpu = float("inf"), 0.0
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = aggregate(updates, workers, d, executor=executor)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best_wall:
            best_wall, best_cpu = wall, cpu
    assert expected is not None
    _check("auto x2", result, expected)
    row.ms["auto x2"], row.cpu_ms_two_threads = best_wall * 1e3, best_cpu * 1e3
    row.union = expected.count
    return row


def _check(path: str, got: Update, expected: Update) -> None:
    if not (torch.equal(got.indices, expected.indices)
            and torch.equal(got.values.view(torch.int32), expected.values.view(torch.int32))):
        raise AssertionError(f"the {path} path's mean differs from the sort's")


def run_aggregate_bench(params: Sequence[int], workers: Sequence[int], deltas: Sequence[float], repeat: int,
                        on_row: Callable[[AggregateRow], None] | None = None) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (`wanps server --torch-threads`, default 1)
    try:
        result: dict[str, Any] = {"benchmark": "aggregate", "machine": machine_info(), "rates": machine_rates(),
                                  "config": {"params": list(params), "workers": list(workers),
                                             "deltas": list(deltas), "repeat": repeat}, "rows": []}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-aggregate") as executor:
            for d in params:
                for n in workers:
                    for delta in deltas:
                        row = run_row(d, n, delta, repeat, executor)
                        result["rows"].append(asdict(row))
                        if on_row is not None:
                            on_row(row)
        return result
    finally:
        torch.set_num_threads(threads)


def print_aggregate(result: dict[str, Any]) -> None:
    print(f"wanps bench aggregate: best of {result['config']['repeat']}; ms of thread CPU on one thread, "
          f"'auto x2' ms of wall time on two (cpu: both threads' CPU)")
    print(f"machine: {rates_summary(result['rates'])}; {load_summary(result['machine'])}")
    rows = []
    for row in result["rows"]:
        per_pair = {path: row["ms"][path] * 1e6 / row["pairs"] for path in PATHS}
        rows.append((f"{row['params'] / 1e6:g}M", row["workers"], f"{row['delta']:g}", f"{row['pairs']:,}",
                     f"{row['union']:,}",
                     *(f"{row['ms'][p]:.1f} ({per_pair[p]:.1f})" for p in PATHS),
                     f"{row['cpu_ms_two_threads']:.1f}"))
    print(text_table(("params", "workers", "delta", "pairs", "union",
                      *(f"{p} ms (ns/pair)" for p in PATHS), "x2 cpu ms"), rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanps bench aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="124M", help="Model sizes, comma-separated (10M, 124M, ...).")
    parser.add_argument("--workers", default="4", help="Updates per round, comma-separated.")
    parser.add_argument("--deltas", default="0.001,0.01,0.1", help="Pairs per update / params, comma-separated.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per path; the best counts.")
    parser.add_argument("--json", default="", help="Also write the results here.")
    args = parser.parse_args(argv)
    try:
        params = [parse_count(p) for p in args.params.split(",")]
        workers = [int(w) for w in args.workers.split(",")]
        deltas = [float(x) for x in args.deltas.split(",")]
    except ValueError as exc:
        print(f"wanps bench aggregate: {exc}")
        return 2
    if min(params) < 1 or min(workers) < 2 or args.repeat < 1 or not all(0 < x <= 1 for x in deltas):
        print("wanps bench aggregate: --params and --repeat must be >= 1, --workers >= 2, --deltas in (0, 1]")
        return 2
    result = run_aggregate_bench(params, workers, deltas, args.repeat,
                                 on_row=lambda row: print(f"  {row.params:,} x {row.workers} x {row.delta:g}: "
                                                          + ", ".join(f"{p} {ms:.1f} ms" for p, ms in row.ms.items()),
                                                          flush=True))
    print_aggregate(result)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

