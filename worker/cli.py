"""`wanps worker`: train a built-in task through a wanps cluster."""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import warnings

import torch

from wanps.deploy.runtime import EnvDefaultsParser, setup_logging
from wanps.worker.compress import VALUE_DTYPES
from wanps.worker.compressors import COMPRESSORS
from wanps.worker.optimizer import Optimizer
from wanps.worker.tasks import TASKS, get_task

log = logging.getLogger("wanps.worker")


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(prog="wanps worker", description="Train a built-in task through a wanps cluster.")
    parser.add_argument("--server", env="WANPS_SERVER", default="127.0.0.1:50051", help="Parameter server HOST:PORT.")
    parser.add_argument("--controller", env="WANPS_CONTROLLER", default="",
                        help="Controller HOST:PORT (empty: none; use --tau and --delta).")
    parser.add_argument("--task", env="WANPS_TASK", choices=sorted(TASKS), default="mnist")
    parser.add_argument("--lr", env="WANPS_LR", type=float, default=0.1, help="Learning rate.")
    parser.add_argument("--batch-size", env="WANPS_BATCH_SIZE", type=int, default=64, help="Per-worker batch size.")
    parser.add_argument("--max-rounds", env="WANPS_MAX_ROUNDS", type=int, default=0,
                        help="Stop after this many rounds (0 = until stopped).")
    parser.add_argument("--until-round", env="WANPS_UNTIL_ROUND", type=int, default=0,
                        help="Stop once this worker has pushed every round below this one (0 = no limit); "
                             "unlike --max-rounds it counts cluster rounds, so a worker that rejoined stops "
                             "at the same round as the others.")
    parser.add_argument("--max-seconds", env="WANPS_MAX_SECONDS", type=float, default=0.0,
                        help="Stop after this long (0 = until stopped).")
    parser.add_argument("--tau", env="WANPS_TAU", type=int, default=0, help="Staleness without a controller.")
    parser.add_argument("--delta", env="WANPS_DELTA", type=float, default=1.0,
                        help="Compression ratio without a controller.")
    parser.add_argument("--compressor", env="WANPS_COMPRESSOR", choices=sorted(COMPRESSORS), default="topk",
                        help="How sparse pushes pick elements (random-block: every worker needs the same --seed).")
    parser.add_argument("--error-feedback", env="WANPS_ERROR_FEEDBACK", choices=("ef", "def"), default="ef",
                        help="ef: plain error feedback; def: detached error feedback (gradient at x - lambda*e).")
    parser.add_argument("--def-lambda", env="WANPS_DEF_LAMBDA", type=float, default=0.3, help="DEF's lambda.")
    parser.add_argument("--value-dtype", env="WANPS_VALUE_DTYPE", choices=list(VALUE_DTYPES), default="float32",
                        help="Value type of sparse pushes on the wire (the rounding error stays in error feedback).")
    parser.add_argument("--seed", env="WANPS_SEED", type=int, default=0,
                        help="Model init, shuffling and random-block seed.")
    parser.add_argument("--name", env="WANPS_WORKER_NAME", default="", help="Name shown in server logs.")
    parser.add_argument("--threads", env="WANPS_THREADS", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--progress", env="WANPS_PROGRESS", action="store_true", help="Show a progress bar.")
    parser.add_argument("--save-replica", env="WANPS_SAVE_REPLICA", default="",
                        help="At the end, save {'version', 'values'} of the replica here (torch.save).")
    parser.add_argument("--no-uvloop", action="store_true", env="WANPS_NO_UVLOOP")
    parser.add_argument("--log-level", env="WANPS_LOG_LEVEL", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.set_num_threads(max(1, args.threads))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    task = get_task(args.task)
    model = task.build_model(args.seed)
    opt = Optimizer(model.parameters(), server=args.server, controller=args.controller or None, lr=args.lr,
                    tau=args.tau, delta=args.delta, name=args.name or None, use_uvloop=not args.no_uvloop,
                    compressor=args.compressor, value_dtype=args.value_dtype, compressor_seed=args.seed,
                    error_feedback=args.error_feedback, def_lambda=args.def_lambda)
    batches = task.batches(opt.rank, opt.world_size, args.batch_size, args.seed)
    progress = None
    if args.progress:
        from tqdm import tqdm

        progress = tqdm(total=args.max_rounds or None, unit="round", file=sys.stderr)
    started = time.monotonic()
    rounds = 0
    try:
        while not stop.is_set():
            if args.max_rounds and rounds >= args.max_rounds:
                break
            if args.until_round and max(opt.round, opt.version) >= args.until_round:
                break
            if args.max_seconds and time.monotonic() - started >= args.max_seconds:
                break
            x, y = next(batches)
            opt.zero_grad()
            loss = task.loss(model, x, y)
            loss.backward()
            opt.step()
            rounds += 1
            if progress is not None:
                decision = opt.last_decision
                progress.set_postfix(round=opt.round, loss=f"{loss.item():.3f}", tau=decision.tau,
                                     delta=f"{decision.delta:g}", up=f"{opt.bytes_up / 2**20:.1f}MiB",
                                     refresh=False)
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        if args.save_replica:
            if not stop.is_set():
                # Every round this worker pushed, applied: replicas of workers that stopped at the
                # same round are then comparable with each other and the server's model.
                opt.wait_for_version(opt.round, timeout_s=120.0)
            torch.save({"version": opt.version, "values": opt.replica.clone(), "worker_id": opt.worker_id,
                        "recoveries": opt.session.recoveries}, args.save_replica)
        opt.close()
    log.info("worker %d done: %d rounds, %.1f MiB up, %.1f MiB down", opt.worker_id, rounds,
             opt.bytes_up / 2**20, opt.bytes_down / 2**20)
    return 0
