"""Which groups a training step probes on its states: the reference group and `k` others drawn for the step.

A probe context costs one forward and backward pass, so a step that probes every group of G on B items pays for
B·G contexts. The penalty and the truth term are means over groups (DESIGN.md "Inconsistency penalty"), and a mean
over a uniformly drawn subset of the other groups is an unbiased estimate of the mean over all of them. Probing the
reference group and k ≪ G−1 others lets a step see (G)/(k+1) times more items for the same cost: on cross-group
states the persona generalizes where the items do not (DESIGN.md "Cross-group states"), so the budget goes to items.

The draw depends only on (seed, step): a resumed run probes the same groups at the same step, and every rank of a
distributed run draws the same subset (its items differ, not its groups).
"""
from __future__ import annotations

import torch


def step_groups(num_groups: int, reference: int | None, k: int | None, step: int, seed: int = 0) -> list[int] | None:
    """Sorted group indices to probe at `step`, or None for all of them (k None, or k covers every other group).

    The reference group (when given) is always in; `k` others are drawn without replacement, uniformly, from a
    generator seeded with (seed, step)."""
    others = [g for g in range(num_groups) if g != reference]
    if k is None or k >= len(others):
        return None
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    drawn = [others[i] for i in torch.randperm(len(others), generator=generator)[:k].tolist()]
    return sorted(drawn + ([] if reference is None else [reference]))
