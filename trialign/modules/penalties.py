"""Inconsistency penalties: how much the current policy's answers to one item differ across groups.

DESIGN.md "Inconsistency penalty". Inputs are over B *comparison units* (an item, or an item at one sample/turn —
the caller chooses) × G groups:

    option_logprobs [B, G, O]  answer-probe log-likelihood of each option under group g's state (with gradient)
    option_mask     [B, O]     bool, valid options (items have different numbers of options)
    gold_logprob    [B, G]     length-normalized log-probability of the gold answer (with gradient)
    group_mask      [B, G]     bool, groups present for the unit
    has_options     [B]        bool, True for option items

* `JensenShannon`: generalized JSD with uniform weights of the G answer distributions
  p_g = softmax over the valid options of option_logprobs[b, g]:  JSD = H(mean_g p_g) − mean_g H(p_g)
  (natural log; 0 iff all groups agree, at most log G). Option items only.
* `GoldLogProbVariance`: population variance (divide by the number of groups) across groups of the gold
  log-probability. Free-form items by default; all items with `free_form_only=False`.
* `GoldLogProbShortfall`: one-sided, mean_g relu(mean − x_g)²: only groups *below* the mean are penalized, so the
  penalty never pushes a well-served group down.
* `AnchoredToReference`: mean over groups of KL(p_anchor ‖ p_g), the anchor being the reference (persona-free)
  group's distribution held fixed — under the current policy, or under the reference model (adapters disabled,
  given as forward's `anchor` [B, O]): personas are pulled to the neutral user's answer, not to any consensus.
* `CombinedPenalty` (the default): one penalty for option items, another for free-form items.
* `NoPenalty`: 0 (the "TriAlign without penalty" ablation).

Each penalty is the mean of a per-unit value over the units it applies to that have at least two groups (a single
group has nothing to disagree with); 0 when there are none. Padded entries (invalid options / groups) may hold
anything, even NaN or −inf: they are replaced before any arithmetic so no NaN reaches the gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

# Stand-in for −inf at padded positions: exp() of it is exactly 0 in fp32, yet sums of it stay finite.
_MASKED = -1e9


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class InconsistencyPenalty(nn.Module, ABC):
    """Base class: `forward(option_logprobs, option_mask, gold_logprob, group_mask, has_options) -> scalar`."""

    needs_anchor = False
    """True when the penalty compares against the reference model's answer distribution (`anchor` in forward)."""

    @abstractmethod
    def per_unit(self, option_logprobs: torch.Tensor, option_mask: torch.Tensor, gold_logprob: torch.Tensor,
                 group_mask: torch.Tensor, has_options: torch.Tensor, anchor: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-unit penalty [B] (finite everywhere) and which units count [B] bool."""

    def forward(self, option_logprobs: torch.Tensor, option_mask: torch.Tensor, gold_logprob: torch.Tensor,
                group_mask: torch.Tensor, has_options: torch.Tensor, anchor: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Mean penalty over the counted units (shapes in the module docstring); a scalar with gradient.

        `anchor` [B, O]: option log-likelihoods of the reference group's state under the reference model (adapters
        disabled, no gradient), for penalties with `needs_anchor`; ignored by the others."""
        tensors = (option_logprobs, option_mask, gold_logprob, group_mask, has_options)
        shapes = [tuple(t.shape) for t in tensors]
        if option_logprobs.dim() != 3 or not (
                shapes[1] == (shapes[0][0], shapes[0][2]) and shapes[2] == shapes[3] == shapes[0][:2]
                and shapes[4] == shapes[0][:1]) or (anchor is not None and tuple(anchor.shape) != shapes[1]):
            raise ValueError("expected option_logprobs [B,G,O], option_mask [B,O], gold_logprob [B,G], "
                             f"group_mask [B,G], has_options [B], anchor [B,O], got {shapes}"
                             + ("" if anchor is None else f", anchor {tuple(anchor.shape)}"))
        values, counted = self.per_unit(option_logprobs, option_mask.bool(), gold_logprob, group_mask.bool(),
                                        has_options.bool(), anchor)
        total = torch.where(counted, values, torch.zeros_like(values)).sum()
        return total / counted.sum().clamp(min=1).to(total.dtype)


class JensenShannon(InconsistencyPenalty):
    """Generalized Jensen–Shannon divergence of the groups' answer distributions (option items)."""

    def per_unit(self, option_logprobs, option_mask, gold_logprob, group_mask, has_options, anchor=None):
        valid = option_mask[:, None, :] & group_mask[:, :, None]  # [B, G, O]; padding may hold NaN or ±inf
        x = torch.where(valid, _float(option_logprobs), torch.full_like(_float(option_logprobs), _MASKED))
        x = x.clamp(min=_MASKED)  # a valid option at −inf (probability 0) stays finite
        log_p = torch.log_softmax(x, dim=-1)  # [B, G, O]
        groups = group_mask.sum(-1)  # [B]
        n = groups.clamp(min=1).to(x.dtype)
        # log of the mixture m = mean_g p_g, in log space so it never takes log(0).
        log_p_present = torch.where(group_mask[:, :, None], log_p, torch.full_like(log_p, _MASKED))
        log_m = torch.logsumexp(log_p_present, dim=1) - torch.log(n)[:, None]  # [B, O]
        # JSD = mean_g KL(p_g || m), written term by term as m·φ(r) with r = log p_g − log m and
        # φ(r) = r·e^r − (e^r − 1) ≥ 0 (≈ r²/2): the Bregman form of the KL (its extra Σ_o (m − p_g) is 0). It
        # equals H(m) − mean_g H(p_g), but near agreement — the regime training drives to — that difference of
        # two entropies of size log O, and even the plain Σ p·r (whose first-order terms cancel across groups),
        # lose most significant digits in fp32; every term here is non-negative and second order.
        r = torch.where(valid, log_p - log_m[:, None, :], torch.zeros_like(log_p))  # padding: r = 0, φ = 0
        phi = r * r.exp() - torch.expm1(r)
        return (log_m.exp()[:, None, :] * phi).sum((1, 2)) / n, has_options & (groups >= 2)


class AnchoredToReference(InconsistencyPenalty):
    """Mean over groups of KL(p_anchor ‖ p_g): every persona is pulled to the answer the model gives without one.

    JSD's minimizers are *any* consensus, including one a persona pulled towards a wrong answer; anchoring to the
    neutral user's distribution is the Truth-Invariant Alignment condition read literally — the answer must not
    depend on who asks, i.e. equal the answer to nobody in particular. Two anchors:

    * ``anchor: current`` — the reference group's distribution under the current policy, held fixed (no gradient
      through it); the mean runs over the other groups, and the reference group is left to the truth term.
    * ``anchor: reference_model`` — the reference group's distribution under the reference model (the backbone
      with its adapters disabled, as for the KL; `TriAlignModule` computes it, no gradient); the mean runs over every
      group, the reference group included, so the persona-free answer itself cannot drift with the adapters. Its
      minimizer is known in advance (every group answers as the base model answers nobody in particular); the truth
      term is what moves that answer towards the gold one.

    Option items with the reference group probed (and, for ``current``, at least one other group).

    ``temperature`` sharpens the target: q = softmax(log p_anchor / temperature) over the valid options, and the
    penalty is KL(q ‖ p_g). 1 (the default) is the anchor itself. 0 is its argmax (one-hot; the first option on ties),
    so the penalty is the cross-entropy −log p_g(a*) of each persona's answer to the neutral user's answer a*: the
    consistency metric counts argmax agreement, and a soft target near a tie is matched by a persona distribution
    whose argmax can still fall either way, where the one-hot target keeps pushing until it does not.

    Args:
        reference_index: position of the reference group in the data's group order; `TriAlignModule` sets it from
            its `reference_group` (None until then, which is an error at the first call).
        anchor: ``current`` or ``reference_model`` (above).
        temperature: of the target (above); at least 0.
    """

    ANCHORS = ("current", "reference_model")

    def __init__(self, reference_index: int | None = None, anchor: str = "current", temperature: float = 1.0):
        super().__init__()
        if anchor not in self.ANCHORS:
            raise ValueError(f"AnchoredToReference.anchor: expected one of {', '.join(self.ANCHORS)}, got {anchor!r}")
        if not temperature >= 0:
            raise ValueError(f"AnchoredToReference.temperature: expected a number >= 0, got {temperature!r}")
        self.reference_index = reference_index
        self.anchor = anchor
        self.temperature = float(temperature)

    @property
    def needs_anchor(self) -> bool:
        return self.anchor == "reference_model"

    def per_unit(self, option_logprobs, option_mask, gold_logprob, group_mask, has_options, anchor=None):
        if self.reference_index is None:
            raise ValueError("AnchoredToReference: reference_index is not set (give TriAlignModule a "
                             "reference_group)")
        ref = self.reference_index
        valid = option_mask[:, None, :] & group_mask[:, :, None]
        x = torch.where(valid, _float(option_logprobs), torch.full_like(_float(option_logprobs), _MASKED))
        log_p = torch.log_softmax(x.clamp(min=_MASKED), dim=-1)  # [B, G, O]
        if self.needs_anchor:
            if anchor is None:
                raise ValueError("AnchoredToReference(anchor='reference_model') needs the reference model's "
                                 "distribution (forward's `anchor`)")
            a = torch.where(option_mask, _float(anchor), torch.full_like(_float(anchor), _MASKED))
            log_ref = torch.log_softmax(a.clamp(min=_MASKED), dim=-1).detach()[:, None, :]
            counted_groups = group_mask
        else:
            log_ref = log_p[:, ref:ref + 1, :].detach()
            counted_groups = group_mask.clone()
            counted_groups[:, ref] = False
        log_ref = self._sharpened(log_ref, option_mask[:, None, :])
        kl = torch.where(valid, log_ref.exp() * (log_ref - log_p), torch.zeros_like(log_p)).sum(-1)  # [B, G]
        count = counted_groups.sum(-1)
        value = torch.where(counted_groups, kl, torch.zeros_like(kl)).sum(-1) / count.clamp(min=1).to(kl.dtype)
        return value, has_options & group_mask[:, ref] & (count >= 1)

    def _sharpened(self, log_ref: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """log q, q = softmax(log_ref / temperature) over the valid options (one-hot at temperature 0)."""
        if self.temperature == 1.0:
            return log_ref
        if self.temperature == 0.0:
            best = torch.where(valid, log_ref, torch.full_like(log_ref, 2 * _MASKED)).argmax(-1, keepdim=True)
            hot = torch.zeros_like(log_ref, dtype=torch.bool).scatter_(-1, best, True)
            return torch.where(hot, torch.zeros_like(log_ref), torch.full_like(log_ref, _MASKED))
        scaled = torch.where(valid, log_ref / self.temperature, torch.full_like(log_ref, _MASKED))
        return torch.log_softmax(scaled.clamp(min=_MASKED), dim=-1)


def _group_moments(gold_logprob: torch.Tensor, group_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Masked values [B, G] (0 at absent groups), per-unit mean [B] and group counts [B]."""
    x = torch.where(group_mask, _float(gold_logprob), torch.zeros_like(_float(gold_logprob)))
    groups = group_mask.sum(-1)
    mean = x.sum(-1) / groups.clamp(min=1).to(x.dtype)
    return x, mean, groups


class GoldLogProbVariance(InconsistencyPenalty):
    """Variance across groups of the length-normalized gold log-probability.

    Args:
        free_form_only: apply to free-form items only (True) or to every item (False).
    """

    def __init__(self, free_form_only: bool = True):
        super().__init__()
        self.free_form_only = free_form_only

    def _applies(self, has_options: torch.Tensor) -> torch.Tensor:
        return ~has_options if self.free_form_only else torch.ones_like(has_options)

    def per_unit(self, option_logprobs, option_mask, gold_logprob, group_mask, has_options, anchor=None):
        x, mean, groups = _group_moments(gold_logprob, group_mask)
        squared = torch.where(group_mask, (x - mean[:, None]) ** 2, torch.zeros_like(x))
        return squared.sum(-1) / groups.clamp(min=1).to(x.dtype), self._applies(has_options) & (groups >= 2)


class GoldLogProbShortfall(GoldLogProbVariance):
    """One-sided: mean over groups of relu(mean − x_g)², penalizing only groups below the mean.

    Args:
        free_form_only: apply to free-form items only (True) or to every item (False).
    """

    def per_unit(self, option_logprobs, option_mask, gold_logprob, group_mask, has_options, anchor=None):
        x, mean, groups = _group_moments(gold_logprob, group_mask)
        shortfall = torch.where(group_mask, torch.relu(mean[:, None] - x) ** 2, torch.zeros_like(x))
        return shortfall.sum(-1) / groups.clamp(min=1).to(x.dtype), self._applies(has_options) & (groups >= 2)


class CombinedPenalty(InconsistencyPenalty):
    """`options` on option items, `free_form` on free-form items, averaged together over all counted units.

    Args:
        options: penalty for option items (default `JensenShannon()`).
        free_form: penalty for free-form items (default `GoldLogProbVariance()`).
    """

    def __init__(self, options: InconsistencyPenalty | None = None, free_form: InconsistencyPenalty | None = None):
        super().__init__()
        self.options = options if options is not None else JensenShannon()
        self.free_form = free_form if free_form is not None else GoldLogProbVariance()

    @property
    def needs_anchor(self) -> bool:
        return self.options.needs_anchor or self.free_form.needs_anchor

    def per_unit(self, option_logprobs, option_mask, gold_logprob, group_mask, has_options, anchor=None):
        args = (option_logprobs, option_mask, gold_logprob, group_mask, has_options, anchor)
        option_values, option_counted = self.options.per_unit(*args)
        free_values, free_counted = self.free_form.per_unit(*args)
        values = torch.where(has_options, option_values, free_values.to(option_values.dtype))
        return values, torch.where(has_options, option_counted, free_counted)


class NoPenalty(InconsistencyPenalty):
    """Always 0 (in the inputs' floating dtype and device)."""

    def per_unit(self, option_logprobs, option_mask, gold_logprob, group_mask, has_options, anchor=None):
        zeros = torch.zeros(has_options.shape, dtype=_float(gold_logprob).dtype, device=gold_logprob.device)
        return zeros, torch.zeros_like(has_options)
