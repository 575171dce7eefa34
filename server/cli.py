"""`wanps server`: run the parameter server."""
from __future__ import annotations

import warnings

import torch

from wanps.deploy.auth import add_server_security_flags, server_security_from_args
from wanps.deploy.runtime import EnvDefaultsParser, serve_main, setup_logging, split_host_port
from wanps.server.limits import Limits
from wanps.server.service import ServerConfig, start_server


def checksum_every(text: str | int | None) -> int | None:
    if text is None or text == "auto":
        return None
    value = int(text)
    if value < 0:
        raise ValueError("--checksum-every must be >= 0 or 'auto'")
    return value


def parse_config(argv: list[str] | None) -> tuple[ServerConfig, str]:
    defaults = ServerConfig()
    limits = defaults.limits
    parser = EnvDefaultsParser(prog="wanps server", description="Run the wanps parameter server.")
    parser.add_argument("--listen", env="WANPS_SERVER_LISTEN", default=f"{defaults.host}:{defaults.port}",
                        help="HOST:PORT for gRPC (port 0 = any free port).")
    parser.add_argument("--metrics-listen", env="WANPS_SERVER_METRICS_LISTEN",
                        default=f"{defaults.metrics_host}:{defaults.metrics_port}",
                        help="HOST:PORT for Prometheus metrics (port 0 = any free port, 'off' = none).")
    parser.add_argument("--tau-max", env="WANPS_TAU_MAX", type=int, default=defaults.tau_max,
                        help="Widest stale window accepted (open rounds = tau_max + 1).")
    parser.add_argument("--min-workers", env="WANPS_MIN_WORKERS", type=int, default=defaults.min_workers,
                        help="Round 0 starts once this many workers have joined.")
    parser.add_argument("--checksum-every", env="WANPS_CHECKSUM_EVERY", type=checksum_every, default="auto",
                        help="Send the model CRC-32 every N rounds (0 = never; auto = every ceil(params / 1M) rounds).")
    parser.add_argument("--torch-threads", env="WANPS_TORCH_THREADS", type=int, default=defaults.torch_threads,
                        help="torch intra-op threads for aggregation.")
    parser.add_argument("--history-rounds", env="WANPS_HISTORY_ROUNDS", type=int, default=defaults.history_rounds,
                        help="Closed rounds kept for followers that reconnect or lag.")
    parser.add_argument("--max-message-mb", env="WANPS_MAX_MESSAGE_MB", type=int,
                        default=defaults.max_message_bytes // 2**20, help="gRPC message size limit (MiB).")
    parser.add_argument("--max-payload-elements", env="WANPS_MAX_PAYLOAD_ELEMENTS", type=int,
                        default=limits.max_payload_elements,
                        help="Largest model (parameters) and push (elements) accepted.")
    parser.add_argument("--max-streams-per-worker", env="WANPS_MAX_STREAMS_PER_WORKER", type=int,
                        default=limits.max_streams_per_worker,
                        help="Open Push/PullModel/Updates streams one worker id may hold at once.")
    parser.add_argument("--join-rate", env="WANPS_JOIN_RATE", type=float, default=limits.join_rate_per_s,
                        help="Joins per second accepted over time (token bucket).")
    parser.add_argument("--join-burst", env="WANPS_JOIN_BURST", type=int, default=limits.join_burst,
                        help="Joins accepted at once (the bucket's size).")
    add_server_security_flags(parser)
    parser.add_argument("--no-uvloop", action="store_true", env="WANPS_NO_UVLOOP", help="Use the default asyncio loop.")
    parser.add_argument("--log-level", env="WANPS_LOG_LEVEL", default="INFO")
    args = parser.parse_args(argv)
    host, port = split_host_port(args.listen)
    if args.metrics_listen == "off":
        metrics_host, metrics_port = "127.0.0.1", -1
    else:
        metrics_host, metrics_port = split_host_port(args.metrics_listen)
    try:
        limits = Limits(max_payload_elements=args.max_payload_elements, max_streams_per_worker=args.max_streams_per_worker,
                        join_rate_per_s=args.join_rate, join_burst=args.join_burst)
        security = server_security_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    config = ServerConfig(
        host=host, port=port, metrics_host=metrics_host, metrics_port=metrics_port, tau_max=args.tau_max,
        min_workers=args.min_workers, checksum_every=checksum_every(args.checksum_every), torch_threads=args.torch_threads, history_rounds=args.history_rounds,
        max_message_bytes=args.max_message_mb * 2**20, use_uvloop=not args.no_uvloop, limits=limits, security=security,
    )
    return config, args.log_level


def main(argv: list[str] | None = None) -> int:
    config, log_level = parse_config(argv)
    setup_logging(log_level)
    torch.set_num_threads(max(1, config.torch_threads))
    # Received tensors are zero-copy, read-only views of the message bytes; torch warns once about that.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    return serve_main(lambda: start_server(config), config.host, config.use_uvloop)
