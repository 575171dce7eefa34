"""Checkpoints of the parameter server: the core's state as plain data, the files, and when to write them.

A checkpoint is `core_state(core)` saved with `torch.save` to `DIR/checkpoint.pt`; `restore_core`
turns it back into a core. It is written to a temporary file in the same directory, flushed
and fsynced, renamed over the previous one, and the directory is fsynced, so a crash at any
moment leaves either the old checkpoint or the new one, never a torn file.

`CheckpointScheduler` decides when: every `every` rounds a snapshot taken on the core thread
is written on a writer thread of its own, so the core never waits for the disk.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from wanps.proto import structure as structures
from wanps.proto.codec import Update
from wanps.server.core import ClosedRound, CoreConfig, Member, OpenRound, ServerCore
from wanps.server.metrics import ServerMetrics
from wanps.server.shard import ShardSpec, check_checkpoint

CHECKPOINT_NAME = "checkpoint.pt"
# 2: members carry the SHA-256 of their member secret ("secret_digest"). Format 1 (before member
# secrets) still restores: its members have no digest and are identified by id alone.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)

log = logging.getLogger("wanps.server")


# ------------------------------------------------------------------ the core's state as plain data


def _update_data(update: Update | None) -> dict | None:
    if update is None:
        return None
    return {"values": update.values, "indices": update.indices, "block_start": update.block_start}


def _update_of(data: dict | None) -> Update | None:
    if data is None:
        return None
    return Update(values=data["values"], indices=data["indices"], block_start=data["block_start"])


def core_state(core: ServerCore) -> dict:
    """Everything needed to resume, as tensors and plain data (for `torch.save`).

    Call on the core thread; the model and audit tensors are copied, stored updates are
    shared (they are never changed in place), so writing can happen on another thread.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": core.version,
        "num_params": core.num_params,
        # Which shard wrote it (server/shard.py: it resumes only as that shard) and the whole size.
        "shard": [core.config.shard_index, core.config.shard_count],
        "total_params": core.total_params,
        "fingerprint": core.fingerprint.hex() if core.fingerprint is not None else None,
        "structure": structures.to_data(core.structure),
        "started": core.started,
        "seeder": core.seeder_id,
        "next_id": core.next_worker_id,
        "model": None if core.model is None else core.model.clone(),
        "members": [
            {"worker_id": m.worker_id, "name": m.name, "first_round": m.first_round, "last_round": m.last_round,
             "highest_round_sent": m.highest_round_sent, "missed_rounds": sorted(m.missed_rounds),
             "last_update": _update_data(m.last_update),
             "secret_digest": None if m.secret_digest is None else m.secret_digest.hex()}
            for m in core.members.values()
        ],
        "open_rounds": [
            {"round": r, "skips": sorted(o.skips),
             "updates": [{"worker_id": w, "computed_at": o.computed_at[w], "update": _update_data(u)}
                         for w, u in o.updates.items()]}
            for r, o in sorted(core.open_rounds.items())
        ],
        "audit": None if core.applied_sum is None else {
            "initial_model": core.initial_model, "applied_sum": core.applied_sum.clone(),
            "applied_rounds": list(core.applied_rounds)},
    }


def restore_core(state: dict, config: CoreConfig, clock: Callable[[], float] = time.monotonic,
                 where: str = "the checkpoint") -> ServerCore:
    """A core continuing from a checkpoint. Every lease restarts now, so members have a
    full lease to reconnect with the secret they joined with; observers are not kept (they
    join again). A checkpoint written by another shard is refused (ShardMismatch; `where`
    names it in the message)."""
    if state.get("format") not in READABLE_FORMATS:
        raise ValueError(f"unsupported checkpoint format {state.get('format')!r} (this server reads "
                         f"{', '.join(map(str, READABLE_FORMATS))})")
    check_checkpoint(state.get("shard"), ShardSpec(config.shard_index, config.shard_count), where)
    core = ServerCore(config, clock)  # its current round's wait starts now
    now = clock()
    core.version = int(state["version"])
    core.num_params = state["num_params"]
    total = state.get("total_params")  # absent in checkpoints from before shards: the whole model
    core.total_params = core.num_params if total is None else int(total)
    core.fingerprint = bytes.fromhex(state["fingerprint"]) if state["fingerprint"] is not None else None
    core.structure = structures.from_data(state.get("structure"))  # absent in older checkpoints
    core.started = bool(state["started"])
    core.seeder_id = state["seeder"]
    core.next_worker_id = int(state["next_id"])
    core.model = state["model"]
    if core.model is not None and (core.model.dtype != torch.float32 or core.model.numel() != core.num_params):
        raise ValueError("checkpoint model does not match its num_params")
    for m in state["members"]:
        core.members[m["worker_id"]] = Member(
            worker_id=m["worker_id"], name=m["name"], first_round=m["first_round"], last_round=m["last_round"],
            last_update=_update_of(m["last_update"]), highest_round_sent=m["highest_round_sent"],
            last_seen=now, missed_rounds=set(m["missed_rounds"]),
            secret_digest=bytes.fromhex(m["secret_digest"]) if m.get("secret_digest") is not None else None)
    legacy = [w for w, m in core.members.items() if m.secret_digest is None]
    if legacy:
        log.warning("checkpoint format %s: members %s have no member secret and are identified by their id alone "
                    "until they leave", state["format"], legacy)
    for o in state["open_rounds"]:
        open_round = OpenRound(skips=set(o["skips"]), first_push_at=now)
        for entry in o["updates"]:
            open_round.updates[entry["worker_id"]] = _update_of(entry["update"])
            open_round.computed_at[entry["worker_id"]] = entry["computed_at"]
        core.open_rounds[o["round"]] = open_round
    audit = state.get("audit")
    if audit is not None and config.audit:
        core.initial_model = audit["initial_model"]
        core.applied_sum = audit["applied_sum"]
        core.applied_rounds = list(audit["applied_rounds"])
    return core


# ------------------------------------------------------------------ files


def checkpoint_path(directory: str | Path) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def write_checkpoint(directory: str | Path, state: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(directory)
    fd, temp_name = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, target)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable
    finally:
        os.close(dir_fd)
    return target


def read_checkpoint(directory: str | Path) -> dict:
    """The last checkpoint in `directory`. Raises FileNotFoundError when there is none."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only: a checkpoint is tensors and plain data; nothing in it is executed.
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------ cadence


class CheckpointScheduler:
    """Checkpoints of one core into one directory: every `every` rounds (0: only the final one).

    `after_close` runs on the core thread; the write runs on the scheduler's writer thread.
    A snapshot that falls due while the previous one is still being written is skipped (the
    next due round takes one). A failed snapshot or write, whatever the exception, is logged
    with it, counted (`wanps_server_background_errors_total{task="checkpoint"}`) and leaves
    `durable_version` as it was; rounds keep closing.
    """

    def __init__(self, core: ServerCore, directory: str | Path, every: int, metrics: ServerMetrics) -> None:
        self.core = core
        self.directory = directory
        self.every = every
        self.metrics = metrics
        # Rounds below this survive a crash: the last checkpoint's version (PushReply.durable_version).
        self.durable_version = core.version
        # The newest snapshot handed to the writer (PushReply.snapshot_version): workers keep the
        # rounds dropped from their push logs apart on each side of it.
        self.snapshot_version = core.version
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanps-checkpoint")
        self._pending: Future | None = None

    def after_close(self, closed: Sequence[ClosedRound]) -> None:
        """On the core thread, after rounds closed: snapshot if one of them is due and hand it to the writer."""
        if self.every <= 0 or not any(c.version % self.every == 0 for c in closed):
            return
        if self._pending is not None and not self._pending.done():
            return
        try:
            state = core_state(self.core)
        except Exception:  # the round is closed already: a lost checkpoint must not stop its publication
            self._failed("checkpoint snapshot at version %d failed", self.core.version)
            return
        self.snapshot_version = state["version"]
        self._pending = self._writer.submit(self._write, state)

    def wait(self) -> None:
        """Until the write in progress (if any) is done."""
        if self._pending is not None:
            self._pending.result()

    def write_final(self, state: dict) -> None:
        """After the write in progress, write `state` (taken on the core thread) here."""
        self.wait()
        self._write(state)

    def _write(self, state: dict) -> None:
        started = time.monotonic()
        try:
            path = write_checkpoint(self.directory, state)
        except Exception:  # any failure, not only the disk's: a lost checkpoint must be seen
            self._failed("checkpoint at version %d failed", state["version"])
            return
        self.durable_version = max(self.durable_version, state["version"])
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_duration.observe(time.monotonic() - started)
        self.metrics.checkpoint_version.set(state["version"])
        log.info("checkpoint at version %d written to %s", state["version"], path)

    def _failed(self, message: str, *args: object) -> None:
        log.exception(message, *args)
        self.metrics.background_errors.labels(task="checkpoint").inc()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
