"""`wanps server`: run the parameter server."""
from __future__ import annotations

import socket
import sys

import torch

from wanps.proto.wire import MAX_TAU
from wanps.rpc.config import EnvDefaultsParser, float_at_least, int_at_least
from wanps.rpc.limits import Limits
from wanps.rpc.serving import add_serve_flags, serve_main, serve_settings_from_args
from wanps.server.checkpoint import checkpoint_path
from wanps.server.service import ServerConfig, start_server
from wanps.server.shard import ShardMismatch, parse_shard


def checksum_every(text: str | int | None) -> int | None:
    if text is None or text == "auto":
        return None
    value = int(text)
    if value < 0:
        raise ValueError("--checksum-every must be >= 0 or 'auto'")
    return value


def parse_config(argv: list[str] | None) -> ServerConfig:
    defaults = ServerConfig()
    limits = defaults.limits
    parser = EnvDefaultsParser(prog="wanps server", description="Run the wanps parameter server.")
    add_serve_flags(parser, defaults, env_prefix="WANPS_SERVER", max_message_env="WANPS_MAX_MESSAGE_MB")
    parser.add_argument("--tau-max", env="WANPS_TAU_MAX", type=int_at_least(0, MAX_TAU), default=defaults.tau_max,
                        help="Widest stale window accepted (open rounds = tau_max + 1).")
    parser.add_argument("--min-workers", env="WANPS_MIN_WORKERS", type=int_at_least(1), default=defaults.min_workers,
                        help="Round 0 starts once this many workers have joined.")
    parser.add_argument("--checksum-every", env="WANPS_CHECKSUM_EVERY", type=checksum_every, default="auto",
                        help="Send the model checksum every N rounds (0 = never; auto = every ceil(params / 1M) rounds).")
    parser.add_argument("--torch-threads", env="WANPS_TORCH_THREADS", type=int_at_least(1),
                        default=defaults.torch_threads,
                        help="torch intra-op threads for aggregation.")
    parser.add_argument("--core-threads", env="WANPS_CORE_THREADS", type=int, choices=(1, 2),
                        default=defaults.core_threads,
                        help="Threads for a round's aggregate, apply and checksum: 2 = two halves of the index "
                             "space at once, 1 = one thread (the same result to the bit).")
    parser.add_argument("--history-mb", env="WANPS_HISTORY_MB", type=float_at_least(0), default=defaults.history_mb,
                        help="Payload MiB of closed rounds kept for followers that reconnect or lag (the newest "
                             "round is always kept, and the rounds a worker's stream has yet to send; "
                             "docs/operations.md, 'Server memory').")
    parser.add_argument("--history-rounds", env="WANPS_HISTORY_ROUNDS", type=int_at_least(1),
                        default=defaults.history_rounds,
                        help="The most closed rounds kept for followers, whatever their size.")
    parser.add_argument("--max-compressed-followers", env="WANPS_MAX_COMPRESSED_FOLLOWERS", type=int_at_least(0),
                        default=defaults.max_compressed_followers,
                        help="Updates streams with their own downlink compression (a worker's --downlink-delta) "
                             "held at once; each keeps a downlink residual of 4 bytes per parameter here "
                             "(docs/operations.md, 'Server memory'). 0: refuse every one.")
    parser.add_argument("--max-payload-elements", env="WANPS_MAX_PAYLOAD_ELEMENTS", type=int_at_least(1),
                        default=limits.max_payload_elements,
                        help="Largest model (parameters) and push (elements) accepted.")
    parser.add_argument("--max-streams-per-worker", env="WANPS_MAX_STREAMS_PER_WORKER", type=int_at_least(1),
                        default=limits.max_streams_per_worker,
                        help="Open Push/PullModel/Updates streams one worker id may hold at once.")
    parser.add_argument("--join-rate", env="WANPS_JOIN_RATE", type=float_at_least(0, above=True),
                        default=limits.join_rate_per_s,
                        help="Joins per second accepted over time (token bucket).")
    parser.add_argument("--join-burst", env="WANPS_JOIN_BURST", type=int_at_least(1), default=limits.join_burst,
                        help="Joins accepted at once (the bucket's size).")
    parser.add_argument("--lease-s", env="WANPS_LEASE_S", type=float_at_least(0), default=defaults.lease_s,
                        help="A worker silent this long (no push, ping or other call) leaves at the next round "
                             "boundary (0 = never).")
    parser.add_argument("--round-deadline-s", env="WANPS_ROUND_DEADLINE_S", type=float_at_least(0),
                        default=defaults.round_deadline_s,
                        help="Close a round without its stragglers this long after its first push; their late "
                             "pushes are acknowledged as late and not applied (0 = wait for every worker).")
    parser.add_argument("--checkpoint-dir", env="WANPS_CHECKPOINT_DIR", default=None,
                        help="Write checkpoints here (every --checkpoint-every rounds and at shutdown).")
    parser.add_argument("--checkpoint-every", env="WANPS_CHECKPOINT_EVERY", type=int_at_least(0),
                        default=defaults.checkpoint_every, help="Rounds between checkpoints (0 = only at shutdown).")
    parser.add_argument("--resume", env="WANPS_RESUME", default=None, metavar="DIR",
                        help="Continue from the checkpoint in DIR (and keep checkpointing there unless "
                             "--checkpoint-dir says otherwise).")
    parser.add_argument("--shard", env="WANPS_SHARD", default="0/1", metavar="I/N",
                        help="Own shard I of N of the model (key ranges, docs/architecture.md 'Beyond one server'); "
                             "I may be 'host': the trailing number of the host name, as a StatefulSet's pod "
                             "wanps-server-2 is 2. 0/1 = the whole model.")
    parser.add_argument("--shard-ordinal-base", env="WANPS_SHARD_ORDINAL_BASE", type=int, default=0, metavar="B",
                        help="Subtracted from the host name's number with --shard host/N (1 for Docker Swarm's "
                             "{{.Task.Slot}}, which counts from 1).")
    parser.add_argument("--audit", env="WANPS_AUDIT", action="store_true",
                        help="Record the initial model, the sum of applied deltas and the applied round ids "
                             "(in checkpoints; for conservation checks; 12 bytes per parameter).")
    parser.add_argument("--check-core-thread", env="WANPS_CHECK_CORE_THREAD", action="store_true",
                        help="Debugging: raise when the server touches its core off the core thread "
                             "(the tests run with it).")
    args = parser.parse_args(argv)
    serve = serve_settings_from_args(parser, args)
    try:
        limits = Limits(max_payload_elements=args.max_payload_elements, max_streams_per_worker=args.max_streams_per_worker,
                        join_rate_per_s=args.join_rate, join_burst=args.join_burst)
    except ValueError as exc:
        parser.error(str(exc))
    try:  # the config's own checks: a usage line too, never a traceback
        shard = parse_shard(args.shard, socket.gethostname(), args.shard_ordinal_base)
        config = ServerConfig(
            **serve, tau_max=args.tau_max, min_workers=args.min_workers,
            checksum_every=checksum_every(args.checksum_every), torch_threads=args.torch_threads,
            core_threads=args.core_threads, history_rounds=args.history_rounds, history_mb=args.history_mb,
            max_compressed_followers=args.max_compressed_followers, limits=limits, lease_s=args.lease_s, round_deadline_s=args.round_deadline_s,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume_dir=args.resume,
            audit=args.audit, check_core_thread=args.check_core_thread,
            shard_index=shard.index, shard_count=shard.count,
        )
        config.core_config()  # CoreConfig checks its own fields
    except ValueError as exc:
        parser.error(str(exc))
    if config.history_mb < 0 or config.history_rounds < 1:
        parser.error("--history-mb must be >= 0 and --history-rounds >= 1")
    if config.lease_s < 0 or config.round_deadline_s < 0 or config.checkpoint_every < 0:
        parser.error("--lease-s, --round-deadline-s and --checkpoint-every must be >= 0")
    if config.resume_dir is not None and not checkpoint_path(config.resume_dir).is_file():
        parser.error(f"--resume: no checkpoint at {checkpoint_path(config.resume_dir)}")
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    torch.set_num_threads(max(1, config.torch_threads))
    try:
        return serve_main(lambda: start_server(config), config)
    except ShardMismatch as exc:  # --resume with another shard's checkpoint: a person's mistake, one line
        print(f"wanps server: --resume: {exc}", file=sys.stderr)
        return 2
