"""Detached error feedback (DEF): gradients at x - lambda*e, replicas still bit-identical."""
from __future__ import annotations

import pytest
import torch

from wanps.worker import Optimizer
from wanps.worker.tasks import get_task

pytestmark = pytest.mark.timeout(120)


def test_def_takes_the_gradient_at_the_detached_point_and_restores_the_replica(make_cluster):
    cluster = make_cluster(min_workers=1, tau_max=2, policy="static", tau=0, delta=0.1)
    task = get_task("synthetic")
    model = task.build_model(0)
    opt = Optimizer(model.parameters(), server=cluster.server_address, controller=cluster.controller_address,
                    lr=0.2, error_feedback="def", def_lambda=0.5)
    batches = task.batches(0, 1, 32)
    try:
        for _ in range(20):
            clean = opt.replica.clone()
            residual = opt.rule.residual.clone()
            opt.zero_grad()
            # Forward and backward see x - lambda*e ...
            assert torch.equal(opt.replica, clean - 0.5 * residual)
            x, y = next(batches)
            task.loss(model, x, y).backward()
            opt.step()
            # ... and step() puts back x exactly, then applies the round: the server's model.
            assert opt.version == cluster.core.version
            assert torch.equal(opt.replica, cluster.core.model)
        assert torch.count_nonzero(opt.rule.residual) > 0  # delta 0.1 keeps a residual: the test saw a shift
    finally:
        opt.close()
    assert torch.equal(opt.replica, cluster.core.model)  # close() leaves the clean replica


def test_def_options_are_checked_before_joining():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="error_feedback"):
        Optimizer(model.parameters(), server="127.0.0.1:1", error_feedback="nope")
    with pytest.raises(ValueError, match="def_lambda"):
        Optimizer(model.parameters(), server="127.0.0.1:1", error_feedback="def", def_lambda=2.0)
