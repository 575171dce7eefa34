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


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("WANPS_MIN_WORKERS", "3")
    monkeypatch.setenv("WANPS_TAU_MAX", "5")
    config, _ = server_config(["--tau-max", "6", "--listen", "0.0.0.0:7000", "--metrics-listen", "off"])
    assert (config.min_workers, config.tau_max, config.host, config.port, config.metrics_port) == (3, 6, "0.0.0.0",
                                                                                                  7000, -1)
    monkeypatch.setenv("WANPS_POLICY", "dsgd")
    assert controller_config([])[0].policy.name == "dsgd"
    with pytest.raises(ValueError, match="delta in"):
        controller_config(["--policy", "static", "--delta", "0"])


def test_server_process_starts_and_stops_on_sigterm(tmp_path):
    server = start_process("server", wanps_command("server", "--listen", "127.0.0.1:0", "--metrics-listen", "off"),
                           tmp_path)
    try:
        line = server.wait_ready(60)
        assert line.startswith("LISTENING 127.0.0.1:")
    finally:
        assert server.stop() == 0
