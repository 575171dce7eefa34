"""When the server checkpoints (wanps.server.checkpoint.CheckpointScheduler), without a network.

The test thread plays the core thread; writes run on the scheduler's writer thread, and
the tests wait for them with `wait()` or events, never with sleeps.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from wanps.server import checkpoint
from wanps.server.checkpoint import CheckpointScheduler, read_checkpoint
from wanps.server.core import ClosedRound
from wanps.server.metrics import ServerMetrics

from test_server_core import make_core, sp


def scheduler_for(tmp_path: Path, every: int) -> tuple[CheckpointScheduler, CollectorRegistry]:
    core, _, _ = make_core(workers=1)
    registry = CollectorRegistry()
    return CheckpointScheduler(core, tmp_path, every, ServerMetrics(registry)), registry


def close_round(scheduler: CheckpointScheduler) -> tuple[ClosedRound, ...]:
    """Close the next round of the scheduler's one-worker core and tell the scheduler, as the servicer does."""
    core = scheduler.core
    worker_id = next(iter(core.members))
    closed = core.push(worker_id, core.version, core.version, sp([0], [1.0])).closed
    scheduler.after_close(closed)
    return closed


def written(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("wanps_server_checkpoints_total")


def test_every_nth_version_is_written_and_becomes_durable(tmp_path: Path) -> None:
    scheduler, registry = scheduler_for(tmp_path, every=2)
    assert scheduler.durable_version == 0
    close_round(scheduler)  # version 1: not due
    scheduler.wait()
    assert not (tmp_path / checkpoint.CHECKPOINT_NAME).exists() and scheduler.durable_version == 0
    close_round(scheduler)  # version 2
    scheduler.wait()
    assert read_checkpoint(tmp_path)["version"] == 2 and scheduler.durable_version == 2
    close_round(scheduler)
    close_round(scheduler)  # version 4
    scheduler.wait()
    assert read_checkpoint(tmp_path)["version"] == 4 and scheduler.durable_version == 4
    assert written(registry) == 2
    assert registry.get_sample_value("wanps_server_checkpoint_version") == 4
    scheduler.close()


def test_a_snapshot_due_while_one_is_being_written_waits_for_the_next_due_round(tmp_path, monkeypatch) -> None:
    scheduler, registry = scheduler_for(tmp_path, every=1)
    writing, release = threading.Event(), threading.Event()
    real_write = checkpoint.write_checkpoint

    def slow_write(directory, state):
        writing.set()
        assert release.wait(timeout=30)
        return real_write(directory, state)

    monkeypatch.setattr(checkpoint, "write_checkpoint", slow_write)
    close_round(scheduler)  # version 1: written, held on the writer thread
    assert writing.wait(timeout=30)
    close_round(scheduler)  # version 2: due, but the writer is busy
    assert scheduler.durable_version == 0  # nothing is durable before its write is done
    release.set()
    scheduler.wait()
    assert read_checkpoint(tmp_path)["version"] == 1 and scheduler.durable_version == 1 and written(registry) == 1
    close_round(scheduler)  # version 3: the next due round takes one
    scheduler.wait()
    assert read_checkpoint(tmp_path)["version"] == 3 and scheduler.durable_version == 3 and written(registry) == 2
    scheduler.close()


@pytest.mark.parametrize("error", [RuntimeError("torch.save broke"), OSError("disk full")])
def test_a_failed_write_is_logged_with_its_exception_and_the_next_one_still_happens(
        tmp_path, monkeypatch, caplog, error) -> None:
    scheduler, registry = scheduler_for(tmp_path, every=1)
    real_write = checkpoint.write_checkpoint

    def failing_write(directory, state):
        raise error

    monkeypatch.setattr(checkpoint, "write_checkpoint", failing_write)
    with caplog.at_level(logging.ERROR, logger="wanps.server"):
        close_round(scheduler)
        scheduler.wait()
    [record] = [r for r in caplog.records if "checkpoint at version 1 failed" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[1] is error
    assert scheduler.durable_version == 0 and not written(registry)
    monkeypatch.setattr(checkpoint, "write_checkpoint", real_write)
    close_round(scheduler)
    scheduler.wait()
    assert scheduler.durable_version == 2 and written(registry) == 1
    scheduler.close()


def test_the_final_checkpoint_is_written_whatever_the_cadence_and_becomes_durable(tmp_path) -> None:
    scheduler, registry = scheduler_for(tmp_path, every=2)
    close_round(scheduler)
    close_round(scheduler)  # version 2: handed to the writer
    close_round(scheduler)  # version 3: not due
    scheduler.write_final(checkpoint.core_state(scheduler.core))
    assert read_checkpoint(tmp_path)["version"] == 3 and scheduler.durable_version == 3 and written(registry) == 2
    scheduler.close()
