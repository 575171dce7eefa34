"""The `wanps` command: sub-commands, help, flags with environment fallbacks."""
from __future__ import annotations

import subprocess

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
    assert exited.value.code == 2 and "delta in" in capsys.readouterr().err


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
