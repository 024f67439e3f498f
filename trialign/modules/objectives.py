"""Policy objectives: per-sample losses on the dataset's actions given their (detached) advantages.

A *sample* is one action a_t (one assistant turn of one episode). All objectives share one call,

    loss, weight = objective(logp_sum, num_tokens, advantages, pool=..., ref_logp_sum=...)

with every tensor of shape [N] over the batch's valid samples, and return a per-sample loss [N] together with a
per-sample weight [N] saying how much the sample counts: the module forms a group's policy loss as
L^π_g = Σ_{i∈g} weight_i·loss_i / Σ_{i∈g} weight_i. (The weight is what lets filtering and pairing objectives keep
the shared interface: samples that are filtered out, or that are the losing side of a pair, have weight 0.)
Class attributes tell the module what to compute: `needs_reference` (reference log-probabilities, i.e. a forward
pass with the adapters disabled) and `needs_pairs` (the `pool` must group samples of the same (item, group, turn)).

* `AdvantageWeighted` (DESIGN.md default; AWR, Peng et al. 2019): −min(exp(A/β), w_max)·log π(a|s)/|a|.
* `FilteredBC`: behaviour cloning, −log π(a|s)/|a|, on the samples whose advantage is in the top fraction of
  their pool. The paper says "BC on filtered top trajectories" without fixing the unit; we filter samples within
  the pool the module passes — (item, group) by default, so a sample competes with the group's other samples and
  turns of the same question; pass (item, group, turn) pools to filter turn by turn.
* `PairwiseDPO` (Rafailov et al. 2023): on the best and the worst sample of each (item, group, turn) pool, by
  advantage, −log σ(β[(log π_w − log π_ref_w) − (log π_l − log π_ref_l)]) with summed (not length-normalized)
  log-probabilities, as in DPO. Pools whose samples all score the same give no pair. The pair loss is put on the
  winner's slot (weight 1); the loser's slot has weight 0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from trialign.errors import TriAlignError


def _pool_ids(pool: torch.Tensor) -> torch.Tensor:
    """Map arbitrary pool keys [N] to contiguous ids 0..P-1."""
    return torch.unique(pool, return_inverse=True)[1]


def rank_within_pool(scores: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each sample among its pool by descending score (0 = best; ties broken by position) and pool sizes.

    Returns:
        rank: [N] long.
        pool_size: [N] long, the size of the sample's pool.
    """
    ids = _pool_ids(pool)
    # Two stable sorts = lexicographic order by (pool, -score, position).
    by_score = torch.sort(scores.detach(), descending=True, stable=True).indices
    order = by_score[torch.sort(ids[by_score], stable=True).indices]
    sizes = torch.bincount(ids)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(ids)
    rank[order] = torch.arange(len(ids), device=ids.device) - starts[ids[order]]
    return rank, sizes[ids]


def make_pairs(scores: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-vs-worst pairs: for each pool whose scores are not all equal, (index of its best, index of its worst).

    Args:
        scores: [N] the quantity that defines "better" (e.g. the advantage).
        pool: [N] long key; only samples with equal keys are compared.

    Returns:
        win_idx, lose_idx: [P] long indices into the N samples, one pair per pool with distinct scores.
        Ties for best go to the earliest sample, ties for worst to the latest.
    """
    if scores.shape != pool.shape or scores.dim() != 1:
        raise ValueError(f"expected scores and pool both [N], got {tuple(scores.shape)} and {tuple(pool.shape)}")
    if scores.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=scores.device)
        return empty, empty.clone()
    rank, size = rank_within_pool(scores, pool)
    ids = _pool_ids(pool)
    num_pools = int(ids.max()) + 1
    win = torch.full((num_pools,), -1, dtype=torch.long, device=scores.device)
    lose = torch.full((num_pools,), -1, dtype=torch.long, device=scores.device)
    positions = torch.arange(len(ids), device=scores.device)
    win[ids[rank == 0]] = positions[rank == 0]
    last = rank == size - 1
    lose[ids[last]] = positions[last]
    keep = scores.detach()[win] > scores.detach()[lose]
    return win[keep], lose[keep]


class PolicyObjective(nn.Module, ABC):
    """Base class of policy objectives (see module docstring for the call and the weight convention)."""

    needs_reference: bool = False
    """True if `forward` needs `ref_logp_sum`, the reference policy's summed log-probabilities of the actions."""
    needs_pairs: bool = False
    """True if samples are compared in pairs: `pool` must then key (item, group, turn)."""

    @abstractmethod
    def forward(self, logp_sum: torch.Tensor, num_tokens: torch.Tensor, advantages: torch.Tensor,
                pool: torch.Tensor | None = None, ref_logp_sum: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss and weight.

        Args:
            logp_sum: [N] log π(a|s) summed over the action's tokens (with gradient).
            num_tokens: [N] number of action tokens |a|.
            advantages: [N] detached advantages.
            pool: [N] long key of the comparison pool (used by `FilteredBC` and `PairwiseDPO`).
            ref_logp_sum: [N] reference log-probabilities (used when `needs_reference`).

        Returns:
            loss: [N]; weight: [N] non-negative, detached.
        """


class AdvantageWeighted(PolicyObjective):
    """Advantage-weighted regression: −min(exp(A/β), w_max)·log π(a|s)/|a|.

    Args:
        beta: temperature β > 0 of the exponential weights.
        max_weight: clip w_max > 0 of the weights.
    """

    def __init__(self, beta: float = 1.0, max_weight: float = 20.0):
        super().__init__()
        if beta <= 0:
            raise TriAlignError(f"beta: expected > 0, got {beta}")
        if max_weight <= 0:
            raise TriAlignError(f"max_weight: expected > 0, got {max_weight}")
        self.beta = beta
        self.max_weight = max_weight

    def weights(self, advantages: torch.Tensor) -> torch.Tensor:
        """The clipped exponential weights [N] (exponent clipped first, so no overflow)."""
        return torch.exp(torch.clamp(advantages.detach() / self.beta, max=math.log(self.max_weight)))

    def forward(self, logp_sum, num_tokens, advantages, pool=None, ref_logp_sum=None):
        per_token = logp_sum / num_tokens.clamp(min=1).to(logp_sum.dtype)
        loss = -self.weights(advantages).to(logp_sum.dtype) * per_token
        return loss, torch.ones_like(loss).detach()


class FilteredBC(PolicyObjective):
    """Behaviour cloning −log π(a|s)/|a| on the top `top_fraction` of each pool by advantage.

    Each pool of n samples keeps its ceil(top_fraction·n) best samples (at least one); ties are broken by position.

    Args:
        top_fraction: fraction in (0, 1] of each pool that is imitated; 1 is plain BC/SFT.
    """

    def __init__(self, top_fraction: float = 0.5):
        super().__init__()
        if not 0.0 < top_fraction <= 1.0:
            raise TriAlignError(f"top_fraction: expected a value in (0, 1], got {top_fraction}")
        self.top_fraction = top_fraction

    def selected(self, advantages: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """[N] bool: the samples that are imitated."""
        rank, size = rank_within_pool(advantages, pool)
        # A small tolerance so that e.g. 0.3 * 10 keeps 3, not ceil(3.0000000000000004) = 4.
        keep = torch.ceil(size.to(torch.float64) * self.top_fraction - 1e-9).clamp(min=1)
        return rank < keep

    def forward(self, logp_sum, num_tokens, advantages, pool=None, ref_logp_sum=None):
        if pool is None:
            raise ValueError("FilteredBC needs `pool` (the (item, group) key of each sample)")
        loss = -logp_sum / num_tokens.clamp(min=1).to(logp_sum.dtype)
        return loss, self.selected(advantages, pool).to(loss.dtype)


class PairwiseDPO(PolicyObjective):
    """DPO on best-vs-worst pairs within each (item, group, turn) pool (see module docstring).

    Args:
        beta: DPO inverse temperature β > 0.
    """

    needs_reference = True
    needs_pairs = True

    def __init__(self, beta: float = 0.1):
        super().__init__()
        if beta <= 0:
            raise TriAlignError(f"beta: expected > 0, got {beta}")
        self.beta = beta

    def pair_loss(self, logp_sum: torch.Tensor, ref_logp_sum: torch.Tensor, win_idx: torch.Tensor,
                  lose_idx: torch.Tensor) -> torch.Tensor:
        """[P] −log σ(β[(log π_w − log π_ref_w) − (log π_l − log π_ref_l)])."""
        ratio = logp_sum - ref_logp_sum.detach().to(logp_sum.dtype)
        return -F.logsigmoid(self.beta * (ratio[win_idx] - ratio[lose_idx]))

    def forward(self, logp_sum, num_tokens, advantages, pool=None, ref_logp_sum=None):
        if pool is None or ref_logp_sum is None:
            raise ValueError("PairwiseDPO needs `pool` ((item, group, turn) key) and `ref_logp_sum`")
        win, lose = make_pairs(advantages, pool)
        loss = torch.zeros_like(logp_sum).index_put((win,), self.pair_loss(logp_sum, ref_logp_sum, win, lose))
        weight = torch.zeros_like(loss).index_fill(0, win, 1.0).detach()
        return loss, weight
