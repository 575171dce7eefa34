"""`python -m wanps.deploy.compose_shard`: which shard this container is, in a compose cluster.

Docker Compose gives a replica no index (Swarm has `{{.Task.Slot}}`, Kubernetes the
StatefulSet ordinal), but it names the replicas of a service `<project>-server-1..N`, and
Docker's DNS resolves those names on the project's networks. A replica is shard k - 1 of N when
the name with ordinal k resolves to an address of its own. deploy/compose-server.sh asks this
when WANPS_SHARDS > 1 and passes the answer to `wanps server` as WANPS_SHARD=I/N.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable

PROG = "wanps-compose-server"


def shard_names(template: str, count: int, first: int) -> list[str]:
    """The replicas' names in shard order: `{}` in `template` takes first, first + 1, ..."""
    return [template.replace("{}", str(first + i)) for i in range(count)]


def resolve_ipv4(name: str) -> set[str]:
    """Addresses of `name` (empty when it does not resolve, yet or at all)."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)}
    except socket.gaierror:
        return set()


def is_own_address(address: str) -> bool:
    """True when this network namespace holds `address`: only a local address can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def own_index(names: list[str], resolve: Callable[[str], set[str]] = resolve_ipv4,
              is_own: Callable[[str], bool] = is_own_address) -> int | None:
    """The position in `names` of the one that resolves to this container, or None."""
    for index, name in enumerate(names):
        if any(is_own(address) for address in resolve(name)):
            return index
    return None


def wait_for_own_index(names: list[str], wait_s: float, resolve: Callable[[str], set[str]] = resolve_ipv4,
                       is_own: Callable[[str], bool] = is_own_address, interval_s: float = 0.5) -> int | None:
    """own_index, asked again until wait_s has passed (the engine registers names as it starts containers)."""
    deadline = time.monotonic() + wait_s
    while True:
        index = own_index(names, resolve, is_own)
        if index is not None or time.monotonic() >= deadline:
            return index
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'wanps.deploy.compose_shard'}",
                                     description="Print this container's shard index (0-based) among the "
                                                 "replicas named by --name.")
    parser.add_argument("--name", required=True, help="The replicas' container name with {} for the ordinal.")
    parser.add_argument("--count", type=int, required=True, help="How many replicas (shards) there are.")
    parser.add_argument("--first", type=int, default=1, help="The first replica's ordinal (compose: 1).")
    parser.add_argument("--wait-s", type=float, default=30.0, help="How long to wait for the names to resolve.")
    args = parser.parse_args(argv)
    if "{}" not in args.name or args.count < 1 or args.first < 0:
        parser.error("--name needs {} for the ordinal, --count >= 1 and --first >= 0")
    names = shard_names(args.name, args.count, args.first)
    index = wait_for_own_index(names, args.wait_s)
    if index is None:
        print(f"{PROG}: none of {names[0]} .. {names[-1]} resolves to this container: WANPS_SHARDS "
              f"({args.count}) must equal the server's replicas (`--scale server=` changes only the latter)",
              file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
