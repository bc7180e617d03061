"""Time budgets of the training loops (`--max-minutes`): stop before an epoch that would not fit.

A loop that checks its budget only after each epoch overruns it by up to one epoch. So before
each epoch the next one is estimated from those so far (the longest of them: epochs of one run
differ little, and a shared machine makes the recent ones slower, not faster), and the loop
stops when it would not fit. The first epoch has no estimate: a loop that already holds a model
to keep (the network it fine-tunes, epoch 0) abandons an epoch at the moment the budget runs
out, within one step of it; a loop from scratch finishes its first epoch, or it would have
nothing to keep.
"""

from __future__ import annotations

import time


def next_epoch_fits(elapsed_s: float, epoch_seconds: list[float], budget_s: float) -> bool:
    """Whether another epoch, estimated as the longest so far, ends within the budget; with no
    epoch yet there is no estimate, and it fits while any time is left."""
    estimate = max(epoch_seconds) if epoch_seconds else 0.0
    return elapsed_s + estimate <= budget_s if epoch_seconds else elapsed_s < budget_s


class Budget:
    """Minutes left of a run's --max-minutes (0 or less: no bound)."""

    def __init__(self, minutes: float) -> None:
        self.minutes, self.start = minutes, time.monotonic()

    @property
    def bounded(self) -> bool:
        return self.minutes > 0

    def elapsed(self) -> float:
        return (time.monotonic() - self.start) / 60

    def left(self) -> float:
        return self.minutes - self.elapsed()

    def over(self) -> bool:
        return self.bounded and self.left() <= 0

    def fits_next(self, epoch_seconds: list[float]) -> bool:
        return not self.bounded or next_epoch_fits(self.elapsed() * 60, epoch_seconds, self.minutes * 60)
