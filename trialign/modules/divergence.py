"""The divergence guard: a Lightning Callback that stops training before a non-finite step is taken.

`TriAlignModule.configure_callbacks` installs it, so every trainer that fits the module has it. Before the backward
pass it checks each loss term of the step (per-group policy, value and truth losses, utilities, aggregation weights,
penalty, KL, total: `TriAlignModule.last_loss_parts`); before the optimizer step, every gradient. A non-finite one
raises a `TriAlignError` naming the global step and the term (or parameter), so the weights are not updated and no
checkpoint of the failing step is written: the last checkpoint on disk is the last good one. Under DDP/FSDP the ranks
agree first (one boolean all-reduce per check), so every rank stops, not just the one that saw it. The gradient
check is skipped with a float16 GradScaler, which expects the occasional Inf and skips those steps itself.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import Callback

from trialign.errors import TriAlignError

CHECKED_TERMS = ("value_loss", "policy_loss", "truth_loss", "utility", "weight", "penalty", "kl", "context_kl", "loss")
_ALL_GROUPS = ("utility", "weight")  # defined for every group; the losses only for the groups present


def loss_problem(parts: dict[str, torch.Tensor], group_names: list[str]) -> str | None:
    """The first non-finite loss term of a step, named with its groups, or None."""
    present = parts["present"]
    for name in CHECKED_TERMS:
        value = parts[name].detach()
        per_group = value.dim() == 1
        if per_group and name not in _ALL_GROUPS:
            value = value[present]
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            where = ""
            if per_group:
                groups = group_names if name in _ALL_GROUPS else [
                    group_names[i] for i in present.nonzero().squeeze(1).tolist()]
                where = f" for group(s) {[g for g, b in zip(groups, bad.tolist()) if b]}"
            return f"{name}{where} is not finite ({value.tolist()})"
    return None


def gradient_problem(module: torch.nn.Module) -> str | None:
    """The first parameter with a non-finite gradient, or None."""
    named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(grad).all() for _, grad in named])
    if bool(finite.all()):
        return None
    return f"the gradient of {named[int((~finite).nonzero()[0])][0]} is not finite (the loss was finite)"


class DivergenceGuard(Callback):
    """Raise before the backward pass on a non-finite loss term and before the optimizer step on a non-finite
    gradient (see the module docstring)."""

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        parts = getattr(pl_module, "last_loss_parts", None)
        problem = None if parts is None else loss_problem(parts, list(pl_module.group_names))
        if parts is None and not bool(torch.isfinite(loss.detach()).all()):
            problem = f"the loss is not finite ({loss.item()})"
        self._stop_if_diverged(trainer, pl_module, problem, "a loss term",
                               "check the data's rewards/returns and any custom component, or lower the learning rate")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer: Any) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # float16 AMP: the GradScaler skips steps with Inf gradients and lowers its scale
        self._stop_if_diverged(trainer, pl_module, gradient_problem(pl_module), "a gradient",
                               "check custom components for a sqrt/log/division at 0 or lower the learning rate")

    @staticmethod
    def _stop_if_diverged(trainer, pl_module, problem: str | None, kind: str, hint: str) -> None:
        """Raise a `TriAlignError` for `problem` (None: nothing wrong here); under several ranks all of them raise
        when any one has a problem, so none is left waiting in a collective."""
        if trainer.world_size > 1:
            anywhere = trainer.strategy.reduce_boolean_decision(problem is not None, all=False)
            if anywhere and problem is None:
                problem = f"{kind} is not finite on another rank"
        if problem is None:
            return
        raise TriAlignError(f"training step {pl_module.global_step}: {problem}; training stopped before the optimizer "
                            f"step{_kept_checkpoint(trainer)}; {hint}")


def _kept_checkpoint(trainer) -> str:
    path = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    if path and os.path.isfile(path):
        return f", the last checkpoint {path} is from before it"
    return ", no checkpoint of this run was written yet"
