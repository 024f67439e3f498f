"""Aggregators: the weights ω_g that turn per-group losses L_g into one loss Σ_g ω_g L_g.

DESIGN.md "Aggregation". Every aggregator returns detached weights that sum to 1; the module does the weighted
sum. Each variant defines unnormalized *log*-weights and the base class normalizes them with a softmax over the
groups present in the batch (absent groups get weight 0: their loss is undefined in this batch). Log space keeps
extreme settings (α = 50, small temperatures) free of overflow.

* `Utilitarian`: ω_g = 1/G.
* `NashSocialWelfare`: ω_g ∝ 1/U_g — the gradient of the Nash welfare Σ_g log U_g is Σ_g ∇U_g / U_g, so worse-served
  groups weigh more. Needs positive utilities: rewards are truth + α·pers ≥ 0, and utilities are clamped at `eps`.
* `MaxMin`: ω = softmax(−U/τ), a smooth max-min (τ → 0 puts all weight on the worst group).
* `AlphaFair` (Mo & Walrand 2000): ω_g ∝ U_g^(−α), the gradient of Σ_g U_g^(1−α)/(1−α); α = 0 is utilitarian,
  α = 1 Nash, α → ∞ max-min.
* `GroupRobust` (GR-DPO, Ramesh et al. 2024): mirror ascent on the group weights, ω_g ← ω_g·exp(η·L_g), renormalized,
  once per training step (not in eval mode), *before* weighting the step's loss as in their Algorithm 1. Their
  update multiplies L_g by N/N_g because their L_g are sums; ours are already per-group means. The weights are a
  buffer saved in the state dict, so a resumed run continues them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from trialign.errors import TriAlignError


class Aggregator(nn.Module, ABC):
    """Base class: `forward(group_losses [G], utilities [G], present [G] | None) -> weights [G]`."""

    @abstractmethod
    def log_weights(self, group_losses: torch.Tensor, utilities: torch.Tensor, present: torch.Tensor
                    ) -> torch.Tensor:
        """Unnormalized log-weights [G] (detached inputs)."""

    def forward(self, group_losses: torch.Tensor, utilities: torch.Tensor, present: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Aggregation weights.

        Args:
            group_losses: [G] per-group losses L_g (their values only are used).
            utilities: [G] group utilities U_g (see `trialign.modules.utility.GroupUtility`).
            present: [G] bool, groups with samples in this batch; all groups if None.

        Returns:
            weights: [G] detached, non-negative, summing to 1, zero for absent groups (uniform if none is present).
        """
        if group_losses.shape != utilities.shape or group_losses.dim() != 1:
            raise ValueError(f"expected group_losses and utilities both [G], got {tuple(group_losses.shape)} "
                             f"and {tuple(utilities.shape)}")
        if present is None or not bool(present.any()):
            present = torch.ones_like(group_losses, dtype=torch.bool)
        group_losses = group_losses.detach().float()
        utilities = utilities.detach().float()
        logits = self.log_weights(group_losses, utilities, present)
        logits = torch.where(present, logits, torch.full_like(logits, -torch.inf))
        return torch.softmax(logits, dim=0).detach()


class Utilitarian(Aggregator):
    """ω_g = 1/G over the present groups."""

    def log_weights(self, group_losses, utilities, present):
        return torch.zeros_like(utilities)


class NashSocialWelfare(Aggregator):
    """ω_g ∝ 1/max(U_g, eps).

    Args:
        eps: floor of the utilities (> 0).
    """

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        if eps <= 0:
            raise TriAlignError(f"eps: expected > 0, got {eps}")
        self.eps = eps

    def log_weights(self, group_losses, utilities, present):
        return -torch.log(utilities.clamp(min=self.eps))


class MaxMin(Aggregator):
    """ω = softmax(−U/τ).

    Args:
        temperature: τ > 0; smaller concentrates more on the worst group.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise TriAlignError(f"temperature: expected > 0, got {temperature}")
        self.temperature = temperature

    def log_weights(self, group_losses, utilities, present):
        return -utilities / self.temperature


class AlphaFair(Aggregator):
    """ω_g ∝ max(U_g, eps)^(−α).

    Args:
        alpha: fairness α >= 0 (0 utilitarian, 1 Nash, large → max-min).
        eps: floor of the utilities (> 0).
    """

    def __init__(self, alpha: float = 1.0, eps: float = 1e-3):
        super().__init__()
        if alpha < 0:
            raise TriAlignError(f"alpha: expected >= 0, got {alpha}")
        if eps <= 0:
            raise TriAlignError(f"eps: expected > 0, got {eps}")
        self.alpha = alpha
        self.eps = eps

    def log_weights(self, group_losses, utilities, present):
        return -self.alpha * torch.log(utilities.clamp(min=self.eps))


class GroupRobust(Aggregator):
    """GR-DPO weights: log ω_g += η·L_g for present groups, renormalized, each training-mode call.

    The number of groups is taken from the first call (the buffer starts empty and uniform weights are created
    then); loading a state dict restores the saved weights whatever their size.

    Args:
        step_size: η > 0, the mirror-ascent step on the group weights.
    """

    def __init__(self, step_size: float = 0.01):
        super().__init__()
        if step_size <= 0:
            raise TriAlignError(f"step_size: expected > 0, got {step_size}")
        self.step_size = step_size
        self.register_buffer("group_log_weights", torch.zeros(0))

    @property
    def weights(self) -> torch.Tensor:
        """The current weights over all groups [G] (empty before the first call)."""
        return torch.softmax(self.group_log_weights, dim=0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "group_log_weights")
        if saved is not None and saved.shape != self.group_log_weights.shape:
            self.group_log_weights = torch.zeros_like(saved, device=self.group_log_weights.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def log_weights(self, group_losses, utilities, present):
        num_groups = group_losses.shape[0]
        current = self.group_log_weights
        if current.numel() == 0:
            current = torch.zeros(num_groups, dtype=torch.float32, device=group_losses.device)
        elif current.shape[0] != num_groups:
            raise ValueError(f"GroupRobust holds weights for {current.shape[0]} groups, got {num_groups} losses")
        if self.training:
            step = torch.where(present, self.step_size * group_losses, torch.zeros_like(group_losses))
            current = current + step
            current = current - torch.logsumexp(current, dim=0)
            self.group_log_weights = current.detach()
        return current
