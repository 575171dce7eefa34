"""A training script with a model of its own, run as a worker process by tests/test_user_model_processes.py.

    python tests/user_model_worker.py --server HOST:PORT --seed N --steps S --out FILE

A small CNN with BatchNorm and a frozen first layer, trained on this process's own random
images through `wanps.worker.Optimizer(model, ...)`; at the end (after close()) it saves
the model's state_dict(), its replica and its version.
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from wanps.worker import Optimizer


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),  # the first convolution stays frozen
        nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    model[0].requires_grad_(False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.set_num_threads(1)
    model = build_model(args.seed)
    opt = Optimizer(model, server=args.server, lr=0.05, tau=1, delta=0.3, buffer_sync_every=4, momentum=0.5,
                    name=f"user-model-{args.seed}")
    generator = torch.Generator().manual_seed(100 + args.seed)  # each worker its own data
    for _ in range(args.steps):
        x = torch.randn(16, 1, 10, 10, generator=generator) * (1 + args.seed)
        y = torch.randint(0, 3, (16,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.close()
    torch.save({"state_dict": model.state_dict(), "replica": opt.replica.clone(), "version": opt.version,
                "trainable": opt.trainable_params}, args.out)


if __name__ == "__main__":
    main()
