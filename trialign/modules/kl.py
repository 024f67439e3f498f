"""KL to the reference policy, estimated per token on the dataset's action tokens.

DESIGN.md: the reference policy is the backbone with its adapters disabled. Our tokens are the offline actions,
drawn from the behaviour policy μ — the base model, i.e. the reference (at a sampling temperature) — not from the
policy π being trained. On samples of π_ref the unbiased low-variance estimator is Schulman's "k3"
(http://joschu.net/blog/kl-approx.html) of the *forward* KL(π_ref ‖ π): with r = log π(x) − log π_ref(x),

    k3 = exp(r) − 1 − r  ≥ 0,      E_{x ~ π_ref}[k3] = KL(π_ref ‖ π),

zero exactly where π and π_ref agree on the data. Its gradient in log π is exp(r) − 1: bounded by 1 in size where
the policy has dropped a token the reference writes (the drift the KL exists to stop, e.g. a persona's style flattened
by the inconsistency penalty), so one such token cannot dominate a step. The reverse-KL form exp(−r) − 1 + r, which
this module used before, is unbiased only on π's own samples and grows as exp(−r) there: measured on the demo, a
policy the penalty had moved made it 41,487 on one batch (loss 2,081). r is clamped to [−20, 20] so exp(r) cannot
overflow.

`context_kl` is the language anchor of DESIGN.md ("Language anchor"): on the answer probe's contexts (the states'
persona, question and chat template, which the data holds as text, not as samples of either policy) it takes the
exact full-vocabulary KL(π_ref ‖ π) of the next-token distribution, so no estimator is needed there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trialign.modules.policy import Policy

_CLAMP = 20.0


def k3_per_token(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Elementwise k3 = exp(r) − 1 − r with r = logp_policy − logp_ref (reference detached), any shape."""
    r = (logp_policy - logp_ref.detach().to(logp_policy.dtype)).clamp(-_CLAMP, _CLAMP)
    return torch.exp(r) - 1.0 - r


def reference_kl(logp_policy_tokens: torch.Tensor, logp_ref_tokens: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
    """Mean k3 over the action tokens.

    Args:
        logp_policy_tokens: [N, L] log π of each token (with gradient).
        logp_ref_tokens: [N, L] log π_ref of the same tokens.
        mask: [N, L] bool, True on action tokens (prompt and padding False).

    Returns:
        A scalar: the mean over all True positions (each token counts once); 0 when there are none.
    """
    if not (logp_policy_tokens.shape == logp_ref_tokens.shape == mask.shape):
        raise ValueError(f"expected three tensors of one shape, got {tuple(logp_policy_tokens.shape)}, "
                         f"{tuple(logp_ref_tokens.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    zeros = torch.zeros_like(logp_policy_tokens)
    per_token = k3_per_token(torch.where(mask, logp_policy_tokens, zeros), torch.where(mask, logp_ref_tokens, zeros))
    total = torch.where(mask, per_token, zeros).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)


def context_kl(policy: "Policy", contexts: list[dict[str, torch.Tensor]], stride: int = 1) -> torch.Tensor:
    """Mean KL(π_ref ‖ π) of the next-token distributions over the full vocabulary at every `stride`-th position of
    the probe's contexts (`Policy.probe_logprobs(keep_contexts=True)`), but not at a context's last position, whose
    next token is the answer that the penalty and the truth term move. The reference forward starts from the
    policy's trunk (`Policy.reference_hidden_states`). 0 when there is no position."""
    total, count = None, 0
    for context in contexts:
        mask = context["attention_mask"].bool()
        steps = torch.arange(mask.shape[1], device=mask.device)
        last = mask.sum(-1, keepdim=True) - 1
        select = mask & (steps[None, :] < last) & (steps[None, :] % stride == 0)
        with torch.no_grad():
            reference = policy.reference_hidden_states(context["input_ids"], context["attention_mask"],
                                                       context["trunk"])
        per_position = policy.next_token_kl(context["hidden"][select], reference[select])
        total = per_position.sum() if total is None else total + per_position.sum()
        count += per_position.numel()
    if total is None or count == 0:
        return torch.zeros((), device=next(policy.parameters()).device)
    return total / count
