"""The running training-loss sums behind ``metrics.jsonl``'s loss records, carried through checkpoints.

A ``train`` record is the mean batch loss of the last ``LOSS_RECORD_STEPS`` global steps and an ``epoch``
record's ``mean_loss`` that of all the epoch's steps. A job resumed from a checkpoint taken between two
records goes on from the sums the checkpoint carries (:class:`~recsys_llm.train.checkpoint.TrainState`'s
``loss_window_*`` and ``epoch_loss_*``), so its records are those of the uninterrupted run: the same
floats on one rank, and on several up to the rounding of the carried mean over the ranks.

Example::

    sums = LossSums.resumed_from(state)
    sums.add(loss)                        # every step: no device sync
    if state.global_step % 50 == 0:
        mean_loss, steps = sums.take_window(device)
    sums.carry_into(state, device)        # before a checkpoint of ``state`` (collective)
"""

from typing import Optional, Tuple, Union

import torch

from recsys_llm.train.checkpoint import TrainState
from recsys_llm.train.distributed import mean_over_ranks

# a sum is a float until the first step's 0-dim loss tensor is added, then a tensor on the loss's device
Sum = Union[float, torch.Tensor]


class LossSums:
    """This rank's sums of batch losses since the last ``train`` record (the window) and in the current epoch.

    A sum carried in from a checkpoint is the mean over the ranks of theirs: the mean over the ranks of
    each rank's sum divided by the steps (every rank takes the same steps) is then what it would have been.
    """

    def __init__(self, window_sum: Sum = 0.0, window_steps: int = 0, epoch_sum: Sum = 0.0,
                 epoch_steps: int = 0) -> None:
        self.window_sum, self.window_steps = window_sum, window_steps
        self.epoch_sum, self.epoch_steps = epoch_sum, epoch_steps

    @classmethod
    def resumed_from(cls, state: TrainState) -> "LossSums":
        """The sums ``state`` carries (zeros for a new run, and for a checkpoint written before 2026-12-06)."""
        return cls(state.loss_window_sum, state.loss_window_steps, state.epoch_loss_sum, state.epoch_loss_steps)

    def add(self, loss: torch.Tensor) -> None:
        """Adds one step's batch loss (detached, 0-dim); stays on its device."""
        self.window_sum = self.window_sum + loss
        self.window_steps += 1
        self.epoch_sum = self.epoch_sum + loss
        self.epoch_steps += 1

    def take_window(self, device: Optional[torch.device] = None) -> Tuple[float, int]:
        """``(mean batch loss over the ranks, steps)`` of the window, which starts again empty (collective)."""
        mean_loss = mean_over_ranks(float(self.window_sum) / self.window_steps, device)
        steps = self.window_steps
        self.window_sum, self.window_steps = 0.0, 0
        return mean_loss, steps

    def epoch_mean(self, device: Optional[torch.device] = None) -> Optional[float]:
        """The mean batch loss of the epoch's steps over the ranks; None before its first (collective)."""
        if not self.epoch_steps:
            return None
        return mean_over_ranks(float(self.epoch_sum), device) / self.epoch_steps

    def start_epoch(self) -> None:
        """Empties the epoch's sum (the window runs on over the epoch boundary)."""
        self.epoch_sum, self.epoch_steps = 0.0, 0

    def carry_into(self, state: TrainState, device: Optional[torch.device] = None) -> None:
        """Writes the sums, as means over the ranks, into ``state`` for its checkpoint (collective)."""
        state.loss_window_sum = mean_over_ranks(float(self.window_sum), device)
        state.loss_window_steps = self.window_steps
        state.epoch_loss_sum = mean_over_ranks(float(self.epoch_sum), device)
        state.epoch_loss_steps = self.epoch_steps
