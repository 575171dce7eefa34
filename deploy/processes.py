"""Start wanps parts as real processes, wait for their readiness line, stop them by PID.

Used by `wanps demo`, the benchmarks and the end-to-end tests. Every service prints one
`LISTENING host:port ...` line on stdout once it serves; we wait for that line (never a
fixed sleep) and keep copying the rest of its output to a log file.

A supervisor takes its children with it however it ends: an exception or SIGINT
(KeyboardInterrupt) runs its `finally` (stop_all); SIGTERM does the same inside
`stopping_on_signals()` (it raises SystemExit(143) in the main thread); and when it is
killed outright (SIGKILL, a test timeout), every child gets SIGTERM from the kernel
(PR_SET_PDEATHSIG, set before exec), which every wanps process obeys within seconds.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType


class ProcessFailed(RuntimeError):
    pass


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_line: str | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        """HOST:PORT from the `LISTENING host:port` readiness line."""
        if not self.ready_line:
            raise ProcessFailed(f"{self.name} has not announced an address")
        return self.ready_line.split()[1]

    @property
    def metrics_port(self) -> int | None:
        words = (self.ready_line or "").split()
        if "METRICS" in words:
            value = words[words.index("METRICS") + 1]
            return int(value) if value.isdigit() else None
        return None

    def wait_ready(self, timeout: float) -> str:
        if not self._ready.wait(timeout):
            self.stop()
            raise ProcessFailed(f"{self.name} did not become ready within {timeout:.0f} s; log: {self.log_path}\n"
                                + self.tail())
        if self.ready_line is None:
            raise ProcessFailed(f"{self.name} exited before it was ready (code {self.popen.poll()}); "
                                f"log: {self.log_path}\n" + self.tail())
        return self.ready_line

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful), then SIGKILL after `timeout`. Only this process, by its PID."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self._pump is not None:
            self._pump.join(5)
            if self._pump.is_alive():  # a grandchild holding the output pipe open keeps it reading
                logging.getLogger(__name__).warning("%s: its log pump still runs 5 s after the process ended",
                                                    self.name)
        return self.popen.returncode


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so a supervisor
    that is killed outright (a test timeout, SIGKILL) leaves no orphaned services behind.
    (The kernel sends it when the *thread* that started the child ends: start children from
    a thread that lives as long as they should, the main thread in every supervisor here.)"""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _dying_with_parent(command: Sequence[str]) -> tuple[list[str], Callable[[], None] | None]:
    """The command and preexec_fn that give the child PR_SET_PDEATHSIG.

    Through util-linux `setpriv --pdeathsig` when it exists: a preexec_fn makes Python fork()
    instead of vfork(), which runs gRPC's fork handlers in the child, and when this process
    has gRPC threads running, the child's restarted poller can abort (epoll_wait: Bad file
    descriptor, SIGABRT) before exec; about 1 spawn in 12 did while a server was busy here
    (grpc/grpc#43055)."""
    if not sys.platform.startswith("linux"):
        return list(command), None
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", "--", *command], None
    return list(command), _die_with_parent


def wanps_command(*args: str) -> list[str]:
    """The `wanps` CLI run by this interpreter (works in a venv without the script on PATH)."""
    return [sys.executable, "-m", "wanps.deploy.cli", *args]


def start_process(
    name: str,
    command: Sequence[str],
    log_dir: Path,
    *,
    wait_for_line: bool = True,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    argv, preexec_fn = _dying_with_parent(command)
    popen = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        text=True,
        bufsize=1,
        preexec_fn=preexec_fn,
    )
    process = ManagedProcess(name=name, popen=popen, log_path=log_path)

    def pump() -> None:
        assert popen.stdout is not None
        with open(log_path, "w") as log:
            for line in popen.stdout:
                if process.ready_line is None and line.startswith("LISTENING "):
                    process.ready_line = line.strip()
                    process._ready.set()
                log.write(line)
                log.flush()
        process._ready.set()  # exited: wake any waiter (ready_line stays None if it never came)

    process._pump = threading.Thread(target=pump, name=f"log-{name}", daemon=True)
    process._pump.start()
    if not wait_for_line:
        process._ready.set()
    return process


def stop_all(processes: Sequence[ManagedProcess], timeout: float = 15.0) -> None:
    """Stop in reverse start order (clients before the services they talk to)."""
    for process in reversed(processes):
        process.stop(timeout)


class Terminated(SystemExit):
    """SIGTERM reached a supervisor inside `stopping_on_signals`: unwind, stopping the children."""


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Inside: SIGTERM raises `Terminated` (SystemExit, code 143) in the main thread, as SIGINT
    raises KeyboardInterrupt, so the supervisor's `finally` blocks stop its children. A second
    SIGTERM while that runs is ignored (the cleanup is already under way). On the main thread
    only (signal handlers live there); elsewhere it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    terminating = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal terminating
        if terminating:
            return
        terminating = True
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
