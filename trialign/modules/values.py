"""Value estimators: the critic's regression loss and the advantages it hands to the policy objective.

DESIGN.md "Training objective / Value estimation": V_g(s_t) is regressed on a target and the advantage is
A_t = target_t − V_g(s_t), detached for the policy. Variants (one class each):

* `MonteCarlo` — target = the stored discounted return R_t; loss = mean (R_t − V)^2.
* `TDLambda` — target = the λ-return G^λ_t computed backwards from the rewards and the *detached* values,
  G^λ_t = r_t + γ[(1 − λ) V(s_{t+1}) + λ G^λ_{t+1}], bootstrapping V(s_T) = G^λ_T = 0 after the last valid turn
  (the episode ends there: the offline dialogues are complete, not truncated). λ = 1 gives the Monte-Carlo return,
  λ = 0 the one-step target r_t + γ V(s_{t+1}); G^λ_t − V(s_t) equals the GAE(γ, λ) advantage.
  The paper does not fix γ: it must equal the rollout's γ for λ = 1 to match the stored returns.
* `Expectile` — IQL-style asymmetric L2 (Kostrikov et al. 2022) on u = R_t − V: |τ − 1(u < 0)|·u². As in IQL the
  weight is not rescaled, so τ = 0.5 gives *half* the Monte-Carlo MSE; τ > 0.5 makes V an upper expectile of the
  return (optimistic baseline). IQL regresses V on Q(s, a); with no Q network we regress on the sampled return.

Shapes: B episodes (one group's sample k of one item) × T assistant turns; `mask` marks the valid turns (padding
after an episode's last turn is False). Losses are means over valid turns; padded entries may hold anything
(even NaN) and never reach the loss or the advantages (which are 0 there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from trialign.errors import TriAlignError


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over True entries of `mask`; 0 (still attached to the graph) when the mask is empty."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp(min=1).to(x.dtype)


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
                   ) -> torch.Tensor:
    """λ-returns [B, T] from rewards [B, T] and (already detached) values [B, T].

    A turn whose next turn is invalid (or that is the last column) is terminal: V(s_{t+1}) = G^λ_{t+1} = 0.
    Entries at invalid turns are 0.
    """
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    out = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_return = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        target = rewards[:, t] + gamma * ((1.0 - lam) * next_value + lam * next_return)
        out[:, t] = torch.where(mask[:, t], target, torch.zeros_like(target))
        # Moving one step back: an invalid turn t means the episode had ended before it, so bootstrap with 0.
        next_value = values[:, t]
        next_return = out[:, t]
    return out


class ValueEstimator(nn.Module, ABC):
    """Base class: `forward(values, rewards, returns, mask) -> (value_loss, advantages)`."""

    @abstractmethod
    def target(self, values: torch.Tensor, rewards: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
               ) -> torch.Tensor:
        """The regression target [B, T]; must not carry gradient."""

    def elementwise_loss(self, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-turn loss [B, T]; squared error unless a variant says otherwise."""
        return (target - values) ** 2

    def forward(self, values: torch.Tensor, rewards: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Value loss and advantages.

        Args:
            values: [B, T] V_g(s_t) from the value head (with gradient).
            rewards: [B, T] per-turn rewards r_t.
            returns: [B, T] discounted returns R_t stored by the rollout.
            mask: [B, T] bool, True at valid turns.

        Returns:
            value_loss: scalar, mean over valid turns.
            advantages: [B, T] target − V, detached; 0 at invalid turns.
        """
        if not (values.shape == rewards.shape == returns.shape == mask.shape) or values.dim() != 2:
            raise ValueError(f"expected values, rewards, returns, mask all [B, T], got {tuple(values.shape)}, "
                             f"{tuple(rewards.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}")
        mask = mask.bool()
        target = self.target(values.detach(), rewards.to(values.dtype), returns.to(values.dtype), mask).detach()
        safe_values = torch.where(mask, values, torch.zeros_like(values))
        loss = masked_mean(self.elementwise_loss(safe_values, target), mask)
        advantages = torch.where(mask, target - safe_values.detach(), torch.zeros_like(target))
        return loss, advantages


class MonteCarlo(ValueEstimator):
    """Regress V on the stored discounted return R_t (mean squared error)."""

    def target(self, values, rewards, returns, mask):
        return torch.where(mask, returns, torch.zeros_like(returns))


class TDLambda(ValueEstimator):
    """Regress V on the λ-return built from the rewards and the detached values (see module docstring).

    Args:
        gamma: discount factor γ in [0, 1]; use the rollout's γ.
        lam: λ in [0, 1]; 1 = Monte-Carlo, 0 = one-step TD.
    """

    def __init__(self, gamma: float = 1.0, lam: float = 0.95):
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise TriAlignError(f"gamma: expected a value in [0, 1], got {gamma}")
        if not 0.0 <= lam <= 1.0:
            raise TriAlignError(f"lam: expected a value in [0, 1], got {lam}")
        self.gamma = gamma
        self.lam = lam

    def target(self, values, rewards, returns, mask):
        return lambda_returns(rewards, values, mask, self.gamma, self.lam)


class Expectile(ValueEstimator):
    """IQL expectile regression of V on R_t: loss |τ − 1(u < 0)|·u² with u = R_t − V.

    Args:
        tau: expectile τ in (0, 1); 0.5 is half the mean squared error, > 0.5 weighs under-estimates more.
    """

    def __init__(self, tau: float = 0.7):
        super().__init__()
        if not 0.0 < tau < 1.0:
            raise TriAlignError(f"tau: expected a value in (0, 1), got {tau}")
        self.tau = tau

    def target(self, values, rewards, returns, mask):
        return torch.where(mask, returns, torch.zeros_like(returns))

    def elementwise_loss(self, values, target):
        u = target - values
        weight = torch.where(u < 0, 1.0 - self.tau, self.tau)
        return weight * u**2
