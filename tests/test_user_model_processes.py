"""A model of the user's own (BatchNorm, a frozen layer) trained by two real worker processes
against a `wanps server` process: after close() both hold identical state_dict()s, bit for bit."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from wanps.deploy.processes import start_process, stop_all, wanps_command
from wanps.server.checkpoint import read_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from user_model_worker import build_model  # noqa: E402

STEPS = 20


@pytest.mark.timeout(240)
def test_two_worker_processes_end_with_identical_state_dicts(tmp_path):
    logs = tmp_path / "logs"
    checkpoints = tmp_path / "checkpoints"
    processes = []
    try:
        server = start_process("server", wanps_command(
            "server", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--min-workers", "2", "--tau-max", "2",
            "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "0"), logs)
        processes.append(server)
        server.wait_ready(60)
        outputs = [tmp_path / f"worker-{seed}.pt" for seed in (1, 2)]
        workers = [start_process(f"worker-{seed}", [
            sys.executable, str(Path(__file__).with_name("user_model_worker.py")), "--server", server.address,
            "--seed", str(seed), "--steps", str(STEPS), "--out", str(out)], logs, wait_for_line=False)
            for seed, out in zip((1, 2), outputs)]
        processes += workers
        for worker in workers:
            assert worker.wait(180) == 0, worker.tail()
        assert server.stop() == 0  # SIGTERM: writes the final checkpoint
        saved = [torch.load(out, weights_only=True) for out in outputs]
    finally:
        stop_all(processes)
    a, b = saved
    # Bit for bit: every parameter (trainable and frozen) and every buffer.
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        left, right = a["state_dict"][key], b["state_dict"][key]
        assert left.dtype == right.dtype and torch.equal(left, right), key
    # ... and the same as the server's model: STEPS rounds, then close()'s buffer-sync round.
    server_model = read_checkpoint(checkpoints)["model"]
    assert a["version"] == b["version"] == STEPS + 1 == read_checkpoint(checkpoints)["version"]
    assert torch.equal(a["replica"], server_model) and torch.equal(b["replica"], server_model)
    state = a["state_dict"]
    # The frozen layer is the seeder's initial one, never pushed; the trained ones moved.
    initial = {seed: build_model(seed).state_dict() for seed in (1, 2)}
    assert any(all(torch.equal(state[k], initial[s][k]) for k in ("0.weight", "0.bias")) for s in (1, 2))
    assert not any(torch.equal(state["3.weight"], initial[s]["3.weight"]) for s in (1, 2))
    # Buffers were averaged, not left at their initial values.
    assert int(state["1.num_batches_tracked"]) > 0 and float(state["4.running_mean"].abs().sum()) > 0
    assert a["trainable"] == sum(p.numel() for p in build_model(0).parameters() if p.requires_grad)
