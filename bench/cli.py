"""`wanps bench`: runs one benchmark by name, importing only that benchmark's module."""
from __future__ import annotations

import importlib
import sys
import warnings

from wanps.deploy.processes import stopping_on_signals

# name -> (module with a `main(argv)`, what it measures)
BENCHMARKS = {
    "push": ("wanps.bench.push", "push ingest: pairs/s through the full server path vs a bare gRPC echo; --shards"),
    "aggregate": ("wanps.bench.aggregate",
                  "the server's mean over a round, path by path (one sort, pieces, blocked, two threads)"),
    "wire": ("wanps.bench.wire", "bytes on the wire per pushed element, serialized and on a real socket"),
    "linkem": ("wanps.bench.linkem", "the link emulator against its settings: goodput, RTT, a step, a stall, gRPC"),
    "estimate": ("wanps.bench.estimate",
                 "link estimation accuracy through the link emulator (fixed link, step change)"),
    "train": ("wanps.bench.train", "time to accuracy of DeCo against D-SGD and static baselines over emulated WANs"),
    "compressors": ("wanps.bench.compressors", "exact vs sampled top-k vs random block: selection time and count"),
    "checksum": ("wanps.bench.checksum", "the device-side model checksum against zlib's CRC-32: time per model"),
    "convergence": ("wanps.bench.convergence",
                    "rounds to a target against staleness and compression (simulated), and the rounds model's fit"),
    "algorithms": ("wanps.bench.algorithms",
                   "SASG rounds/bits to target, DEF vs EF at high compression, compressor speed"),
    "scrape": ("wanps.bench.scrape", "the server's CPU per Prometheus scrape, as a fraction of a round's time"),
    "soak": ("wanps.bench.soak", "many workers x many rounds on loopback: rounds/s, peak RSS, invariants"),
    "scale": ("wanps.bench.scale",
              "10M and 124M parameters: join/pull time, the worker's step split, server round time and RSS"),
}

USAGE = "\n".join([
    f"usage: wanps bench {{{','.join(BENCHMARKS)}}} [options]",
    "",
    *(f"  {name:<12} {text}" for name, (_, text) in BENCHMARKS.items()),
    "",
    "`wanps bench push --help` shows a benchmark's options.",
])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    # Zero-copy decoding views read-only bytes; torch warns about that once per process.
    warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable")
    if argv[0] not in BENCHMARKS:
        print(f"wanps bench: unknown benchmark {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    # SIGTERM unwinds like SIGINT, so a benchmark's finally blocks stop the processes it started.
    with stopping_on_signals():
        return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
