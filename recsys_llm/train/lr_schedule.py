"""Learning-rate warmup and decay over the global step, as torchrec's DLRM example schedules them.

torchrec's DLRM example (``--lr_warmup_steps``, ``--lr_decay_start``, ``--lr_decay_steps``, its
``LRPolicyScheduler``) ramps every learning rate up linearly, holds it, then decays it polynomially (power 2):
``optim.lr_warmup_steps``, ``optim.lr_decay_start`` and ``optim.lr_decay_steps`` do the same to the table and
the dense optimizers alike (between warmup and decay at the configured rates, where the example holds the warmup's
last, and from ``lr_decay_start`` itself, one step later than the example's, without its 1e-7 floor). The factor is
a function of the global step alone, so a resumed job (any world size) and an uninterrupted one step with the same
rates, and no scheduler state is saved.

The fused table optimizers take the rate their param group holds at each ``zero_grad`` (torchrec's
``EmbeddingFusedOptimizer`` hands it to FBGEMM's kernel, which applies it in the backward); the dense optimizer at
its ``step``: :meth:`ScheduledLearningRates.set_for_step` before a step sets both.

Example::

    rates = ScheduledLearningRates(optimizer, LRSchedule(warmup_steps=100, decay_start=1000, decay_steps=500))
    rates.set_for_step(state.global_step)       # before each training step
"""

import dataclasses
from typing import List

from torch.optim import Optimizer

from recsys_llm.data.validation import check_number


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """The factor of the configured learning rates at each step.

    Args:
        warmup_steps (int): the first steps ramp linearly up to the configured rates (step ``s`` of them, counted
            from 0, takes ``(s + 1) / warmup_steps``); 0: none.
        decay_start (int): the step the decay begins at (at or after the warmup).
        decay_steps (int): steps of the decay ``((decay_steps - d) / decay_steps) ** 2`` (``d`` steps into it),
            which then stays at its last value, ``1 / decay_steps ** 2``; 0: no decay.
    """

    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0

    def __post_init__(self) -> None:
        for name, value in (("lr_warmup_steps", self.warmup_steps), ("lr_decay_start", self.decay_start),
                            ("lr_decay_steps", self.decay_steps)):
            check_number(f"optim.{name}", value, integer=True, minimum=0)
        if self.decay_start and not self.decay_steps:  # the example ignores it alike; a setting that does nothing
            raise ValueError(f"optim.lr_decay_start={self.decay_start} without optim.lr_decay_steps: no decay would "
                             "start; expected optim.lr_decay_steps > 0 beside it (or lr_decay_start left at 0)")
        if self.decay_steps and self.decay_start < self.warmup_steps:
            raise ValueError(f"optim.lr_decay_start={self.decay_start} is within the warmup (optim.lr_warmup_steps="
                             f"{self.warmup_steps}); expected the decay to start at or after it")

    @property
    def constant(self) -> bool:
        """Whether every step takes the configured rates."""
        return not self.warmup_steps and not self.decay_steps

    def scale(self, step: int) -> float:
        """The factor of the configured rates for the step after ``step`` completed ones."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_steps and step >= self.decay_start:
            into = min(step - self.decay_start, self.decay_steps - 1)
            return ((self.decay_steps - into) / self.decay_steps) ** 2
        return 1.0


class ScheduledLearningRates:
    """Sets every param group's learning rate to its configured rate times ``schedule.scale(step)``.

    Args:
        optimizer (Optimizer): the run's optimizer (torchrec's ``CombinedOptimizer`` of the fused table and the
            dense optimizers), holding the configured rates when this is built.
        schedule (LRSchedule): the factors.
    """

    def __init__(self, optimizer: Optimizer, schedule: LRSchedule) -> None:
        self._groups = optimizer.param_groups
        self._configured: List[float] = [group["lr"] for group in self._groups]
        self._schedule = schedule

    def set_for_step(self, step: int) -> float:
        """Sets the rates of the step after ``step`` completed ones; returns their factor."""
        scale = self._schedule.scale(step)
        for group, rate in zip(self._groups, self._configured):
            group["lr"] = rate * scale
        return scale
