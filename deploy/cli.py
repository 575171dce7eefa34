"""`wanps`: one command, a sub-command per part."""
from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "server": ("wanps.server.cli", "run the parameter server"),
    "controller": ("wanps.controller.cli", "run the controller"),
    "worker": ("wanps.worker.cli", "train a built-in task through a cluster"),
    "linkem": ("wanps.linkem.cli", "emulate a WAN link (TCP proxy with delay and bandwidth)"),
    "demo": ("wanps.deploy.demo", "run a local cluster over emulated WAN links and report"),
    "bench": ("wanps.bench.cli", "run a benchmark"),
    "health": ("wanps.rpc.health", "check a service's gRPC health (exit 0 when SERVING)"),
}


def usage() -> str:
    lines = ["usage: wanps <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "`wanps <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"wanps: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        # Ctrl-C is a person's stop, not a failure: the `finally` blocks on the way out have
        # stopped what the command started; one line, the shell's exit code for SIGINT.
        print(f"wanps {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`wanps controller status | head`): nothing left to say. Point
        # stdout at /dev/null so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
