"""`wanps worker`: train a built-in task through a wanps cluster.

SIGTERM and SIGINT stop it within a few seconds whatever it waits for (joining, a round, a
server that is gone): the optimizer is interrupted, says goodbye to the server if it can
(STOP_GRACE_S for its pushes in flight and a Leave) and the process exits 0. Before the
optimizer exists (loading the task, building the model) the signal ends the process the same
way. docs/operations.md, "Stopping".
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from types import FrameType
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from wanps.rpc.auth import add_client_security_flags, client_security_from_args
from wanps.proto.wire import MAX_TAU
from wanps.rpc.config import EnvDefaultsParser, float_at_least, fraction, host_port, int_at_least, setup_logging
from wanps.rpc.serving import start_metrics_endpoint
from wanps.worker.error_feedback import VALUE_DTYPES
from wanps.worker.compressors import COMPRESSORS
from wanps.worker.layout import ModelMismatch
from wanps.worker.io_loop import Interrupted
from wanps.worker.optimizer import Optimizer
from wanps.worker.shards import ShardOrderError, server_addresses
from wanps.worker.skip_rule import SkipRule, alphas_from_spec
from wanps.worker.update_rule import ERROR_FEEDBACK_MODES
from wanps.worker.tasks import TASKS, get_task

log = logging.getLogger("wanps.worker")


def skip_rule_from_flags(max_delay: int, alpha: str, lr: float) -> SkipRule | None:
    """--sasg-max-delay D --sasg-alpha half|one|NUMBER -> a SkipRule (None when D = 0).
    Raises ValueError naming the flag."""
    if max_delay < 0:
        raise ValueError(f"--sasg-max-delay must be >= 0, got {max_delay}")
    if max_delay == 0:
        return None
    try:
        return SkipRule(alphas_from_spec(alpha, lr, max_delay))
    except ValueError as exc:
        raise ValueError(f"--sasg-alpha: {exc}") from None


class StoppedBySignal(Exception):
    """SIGTERM/SIGINT before the optimizer existed (nothing to interrupt yet)."""


class SignalStop:
    """What SIGTERM and SIGINT do: note the request and interrupt the optimizer (signal-safe:
    a flag and a hand-over to its I/O loop); before there is one, end what runs now."""

    def __init__(self) -> None:
        self.requested = False
        self.optimizer: Optimizer | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.optimizer is not None:
            self.optimizer.interrupt()
        else:
            raise StoppedBySignal(signal.Signals(signum).name)


def server_list(text: str) -> list[str]:
    """HOST:PORT, or every shard's HOST:PORT in shard order separated by commas."""
    try:
        addresses = server_addresses(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return [host_port(address) for address in addresses]


def optional_host_port(text: str) -> str:
    return "" if text == "" else host_port(text)


def momentum_value(text: str) -> float:
    value = float_at_least(0)(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def metrics_port(text: str) -> int:
    if text == "off":
        return -1
    value = int(text)
    if not -1 <= value <= 65535:
        raise ValueError(f"metrics port must be 0-65535, -1 or 'off', got {text}")
    return value


def serve_metrics(host: str, port: int) -> tuple[CollectorRegistry | None, Any]:
    """The worker's registry and its endpoint, announced as `LISTENING host:port METRICS port`
    (a worker serves no gRPC: the line names the metrics endpoint, for scripts and tests).
    Started before joining, which waits for the cluster, so a scraper sees the worker at once."""
    if port < 0:
        return None, None
    registry = CollectorRegistry()
    httpd, bound = start_metrics_endpoint(host, port, registry)
    print(f"LISTENING {host}:{bound} METRICS {bound}", flush=True)
    log.info("worker metrics on http://%s:%d/metrics", host, bound)
    return registry, httpd


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(prog="wanps worker", description="Train a built-in task through a wanps cluster.")
    parser.add_argument("--server", env="WANPS_SERVER", type=server_list, default="127.0.0.1:50051",
                        help="Parameter server HOST:PORT, or every shard's HOST:PORT in shard order, separated by "
                             "commas (a sharded cluster: wanps server --shard I/N).")
    parser.add_argument("--controller", env="WANPS_CONTROLLER", type=optional_host_port, default="",
                        help="Controller HOST:PORT (empty: none; use --tau and --delta).")
    parser.add_argument("--task", env="WANPS_TASK", choices=sorted(TASKS), default="mnist")
    parser.add_argument("--lr", env="WANPS_LR", type=float_at_least(0, above=True), default=0.1, help="Learning rate.")
    parser.add_argument("--batch-size", env="WANPS_BATCH_SIZE", type=int_at_least(0), default=0,
                        help="Per-worker batch size (0 = the task's default: 64; gpt2-small 2, gpt2-tiny 16).")
    parser.add_argument("--seq-len", env="WANPS_SEQ_LEN", type=int_at_least(0), default=0,
                        help="Tokens per training sequence, for the gpt2-* tasks (0 = the task's default: "
                             "gpt2-small 128 of its 1024 context, gpt2-tiny 32).")
    parser.add_argument("--max-rounds", env="WANPS_MAX_ROUNDS", type=int_at_least(0), default=0,
                        help="Stop after this many rounds (0 = until stopped).")
    parser.add_argument("--until-round", env="WANPS_UNTIL_ROUND", type=int_at_least(0), default=0,
                        help="Stop once this worker has pushed every round below this one (0 = no limit); "
                             "unlike --max-rounds it counts cluster rounds, so a worker that rejoined stops "
                             "at the same round as the others.")
    parser.add_argument("--max-seconds", env="WANPS_MAX_SECONDS", type=float_at_least(0), default=0.0,
                        help="Stop after this long (0 = until stopped).")
    parser.add_argument("--tau", env="WANPS_TAU", type=int_at_least(0, MAX_TAU), default=0,
                        help="Staleness without a controller.")
    parser.add_argument("--delta", env="WANPS_DELTA", type=fraction, default=1.0,
                        help="Compression ratio without a controller, in (0, 1].")
    parser.add_argument("--downlink-delta", env="WANPS_DOWNLINK_DELTA", type=fraction, default=None, metavar="F",
                        help="For a slow downlink: download only this fraction (0, 1] of elements per round, the "
                             "rest kept on the server as this worker's downlink residual (default: every round's "
                             "full delta).")
    parser.add_argument("--compressor", env="WANPS_COMPRESSOR", choices=sorted(COMPRESSORS), default="topk",
                        help="How sparse pushes pick elements (random-block: every worker needs the same --seed).")
    parser.add_argument("--error-feedback", env="WANPS_ERROR_FEEDBACK", choices=ERROR_FEEDBACK_MODES, default="ef",
                        help="ef: plain error feedback; def: detached error feedback (gradient at x - lambda*e), "
                             "model ends at y_T = x_T - mean(e); def-a: the same, model ends at x_T.")
    parser.add_argument("--def-lambda", env="WANPS_DEF_LAMBDA", type=float_at_least(0), default=0.3,
                        help="DEF's lambda.")
    parser.add_argument("--momentum", env="WANPS_MOMENTUM", type=momentum_value, default=0.0,
                        help="Momentum mu in [0, 1) (m = mu*m + g; p = lr*m + e).")
    parser.add_argument("--sasg-max-delay", env="WANPS_SASG_MAX_DELAY", type=int_at_least(0), default=0,
                        help="SASG skip rule with this D (0 = off; the paper uses 10).")
    parser.add_argument("--sasg-alpha", env="WANPS_SASG_ALPHA", default="half",
                        help="SASG alpha_d: 'half' = 1/(2 lr), 'one' = 1/lr (the paper's), or a number.")
    parser.add_argument("--value-dtype", env="WANPS_VALUE_DTYPE", choices=list(VALUE_DTYPES), default="float32",
                        help="Value type of sparse pushes on the wire (the rounding error stays in error feedback).")
    parser.add_argument("--seed", env="WANPS_SEED", type=int, default=0,
                        help="Model init, shuffling and random-block seed.")
    parser.add_argument("--name", env="WANPS_WORKER_NAME", default="", help="Name shown in server logs.")
    parser.add_argument("--threads", env="WANPS_THREADS", type=int_at_least(1), default=1,
                        help="torch intra-op threads.")
    parser.add_argument("--progress", env="WANPS_PROGRESS", action="store_true", help="Show a progress bar.")
    parser.add_argument("--save-replica", env="WANPS_SAVE_REPLICA", default="",
                        help="At the end, save {'version', 'values'} of the replica here (torch.save).")
    add_client_security_flags(parser)
    parser.add_argument("--metrics-host", env="WANPS_WORKER_METRICS_HOST", default="127.0.0.1",
                        help="Address the Prometheus metrics endpoint binds.")
    parser.add_argument("--metrics-port", env="WANPS_WORKER_METRICS_PORT", type=metrics_port, default=-1,
                        help="Port of the Prometheus metrics endpoint (0 = any free port; -1 or 'off' = none, "
                             "the default, so several workers on one machine need no ports).")
    parser.add_argument("--no-uvloop", action="store_true", env="WANPS_NO_UVLOOP")
    parser.add_argument("--log-level", env="WANPS_LOG_LEVEL", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), type=str.upper)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        security = client_security_from_args(args)
        task = get_task(args.task, seq_len=args.seq_len or None)
        skip_rule = skip_rule_from_flags(args.sasg_max_delay, args.sasg_alpha, args.lr)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(args.log_level)
    torch.set_num_threads(args.threads)
    stop = SignalStop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        return train(args, parser, task, skip_rule, security, stop)
    except StoppedBySignal as exc:
        log.info("worker stopped by %s before it joined", exc)
        return 0


def train(args: argparse.Namespace, parser: EnvDefaultsParser, task: Any, skip_rule: SkipRule | None,
          security: Any, stop: SignalStop) -> int:
    try:
        task.data  # the task's data before joining: a worker that cannot train must not join (nor seed) first
    except RuntimeError as exc:
        parser.error(f"--task {args.task}: {exc}")
    registry, metrics_httpd = serve_metrics(args.metrics_host, args.metrics_port)
    batch_size = args.batch_size or task.default_batch_size
    model = task.build_model(args.seed)
    try:
        opt = Optimizer(model, server=args.server, controller=args.controller or None, lr=args.lr,
                        tau=args.tau, delta=args.delta, name=args.name or None, use_uvloop=not args.no_uvloop,
                        compressor=args.compressor, value_dtype=args.value_dtype, compressor_seed=args.seed,
                        error_feedback=args.error_feedback, def_lambda=args.def_lambda, momentum=args.momentum,
                        skip_rule=skip_rule, security=security, registry=registry,
                        downlink_delta=args.downlink_delta)
    except (ShardOrderError, ModelMismatch, ConnectionError) as exc:  # the cluster is not what --server says
        print(f"wanps worker: {exc}", file=sys.stderr)
        return 2
    stop.optimizer = opt
    if stop.requested:  # a signal between the join and here
        opt.interrupt()
    progress = None
    started = time.monotonic()
    rounds = 0
    try:
        batches = task.batches(opt.rank, opt.world_size, batch_size, args.seed)
        if args.progress:
            from tqdm import tqdm

            progress = tqdm(total=args.max_rounds or None, unit="round", file=sys.stderr)
        while not stop.requested:
            if args.max_rounds and rounds >= args.max_rounds:
                break
            if args.until_round and max(opt.round, opt.version) >= args.until_round:
                break
            if args.max_seconds and time.monotonic() - started >= args.max_seconds:
                break
            x, y = next(batches)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                batch_loss = task.loss(model, x, y)
                batch_loss.backward()
                return batch_loss

            loss = opt.step(closure)  # SASG calls it twice on the same batch (the auxiliary gradient)
            rounds += 1
            if progress is not None:
                decision = opt.last_decision
                progress.set_postfix(round=opt.round, loss=f"{loss.item():.3f}", tau=decision.tau,
                                     delta=f"{decision.delta:g}", up=f"{opt.bytes_up / 2**20:.1f}MiB",
                                     refresh=False)
                progress.update(1)
        if args.save_replica and not stop.requested and args.error_feedback != "def":
            # Every round this worker pushed, applied: replicas of workers that stopped at the
            # same round are then comparable with each other and the server's model.
            opt.wait_for_version(opt.round, timeout_s=120.0)
    except Interrupted:
        log.info("worker %d stopped by a signal at round %d", opt.worker_id, opt.round)
    finally:
        if progress is not None:
            progress.close()
        opt.close()  # with --error-feedback def, the replica ends at y_T (the flush round) only after this
        if args.save_replica:
            torch.save({"version": opt.version, "values": opt.replica.clone(), "worker_id": opt.worker_id,
                        "recoveries": opt.session.recoveries}, args.save_replica)
        if metrics_httpd is not None:
            metrics_httpd.shutdown()
            metrics_httpd.server_close()
    log.info("worker %d done: %d rounds, %.1f MiB up, %.1f MiB down", opt.worker_id, rounds,
             opt.bytes_up / 2**20, opt.bytes_down / 2**20)
    return 0
