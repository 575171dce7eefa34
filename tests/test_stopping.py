"""Stopping cleanly, with real processes: every wanps process exits within a few seconds of
SIGTERM whatever it waits for, and a supervisor takes its children with it however it ends
(SIGTERM, SIGKILL). Bounds are generous (tens of seconds on a loaded machine) against a stop
that used to take 25 s and more, or never came; each wait starts at a counted event (a log
line, a process appearing), never after a fixed sleep."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from wanps.deploy.processes import ManagedProcess, start_process, wanps_command
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parent.parent
# A stopping worker waits STOP_GRACE_S for its pushes and again for its Leave; the rest is
# process exit. Generous for a machine shared with other jobs.
EXIT_BOUND_S = 15.0


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.05)


def log_has(process: ManagedProcess, text: str) -> bool:
    return process.log_path.exists() and text in process.log_path.read_text(errors="replace")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc: pid -> parent)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_leftovers(pids: set[int]) -> None:
    """This test's own processes only, by PID, if a failure left any."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def server_version(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.ParameterServerStub(channel).Ping(pb.PingRequest(), timeout=2).version
        except grpc.RpcError:
            return -1


def start_server(tmp_path: Path, *extra: str) -> ManagedProcess:
    server = start_process("server", wanps_command("server", "--listen", "127.0.0.1:0", "--metrics-listen", "off",
                                                   *extra), tmp_path)
    server.wait_ready(60)
    return server


def start_worker(tmp_path: Path, server: str, name: str = "worker") -> ManagedProcess:
    return start_process(name, wanps_command("worker", "--server", server, "--task", "synthetic", "--tau", "1",
                                             "--delta", "0.1", "--name", name), tmp_path, wait_for_line=False)


def test_a_worker_whose_server_is_gone_exits_on_sigterm(tmp_path):
    server = start_server(tmp_path)
    worker = start_worker(tmp_path, server.address)
    try:
        wait_for(lambda: server_version(server.address) >= 3, 60, "training")
        server.popen.kill()
        server.wait(10)
        wait_for(lambda: log_has(worker, f"connection to the server at {server.address} lost"), 30, "the worker noticing")
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.wait(EXIT_BOUND_S) == 0
        assert log_has(worker, "stopped by a signal")
    finally:
        worker.stop(5)
        server.stop(5)


def test_a_worker_waiting_for_a_server_exits_on_sigterm(tmp_path):
    with socket.socket() as probe:  # nothing listens there once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = start_worker(tmp_path, f"127.0.0.1:{port}")
    try:
        wait_for(lambda: log_has(worker, f"waiting for the wanps server at 127.0.0.1:{port}"), 60,
                 "the worker waiting to join")
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.wait(EXIT_BOUND_S) == 0
    finally:
        worker.stop(5)


@pytest.mark.parametrize("name", ["controller", "linkem"])
def test_services_exit_on_sigterm(tmp_path, name):
    command = (wanps_command("controller", "--listen", "127.0.0.1:0", "--metrics-listen", "off") if name == "controller"
               else wanps_command("linkem", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:9",
                                  "--bandwidth-mbit", "10", "--delay-ms", "5"))
    process = start_process(name, command, tmp_path)
    try:
        process.wait_ready(60)
        process.popen.send_signal(signal.SIGTERM)
        assert process.wait(EXIT_BOUND_S) == 0
    finally:
        process.stop(5)


def test_a_demo_stopped_with_sigterm_takes_every_child_with_it(tmp_path):
    """`wanps demo` (and `wanps bench train`, which runs it): SIGTERM stops its server,
    controller and workers before it exits; none is left running, re-parented to init."""
    demo = subprocess.Popen(wanps_command("demo", "--workers", "2", "--task", "synthetic", "--direct", "--no-progress",
                                          "--time-limit", "120", "--target-accuracy", "1", "--out", str(tmp_path)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        log_dir = tmp_path / "logs"
        # Server, controller and two workers started, and the workers training (a log line each).
        wait_for(lambda: all((log_dir / f"worker-{i}.log").exists()
                             and "rank" in (log_dir / f"worker-{i}.log").read_text() for i in range(2)),
                 120, "the demo's workers joining")
        children = descendants(demo.pid)
        assert len(children) >= 4, children
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 143
        wait_for(lambda: not any(alive(pid) for pid in children), EXIT_BOUND_S, "every child of the demo exiting")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
        kill_leftovers(children)


def test_a_killed_supervisor_takes_a_worker_that_lost_its_server_with_it(tmp_path):
    """SIGKILL: no cleanup runs in the supervisor; the kernel sends each child SIGTERM
    (PR_SET_PDEATHSIG). The worker loses its server at the same moment and must still go."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from wanps.deploy.processes import start_process, wanps_command\n"
        "logs = Path(sys.argv[1])\n"
        "server = start_process('server', wanps_command('server', '--listen', '127.0.0.1:0', '--metrics-listen', 'off'),"
        " logs)\n"
        "server.wait_ready(60)\n"
        "worker = start_process('worker', wanps_command('worker', '--server', server.address, '--task', 'synthetic'),"
        " logs, wait_for_line=False)\n"
        "print(server.pid, worker.pid, server.address, flush=True)\n"
        "time.sleep(600)\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    children: set[int] = set()
    try:
        server_pid, worker_pid, address = supervisor.stdout.readline().split()
        children = {int(server_pid), int(worker_pid)}
        wait_for(lambda: server_version(address) >= 3, 60, "training")
        supervisor.kill()
        supervisor.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in children), EXIT_BOUND_S, "the server and the worker exiting")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
        kill_leftovers(children)


def test_the_compose_worker_takes_its_link_emulator_with_it(tmp_path):
    """deploy/compose-worker.sh with WANPS_WAN_TRACE: the worker and its own `wanps linkem`;
    when the worker ends (SIGTERM here), the link emulator goes too."""
    server = start_server(tmp_path)
    trace = tmp_path / "trace.csv"
    trace.write_text("time_s,bandwidth_mbit,delay_ms\n0,100,1\n")
    env = {**os.environ, "WANPS_WAN_TRACE": str(trace), "WANPS_SERVER": server.address,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    worker = subprocess.Popen(["sh", str(REPO / "deploy" / "compose-worker.sh"), "--task", "synthetic"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        wait_for(lambda: server_version(server.address) >= 3, 90, "the worker training through its link")
        children = descendants(worker.pid)
        assert children, "the link emulator is not a child of the worker"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(EXIT_BOUND_S) == 0
        wait_for(lambda: not any(alive(pid) for pid in children), EXIT_BOUND_S, "the link emulator exiting")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        kill_leftovers(children)
        server.stop(5)
