"""Group utilities U_g: each group's expected reward under the current policy, from off-policy samples.

DESIGN.md: U_g is estimated by self-normalized importance sampling (SNIS) over the batch's samples of group g and
smoothed by an EMA across steps. The samples were drawn by the behaviour policy μ, so

    U_g^batch = Σ_{i∈g} w_i R_i,   w_i = exp(log π_i − log μ_i) / Σ_{j∈g} exp(log π_j − log μ_j)

(a softmax of the log-ratios within the group). Self-normalization makes the estimate a convex combination of
observed rewards (biased but consistent, and bounded by the rewards, unlike plain IS whose ratios of
multi-token actions can be astronomically large). With equal log-ratios (π = μ) it is the plain mean reward.

What a "sample" is — one turn (r_t with the action's log-ratio) or one episode (its return with the summed
log-ratio over turns) — is the caller's choice; the estimator is the same. Log-ratios are detached: U_g only sets
the aggregation weights, which are constants for the gradient.

Cross-group states (rows without episodes) add a second, exact estimate: E_π[truth] at the states, folded into the
same EMA with `observe` (a batch with both kinds folds both). The two kinds measure reward on different scales
(an episode turn's reward also holds α·pers), which shifts a group's utility but not which groups are served worse.

Filled in for the paper: the EMA starts at a group's first batch estimate (no bias towards 0); groups absent from a
batch keep their EMA; a group never seen yet reports the mean of the seen groups (1.0 when none is), a neutral
value for the aggregators. Reported utilities are floored at `eps` so that log U and 1/U stay finite. The EMA is
updated only in training mode; in eval mode `forward` returns what the update would give without storing it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trialign.errors import TriAlignError


def snis_group_means(values: torch.Tensor, log_ratio: torch.Tensor, group_index: torch.Tensor, num_groups: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalized importance-weighted mean of `values` per group.

    Args:
        values: [N] rewards (or returns) of the samples.
        log_ratio: [N] log π − log μ of each sample.
        group_index: [N] long group of each sample, in [0, num_groups).
        num_groups: G.

    Returns:
        means: [G] (0 for groups without samples), present: [G] bool.
    """
    values = values.detach().float()
    log_ratio = log_ratio.detach().float()
    counts = torch.bincount(group_index, minlength=num_groups)
    present = counts > 0
    # Softmax within each group: subtract the group's max log-ratio before exponentiating.
    group_max = torch.full((num_groups,), -torch.inf, dtype=log_ratio.dtype, device=log_ratio.device)
    group_max = group_max.scatter_reduce(0, group_index, log_ratio, reduce="amax")
    unnormalized = torch.exp(log_ratio - group_max[group_index])
    total = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, group_index, unnormalized)
    weighted = torch.zeros_like(total).index_add(0, group_index, unnormalized * values)
    means = torch.where(present, weighted / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))
    return means, present


class GroupUtility(nn.Module):
    """EMA-smoothed SNIS estimate of each group's expected reward under the current policy.

    Args:
        group_names: the groups, in the dataset's group order (`group_index` indexes this list).
        ema: smoothing factor in [0, 1): U ← ema·U + (1 − ema)·U^batch; 0 uses the batch estimate alone.
        eps: floor of the reported utilities (> 0).
    """

    def __init__(self, group_names: Sequence[str], ema: float = 0.9, eps: float = 1e-3):
        super().__init__()
        names = list(group_names)
        if not names:
            raise TriAlignError("group_names: expected at least one group name, got an empty list")
        if not 0.0 <= ema < 1.0:
            raise TriAlignError(f"ema: expected a value in [0, 1), got {ema}")
        if eps <= 0:
            raise TriAlignError(f"eps: expected > 0, got {eps}")
        self.group_names = names
        self.ema = ema
        self.eps = eps
        # State is saved in checkpoints so that a resumed run continues the same averages.
        self.register_buffer("average", torch.zeros(len(names), dtype=torch.float32))
        self.register_buffer("seen", torch.zeros(len(names), dtype=torch.bool))

    def _updated(self, batch: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(self.average.dtype)
        blended = self.ema * self.average + (1.0 - self.ema) * batch
        average = torch.where(present, torch.where(self.seen, blended, batch), self.average)
        return average, self.seen | present

    def utilities(self, average: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The reported utilities [G] (float32) for a state; the stored state by default."""
        average = self.average if average is None else average
        seen = self.seen if seen is None else seen
        fallback = average[seen].mean() if bool(seen.any()) else torch.ones((), dtype=average.dtype,
                                                                             device=average.device)
        return torch.where(seen, average, fallback).float().clamp(min=self.eps)

    def forward(self, rewards: torch.Tensor, logp_policy: torch.Tensor, logp_behavior: torch.Tensor,
                group_index: torch.Tensor) -> torch.Tensor:
        """Fold one batch into the EMA (training mode only) and return the utilities.

        Args:
            rewards: [N] reward (or return) of each sample.
            logp_policy: [N] log π of each sample's action under the current policy.
            logp_behavior: [N] log μ of the same action, stored by the rollout.
            group_index: [N] long group of each sample.

        Returns:
            utilities: [G] detached, float32, >= eps.
        """
        if not (rewards.shape == logp_policy.shape == logp_behavior.shape == group_index.shape):
            raise ValueError("expected rewards, logp_policy, logp_behavior, group_index all [N], got "
                             f"{[tuple(t.shape) for t in (rewards, logp_policy, logp_behavior, group_index)]}")
        batch, present = snis_group_means(rewards, logp_policy.detach() - logp_behavior, group_index,
                                          len(self.group_names))
        average, seen = self._updated(batch, present)
        if self.training:
            self.average.copy_(average)
            self.seen.copy_(seen)
        return self.utilities(average, seen)

    def observe(self, means: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Fold a direct per-group estimate [G] (groups where `present` [G] is True) into the EMA, as `forward` folds
        its SNIS estimate, and return the utilities. Cross-group states use it: at a state the probe enumerates every
        answer, so E_π[truth] is computed exactly (`trialign.modules.truth.expected_truth`), no importance weights."""
        average, seen = self._updated(means.detach(), present.bool())
        if self.training:
            self.average.copy_(average)
            self.seen.copy_(seen)
        return self.utilities(average, seen)
