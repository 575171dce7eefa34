"""`wanps bench compressors`: how long each compressor takes to select k of d elements.

For each size d, one random float32 vector p (normal values, like lr*g + e) and
k = ceil(ratio * d): the median wall time of `compressor.select(p, k, round)` over
`--repeats` calls (after one untimed warm-up, which also lets the sampled top-k allocate
its reusable buffers), and the number selected over k. Selection only: error feedback and
the wire encoding cost the same for every sparse compressor.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from wanps.bench.report import load_summary, machine_info, text_table, write_json
from wanps.worker.error_feedback import elements_for
from wanps.worker.compressors import COMPRESSORS, make_compressor
from wanps.rpc.config import EnvDefaultsParser, fraction, int_at_least

DEFAULT_SIZES = (1_000_000, 10_000_000, 25_000_000)
DEFAULT_COMPRESSORS = ("topk", "topk-sampled", "random-block")


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(prog="wanps bench compressors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int_at_least(1), nargs="+", default=list(DEFAULT_SIZES), help="Elements d.")
    parser.add_argument("--ratio", type=fraction, default=0.01, help="Compression ratio delta (k = ceil(delta*d)).")
    parser.add_argument("--compressors", nargs="+", choices=sorted(COMPRESSORS), default=list(DEFAULT_COMPRESSORS))
    parser.add_argument("--repeats", type=int_at_least(1), default=7, help="Timed calls per (compressor, size).")
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch intra-op threads (workers use 1 by default).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="Also write the rows (and the machine's load) to this file.")
    return parser


def measure(name: str, d: int, ratio: float, repeats: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(d, generator=generator)
    k = elements_for(ratio, d)
    compressor = make_compressor(name, seed)
    compressor.select(p, k, 0)  # warm-up: buffers, caches
    times, counts = [], []
    for round_ in range(1, repeats + 1):
        started = time.perf_counter()
        selection = compressor.select(p, k, round_)
        times.append(time.perf_counter() - started)
        counts.append(selection.count)
    return {
        "compressor": name,
        "d": d,
        "k": k,
        "ms_median": round(1000 * statistics.median(times), 3),
        "ms_min": round(1000 * min(times), 3),
        "selected_over_k": round(statistics.median(counts) / k, 4),
        "selected_over_k_worst": round(max(counts, key=lambda c: abs(c - k)) / k, 4),
    }


def format_table(rows: list[dict]) -> str:
    exact_ms = {r["d"]: r["ms_median"] for r in rows if r["compressor"] == "topk"}
    cells = []
    for r in rows:
        speedup = f"{exact_ms[r['d']] / r['ms_median']:.1f}x" if r["d"] in exact_ms and r["ms_median"] else "-"
        cells.append((r["compressor"], f"{r['d']:,}", f"{r['k']:,}", f"{r['ms_median']:.2f}", f"{r['ms_min']:.2f}",
                      speedup, f"{r['selected_over_k']:.4f}", f"{r['selected_over_k_worst']:.4f}"))
    return text_table(("compressor", "d", "k", "ms_median", "ms_min", "speedup", "selected_over_k", "worst"), cells)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    rows = [measure(name, d, args.ratio, args.repeats, args.seed) for d in args.sizes for name in args.compressors]
    print(format_table(rows))
    machine = machine_info()
    print(f"{load_summary(machine)}, torch threads {args.threads}")
    if args.json:
        write_json(args.json, {"ratio": args.ratio, "threads": args.threads, "repeats": args.repeats,
                               "machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
