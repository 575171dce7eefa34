"""Checkpoint files of the parameter server: written atomically, read back for `--resume`.

A checkpoint is `ServerCore.state_dict()` saved with `torch.save` to `DIR/checkpoint.pt`.
It is written to a temporary file in the same directory, flushed and fsynced, renamed over
the previous one, and the directory is fsynced, so a crash at any moment leaves either the
old checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"


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
