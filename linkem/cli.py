"""`wanps linkem`: a user-space WAN link emulator (a shaping TCP proxy) from the command line.

`--trace FILE` (or a fixed `--bandwidth-mbit` and `--delay-ms`) sets the link; the
`--down-*` flags give the downlink (target -> client) its own trace or rates, for an
asymmetric line (without them both directions follow the same link);
`--faults "reset@5,stall@8:3"` schedules faults (seconds after start), and SIGUSR1 resets /
SIGUSR2 stalls for `--stall-s` at any moment. Prints `LISTENING HOST:PORT` once ready.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from collections.abc import Sequence

from wanps.linkem.faults import Fault, parse_faults
from wanps.linkem.proxy import LinkEmulator
from wanps.linkem.shaper import DEFAULT_QUEUE_MS
from wanps.linkem.trace import LinkTrace
from wanps.rpc.config import EnvDefaultsParser, float_at_least, host_port, run_async, setup_logging, split_host_port

log = logging.getLogger(__name__)


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(
        prog="wanps linkem",
        allow_abbrev=False,  # flags are matched literally to tell them from env fallbacks
        description="User-space WAN link emulator: a TCP proxy adding delay and a bandwidth limit "
        "that follow a trace. Prints 'LISTENING HOST:PORT' once ready.",
    )
    parser.add_argument("--listen", env="WANPS_LINKEM_LISTEN", type=host_port,
                        help="HOST:PORT to listen on (port 0 picks one)")
    parser.add_argument("--target", env="WANPS_LINKEM_TARGET", type=host_port, help="HOST:PORT to forward to")
    parser.add_argument("--trace", env="WANPS_LINKEM_TRACE",
                        help="CSV trace file (time_s,bandwidth_mbit,delay_ms), or a shipped trace's name "
                             "(wan-varying, wan-congested)")
    parser.add_argument("--bandwidth-mbit", env="WANPS_LINKEM_BANDWIDTH_MBIT", type=float_at_least(0, above=True),
                        help="fixed link bandwidth, Mbit/s")
    parser.add_argument("--delay-ms", env="WANPS_LINKEM_DELAY_MS", type=float_at_least(0),
                        help="fixed one-way delay, ms")
    parser.add_argument("--down-trace", env="WANPS_LINKEM_DOWN_TRACE",
                        help="CSV trace of the downlink (target -> client) alone; default: the link's")
    parser.add_argument("--down-bandwidth-mbit", env="WANPS_LINKEM_DOWN_BANDWIDTH_MBIT", type=float_at_least(0, above=True),
                        help="fixed downlink bandwidth, Mbit/s (default: --bandwidth-mbit)")
    parser.add_argument("--down-delay-ms", env="WANPS_LINKEM_DOWN_DELAY_MS", type=float_at_least(0),
                        help="fixed downlink one-way delay, ms (default: --delay-ms)")
    parser.add_argument("--no-loop", action="store_true", help="play the trace(s) once, then hold the last row")
    parser.add_argument("--queue-ms", env="WANPS_LINKEM_QUEUE_MS", type=float_at_least(0), default=DEFAULT_QUEUE_MS,
                        help="link queue (router buffer) in ms of transmit time")
    parser.add_argument("--faults", env="WANPS_LINKEM_FAULTS", default="",
                        help="fault schedule, seconds after start: 'reset@5,stall@8:3' (a reset at 5 s, "
                             "a 3 s stall at 8 s); SIGUSR1 also resets and SIGUSR2 stalls for --stall-s")
    parser.add_argument("--stall-s", env="WANPS_LINKEM_STALL_S", type=float_at_least(0, above=True), default=3.0,
                        help="length of a stall triggered by SIGUSR2")
    parser.add_argument("--log-level", env="WANPS_LOG_LEVEL", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), type=str.upper)
    return parser


def _trace_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> LinkTrace:
    def on_command_line(*flags: str) -> bool:
        return any(arg == flag or arg.startswith(flag + "=") for arg in argv for flag in flags)

    # A flag beats the environment: a fixed link on the command line overrides a trace from
    # WANPS_LINKEM_TRACE, and --trace overrides WANPS_LINKEM_BANDWIDTH_MBIT/_DELAY_MS.
    trace_flag = on_command_line("--trace")
    fixed_flag = on_command_line("--bandwidth-mbit", "--delay-ms")
    if trace_flag and fixed_flag:
        parser.error("give either --trace or --bandwidth-mbit/--delay-ms, not both")
    trace_path = None if fixed_flag else args.trace
    if trace_path is not None and not trace_flag and (args.bandwidth_mbit is not None or args.delay_ms is not None):
        parser.error("both a trace and a fixed link are set (flags or WANPS_LINKEM_* variables); give one")
    if trace_path is not None:
        try:
            return LinkTrace.from_csv(trace_path, loop=not args.no_loop)
        except (OSError, ValueError) as exc:
            parser.error(f"bad --trace: {exc}")
    if args.bandwidth_mbit is None or args.delay_ms is None:
        parser.error("give --trace FILE, or both --bandwidth-mbit and --delay-ms")
    try:
        return LinkTrace.fixed(args.bandwidth_mbit, args.delay_ms)
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # parser.error exits


def _downlink_trace_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                              uplink: LinkTrace) -> LinkTrace | None:
    """The downlink's own trace, or None when both directions follow the uplink's."""
    fixed = args.down_bandwidth_mbit is not None or args.down_delay_ms is not None
    if args.down_trace is not None and fixed:
        parser.error("give either --down-trace or --down-bandwidth-mbit/--down-delay-ms, not both")
    if args.down_trace is not None:
        try:
            return LinkTrace.from_csv(args.down_trace, loop=not args.no_loop)
        except (OSError, ValueError) as exc:
            parser.error(f"bad --down-trace: {exc}")
    if not fixed:
        return None
    # A fixed downlink takes the rate it does not name from the (fixed) uplink's.
    now = uplink.at(0.0)
    bandwidth = args.down_bandwidth_mbit if args.down_bandwidth_mbit is not None else now.bandwidth_mbit
    delay = args.down_delay_ms if args.down_delay_ms is not None else now.delay_ms
    if uplink.period_s is not None and (args.down_bandwidth_mbit is None or args.down_delay_ms is None):
        parser.error("under --trace, a fixed downlink needs both --down-bandwidth-mbit and --down-delay-ms")
    try:
        return LinkTrace.fixed(bandwidth, delay)
    except ValueError as exc:
        parser.error(f"downlink: {exc}")
    raise AssertionError("unreachable")  # parser.error exits


def _format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve(listen: tuple[str, int], target: tuple[str, int], trace: LinkTrace, queue_ms: float,
                 faults: Sequence[Fault] = (), stall_s: float = 3.0, downlink_trace: LinkTrace | None = None) -> int:
    emulator = LinkEmulator(listen[0], listen[1], target[0], target[1], trace, downlink_trace=downlink_trace,
                            queue_ms=queue_ms)
    try:
        port = await emulator.start()
    except OSError as exc:
        log.error("linkem: cannot listen on %s: %s", _format_host_port(*listen), exc)
        return 1
    if faults:
        emulator.schedule_faults(faults)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    for sig in signals[:2]:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, emulator.reset_connections)
    loop.add_signal_handler(signal.SIGUSR2, emulator.stall, stall_s)
    print(f"LISTENING {_format_host_port(listen[0], port)}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await emulator.close()
    log.info(
        "linkem stopped: %d connections, %d bytes client->target, %d bytes target->client",
        emulator.connections_accepted, emulator.bytes_client_to_target, emulator.bytes_target_to_client,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.listen is None or args.target is None:
        parser.error("--listen and --target are required")
    try:
        listen = split_host_port(args.listen)
        target = split_host_port(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    if args.queue_ms < 0:
        parser.error("--queue-ms must be >= 0")
    trace = _trace_from_args(parser, args, argv)
    downlink_trace = _downlink_trace_from_args(parser, args, trace)
    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        parser.error(f"bad --faults: {exc}")
    if not (math.isfinite(args.stall_s) and args.stall_s > 0):
        parser.error("--stall-s must be > 0")
    setup_logging(args.log_level)
    return run_async(_serve(listen, target, trace, args.queue_ms, faults, args.stall_s, downlink_trace))


if __name__ == "__main__":
    sys.exit(main())
