"""Learning-rate schedules of a fit (`TriAlignModule(lr_schedule=..., warmup_steps=...)`), stepped every optimizer step.

The factor multiplies the optimizer's configured learning rate; for optimizer step s (0-based: the rate the s-th
update uses) of a fit of S steps with W warm-up steps:

* warm-up, s < W: (s + 1) / (W + 1), a linear ramp that never uses a rate of 0;
* then, with progress p = (s − W) / (S − W) ∈ [0, 1):
  - "constant": 1;
  - "linear": 1 − p (HF Trainer's default schedule);
  - "cosine": (1 + cos(π p)) / 2.

The decaying schedules end at the last update's rate 1/(S − W) (linear) or near (π / (2 (S − W)))² (cosine), never
exactly 0, so that no step of the fit is wasted. "constant" without warm-up is the optimizer alone (no scheduler):
fits configured before schedules existed are unchanged, step for step.
"""

from __future__ import annotations

import math

from trialign.errors import TriAlignError

LR_SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(lr_schedule: str, warmup_steps: int) -> None:
    """A one-line error naming the field for a schedule that is not known or a warm-up that is not an integer >= 0."""
    if lr_schedule not in LR_SCHEDULES:
        raise TriAlignError(f"model.lr_schedule: expected one of {list(LR_SCHEDULES)}, got {lr_schedule!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise TriAlignError(f"model.warmup_steps: expected an integer >= 0, got {warmup_steps!r}")


def lr_factor(step: int, total_steps: int, lr_schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based) of `total_steps` (module doc)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if lr_schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_fit_steps(trainer, warmup_steps: int) -> int:
    """The number of optimizer steps a decaying schedule spans: `trainer.max_steps` where set (> 0), else Lightning's
    estimate from the epochs; it must leave at least one step after the warm-up.

    The estimate sets up the data loaders, so it is read only where max_steps does not say: before a resumed fit's
    restore it would start the data early, and the resumed fit would differ from an uninterrupted one."""
    total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise TriAlignError("model.lr_schedule: a decaying schedule needs trainer.max_steps or trainer.max_epochs")
    total = int(total)
    if total <= warmup_steps:
        raise TriAlignError(f"model.warmup_steps: {warmup_steps} warm-up steps leave none of the fit's {total} steps "
                            "to the schedule")
    return total
