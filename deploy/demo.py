"""`wanps demo` (= `make run`): a whole cluster on loopback over emulated WAN links.

Starts a parameter server (or `--shards N` of them, each owning a key range of the model),
a controller, one `wanps linkem` per worker and server (delay and a bandwidth that follows
a trace), and the workers, as real processes. This process is the
observer: it follows the model through the update stream and evaluates test accuracy
against wall time, off the workers' critical path. It stops everything once the target
accuracy is reached (or the time limit passes), prints a results table, and writes
results/demo.json and results/demo.png (accuracy over time; below it, the set and the
estimated bandwidth with the (tau, delta) in force over time).
"""
from __future__ import annotations

import json
import logging
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wanps.proto.decisions import decision_for_round
from wanps.controller.policy import POLICIES
from wanps.rpc.auth import ClientSecurity, add_client_security_flags, client_security_env, client_security_from_args
from wanps.worker.tasks import TASKS
from wanps.deploy.processes import ManagedProcess, start_process, stop_all, stopping_on_signals, wanps_command
from wanps.proto.wire import MAX_TAU
from wanps.linkem.trace import DEFAULT_TRACE, LinkTrace, shipped_traces
from wanps.rpc.config import EnvDefaultsParser, float_at_least, fraction, int_at_least, setup_logging

log = logging.getLogger("wanps.demo")


@dataclass(frozen=True)
class DemoConfig:
    workers: int = 4
    task: str = "mnist"
    policy: str = "deco"
    tau: int = 2
    delta: float = 0.01
    tau_max: int = 8
    lr: float = 0.1
    batch_size: int = 64
    target_accuracy: float = 0.97
    time_limit_s: float = 270.0
    eval_every_s: float = 2.0
    trace: str = ""  # empty: the shipped varying trace
    # One trace per worker (overrides `trace`), e.g. one slow link among fast ones.
    worker_traces: tuple[str, ...] = ()
    # One downlink trace per worker ("": the link's own trace both ways), for asymmetric links.
    worker_down_traces: tuple[str, ...] = ()
    # Extra flags for `wanps controller` (e.g. ("--every-rounds", "0")).
    controller_args: tuple[str, ...] = ()
    # Poll the controller's estimates at every evaluation (the PNG's second panel, the bench's
    # per-round predictions): one GetState every eval_every_s.
    track_links: bool = True
    direct: bool = False  # no link emulator (LAN-like loopback)
    # Parameter servers the model is cut over (docs/architecture.md, "Beyond one server").
    # Each (worker, shard) connection gets its own emulated link, so with N shards a worker's
    # link carries N times the trace's bandwidth.
    shards: int = 1
    out_dir: str = "results"
    progress: bool = True
    seed: int = 0


def default_trace() -> str:
    return str(shipped_traces()[DEFAULT_TRACE])


def scrape(port: int | None) -> dict[str, float]:
    """Sample values from a Prometheus endpoint, by sample name (labels folded in)."""
    if port is None:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()))
            values[key] = sample.value
    return values


def start_cluster(config: DemoConfig, log_dir: Path, env: dict[str, str] | None = None
                  ) -> tuple[list[ManagedProcess], ManagedProcess, list[list[ManagedProcess]]]:
    """The servers (one per shard), the controller, and for each worker one link emulator per
    server; returns them all started and ready.

    `env`: extra environment of the servers and the controller (the demo's token file or token)."""
    servers = [start_process("server" if config.shards == 1 else f"server-{index}", wanps_command(
        "server", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--shard", f"{index}/{config.shards}",
        "--min-workers", str(config.workers), "--tau-max", str(config.tau_max)), log_dir, env=env)
        for index in range(config.shards)]
    controller = start_process("controller", wanps_command(
        "controller", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        "--policy", config.policy, "--tau", str(config.tau), "--delta", str(config.delta),
        "--tau-max", str(config.tau_max), *config.controller_args), log_dir, env=env)
    for server in servers:
        server.wait_ready(60)
    controller.wait_ready(60)
    links: list[list[ManagedProcess]] = []
    if not config.direct:
        for i in range(config.workers):
            trace = config.worker_traces[i] if config.worker_traces else (config.trace or default_trace())
            down = config.worker_down_traces[i] if config.worker_down_traces else ""
            down_args = ("--down-trace", down) if down else ()
            links.append([start_process(f"linkem-{i}" if config.shards == 1 else f"linkem-{i}-{index}", wanps_command(
                "linkem", "--listen", "127.0.0.1:0", "--target", server.address, "--trace", trace, *down_args),
                log_dir) for index, server in enumerate(servers)])
        for link in (link for worker_links in links for link in worker_links):
            link.wait_ready(30)
    return servers, controller, links


def run_demo(config: DemoConfig, security: ClientSecurity | None = None) -> dict:
    """`security`: how this process and the workers dial. The server and the controller read
    their own token and TLS settings from the environment they inherit (WANPS_TOKEN_FILE, WANPS_TLS_*).
    Kept out of DemoConfig, which is written to demo.json."""
    from wanps.worker.observer import Observer
    from wanps.worker.tasks import get_task

    out_dir = Path(config.out_dir)
    log_dir = out_dir / "logs"
    task = get_task(config.task)
    task.data  # load before the clock starts
    processes: list[ManagedProcess] = []
    observer = None
    progress = None
    try:
        child_env = client_security_env(security or ClientSecurity())
        links_started = time.monotonic()
        servers, controller, links = start_cluster(config, log_dir, child_env)
        processes += [*servers, controller, *(link for worker_links in links for link in worker_links)]
        server_addresses = ",".join(server.address for server in servers)  # in shard order
        workers = []
        for i in range(config.workers):
            server_address = server_addresses if config.direct else ",".join(link.address for link in links[i])
            workers.append(start_process(f"worker-{i}", wanps_command(
                "worker", "--server", server_address, "--controller", controller.address, "--task", config.task,
                "--lr", str(config.lr), "--batch-size", str(config.batch_size), "--seed", str(config.seed),
                "--name", f"worker-{i}", "--max-seconds", str(config.time_limit_s + 60)), log_dir, wait_for_line=False,
                env=child_env))
        processes += workers
        model = task.build_model(config.seed)
        observer = Observer(model, server_addresses, controller=controller.address, name="demo-observer",
                            security=security)
        started = time.monotonic()
        rounds: list[dict] = []
        evaluations: list[tuple[float, int, float]] = []
        link_track: list[dict] = []
        # The emulators' trace clocks started before this one: the PNG's set bandwidth is read at
        # the trace time of each point (time since the links started).
        trace_offset_s = time.monotonic() - links_started if links else 0.0
        reached_at: float | None = None
        next_eval = started
        if config.progress:
            from tqdm import tqdm

            progress = tqdm(unit="round", file=sys.stderr, dynamic_ncols=True)
        while True:
            now = time.monotonic()
            elapsed = now - started
            if elapsed > config.time_limit_s:
                break
            for worker in workers:
                if not worker.running():
                    raise RuntimeError(f"{worker.name} exited early (code {worker.popen.returncode}):\n{worker.tail()}")
            before = observer.version
            observer.wait_for_version(before + 1, timeout_s=0.5)
            stamp = time.monotonic() - started
            decisions = observer.session.decisions()
            for r in range(before, observer.version):
                decision = decision_for_round(decisions, r)
                rounds.append({"round": r, "time_s": round(stamp, 3),
                               "tau": decision.tau if decision else None,
                               "delta": decision.delta if decision else None, "accuracy": None})
            if time.monotonic() >= next_eval and observer.version > 0:
                accuracy = task.accuracy(model)
                evaluations.append((stamp, observer.version, accuracy))
                if config.track_links:
                    state = fetch_controller_state(controller.address, security)
                    link_track.append({"time_s": round(stamp, 3), "round": observer.version,
                                       "links": state.get("links", []),
                                       # What DeCo's time model reads besides the links (bench's predictions).
                                       **{key: state[key] for key in ("traffic_factor", "bits_per_element",
                                                                       "overhead_s", "time_model") if key in state}})
                if rounds:
                    rounds[-1]["accuracy"] = round(accuracy, 4)
                next_eval = time.monotonic() + config.eval_every_s
                if progress is not None:
                    decision = decision_for_round(decisions, observer.version)
                    progress.set_postfix(acc=f"{accuracy:.4f}", tau=decision.tau if decision else "?",
                                         delta=f"{decision.delta:g}" if decision else "?", refresh=False)
                if accuracy >= config.target_accuracy:
                    reached_at = stamp
                    break
            if progress is not None:
                progress.update(observer.version - before)
        metrics = [scrape(server.metrics_port) for server in servers]
        controller_state = fetch_controller_state(controller.address, security)
        decisions = sorted(observer.session.decisions(), key=lambda d: d.decision_id)
    finally:
        if progress is not None:
            progress.close()
        if observer is not None:
            observer.close()
        stop_all(processes)
    final_accuracy = evaluations[-1][2] if evaluations else 0.0
    result = {
        "reached_target": reached_at is not None,
        "target_accuracy": config.target_accuracy,
        "time_to_target_s": round(reached_at, 2) if reached_at is not None else None,
        "final_accuracy": round(final_accuracy, 4),
        "rounds": rounds[-1]["round"] + 1 if rounds else 0,
        "bytes_up": int(sum(m.get("wanps_server_received_bytes_total", 0) for m in metrics)),
        "bytes_down": int(sum(m.get("wanps_server_sent_bytes_total", 0) for m in metrics)),
        "shards": config.shards,
        "policy": config.policy,
        "workers": config.workers,
        "task": config.task,
        "link": "direct" if config.direct else Path(config.trace or default_trace()).name,
        "config": asdict(config),
        "measured_iter_s": measured_iteration_s(rounds),
        "decisions": [{"id": d.decision_id, "from_round": d.from_round, "tau": d.tau, "delta": d.delta,
                       "predicted_iter_s": d.predicted_iter_s, "reason": d.reason,
                       "worker_delta": {str(k): v for k, v in d.worker_delta.items()},
                       "worker_downlink_delta": {str(k): v for k, v in d.worker_downlink_delta.items()}}
                      for d in decisions],
        "controller_state": controller_state,
        "link_track": link_track,
        "trace_offset_s": round(trace_offset_s, 3),
        "per_round": [[r["round"], r["time_s"], r["tau"], r["delta"], r["accuracy"]] for r in rounds],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(result, indent=1))
    plot(evaluations, config, out_dir / "demo.png", result)
    return result


def measured_iteration_s(rounds: list[dict]) -> float | None:
    """Seconds per round over the middle 80% of the run (start-up and the end excluded)."""
    if len(rounds) < 10:
        return None
    lo, hi = rounds[len(rounds) // 10], rounds[(len(rounds) * 9) // 10]
    if hi["round"] <= lo["round"]:
        return None
    return round((hi["time_s"] - lo["time_s"]) / (hi["round"] - lo["round"]), 5)


def fetch_controller_state(address: str, security: ClientSecurity | None = None) -> dict:
    """The controller's policy, decisions in force and link estimates (GetState), as a dict."""
    from google.protobuf.json_format import MessageToDict

    from wanps.rpc.auth import sync_channel

    from wanps.proto import wanps_pb2 as pb
    from wanps.proto import wanps_pb2_grpc as pb_grpc

    with sync_channel(address, security) as channel:
        state = pb_grpc.ControllerStub(channel).GetState(pb.GetStateRequest(), timeout=10)
    return MessageToDict(state, preserving_proto_field_name=True)


def policy_label(policy: str, per_round: list[list]) -> str:
    """The legend of a run's accuracy curve: its one (tau, delta), or that it moved."""
    used = [(r[2], r[3]) for r in per_round if r[2] is not None]
    if not used:
        return policy
    if len(set(used)) == 1:
        return f"{policy} (tau {used[0][0]}, delta {used[0][1]:g})"
    return f"{policy} (tau and delta over time: below)"


def set_bandwidth_mbit(config: DemoConfig) -> Callable[[float], float] | None:
    """The slowest worker's set bandwidth at a trace time (None: no emulated link)."""
    if config.direct:
        return None
    paths = config.worker_traces or (config.trace or default_trace(),)
    traces = [LinkTrace.from_csv(path) for path in paths]
    return lambda t: min(trace.at(t).bandwidth_mbit for trace in traces)


@dataclass(frozen=True)
class LinkSeries:
    """What the PNG's second panel draws, as plain lists (computed apart from the drawing)."""

    times: list[float]  # evaluation times (s since training started)
    set_mbit: list[float] | None  # the slowest link's set bandwidth (None: direct)
    up_mbit: list[float]  # the controller's lowest uplink estimate (nan: none yet)
    down_mbit: list[float]  # ... and downlink (nan: none of its own)
    taus: list[float]  # the decision in force at each time's round (nan: none)
    deltas: list[float]


def link_series(track: list[dict], used_at: Callable[[int], tuple[int, float] | None],
                set_at: Callable[[float], float] | None, offset_s: float = 0.0) -> LinkSeries:
    """`track`: the run's link_track; `used_at(round)`: the (tau, delta) a round used;
    `set_at(t)`: the set bandwidth at trace time t, read at `offset_s` + each point's time."""
    nan = float("nan")
    times = [t["time_s"] for t in track]
    up = [min((link["bandwidth_bps"] for link in t["links"]), default=nan) / 1e6 for t in track]
    down = [min((link["down_bandwidth_bps"] for link in t["links"] if link.get("down_bandwidth_bps")), default=nan) / 1e6
            for t in track]
    taus, deltas = [], []
    for t in track:
        used = used_at(t["round"] - 1)  # the round just applied at that time
        taus.append(nan if used is None else used[0])
        deltas.append(nan if used is None else used[1])
    return LinkSeries(times, None if set_at is None else [set_at(offset_s + x) for x in times], up, down, taus, deltas)


def draw_link_panel(links_ax, series: LinkSeries) -> None:
    """Set and estimated bandwidth (left axis), delta (log) and tau (right axes), as steps over time."""
    if series.set_mbit is not None:
        links_ax.step(series.times, series.set_mbit, where="post", color="C1", label="set (slowest link)")
    links_ax.plot(series.times, series.up_mbit, ".", color="C0", label="estimated up (slowest)")
    links_ax.plot(series.times, series.down_mbit, "x", color="C2", markersize=4, label="estimated down (slowest)")
    links_ax.set_ylabel("bandwidth (Mbit/s)")
    links_ax.set_xlabel("wall time (s)")
    links_ax.grid(alpha=0.3)
    decisions_ax = links_ax.twinx()
    decisions_ax.step(series.times, series.deltas, where="post", color="C3", label="delta")
    decisions_ax.set_yscale("log")
    decisions_ax.set_ylabel("delta", color="C3")
    tau_ax = links_ax.twinx()  # a third axis, its spine set off to the right of delta's
    tau_ax.spines["right"].set_position(("axes", 1.13))
    tau_ax.step(series.times, series.taus, where="post", color="C4", linestyle="--", label="tau")
    tau_ax.set_ylabel("tau", color="C4")
    tau_ax.yaxis.get_major_locator().set_params(integer=True)
    handles = [h for a in (links_ax, decisions_ax, tau_ax) for h in a.get_legend_handles_labels()[0]]
    labels = [lab for a in (links_ax, decisions_ax, tau_ax) for lab in a.get_legend_handles_labels()[1]]
    links_ax.legend(handles, labels, loc="upper right", fontsize="small", ncol=2)


def plot(evaluations: list[tuple[float, int, float]], config: DemoConfig, path: Path, result: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = result or {}
    per_round = result.get("per_round", [])
    fig, (ax, links_ax) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    if evaluations:
        times, _, accuracies = zip(*evaluations)
        ax.plot(times, accuracies, marker=".", label=policy_label(config.policy, per_round))
    ax.axhline(config.target_accuracy, color="grey", linestyle="--", label=f"target {config.target_accuracy:.0%}")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.8 if evaluations and min(a for *_, a in evaluations) > 0.8 else 0.0, 1.0)
    ax.set_title(f"wanps demo: {config.task}, {config.workers} workers over emulated WAN")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    by_round = {r[0]: (r[2], r[3]) for r in per_round if r[2] is not None}
    draw_link_panel(links_ax, link_series(result.get("link_track") or [], by_round.get, set_bandwidth_mbit(config),
                                          result.get("trace_offset_s", 0.0)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(result: dict) -> str:
    mib = 2**20
    rows = [
        ("policy", result["policy"]),
        ("workers / task / link", f"{result['workers']} / {result['task']} / {result['link']}"
                                  + (f" / {result['shards']} shards" if result.get("shards", 1) > 1 else "")),
        ("target accuracy", f"{result['target_accuracy']:.2%}"),
        ("reached", "yes" if result["reached_target"] else "NO"),
        ("time to target", f"{result['time_to_target_s']} s" if result["reached_target"] else "-"),
        ("final accuracy", f"{result['final_accuracy']:.2%}"),
        ("rounds", str(result["rounds"])),
        ("bytes up (all workers)", f"{result['bytes_up'] / mib:.1f} MiB"),
        ("bytes down (all followers)", f"{result['bytes_down'] / mib:.1f} MiB"),
    ]
    rows.append(("(tau, delta) used", decisions_summary(result["per_round"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def decisions_summary(per_round: list[list]) -> str:
    """'(2, 0.01)' for one decision; ranges and the number of switches for many."""
    used = [(r[2], r[3]) for r in per_round if r[2] is not None]
    if not used:
        return "-"
    switches = sum(1 for a, b in zip(used, used[1:]) if a != b)
    taus = sorted({t for t, _ in used})
    deltas = sorted({d for _, d in used})
    if switches == 0:
        return f"({taus[0]}, {deltas[0]:g})"
    return (f"tau {taus[0]}-{taus[-1]}, delta {deltas[0]:.2g}-{deltas[-1]:.2g}, {switches} switches "
            f"(per round in demo.json)")


def parse_config(argv: list[str] | None) -> tuple[DemoConfig, ClientSecurity]:
    d = DemoConfig()
    p = EnvDefaultsParser(prog="wanps demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int_at_least(1), default=d.workers, env="WANPS_DEMO_WORKERS")
    p.add_argument("--task", default=d.task, choices=sorted(TASKS), env="WANPS_DEMO_TASK")
    p.add_argument("--policy", default=d.policy, choices=POLICIES, env="WANPS_DEMO_POLICY")
    p.add_argument("--tau", type=int_at_least(0, MAX_TAU), default=d.tau, env="WANPS_DEMO_TAU")
    p.add_argument("--delta", type=fraction, default=d.delta, env="WANPS_DEMO_DELTA")
    p.add_argument("--tau-max", type=int_at_least(0, MAX_TAU), default=d.tau_max)
    p.add_argument("--lr", type=float_at_least(0, above=True), default=d.lr, env="WANPS_DEMO_LR")
    p.add_argument("--batch-size", type=int_at_least(1), default=d.batch_size, env="WANPS_DEMO_BATCH_SIZE")
    p.add_argument("--target-accuracy", type=fraction, default=d.target_accuracy, env="WANPS_DEMO_TARGET")
    p.add_argument("--time-limit", type=float_at_least(0, above=True), default=d.time_limit_s,
                   env="WANPS_DEMO_TIME_LIMIT", help="Seconds of training before giving up.")
    p.add_argument("--eval-every", type=float_at_least(0, above=True), default=d.eval_every_s,
                   help="Seconds between evaluations.")
    p.add_argument("--trace", default=d.trace, env="WANPS_DEMO_TRACE",
                   help="Link trace CSV (time_s,bandwidth_mbit,delay_ms) or a shipped trace's name (wan-varying, "
                        "wan-congested); default: the shipped varying trace.")
    p.add_argument("--direct", action="store_true", help="No link emulator.")
    p.add_argument("--shards", type=int, default=d.shards, env="WANPS_DEMO_SHARDS",
                   help="Parameter servers the model is cut over (wanps server --shard I/N); each worker-server "
                        "connection gets its own emulated link.")
    p.add_argument("--out", default=d.out_dir, env="WANPS_DEMO_OUT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int_at_least(0), default=d.seed)
    add_client_security_flags(p)
    a = p.parse_args(argv)
    try:
        security = client_security_from_args(a)
    except ValueError as exc:
        p.error(str(exc))
    if a.shards < 1:
        p.error(f"--shards must be >= 1, got {a.shards}")
    if a.trace and not a.direct:
        try:  # here, not in the emulators the demo starts: one line, before any process starts
            LinkTrace.from_csv(a.trace)
        except (OSError, ValueError) as exc:
            p.error(f"bad --trace: {exc}")
    return DemoConfig(workers=a.workers, task=a.task, policy=a.policy, tau=a.tau, delta=a.delta, tau_max=a.tau_max,
                      lr=a.lr, batch_size=a.batch_size, target_accuracy=a.target_accuracy, time_limit_s=a.time_limit,
                      eval_every_s=a.eval_every, trace=a.trace, direct=a.direct, shards=a.shards, out_dir=a.out,
                      progress=not a.no_progress, seed=a.seed), security


def main(argv: list[str] | None = None) -> int:
    config, security = parse_config(argv)
    setup_logging("WARNING")
    torch.set_num_threads(1)
    shards = f", {config.shards} shards" if config.shards > 1 else ""
    print(f"wanps demo: {config.workers} workers{shards}, {config.task}, policy {config.policy} "
          f"(tau {config.tau}, delta {config.delta:g}), target {config.target_accuracy:.0%}, "
          f"link {'direct' if config.direct else Path(config.trace or default_trace()).name}", flush=True)
    with stopping_on_signals():  # SIGTERM stops every process the demo started, as SIGINT does
        result = run_demo(config, security)
    print("\nresults\n" + results_table(result))
    print(f"\nwrote {Path(config.out_dir) / 'demo.json'} and {Path(config.out_dir) / 'demo.png'}; "
          f"logs in {Path(config.out_dir) / 'logs'}")
    return 0 if result["reached_target"] else 1
