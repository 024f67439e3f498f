"""Group-agent value heads: one scalar value head V_g per social group on the shared backbone's hidden state.

DESIGN.md: each agent g has its own value head V_g(s_t), read from the backbone's hidden state at the last token of
the state s_t (parameter sharing as in MAPPO: one backbone, per-agent heads). The paper does not say how the heads
are initialised; we start them near zero (small normal weights, zero bias) so that early advantages are close to the
returns themselves and no group starts with a large arbitrary baseline.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trialign.errors import TriAlignError
from trialign.groups import check_group_ids

class ValueHead(nn.Module):
    """A linear value head V(s) = w·h + b on a hidden state h.

    Args:
        hidden_size: size H of the backbone's hidden state.
        init_std: standard deviation of the initial weights (bias starts at zero).
    """

    def __init__(self, hidden_size: int, init_std: float = 1e-3):
        super().__init__()
        if hidden_size < 1:
            raise TriAlignError(f"hidden_size: expected a positive integer, got {hidden_size}")
        if init_std < 0:
            raise TriAlignError(f"init_std: expected >= 0, got {init_std}")
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> values [...] (computed in the head's dtype, e.g. fp32 on a bf16 backbone)."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class GroupValueHeads(nn.Module):
    """One `ValueHead` per group, kept in an `nn.ModuleDict` keyed by group name.

    Args:
        group_names: the groups, in the dataset's group order; `group_index` in `forward` indexes this list.
        hidden_size: size H of the backbone's hidden state.
        init_std: standard deviation of each head's initial weights.
    """

    def __init__(self, group_names: Sequence[str], hidden_size: int, init_std: float = 1e-3):
        super().__init__()
        names = list(group_names)
        if not names:
            raise TriAlignError("group_names: expected at least one group name, got an empty list")
        if len(set(names)) != len(names):
            raise TriAlignError(f"group_names: expected unique names, got {names}")
        check_group_ids(names, "group_names")
        self.group_names = names
        self.heads = nn.ModuleDict({name: ValueHead(hidden_size, init_std) for name in names})

    def __getitem__(self, name: str) -> ValueHead:
        return self.heads[name]

    def forward(self, hidden: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
        """Value of each row under its own group's head.

        Args:
            hidden: [N, H] hidden states at the last token of each state s_t.
            group_index: [N] long, the row's group as an index into `group_names`.

        Returns:
            values: [N]. Only the heads of groups present in `group_index` receive gradient.
        """
        if hidden.dim() != 2 or group_index.shape != hidden.shape[:1]:
            raise ValueError(f"expected hidden [N, H] and group_index [N], got {tuple(hidden.shape)} and "
                             f"{tuple(group_index.shape)}")
        num_groups = len(self.group_names)
        if group_index.numel() and (int(group_index.min()) < 0 or int(group_index.max()) >= num_groups):
            raise ValueError(f"group_index must lie in [0, {num_groups}), got values in "
                             f"[{int(group_index.min())}, {int(group_index.max())}]")
        heads = [self.heads[name].linear for name in self.group_names]
        weight = torch.cat([h.weight for h in heads], dim=0)  # [G, H]
        bias = torch.cat([h.bias for h in heads], dim=0)  # [G]
        hidden = hidden.to(weight.dtype)
        return (hidden * weight[group_index]).sum(-1) + bias[group_index]
