"""`wanps bench algorithms` (`make bench-algorithms`): does each algorithm do what its paper claims?

Three studies, written together to results/algorithms.json:

- `sasg`: the SASG paper's Table II shape. MNIST, its 2-layer FC network (784-512-10),
  plain SGD (dense), sparse EF (top-k), LASG-style (skip rule, no compression) and SASG
  (skip rule + top-k + EF): communication rounds (worker uploads) and bits until the test
  accuracy first reaches the target (98%), by in-process simulation with many workers.
- `def`: the DEF paper's Table 1 shape. A small CNN on MNIST with random-block
  sparsification at ratios 16, 64 and 256 and momentum: final accuracy of EF, DEF (output
  y_T = x_T - mean(e_T)) and DEF-A (output x_T). DEF and DEF-A train identically and
  differ only in the output, so one DEF run gives both rows.
- `compressors`: exact top-k, sampled top-k and random block at 1M/10M/25M elements.

The simulation (wanps.bench.simulate) runs the workers' UpdateRule and the real
ServerCore without sockets; the networked path of the same code is tested elsewhere.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from wanps.bench.compressors import measure
from wanps.bench.report import machine_info, write_json
from wanps.bench.simulate import SimulationConfig, SimulationResult, simulate
from wanps.worker.skip_rule import alphas_from_spec
from wanps.worker.tasks import get_task
from wanps.worker.update_rule import UpdateConfig
from wanps.rpc.config import EnvDefaultsParser, int_at_least

SASG_METHODS = ("sgd", "sparse", "lasg", "sasg")
DEF_METHODS = ("ef", "def", "def-a")
DEF_RATIOS = (16, 64, 256)
COMPRESSOR_SIZES = (1_000_000, 10_000_000, 25_000_000)
COMPRESSOR_METHODS = ("topk", "topk-sampled", "random-block")


def small_cnn(seed: int) -> nn.Module:
    """The DEF study's CNN: two 5x5 convolutions and one linear layer on 28x28 MNIST (18,378 parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 12 x 12
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 4 x 4
        nn.Flatten(), nn.Linear(512, 10),
    )


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(prog="wanps bench algorithms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/algorithms.json")
    parser.add_argument("--studies", default="sasg,def,compressors", help="Comma-separated subset.")
    parser.add_argument("--quick", action="store_true",
                        help="Minutes instead of tens of minutes: fewer rounds, a lower target, small compressor sizes.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=None, help="Test examples per evaluation (default: all 10,000).")
    # SASG study
    # The paper's MNIST setting is 10 workers x 10 samples, lr 0.005, alpha_d = 1/(2 lr) = 100,
    # so alpha_d / M^2 = 1. Both sides of rule (6) scale with lr^2, so skipping depends on
    # alpha_d / M^2, not on lr: 10x the paper's lr with the same alpha_d = 100 keeps its rule
    # and reaches 98% in far fewer iterations (docs/benchmarks.md).
    parser.add_argument("--sasg-workers", type=int, default=10)
    parser.add_argument("--sasg-batch", type=int, default=10)
    parser.add_argument("--sasg-lr", type=float, default=0.05)
    parser.add_argument("--sasg-delta", type=float, default=0.01, help="top-k ratio of sparse EF and SASG.")
    parser.add_argument("--sasg-max-rounds", type=int, default=8000, help="Iterations at most per method.")
    parser.add_argument("--sasg-target", type=float, default=0.98)
    parser.add_argument("--sasg-alpha", default="100",
                        help="alpha_d: a number (default 100, the paper's MNIST value), 'half' = 1/(2 lr), 'one' = 1/lr.")
    parser.add_argument("--sasg-max-delay", type=int, default=10, help="D.")
    parser.add_argument("--sasg-methods", default=",".join(SASG_METHODS))
    parser.add_argument("--sasg-eval-every", type=int, default=50,
                        help="Iterations between test evaluations (the resolution of 'to target').")
    # DEF study
    parser.add_argument("--def-workers", type=int, default=4)
    parser.add_argument("--def-batch", type=int, default=32)
    parser.add_argument("--def-lr", type=float, default=0.01)
    parser.add_argument("--def-momentum", type=float, default=0.9)
    parser.add_argument("--def-lambda", type=float, default=0.3)
    parser.add_argument("--def-rounds", type=int, default=800)
    parser.add_argument("--def-ratios", default=",".join(map(str, DEF_RATIOS)))
    # compressors
    parser.add_argument("--sizes", default=",".join(map(str, COMPRESSOR_SIZES)))
    parser.add_argument("--compressor-ratio", type=float, default=0.01)
    parser.add_argument("--repeats", type=int_at_least(1), default=7)
    return parser


QUICK = dict(sasg_max_rounds=600, sasg_target=0.95, def_rounds=200, sizes="100000,1000000", repeats=3)


def _log(message: str) -> None:
    print(message, flush=True)


def sasg_config(method: str, args: argparse.Namespace) -> SimulationConfig:
    skip = tuple(alphas_from_spec(args.sasg_alpha, args.sasg_lr, args.sasg_max_delay))
    base = SimulationConfig(num_workers=args.sasg_workers, batch_size=args.sasg_batch, lr=args.sasg_lr,
                            rounds=args.sasg_max_rounds, seed=args.seed, eval_every=args.sasg_eval_every,
                            eval_limit=args.eval_limit, update=UpdateConfig(compressor_seed=args.seed),
                            target_accuracy=args.sasg_target, stop_at_target=True)
    compressed = dict(delta=args.sasg_delta, update=replace(base.update, compressor="topk"))
    return {
        "sgd": base,
        "sparse": replace(base, **compressed),
        "lasg": replace(base, skip_alphas=skip),
        "sasg": replace(base, skip_alphas=skip, **compressed),
    }[method]


def sasg_study(args: argparse.Namespace) -> list[dict]:
    task = get_task("mnist")
    rows = []
    for method in args.sasg_methods.split(","):
        config = sasg_config(method, args)
        started = time.monotonic()
        result = simulate(task, config)
        reached = result.first_reaching(args.sasg_target)
        rows.append({
            "method": method,
            "target_accuracy": args.sasg_target,
            "reached_target": reached is not None,
            "rounds_to_target": reached.uploads if reached else None,  # communication rounds = uploads
            "iterations_to_target": reached.round if reached else None,
            "bits_to_target": reached.bits if reached else None,
            "final_accuracy": result.final_accuracy,
            "iterations": result.rounds,
            "uploads": result.uploads,
            "skips": result.skips,
            "skip_rate": round(result.skips / max(1, result.uploads + result.skips), 4),
            "seconds": round(time.monotonic() - started, 1),
        })
        _log(f"sasg {method:<7} {_fmt_sasg(rows[-1])}")
    return rows


def _fmt_sasg(row: dict) -> str:
    if not row["reached_target"]:
        return (f"did not reach {row['target_accuracy']:.0%} in {row['iterations']} iterations "
                f"(final {row['final_accuracy']:.4f}, skip rate {row['skip_rate']:.2f}, {row['seconds']} s)")
    return (f"{row['rounds_to_target']:>7} uploads  {row['bits_to_target']:.3e} bits  "
            f"{row['iterations_to_target']:>5} iterations  skip rate {row['skip_rate']:.2f}  "
            f"final {row['final_accuracy']:.4f}  ({row['seconds']} s)")


def def_study(args: argparse.Namespace) -> list[dict]:
    task = get_task("mnist")
    rows = []
    base = SimulationConfig(num_workers=args.def_workers, batch_size=args.def_batch, lr=args.def_lr,
                            rounds=args.def_rounds, seed=args.seed, eval_every=args.def_rounds,
                            eval_limit=args.eval_limit,
                            update=UpdateConfig(compressor="random-block", compressor_seed=args.seed,
                                                momentum=args.def_momentum, def_lambda=args.def_lambda))
    reference = simulate(task, base, small_cnn)  # ratio 1: SGD with momentum, no compression
    rows.append({"method": "sgd", "ratio": 1, "final_accuracy": reference.final_accuracy})
    _log(f"def   sgd     ratio    1  final {reference.final_accuracy:.4f}")
    for ratio in (int(r) for r in args.def_ratios.split(",")):
        runs: dict[str, SimulationResult] = {}
        for mode in ("ef", "def"):
            runs[mode] = simulate(task, replace(base, delta=1.0 / ratio,
                                                    update=replace(base.update, error_feedback=mode)), small_cnn)
        outputs = {
            "ef": runs["ef"].final_accuracy,
            "def": runs["def"].flushed_accuracy,  # y_T
            "def-a": runs["def"].final_accuracy,  # x_T
        }
        for method in DEF_METHODS:
            rows.append({"method": method, "ratio": ratio, "final_accuracy": outputs[method],
                         "diverged": runs["ef" if method == "ef" else "def"].rounds < args.def_rounds})
            _log(f"def   {method:<7} ratio {ratio:>4}  final {outputs[method]:.4f}")
    return rows


def compressor_study(args: argparse.Namespace) -> list[dict]:
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for method in COMPRESSOR_METHODS:
            measured = measure(method, size, args.compressor_ratio, args.repeats, args.seed)
            rows.append({"method": method, "elements": size, "ratio": args.compressor_ratio,
                         "ms_median": measured["ms_median"], "selected_over_k": measured["selected_over_k"]})
            _log(f"compressors {method:<13} {size:>11,}  {measured['ms_median']:>9.2f} ms  "
                 f"selected/k {measured['selected_over_k']:.4f}")
    return rows


STUDIES = {"sasg": sasg_study, "def": def_study, "compressors": compressor_study}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        # Quick values replace the defaults only where the user did not set a flag.
        defaults = vars(parser.parse_args([]))
        for name, value in QUICK.items():
            if getattr(args, name) == defaults[name]:
                setattr(args, name, value)
    studies = [s for s in args.studies.split(",") if s]
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        parser.error(f"unknown studies {unknown}; choose from {', '.join(STUDIES)}")
    torch.set_num_threads(1)  # as a worker runs; the figures compare methods, not thread counts
    out = Path(args.out)
    report: dict = json.loads(out.read_text()) if out.exists() else {}  # keep studies not rerun
    out.parent.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the first study
    for name in studies:
        started = time.monotonic()
        report[name] = STUDIES[name](args)
        _log(f"{name}: {time.monotonic() - started:.0f} s")
        # Written after every study, so a long run that is stopped keeps what it finished.
        report["settings"] = {**report.get("settings", {}), **{k: v for k, v in vars(args).items() if k != "out"}}
        report["machine"] = machine_info()
        write_json(out, report, announce=False)
    _log(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
