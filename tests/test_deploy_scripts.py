"""The container entry scripts (deploy/compose-worker.sh, deploy/compose-server.sh) and the
compose replica's shard index (wanps.deploy.compose_shard), run for real with `wanps` replaced
by a stand-in that records how it was started."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wanps.deploy import compose_shard

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture
def fake_wanps(tmp_path: Path) -> Path:
    """A `wanps` that appends its arguments and WANPS_SERVER / WANPS_SHARD to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "wanps"
    # A stand-in worker lives until FAKE_WORKER_WAITS_FOR calls are logged (10 s at most), as a
    # real one outlives its proxies' start: they die with it (PR_SET_PDEATHSIG in the script).
    script.write_text(f"""#!/bin/sh
echo "$* | server=${{WANPS_SERVER:-}} shard=${{WANPS_SHARD:-}}" >> {tmp_path}/calls.log
if [ "$1" = worker ] && [ -n "${{FAKE_WORKER_WAITS_FOR:-}}" ]; then
    i=0
    while [ "$(wc -l < {tmp_path}/calls.log)" -lt "$FAKE_WORKER_WAITS_FOR" ] && [ "$i" -lt 200 ]; do
        sleep 0.05
        i=$((i + 1))
    done
fi
""")
    script.chmod(0o755)
    return tmp_path


def run_script(name: str, fake: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    # The venv's python3 comes after the stand-in: compose-server.sh runs `python3 -m wanps.deploy...`.
    path = f"{fake / 'bin'}:{VENV_BIN}:/usr/bin:/bin"
    return subprocess.run(["sh", str(DEPLOY / name), *args], env={"PATH": path, **env}, capture_output=True,
                          text=True, timeout=60)


def calls(fake: Path, count: int) -> list[str]:
    """The stand-in's calls, once `count` are logged (background linkem calls may come last)."""
    log = fake / "calls.log"
    for _ in range(200):  # bounded: 10 s at most
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count:
            return sorted(lines)
        subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError(f"{count} calls expected, got {lines}")


# --------------------------------------------------------------------------- the worker


def test_a_worker_dials_every_shard_in_order(fake_wanps) -> None:
    env = {"WANPS_SHARDS": "3", "WANPS_SHARD_ADDRESS": "server-{}:50051", "WANPS_SHARD_ORDINAL_BASE": "1"}
    result = run_script("compose-worker.sh", fake_wanps, env, "--max-rounds", "5")
    assert result.returncode == 0, result.stderr
    assert calls(fake_wanps, 1) == ["worker --max-rounds 5 | server=server-1:50051,server-2:50051,server-3:50051 shard="]


def test_a_worker_without_shard_settings_keeps_its_server(fake_wanps) -> None:
    result = run_script("compose-worker.sh", fake_wanps, {"WANPS_SERVER": "ps.example:50051"})
    assert result.returncode == 0, result.stderr
    assert calls(fake_wanps, 1) == ["worker | server=ps.example:50051 shard="]


def test_each_shard_gets_its_own_emulated_link(fake_wanps) -> None:
    env = {"WANPS_SHARDS": "2", "WANPS_SHARD_ADDRESS": "wanps-server-{}.wanps-server:50051",
           "WANPS_WAN_TRACE": "/opt/wanps/traces/wan-varying.csv", "FAKE_WORKER_WAITS_FOR": "3"}
    result = run_script("compose-worker.sh", fake_wanps, env)
    assert result.returncode == 0, result.stderr
    trace = "--trace /opt/wanps/traces/wan-varying.csv"
    assert calls(fake_wanps, 3) == sorted([
        f"linkem --listen 127.0.0.1:15051 --target wanps-server-0.wanps-server:50051 {trace} | server=wanps-server-0.wanps-server:50051,wanps-server-1.wanps-server:50051 shard=",
        f"linkem --listen 127.0.0.1:15052 --target wanps-server-1.wanps-server:50051 {trace} | server=wanps-server-0.wanps-server:50051,wanps-server-1.wanps-server:50051 shard=",
        "worker | server=127.0.0.1:15051,127.0.0.1:15052 shard=",
    ])


@pytest.mark.parametrize("env, says", [
    ({"WANPS_SHARDS": "two", "WANPS_SHARD_ADDRESS": "s-{}:1"}, "WANPS_SHARDS must be a whole number, not 'two'"),
    ({"WANPS_SHARDS": "0", "WANPS_SHARD_ADDRESS": "s-{}:1"}, "WANPS_SHARDS must be between 1 and 1024, not 0"),
    ({"WANPS_SHARDS": "2", "WANPS_SHARD_ADDRESS": "s-{}:1", "WANPS_SHARD_ORDINAL_BASE": "-1"},
     "WANPS_SHARD_ORDINAL_BASE must be a whole number, not '-1'"),
    ({"WANPS_SHARDS": "2", "WANPS_SHARD_ADDRESS": "server:50051"}, "WANPS_SHARD_ADDRESS must contain {}"),
])
def test_bad_worker_shard_settings_are_one_line_and_start_nothing(fake_wanps, env, says) -> None:
    result = run_script("compose-worker.sh", fake_wanps, env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr
    assert not (fake_wanps / "calls.log").exists()


# --------------------------------------------------------------------------- the compose server


def test_one_shard_is_shard_zero_of_one(fake_wanps) -> None:
    result = run_script("compose-server.sh", fake_wanps, {})
    assert result.returncode == 0, result.stderr
    assert calls(fake_wanps, 1) == ["server | server= shard=0/1"]


def test_a_replica_finds_its_shard_from_the_name_that_resolves_to_it(fake_wanps) -> None:
    """Real name resolution and a real check of this machine's addresses: of 121.0.0.1 ..
    127.0.0.1 only the last is ours, so this "replica" is ordinal 7, shard 6 of 7."""
    env = {"WANPS_SHARDS": "7", "WANPS_SHARD_NAME": "12{}.0.0.1"}
    result = run_script("compose-server.sh", fake_wanps, env, "--tau-max", "4")
    assert result.returncode == 0, result.stderr
    assert calls(fake_wanps, 1) == ["server --tau-max 4 | server= shard=6/7"]


def test_a_shard_set_by_hand_wins(fake_wanps) -> None:
    result = run_script("compose-server.sh", fake_wanps, {"WANPS_SHARDS": "3", "WANPS_SHARD": "2/3"})
    assert result.returncode == 0, result.stderr
    assert calls(fake_wanps, 1) == ["server | server= shard=2/3"]


@pytest.mark.parametrize("env, says", [
    ({"WANPS_SHARDS": "x"}, "WANPS_SHARDS must be a whole number >= 1, not 'x'"),
    ({"WANPS_SHARDS": "2"}, "WANPS_SHARD_NAME must name the server replicas"),
])
def test_bad_server_shard_settings_are_one_line_and_start_nothing(fake_wanps, env, says) -> None:
    result = run_script("compose-server.sh", fake_wanps, env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr
    assert not (fake_wanps / "calls.log").exists()


def test_a_replica_that_is_none_of_the_shards_says_so(fake_wanps) -> None:
    # 203.0.113.0/24 is documentation space (TEST-NET-3). --scale beyond WANPS_SHARDS looks like this.
    env = {"WANPS_SHARDS": "2", "WANPS_SHARD_NAME": "203.0.113.{}"}
    result = subprocess.run([sys.executable, "-m", "wanps.deploy.compose_shard", "--name", "203.0.113.{}", "--count", "2",
                             "--wait-s", "0"], capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "none of 203.0.113.1 .. 203.0.113.2 resolves to this container" in result.stderr


def test_own_index_asks_each_name_in_order() -> None:
    table = {"p-server-1": {"10.0.0.5"}, "p-server-2": {"10.0.0.7"}, "p-server-3": set()}
    names = compose_shard.shard_names("p-server-{}", 3, 1)
    assert names == ["p-server-1", "p-server-2", "p-server-3"]
    assert compose_shard.own_index(names, table.__getitem__, lambda a: a == "10.0.0.7") == 1
    assert compose_shard.own_index(names, table.__getitem__, lambda a: False) is None
    assert compose_shard.is_own_address("127.0.0.1") and not compose_shard.is_own_address("203.0.113.1")


def test_waiting_for_the_names_is_bounded_and_retries() -> None:
    answers = iter([set(), set(), {"10.0.0.9"}])
    index = compose_shard.wait_for_own_index(["only"], wait_s=30, resolve=lambda name: next(answers),
                                             is_own=lambda a: True, interval_s=0)
    assert index == 0
    assert compose_shard.wait_for_own_index(["only"], wait_s=0, resolve=lambda name: set(), is_own=lambda a: True) is None
