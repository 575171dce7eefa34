"""Invariants every fault test checks at the end, from the server's final checkpoint.

The server runs with `--audit --checkpoint-dir DIR`; stopping it (SIGTERM) writes the final
checkpoint, which holds the model, its version, the initial model, the float64 sum of every
applied delta and the ids of the applied rounds. Workers save their replicas at the end
(`wanps worker --until-round N --save-replica FILE`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from wanps.proto.codec import model_crc32
from wanps.server.checkpoint import read_checkpoint
from wanps.worker.optimizer import bind_to_flat
from wanps.worker.tasks import get_task


def check_invariants(checkpoint_dir: Path, replica_files: list[Path], *, rounds: int, task_name: str = "synthetic",
                     target_accuracy: float = 0.8) -> dict:
    state = read_checkpoint(checkpoint_dir)
    model, version, audit = state["model"], state["version"], state["audit"]
    assert audit is not None, "the server must run with --audit"
    # Each round applied exactly once, in order, and training went the whole way.
    assert audit["applied_rounds"] == list(range(version)), "a round was applied twice or skipped"
    assert version == rounds, f"server at version {version}, expected {rounds}"
    # Conservation: final model == initial model - sum of the applied means (float64, to rounding).
    expected = audit["initial_model"].double() - audit["applied_sum"]
    assert torch.allclose(expected, model.double(), atol=1e-5), \
        f"conservation broken: max error {float((expected - model.double()).abs().max()):.3g}"
    # Replicas equal the server's model at the same version (bit for bit, hence the same CRC).
    server_crc = model_crc32(model)
    saved = [torch.load(path, weights_only=True) for path in replica_files]
    for path, replica in zip(replica_files, saved):
        assert replica["version"] == version, f"{path.name} at version {replica['version']}, server at {version}"
        assert model_crc32(replica["values"]) == server_crc and torch.equal(replica["values"], model), \
            f"{path.name} differs from the server's model"
    # Training still reaches the target.
    task = get_task(task_name)
    net = task.build_model(0)
    bind_to_flat(list(net.parameters())).copy_(model)
    accuracy = task.accuracy(net)
    assert accuracy >= target_accuracy, f"accuracy {accuracy:.3f} below {target_accuracy}"
    return {"version": version, "accuracy": accuracy, "replicas": saved}
