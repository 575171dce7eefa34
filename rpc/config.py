"""The process edge of every wanps command: config from flags with environment fallbacks,
logging, and the event loop (uvloop through a loop factory).

Nothing here runs at import time. Each command's `main` builds its typed config object from
CLI flags (with environment-variable fallbacks) and hands a coroutine to `run_async`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def event_loop_factory(use_uvloop: bool = True) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop factory for `asyncio.Runner`: uvloop when asked for and importable."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a hard dependency; keep a clear fallback
            logging.getLogger(__name__).warning("uvloop not importable; using the default asyncio loop")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_async(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    with asyncio.Runner(loop_factory=event_loop_factory(use_uvloop)) as runner:
        return runner.run(main)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` shows each flag's default (as ArgumentDefaultsHelpFormatter, but not for flags
    whose default is nothing: None, False, ''), and descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings and action.default is not argparse.SUPPRESS
                and action.default not in (None, False, "")):
            text += " (default: %(default)s)"
        return text


def _typed(name: str, convert: Callable[[str], Any], check: Callable[[Any], str | None]) -> Callable[[str], Any]:
    """An argparse `type=`: converts, then `check` returns what is wrong (None: fine). A bad
    value is a one-line usage error naming the flag: `argument --min-workers: must be >= 1, got -1`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        problem = check(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = name
    return parse


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer flag in [low, high]."""
    def check(value: int) -> str | None:
        if value < low or (high is not None and value > high):
            return f"must be >= {low}" if high is None else f"must be in [{low}, {high}]"
        return None
    return _typed("an integer", int, check)


def float_at_least(low: float, *, above: bool = False, high: float | None = None) -> Callable[[str], float]:
    """A finite number flag >= low (> low with `above`), and <= high when given."""
    def check(value: float) -> str | None:
        if not math.isfinite(value):
            return "must be a finite number"
        if value < low or (above and value == low):
            return f"must be {'>' if above else '>='} {low:g}"
        if high is not None and value > high:
            return f"must be <= {high:g}"
        return None
    return _typed("a number", float, check)


def fraction(text: str) -> float:
    """A ratio in (0, 1] (delta: the fraction of elements sent)."""
    return _typed("a number", float, lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]")(text)


def host_port(text: str) -> str:
    """HOST:PORT (IPv6 as [HOST]:PORT), checked as split_host_port reads it; returned as given."""
    def check(value: str) -> str | None:
        try:
            split_host_port(value)
        except ValueError:
            return "expected HOST:PORT (IPv6 as [HOST]:PORT, port 0-65535)"
        return None
    return _typed("HOST:PORT", str, check)(text)


class EnvDefaultsParser(argparse.ArgumentParser):
    """argparse with an environment-variable fallback for every flag that names one.

    `parser.add_argument("--port", env="WANPS_PORT", type=int, default=0)`: the flag wins,
    then the variable, then the default. The variable is read when parsing, never at import.
    `--help` shows the defaults (HelpFormatter); typed flags (int_at_least, fraction,
    host_port, ...) refuse bad values with one usage line, exit code 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._env_names: dict[str, str] = {}
        self._env_only: dict[str, str] = {}

    def add_env_setting(self, dest: str, env: str, help: str) -> None:
        """A setting read from the environment only, never a flag: for secrets, which a flag
        would show in `ps` and in shell history. Listed at the end of `--help`."""
        self._env_only[dest] = env
        line = f"{env}: {help}"
        self.epilog = f"{self.epilog}\n{line}" if self.epilog else f"environment-only settings:\n{line}"

    def add_argument(self, *args: Any, env: str | None = None, **kwargs: Any):  # type: ignore[override]
        if not kwargs.get("help") and kwargs.get("default") not in (None, False, "", argparse.SUPPRESS):
            kwargs["help"] = "(default: %(default)s)"  # argparse prints no line at all for a flag without help
        if env is not None:
            kwargs["help"] = (kwargs.get("help") or "") + f" [env {env}]"
        action = super().add_argument(*args, **kwargs)
        if env is not None:
            self._env_names[action.dest] = env
        return action

    def parse_args(self, args: Any = None, namespace: Any = None):  # type: ignore[override]
        # Environment values go into the namespace (not the parser's defaults), so they are
        # checked like flags (type, choices), never stick to the parser, and flags still win:
        # argparse fills only the attributes a namespace lacks, then flags overwrite them.
        namespace = argparse.Namespace() if namespace is None else namespace
        for dest, env_name in self._env_names.items():
            raw = os.environ.get(env_name)
            if raw is None or hasattr(namespace, dest):
                continue
            action = next(a for a in self._actions if a.dest == dest)
            if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
                truthy = raw.strip().lower() in ("1", "true", "yes", "on")
                value: Any = action.const if truthy else action.default
            else:
                try:
                    value = self._get_value(action, raw)
                    self._check_value(action, value)
                except argparse.ArgumentError as exc:
                    self.error(f"environment variable {env_name}: {exc}")
            setattr(namespace, dest, value)
        for dest, env_name in self._env_only.items():
            if not hasattr(namespace, dest):
                setattr(namespace, dest, os.environ.get(env_name) or None)
        return super().parse_args(args, namespace)


def split_host_port(address: str) -> tuple[str, int]:
    """'127.0.0.1:50051' or '[::1]:50051' -> (host, port). An IPv6 host needs its brackets."""
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not host or not port.isdigit() or int(port) > 65535 or (":" in host and not bracketed):
        raise ValueError(f"expected HOST:PORT (IPv6 as [HOST]:PORT, port 0-65535), got {address!r}")
    return (host[1:-1] if bracketed else host), int(port)


