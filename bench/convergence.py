"""`wanps bench convergence`: rounds to a target against staleness and compression, no clock.

DeCo trades staleness (tau) and compression (delta) for time: its phi prices them as rounds
to converge. How many rounds each really costs is a property of the task, and what the
benchmarks over emulated links cannot separate from seed noise (time to target there spreads
widely from seed to seed, docs/benchmarks.md). This benchmark counts rounds alone: the
in-process simulation (wanps.bench.simulate: the workers' UpdateRule, the real ServerCore,
the gradients of round r taken at the model tau rounds old) on a grid of (tau, delta), with
the task, learning rate, batch and workers of a `wanps bench train` condition.

It prints the rounds to the target per point and seed, and fits the rounds model

    rounds(tau, delta) = R0 * (1 + w * tau) * (1 + k0 / (delta * d))

(w: the share of rounds one round of staleness adds; k0: the elements per push below which
compression starts to cost rounds; d: the parameters), the model `--objective time` of
`wanps controller` decides with (controller/deco.py). Writes results/convergence.json.
"""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from wanps.bench.report import machine_info, text_table, write_json
from wanps.rpc.config import EnvDefaultsParser, float_at_least, int_at_least


@dataclass(frozen=True)
class Point:
    tau: int
    delta: float
    seed: int


@dataclass(frozen=True)
class RoundsFit:
    """rounds(tau, delta) = r0 * (1 + w tau) * (1 + k0 / (delta d)), fitted in log space."""

    r0: float
    w: float
    k0: float
    rms_log_error: float  # of the fit's residuals: 0.1 is about 10% per point
    points: int

    def rounds(self, tau: int, delta: float, num_params: int) -> float:
        return self.r0 * (1.0 + self.w * tau) * (1.0 + self.k0 / (delta * num_params))


# The fit's search grid: w in [0, 2], k0 0 or 1 to 1e5 elements (log-spaced).
FIT_W = np.linspace(0.0, 2.0, 201)
FIT_K0 = np.concatenate([[0.0], np.geomspace(1.0, 1e5, 250)])


def fit_rounds(taus: Sequence[int], deltas: Sequence[float], rounds: Sequence[float], num_params: int) -> RoundsFit:
    """Least squares in log rounds over a grid of (w, k0), r0 in closed form (the mean residual).

    Needs points at two taus or more to tell w, and at two deltas or more to tell k0; with
    fewer, that parameter is 0 (at one tau, (1 + w tau) is a constant r0 absorbs).
    """
    if not (len(taus) == len(deltas) == len(rounds)) or len(rounds) < 2:
        raise ValueError("need two points or more, each a (tau, delta, rounds)")
    tau = np.asarray(taus, dtype=np.float64)
    elements = np.asarray(deltas, dtype=np.float64) * num_params
    log_rounds = np.log(np.asarray(rounds, dtype=np.float64))
    ws = FIT_W if len(set(taus)) > 1 else FIT_W[:1]
    k0s = FIT_K0 if len(set(deltas)) > 1 else FIT_K0[:1]
    model = (np.log1p(ws[:, None, None] * tau[None, None, :])
             + np.log1p(k0s[None, :, None] / elements[None, None, :]))  # (w, k0, point)
    residual = log_rounds[None, None, :] - model
    offset = residual.mean(axis=2, keepdims=True)
    error = np.sqrt(((residual - offset) ** 2).mean(axis=2))
    i, j = np.unravel_index(np.argmin(error), error.shape)  # the first minimum: the smallest w, k0 on ties
    return RoundsFit(r0=float(np.exp(offset[i, j, 0])), w=float(ws[i]), k0=float(k0s[j]),
                     rms_log_error=float(error[i, j]), points=len(rounds))


def run_point(task_name: str, workers: int, batch_size: int, lr: float, target: float, max_rounds: int,
              eval_every: int, eval_limit: int | None, point: Point) -> dict:
    """One simulation to the target (in a process of its own: one torch thread each)."""
    import torch

    from wanps.bench.simulate import SimulationConfig, simulate
    from wanps.worker.tasks import get_task

    torch.set_num_threads(1)
    task = get_task(task_name)
    config = SimulationConfig(num_workers=workers, batch_size=batch_size, lr=lr, rounds=max_rounds,
                              delta=point.delta, seed=point.seed, eval_every=eval_every, eval_limit=eval_limit,
                              target_accuracy=target, stop_at_target=True, staleness=point.tau)
    result = simulate(task, config)
    reached = result.first_reaching(target)
    return {"tau": point.tau, "delta": point.delta, "seed": point.seed,
            "rounds_to_target": None if reached is None else reached.round,
            "rounds_run": result.rounds, "final_accuracy": round(result.final_accuracy, 4)}


def build_parser() -> EnvDefaultsParser:
    from wanps.bench.train import CONDITIONS
    from wanps.worker.tasks import TASKS

    parser = EnvDefaultsParser(prog="wanps bench convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--condition", default="gpt2-varying", choices=sorted(CONDITIONS),
                        help="Task, learning rate, batch, workers and target of this `wanps bench train` "
                             "condition (default gpt2-varying); the flags below override them.")
    parser.add_argument("--task", default=None, choices=sorted(TASKS))
    parser.add_argument("--lr", type=float_at_least(0, above=True), default=None)
    parser.add_argument("--batch-size", type=int_at_least(1), default=None)
    parser.add_argument("--workers", type=int_at_least(1), default=None)
    parser.add_argument("--target", type=float_at_least(0, above=True), default=None, help="Test accuracy to reach.")
    parser.add_argument("--taus", default="0,1,2,3", help="Comma-separated staleness values.")
    parser.add_argument("--deltas", default="0.001,0.0025,0.005", help="Comma-separated compression ratios.")
    parser.add_argument("--seeds", type=int_at_least(1), default=2, help="Seeds 0..N-1 per point.")
    parser.add_argument("--max-rounds", type=int_at_least(1), default=3000,
                        help="A point still short of the target after this many rounds counts as not reaching it.")
    parser.add_argument("--eval-every", type=int_at_least(1), default=10,
                        help="Rounds between evaluations (rounds to the target are counted in these steps).")
    parser.add_argument("--eval-limit", type=int_at_least(1), default=None,
                        help="Test examples per evaluation (default: all).")
    parser.add_argument("--jobs", type=int_at_least(1), default=max(1, (os.cpu_count() or 1)),
                        help="Points simulated at once, one process and one torch thread each.")
    parser.add_argument("--out", default="results/convergence.json")
    parser.add_argument("--summarize", metavar="FILE", default="",
                        help="Print the table and the fit of a convergence.json written before; run nothing.")
    return parser


def report(runs: list[dict], num_params: int) -> RoundsFit | None:
    """Print the rounds per point (per seed, and their median) and the rounds model's fit."""
    headers = ("tau", "delta", "elements per push", "rounds (per seed)", "median")
    table = []
    fit_points: list[tuple[int, float, float]] = []
    for tau, delta in sorted({(r["tau"], r["delta"]) for r in runs}):
        reached = [r["rounds_to_target"] for r in runs if r["tau"] == tau and r["delta"] == delta]
        # A seed short of the target (or diverged) counts as infinitely many rounds.
        median = statistics.median(math.inf if r is None else r for r in reached)
        if not math.isinf(median):
            fit_points.append((tau, delta, median))
        table.append((tau, f"{delta:g}", max(1, round(delta * num_params)),
                      " ".join("-" if r is None else str(r) for r in reached),
                      "-" if math.isinf(median) else f"{median:g}"))
    print(text_table(headers, table))
    if len(fit_points) < 2:
        print("fit: needs two points or more that reached the target")
        return None
    fit = fit_rounds(*zip(*fit_points), num_params=num_params)
    print(f"fit: rounds = {fit.r0:.0f} * (1 + {fit.w:.2f} tau) * (1 + {fit.k0:.0f} / (delta d)), "
          f"d = {num_params}; rms error {math.expm1(fit.rms_log_error):.0%} per point "
          f"(`wanps controller --objective time --staleness-weight {fit.w:.2f} --compression-knee {fit.k0:.0f}`)")
    return fit


def parse_list(parser: EnvDefaultsParser, flag: str, text: str, kind: type) -> list:
    try:
        values = sorted({kind(v) for v in text.split(",") if v.strip()})
    except ValueError:
        parser.error(f"{flag}: expected comma-separated numbers, got {text!r}")
    if not values:
        parser.error(f"{flag}: at least one value")
    return values


def main(argv: list[str] | None = None) -> int:
    from wanps.bench.train import CONDITIONS, FULL, num_params_of

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarize:
        try:
            written = json.loads(Path(args.summarize).read_text())
            runs, num_params = written["runs"], written["num_params"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--summarize {args.summarize}: not a convergence.json ({exc})")
        print(f"[convergence] {written.get('task')}: lr {written.get('lr')}, target {written.get('target_accuracy')}")
        report(runs, num_params)
        return 0
    condition = CONDITIONS[args.condition]
    task = args.task or condition.task
    lr = args.lr or condition.lr or FULL.lr
    batch_size = args.batch_size or condition.batch_size or FULL.batch_size
    workers = args.workers or condition.workers
    target = args.target or condition.target_accuracy or FULL.target_accuracy
    taus = parse_list(parser, "--taus", args.taus, int)
    deltas = parse_list(parser, "--deltas", args.deltas, float)
    if taus[0] < 0:
        parser.error("--taus: staleness is >= 0")
    if not (0 < deltas[0] and deltas[-1] <= 1):
        parser.error("--deltas: each in (0, 1]")
    num_params = num_params_of(task)
    points = [Point(tau, delta, seed) for tau in taus for delta in deltas for seed in range(args.seeds)]
    print(f"[convergence] {task}: {workers} workers, batch {batch_size}, lr {lr:g}, target {target:g}; "
          f"{len(points)} simulations, {args.jobs} at a time", flush=True)
    runs: list[dict] = []
    # A Pool, not a ProcessPoolExecutor: leaving the block on an error, Ctrl-C or SIGTERM
    # terminates the simulations (an executor would wait for each to finish: minutes). Ctrl-C
    # reaches the whole process group: the simulations start with SIGINT ignored (kept across
    # exec), and the parent alone stops them, without a traceback from each.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = get_context("spawn").Pool(args.jobs)
    finally:
        signal.signal(signal.SIGINT, previous)
    with pool:
        pending = [pool.apply_async(run_point, (task, workers, batch_size, lr, target, args.max_rounds,
                                                args.eval_every, args.eval_limit, point)) for point in points]
        for job in pending:
            run = job.get()
            runs.append(run)
            reached = run["rounds_to_target"]
            rounds_text = str(reached) if reached is not None else f"> {run['rounds_run']}"
            print(f"[convergence]   tau {run['tau']}, delta {run['delta']:g}, seed {run['seed']}: "
                  f"{rounds_text} rounds", flush=True)
    fit = report(runs, num_params)
    out = Path(args.out)
    write_json(out, {"benchmark": "convergence", "machine": machine_info(), "condition": args.condition,
                     "task": task, "num_params": num_params, "workers": workers, "batch_size": batch_size, "lr": lr,
                     "target_accuracy": target, "max_rounds": args.max_rounds, "eval_every": args.eval_every,
                     "runs": runs, "fit": fit})
    return 0


if __name__ == "__main__":
    sys.exit(main())
