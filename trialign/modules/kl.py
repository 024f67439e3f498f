"""KL to the reference policy, estimated per token on the dataset's action tokens.

DESIGN.md: the reference policy is the backbone with its adapters disabled. We use Schulman's "k3" estimator
(http://joschu.net/blog/kl-approx.html): with r = log π_ref(x) − log π(x),

    k3 = exp(r) − 1 − r  ≥ 0,

unbiased for KL(π ‖ π_ref) when tokens are drawn from π, and of lower variance than the sampled log-ratio −r (k1),
which can be negative per token. Where we fill in for the paper: our tokens are the offline actions, drawn from the
behaviour policy μ (the base model at a sampling temperature), not from π, so k3 here is a per-token divergence
penalty — zero exactly where π and π_ref agree on the data, growing only linearly in r when the policy raises the
likelihood of a data token above the reference (which is what AWR/BC do), instead of exponentially as the k3 of
KL(π_ref ‖ π) would. r is clamped to [−20, 20] so exp(r) cannot overflow.
"""

from __future__ import annotations

import torch

_CLAMP = 20.0


def k3_per_token(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Elementwise k3 = exp(r) − 1 − r with r = logp_ref − logp_policy (reference detached), any shape."""
    r = (logp_ref.detach().to(logp_policy.dtype) - logp_policy).clamp(-_CLAMP, _CLAMP)
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
