"""`wanps controller`: run the controller."""
from __future__ import annotations

from wanps.controller.decisions import POLICIES
from wanps.controller.service import ControllerConfig, start_controller
from wanps.deploy.runtime import EnvDefaultsParser, run_async, serve_until_signalled, setup_logging, split_host_port


def parse_config(argv: list[str] | None) -> tuple[ControllerConfig, str]:
    defaults = ControllerConfig()
    parser = EnvDefaultsParser(prog="wanps controller", description="Run the wanps controller.")
    parser.add_argument("--listen", env="WANPS_CONTROLLER_LISTEN", default=f"{defaults.host}:{defaults.port}",
                        help="HOST:PORT for gRPC (port 0 = any free port).")
    parser.add_argument("--metrics-listen", env="WANPS_CONTROLLER_METRICS_LISTEN",
                        default=f"{defaults.metrics_host}:{defaults.metrics_port}",
                        help="HOST:PORT for Prometheus metrics (port 0 = any free port, 'off' = none).")
    parser.add_argument("--policy", env="WANPS_POLICY", choices=POLICIES, default=defaults.policy,
                        help="dsgd: tau 0, delta 1. static: the given --tau and --delta.")
    parser.add_argument("--tau", env="WANPS_TAU", type=int, default=defaults.tau, help="Staleness for 'static'.")
    parser.add_argument("--delta", env="WANPS_DELTA", type=float, default=defaults.delta,
                        help="Fraction of elements sent per round for 'static', in (0, 1].")
    parser.add_argument("--no-uvloop", action="store_true", env="WANPS_NO_UVLOOP")
    parser.add_argument("--log-level", env="WANPS_LOG_LEVEL", default="INFO")
    args = parser.parse_args(argv)
    host, port = split_host_port(args.listen)
    if args.metrics_listen == "off":
        metrics_host, metrics_port = "127.0.0.1", -1
    else:
        metrics_host, metrics_port = split_host_port(args.metrics_listen)
    config = ControllerConfig(host=host, port=port, metrics_host=metrics_host, metrics_port=metrics_port,
                              policy=args.policy, tau=args.tau, delta=args.delta, use_uvloop=not args.no_uvloop)
    return config, args.log_level


def main(argv: list[str] | None = None) -> int:
    config, log_level = parse_config(argv)
    setup_logging(log_level)
    run_async(
        serve_until_signalled(
            lambda: start_controller(config),
            lambda running: f"LISTENING {config.host}:{running.port} METRICS {running.metrics_port}",
        ),
        use_uvloop=config.use_uvloop,
    )
    return 0
