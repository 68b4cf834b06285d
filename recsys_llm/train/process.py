"""Process-wide settings of a run: the RNG seeds, how CPU float math treats subnormal numbers, and torch's default
dtype while a run builds its model."""

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

from recsys_llm.train.config import TrainConfig


def seed_everything(seed: int) -> None:
    """Seeds torch, numpy and Python ``random`` (the same seed on every rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def set_cpu_float_mode(train_cfg: TrainConfig) -> bool:
    """Sets whether CPU float math flushes subnormal numbers to zero: ``train.flush_denormal``.

    The setting is the process's (``torch.set_flush_denormal``), and it reaches torch's worker
    threads only when set before the process's first multi-threaded op, as the ``recsys-llm``
    commands do; called later (e.g. in a notebook after other torch work), it covers the calling
    thread's share of each op only.

    Returns:
        bool: whether subnormals are now flushed (False where the CPU cannot, with a warning).
    """
    supported = torch.set_flush_denormal(train_cfg.flush_denormal)  # True where the CPU has the mode, either way
    flushing = train_cfg.flush_denormal and supported
    if train_cfg.flush_denormal and not supported:
        print("[recsys_llm] train.flush_denormal: this CPU cannot flush subnormal floats; training goes on without",
              flush=True)
    return flushing


@contextlib.contextmanager
def float32_default_dtype() -> Iterator[None]:
    """Runs the block with float32 as torch's default dtype and puts the caller's back after it, failed or not.

    The models, tables and data of a run are float32: a caller's float64 default (a scientific notebook's
    ``torch.set_default_dtype(torch.float64)``) would build float64 dense layers beside float32 embeddings and fail
    deep inside the first forward ("addmv input tensors must have the same dtype"). ``recsys_llm.cli.main`` does
    the same for a command; this gives :func:`~recsys_llm.train.runner.run_training` and
    :func:`~recsys_llm.train.trained_run.run_evaluation`, called directly, the same footing.
    """
    caller = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(caller)
