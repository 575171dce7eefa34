"""The push log's byte cap, end to end: a real server process killed between checkpoints
loses the rounds after its last one; the worker's push log had dropped some of them over its
cap. Their updates go back into error feedback (those rounds are replayed empty), so nothing
is lost: what the server applied + the residual == the sum of lr * grad."""
from __future__ import annotations

import pytest
import torch

from wanps.deploy.processes import start_process, wanps_command
from wanps.server.checkpoint import read_checkpoint
from wanps.worker import Optimizer
from wanps.worker.tasks import get_task

LR = 0.2
# Rounds between checkpoints: the write (fsync) can take tens of rounds here, and the one at
# this round must be heard of before the next is due.
CHECKPOINT_EVERY = 100


@pytest.mark.timeout(180)
def test_rounds_dropped_from_the_push_log_and_lost_with_the_server_go_back_into_error_feedback(tmp_path):
    checkpoints = tmp_path / "checkpoints"

    def start_server(listen: str, *extra: str):
        return start_process("server", wanps_command(
            "server", "--listen", listen, "--metrics-listen", "off", "--min-workers", "1", "--tau-max", "1",
            "--checkpoint-dir", str(checkpoints), "--checkpoint-every", str(CHECKPOINT_EVERY), "--audit",
            "--log-level", "WARNING", *extra), tmp_path / "logs")

    server = start_server("127.0.0.1:0")
    opt = None
    try:
        address = server.wait_ready(60).split()[1]
        task = get_task("synthetic")
        model = task.build_model(1)
        opt = Optimizer(model.parameters(), server=address, lr=LR, tau=0, delta=0.1)
        opt.session.push_log.max_bytes = 1  # over the cap from the first push: it keeps only what it must
        batches = task.batches(0, 1, 32, 1)
        scaled_gradients = torch.zeros(opt.trainable_params, dtype=torch.float64)  # sum of lr * grad

        def step() -> None:
            nonlocal scaled_gradients
            x, y = next(batches)
            opt.zero_grad()
            task.loss(model, x, y).backward()
            scaled_gradients += LR * torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
            opt.step()

        # Past the first checkpoint, until its durable version came back in a push reply (a
        # counted event, bounded), and on until rounds after it were dropped over the cap.
        while opt.round < CHECKPOINT_EVERY + 10 or opt.session.push_log.durable_version < CHECKPOINT_EVERY:
            assert opt.round < 2 * CHECKPOINT_EVERY - 5, "the first checkpoint was not reported durable in time"
            step()
        assert opt.session.push_log.durable_version == CHECKPOINT_EVERY
        assert opt.session.push_log.get(CHECKPOINT_EVERY) is None  # dropped over the cap, not durable
        stopped_at = opt.round

        server.popen.kill()  # no final checkpoint: the rounds after the first one are lost with it
        server.wait(10)
        server = start_server(address, "--resume", str(checkpoints))
        server.wait_ready(60)
        rounds = stopped_at + 10
        while opt.round < rounds:
            step()  # the first one meets the lost connection and recovers
        assert opt.session.recoveries >= 1
        opt.wait_for_version(opt.round, timeout_s=60)
        residual = opt.rule.residual.double().clone()
        opt.close()
        opt = None
        assert server.stop() == 0  # the final checkpoint
    finally:
        if opt is not None:
            opt.close()
        server.stop()
    audit = read_checkpoint(checkpoints)["audit"]
    assert audit["applied_rounds"] == list(range(rounds))
    applied = audit["applied_sum"][: scaled_gradients.numel()]  # one worker: each round's mean is its push
    assert torch.allclose(applied + residual, scaled_gradients, atol=1e-5), \
        f"mass lost: {float((applied + residual - scaled_gradients).abs().max()):.3g}"
