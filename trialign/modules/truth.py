"""The truth term on cross-group states: the likelihood of the gold answer under the policy's answer distribution.

DESIGN.md "Cross-group states". At a state s_{b,g} (item b asked by group g) the answer probe gives the policy's
distribution over the item's options, p_g(o | s) = softmax over the valid options of the summed option
log-likelihoods (the distribution the inconsistency penalty compares across groups). The truth term is, per group,

    L^truth_g = − mean_b log Σ_{o ∈ correct(b)} p_g(o | s_{b,g})

over the option items of the batch that group g was probed on (free-form items have no option distribution and are
left to the episodes' rewards). It is the expected-truth objective in log form: E_p[truth] = Σ_{o ∈ correct} p(o),
and log keeps its gradient alive where that probability is small. We chose it over advantage-weighted likelihood
of the gold option because a state has no action to weight: the probe enumerates every answer. Per group, so the
aggregation weights ω_g (NSW: worse-served groups weigh more) apply to it as to the episodes' losses.

`expected_truth` returns E_p[truth] per group (detached), the state part of the group utilities U_g.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASKED = -1e9


def _option_log_probs(option_logprobs: Tensor, option_mask: Tensor, group_mask: Tensor) -> tuple[Tensor, Tensor]:
    valid = option_mask.bool()[:, None, :] & group_mask.bool()[:, :, None]
    x = option_logprobs.to(torch.promote_types(option_logprobs.dtype, torch.float32))
    x = torch.where(valid, x, torch.full_like(x, _MASKED)).clamp(min=_MASKED)
    return torch.log_softmax(x, dim=-1), valid


def gold_log_prob(option_logprobs: Tensor, option_mask: Tensor, correct_options: Tensor, group_mask: Tensor,
                  has_options: Tensor) -> tuple[Tensor, Tensor]:
    """log Σ_{o ∈ correct} p_g(o | s) [B, G] and where it counts [B, G] (option items, probed groups, with a
    correct option)."""
    log_p, valid = _option_log_probs(option_logprobs, option_mask, group_mask)
    correct = correct_options.bool()[:, None, :] & valid
    log_gold = torch.logsumexp(torch.where(correct, log_p, torch.full_like(log_p, _MASKED)), dim=-1)
    counts = group_mask.bool() & has_options.bool()[:, None] & correct.any(-1)
    return torch.where(counts, log_gold, torch.zeros_like(log_gold)), counts


def truth_loss(option_logprobs: Tensor, option_mask: Tensor, correct_options: Tensor, group_mask: Tensor,
               has_options: Tensor) -> tuple[Tensor, Tensor]:
    """L^truth_g [G] (0 for a group without counted states) and which groups have states [G]."""
    log_gold, counts = gold_log_prob(option_logprobs, option_mask, correct_options, group_mask, has_options)
    per_group = counts.sum(0)
    loss = -(log_gold * counts).sum(0) / per_group.clamp(min=1).to(log_gold.dtype)
    return loss, per_group > 0


@torch.no_grad()
def expected_truth(option_logprobs: Tensor, option_mask: Tensor, correct_options: Tensor, group_mask: Tensor,
                   has_options: Tensor) -> tuple[Tensor, Tensor]:
    """mean_b Σ_{o ∈ correct} p_g(o | s) per group [G] (detached) and which groups have states [G]."""
    log_gold, counts = gold_log_prob(option_logprobs, option_mask, correct_options, group_mask, has_options)
    per_group = counts.sum(0)
    mean = (log_gold.exp() * counts).sum(0) / per_group.clamp(min=1).to(log_gold.dtype)
    return mean, per_group > 0
