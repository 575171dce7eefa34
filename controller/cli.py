"""`wanps controller`: run the controller, plan with DeCo, or steer a running controller.

    wanps controller [--policy deco ...]          run the service
    wanps controller decide --params D ...        print DeCo's (tau, delta) in both time models as JSON
    wanps controller set-policy --controller ADDR --policy P [--tau T --delta D]
    wanps controller status --controller ADDR     print policy, decisions, link estimates as JSON
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator

import grpc

from wanps.controller.deco import (DEFAULT_BITS_PER_ELEMENT, DEFAULT_OBJECTIVE, DEFAULT_TIME_MODEL, OBJECTIVES,
                                   TIME_MODELS, DecoInput, deco)
from wanps.controller.estimator import EstimatorConfig
from wanps.controller.policy import POLICIES, PolicyConfig
from wanps.controller.service import ControllerConfig, start_controller
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.rpc.auth import add_client_security_flags, client_security_from_args, sync_channel
from wanps.proto.wire import MAX_TAU
from wanps.rpc.config import EnvDefaultsParser, float_at_least, fraction, host_port, int_at_least
from wanps.rpc.serving import add_serve_flags, serve_main, serve_settings_from_args


def parse_config(argv: list[str] | None) -> ControllerConfig:
    defaults = ControllerConfig()
    policy, estimator = defaults.policy, defaults.estimator
    parser = EnvDefaultsParser(prog="wanps controller", description="Run the wanps controller.")
    add_serve_flags(parser, defaults, env_prefix="WANPS_CONTROLLER", max_message_env="WANPS_CONTROLLER_MAX_MESSAGE_MB")
    parser.add_argument("--policy", env="WANPS_POLICY", choices=POLICIES, default=policy.name,
                        help="dsgd: tau 0, delta 1. static: --tau and --delta. deco: DeCo on the slowest link. "
                             "deco-hetero: DeCo's tau, each worker its own delta. accordion: tau 0, delta by "
                             "gradient-norm regime (a baseline).")
    parser.add_argument("--tau", env="WANPS_TAU", type=int_at_least(0, MAX_TAU), default=policy.tau,
                        help="Staleness for 'static' (and the adaptive policies' start).")
    parser.add_argument("--delta", env="WANPS_DELTA", type=fraction, default=policy.delta,
                        help="Fraction of elements sent per round for 'static' (and the adaptive start), in (0, 1].")
    parser.add_argument("--tau-max", env="WANPS_CONTROLLER_TAU_MAX", type=int_at_least(0, MAX_TAU),
                        default=policy.tau_max,
                        help="Largest tau an adaptive policy picks (workers also clamp to the server's).")
    parser.add_argument("--bits-per-element", env="WANPS_BITS_PER_ELEMENT", type=float_at_least(0, above=True),
                        default=policy.bits_per_element,
                        help="Wire bits per sent element in DeCo's model. Default: measured from the workers' "
                             "pushes (64 = uint32 index + float32 until the first push); 32 reproduces the paper.")
    parser.add_argument("--every-rounds", env="WANPS_DECIDE_EVERY", type=int_at_least(0), default=policy.every_rounds,
                        help="Recompute adaptive decisions every E rounds (0: decide once, on the first estimates).")
    parser.add_argument("--change-threshold", env="WANPS_CHANGE_THRESHOLD", type=float_at_least(0),
                        default=policy.change_threshold,
                        help="Also recompute when an estimate moves by more than this fraction.")
    parser.add_argument("--window-s", env="WANPS_ESTIMATOR_WINDOW_S", type=float_at_least(0, above=True),
                        default=estimator.window_s,
                        help="Sliding window of link samples (seconds).")
    parser.add_argument("--max-streams-per-worker", env="WANPS_CONTROLLER_MAX_STREAMS_PER_WORKER", type=int_at_least(1),
                        default=defaults.max_streams_per_worker, help="Open Decisions streams per worker id.")
    parser.add_argument("--max-workers", env="WANPS_CONTROLLER_MAX_WORKERS", type=int_at_least(1),
                        default=defaults.max_workers,
                        help="Workers whose links are tracked at once (ids silent for --window-s make room).")
    parser.add_argument("--overhead-max-ratio", env="WANPS_OVERHEAD_MAX_RATIO", type=float_at_least(0),
                        default=policy.overhead_max_ratio,
                        help="Cap of the measured per-round overhead DeCo adds to T_comp, in T_comps "
                             "(0: no overhead term, the paper's model). Default: none in the ps time model "
                             "(the overhead as measured), 1 in the paper's.")
    parser.add_argument("--time-model", env="WANPS_TIME_MODEL", choices=TIME_MODELS, default=policy.time_model,
                        help="DeCo's round time: ps = the parameter server's (upload and download of a round in "
                             "series, each direction estimated apart); paper = Theorem 3 as published (one "
                             "transfer per round).")
    parser.add_argument("--link-share", env="WANPS_LINK_SHARE", type=fraction, default=policy.link_share,
                        help="Share of each estimated bandwidth DeCo keeps busy round after round, in (0, 1] "
                             "(headroom: a queue that forms can drain; 1: the link filled exactly). One round's "
                             "transfers are timed at the whole link.")
    parser.add_argument("--staleness-weight", env="WANPS_STALENESS_WEIGHT", type=float_at_least(0),
                        default=policy.staleness_weight,
                        help="DeCo minimises phi(tau, delta) * (1 + W * tau): what each round of staleness costs "
                             "in rounds to converge, which phi prices at about nothing at small delta (0: the paper). "
                             "With --objective time: the rounds model's w (`wanps bench convergence` fits it).")
    parser.add_argument("--objective", env="WANPS_OBJECTIVE", choices=OBJECTIVES, default=policy.objective,
                        help="What DeCo minimises: phi = Algorithm 1 (the least phi among the choices that hide "
                             "communication); time = rounds x seconds per round over every tau and delta, with "
                             "rounds ~ (1 + W tau)(1 + K / (delta d)) (W: --staleness-weight, K: --compression-knee).")
    parser.add_argument("--compression-knee", env="WANPS_COMPRESSION_KNEE", type=float_at_least(0),
                        default=policy.compression_knee,
                        help="With --objective time: elements per push below which compression costs rounds "
                             "(`wanps bench convergence` fits it).")
    parser.add_argument("--switch-margin-s", env="WANPS_SWITCH_MARGIN_S", type=float_at_least(0),
                        default=policy.switch_margin_s,
                        help="A decision holds from this much training time ahead (at the recent speed; at "
                             "least 10 rounds), so every worker hears of it before its round.")
    args = parser.parse_args(argv)
    serve = serve_settings_from_args(parser, args)
    try:
        policy = PolicyConfig(name=args.policy, tau=args.tau, delta=args.delta, tau_max=args.tau_max,
                              bits_per_element=args.bits_per_element, every_rounds=args.every_rounds,
                              change_threshold=args.change_threshold, overhead_max_ratio=args.overhead_max_ratio,
                              time_model=args.time_model, link_share=args.link_share,
                              switch_margin_s=args.switch_margin_s, staleness_weight=args.staleness_weight,
                              objective=args.objective, compression_knee=args.compression_knee)
        estimator = EstimatorConfig(window_s=args.window_s)
    except ValueError as exc:
        parser.error(str(exc))
    return ControllerConfig(**serve, policy=policy, estimator=estimator,
                            max_streams_per_worker=args.max_streams_per_worker, max_workers=args.max_workers)


def decide_main(argv: list[str]) -> int:
    parser = EnvDefaultsParser(prog="wanps controller decide",
                               description="DeCo's (tau, delta) for a link, as JSON (Algorithm 1, Theorem 3), in the "
                                           "parameter-server and the paper's time model.")
    parser.add_argument("--params", type=int_at_least(1), required=True, help="Model parameters d.")
    parser.add_argument("--bandwidth-mbit", type=float_at_least(0, above=True), required=True,
                        help="Bandwidth a (the uplink), Mbit/s.")
    parser.add_argument("--down-bandwidth-mbit", type=float_at_least(0, above=True), default=None,
                        help="Downlink bandwidth, Mbit/s (default: --bandwidth-mbit, a symmetric link).")
    parser.add_argument("--download-factor", type=float_at_least(0), default=1.0,
                        help="Bytes a worker downloads per byte it pushes: the round's union (about the number of "
                             "workers at small delta; the controller measures it). Default 1.")
    parser.add_argument("--latency-ms", type=float_at_least(0), required=True, help="End-to-end latency b, ms.")
    parser.add_argument("--t-comp-ms", type=float_at_least(0), required=True, help="Compute time per step, ms.")
    parser.add_argument("--bits-per-element", type=float_at_least(0, above=True), default=DEFAULT_BITS_PER_ELEMENT,
                        help="Wire bits per sent element (64: uint32 index + float32 value; 32: the paper's model).")
    parser.add_argument("--tau-max", type=int_at_least(0, MAX_TAU), default=PolicyConfig().tau_max,
                        help="Largest tau considered.")
    parser.add_argument("--overhead-ms", type=float_at_least(0), default=0.0,
                        help="Fixed cost per round beyond T_comp, ms (the controller measures it; 0: the paper).")
    parser.add_argument("--staleness-weight", type=float_at_least(0), default=PolicyConfig().staleness_weight,
                        help="The ps form minimises phi(tau, delta) * (1 + W * tau) (0: the paper's phi; the paper's "
                             "form always uses it).")
    parser.add_argument("--round-floor-ms", type=float_at_least(0, above=True), default=None,
                        help="Rounds measured this long on idle links (longer than T_comp + overhead: shared cores, "
                             "a barrier on the slowest worker); latency hides behind rounds this long. Default: none.")
    parser.add_argument("--time-model", choices=TIME_MODELS, default=DEFAULT_TIME_MODEL,
                        help="The form whose decision is printed at the top level (both are printed under 'forms').")
    parser.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                        help="phi: Algorithm 1; time: min rounds x seconds per round (see `wanps controller --help`).")
    parser.add_argument("--compression-knee", type=float_at_least(0), default=PolicyConfig().compression_knee,
                        help="With --objective time: elements per push below which compression costs rounds.")
    args = parser.parse_args(argv)
    try:
        forms = {model: deco(DecoInput(
            num_params=args.params, bandwidth_bps=args.bandwidth_mbit * 1e6, latency_s=args.latency_ms / 1e3,
            t_comp_s=args.t_comp_ms / 1e3, bits_per_element=args.bits_per_element, tau_max=args.tau_max,
            overhead_s=args.overhead_ms / 1e3,
            down_bandwidth_bps=None if args.down_bandwidth_mbit is None else args.down_bandwidth_mbit * 1e6,
            download_factor=args.download_factor, time_model=model,
            round_floor_s=None if args.round_floor_ms is None else args.round_floor_ms / 1e3,
            staleness_weight=args.staleness_weight, objective=args.objective,
            compression_knee=args.compression_knee)).as_dict()
            for model in TIME_MODELS}
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps({**forms[args.time_model], "forms": forms}, indent=2))
    return 0


@contextlib.contextmanager
def _one_line_errors(prog: str, address: str) -> Iterator[None]:
    """A refused or failed admin call: one line naming the controller and why, exit code 1."""
    try:
        yield
    except grpc.RpcError as exc:
        print(f"{prog}: {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        raise SystemExit(1) from None


def _admin_stub(parser: EnvDefaultsParser, args) -> tuple[grpc.Channel, pb_grpc.ControllerStub]:
    try:
        security = client_security_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    channel = sync_channel(args.controller, security)
    return channel, pb_grpc.ControllerStub(channel)


def set_policy_main(argv: list[str]) -> int:
    parser = EnvDefaultsParser(prog="wanps controller set-policy", description="Switch a running controller's policy.")
    parser.add_argument("--controller", env="WANPS_CONTROLLER", type=host_port, default="127.0.0.1:50052")
    parser.add_argument("--policy", choices=POLICIES, required=True)
    parser.add_argument("--tau", type=int_at_least(0, MAX_TAU), default=PolicyConfig().tau)
    parser.add_argument("--delta", type=fraction, default=PolicyConfig().delta)
    add_client_security_flags(parser)
    args = parser.parse_args(argv)
    channel, stub = _admin_stub(parser, args)
    with channel, _one_line_errors(parser.prog, args.controller):
        reply = stub.SetPolicy(pb.SetPolicyRequest(policy=args.policy, tau=args.tau, delta=args.delta), timeout=10)
    decision = reply.decision if reply.HasField("decision") else None
    print(json.dumps({"policy": args.policy, "decision": None if decision is None else {
        "from_round": decision.from_round, "tau": decision.tau, "delta": decision.delta, "reason": decision.reason}}))
    return 0


def status_main(argv: list[str]) -> int:
    parser = EnvDefaultsParser(prog="wanps controller status", description="A running controller's state as JSON.")
    parser.add_argument("--controller", env="WANPS_CONTROLLER", type=host_port, default="127.0.0.1:50052")
    add_client_security_flags(parser)
    args = parser.parse_args(argv)
    channel, stub = _admin_stub(parser, args)
    with channel, _one_line_errors(parser.prog, args.controller):
        state = stub.GetState(pb.GetStateRequest(), timeout=10)
    print(json.dumps({
        "policy": state.policy,
        "reported_round": state.reported_round,
        "traffic_factor": state.traffic_factor,
        "bits_per_element": state.bits_per_element,
        "time_model": state.time_model,
        "objective": state.objective,
        "staleness_weight": state.staleness_weight,
        "compression_knee": state.compression_knee,
        "overhead_ms": state.overhead_s * 1e3,
        "decisions": [{"id": d.decision_id, "from_round": d.from_round, "tau": d.tau, "delta": d.delta,
                       "reason": d.reason, "worker_delta": dict(d.worker_delta),
                       "worker_downlink_delta": dict(d.worker_downlink_delta)} for d in state.decisions],
        "links": [{"worker": w.worker_id, "bandwidth_mbit": w.bandwidth_bps / 1e6,
                   "down_bandwidth_mbit": w.down_bandwidth_bps / 1e6 if w.down_bandwidth_bps else None,
                   "latency_ms": w.latency_s * 1e3, "t_comp_ms": w.t_comp_s * 1e3, "pushes": w.push_samples,
                   "pings": w.ping_samples, "method": w.method, "down_samples": w.down_samples,
                   "down_method": w.down_method or None} for w in state.links],
    }, indent=2))
    return 0


ADMIN_COMMANDS = {"decide": decide_main, "set-policy": set_policy_main, "status": status_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ADMIN_COMMANDS:
        return ADMIN_COMMANDS[argv[0]](argv[1:])
    config = parse_config(argv)
    return serve_main(lambda: start_controller(config), config)
