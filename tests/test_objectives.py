"""Policy objectives against hand-computed NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trialign.errors import TriAlignError
from trialign.modules.objectives import (AdvantageWeighted, FilteredBC, PairwiseDPO, PolicyObjective, make_pairs,
                                         rank_within_pool)


def _samples():
    logp = np.array([-12.0, -30.0, -5.0, -8.0, -20.0, -3.0, -9.0])
    tokens = np.array([4, 10, 5, 2, 8, 1, 3])
    adv = np.array([0.5, 4.0, -1.0, 0.0, 2.0, 0.1, 0.3])
    pool = np.array([7, 7, 7, 3, 3, 9, 3])
    return logp, tokens, adv, pool


def _torch(logp, tokens, adv, pool):
    return (torch.tensor(logp, requires_grad=True), torch.tensor(tokens), torch.tensor(adv), torch.tensor(pool))


def test_flags_tell_the_module_what_to_compute():
    assert not AdvantageWeighted.needs_reference and not AdvantageWeighted.needs_pairs
    assert not FilteredBC.needs_reference and not FilteredBC.needs_pairs
    assert PairwiseDPO.needs_reference and PairwiseDPO.needs_pairs
    assert all(issubclass(c, PolicyObjective) for c in (AdvantageWeighted, FilteredBC, PairwiseDPO))


def test_awr_clipped_weights_loss_and_gradient():
    logp, tokens, adv, pool = _samples()
    lp, nt, a, _ = _torch(logp, tokens, adv, pool)
    beta, max_weight = 1.0, 20.0
    loss, weight = AdvantageWeighted(beta=beta, max_weight=max_weight)(lp, nt, a)
    w = np.minimum(np.exp(adv / beta), max_weight)
    assert w[1] == max_weight and w[4] < max_weight  # exp(4) is clipped, exp(2) is not
    np.testing.assert_allclose(loss.detach().numpy(), -w * logp / tokens)
    assert (weight.numpy() == 1).all()
    loss.sum().backward()
    np.testing.assert_allclose(lp.grad.numpy(), -w / tokens)


def test_awr_huge_advantage_does_not_overflow():
    loss, _ = AdvantageWeighted(beta=0.01, max_weight=5.0)(torch.tensor([-2.0]), torch.tensor([2]),
                                                          torch.tensor([1e4]))
    assert loss.item() == pytest.approx(5.0)


def test_rank_within_pool_orders_by_score_then_position():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0])
    pool = torch.tensor([5, 5, 5, 1, 1])
    rank, size = rank_within_pool(scores, pool)
    assert rank.tolist() == [2, 0, 1, 1, 0]
    assert size.tolist() == [3, 3, 3, 2, 2]


def test_filtered_bc_keeps_top_fraction_per_pool():
    logp, tokens, adv, pool = _samples()
    lp, nt, a, p = _torch(logp, tokens, adv, pool)
    loss, weight = FilteredBC(top_fraction=0.5)(lp, nt, a, pool=p)
    # Reference: in each pool of n samples keep the ceil(n/2) highest advantages.
    expected = np.zeros(len(adv), dtype=bool)
    for key in np.unique(pool):
        members = np.flatnonzero(pool == key)
        keep = math.ceil(0.5 * len(members))
        expected[members[np.argsort(-adv[members], kind="stable")[:keep]]] = True
    assert weight.numpy().astype(bool).tolist() == expected.tolist()
    np.testing.assert_allclose(loss.detach().numpy(), -logp / tokens)
    (loss * weight).sum().backward()
    np.testing.assert_allclose(lp.grad.numpy(), np.where(expected, -1 / tokens, 0.0))


def test_filtered_bc_fraction_one_is_plain_bc_and_tiny_fraction_keeps_the_best():
    logp, tokens, adv, pool = _samples()
    lp, nt, a, p = _torch(logp, tokens, adv, pool)
    _, everything = FilteredBC(top_fraction=1.0)(lp, nt, a, pool=p)
    assert (everything == 1).all()
    _, best = FilteredBC(top_fraction=0.01)(lp, nt, a, pool=p)
    assert np.flatnonzero(best.numpy()).tolist() == [1, 4, 5]
    _, three_of_ten = FilteredBC(top_fraction=0.3)(torch.zeros(10), torch.ones(10), torch.arange(10.0),
                                                   pool=torch.zeros(10, dtype=torch.long))
    assert three_of_ten.sum().item() == 3


def test_make_pairs_best_vs_worst_per_pool():
    scores = torch.tensor([0.2, 0.9, -0.5, 1.0, 1.0, 0.3, 0.3, 4.0])
    pool = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    win, lose = make_pairs(scores, pool)
    # Pool 0: best 1, worst 2. Pool 1 and 2: all tied, no pair. Pool 3: a single sample, no pair.
    assert win.tolist() == [1] and lose.tolist() == [2]
    win, lose = make_pairs(torch.tensor([1.0, 2.0, 2.0, 0.0, 0.0]), torch.tensor([4, 4, 4, 4, 4]))
    assert (win.tolist(), lose.tolist()) == ([1], [4])  # ties: earliest best, latest worst
    win, lose = make_pairs(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert win.numel() == 0 and lose.numel() == 0


def test_dpo_loss_against_numpy():
    logp, tokens, adv, pool = _samples()
    ref = logp + np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 2.0])
    lp, nt, a, p = _torch(logp, tokens, adv, pool)
    beta = 0.1
    loss, weight = PairwiseDPO(beta=beta)(lp, nt, a, pool=p, ref_logp_sum=torch.tensor(ref))
    # Pool 7: best 1 (A=4), worst 2 (A=-1). Pool 3: best 4 (A=2), worst 3 (A=0). Pool 9: single, no pair.
    pairs = [(1, 2), (4, 3)]
    expected = np.zeros(len(logp))
    grad = np.zeros(len(logp))
    for w, l in pairs:
        z = beta * ((logp[w] - ref[w]) - (logp[l] - ref[l]))
        expected[w] = np.log1p(np.exp(-z))
        sig = 1 / (1 + np.exp(-z))
        grad[w] += -beta * (1 - sig)
        grad[l] += beta * (1 - sig)
    np.testing.assert_allclose(loss.detach().numpy(), expected)
    assert weight.tolist() == [0, 1, 0, 0, 1, 0, 0]
    (loss * weight).sum().backward()
    np.testing.assert_allclose(lp.grad.numpy(), grad)


def test_missing_inputs_and_bad_settings_are_reported():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="pool"):
        FilteredBC()(x, x, x)
    with pytest.raises(ValueError, match="ref_logp_sum"):
        PairwiseDPO()(x, x, x, pool=torch.zeros(2, dtype=torch.long))
    with pytest.raises(TriAlignError, match="top_fraction"):
        FilteredBC(top_fraction=0.0)
    with pytest.raises(TriAlignError, match="max_weight"):
        AdvantageWeighted(max_weight=-1)
    with pytest.raises(TriAlignError, match="beta"):
        PairwiseDPO(beta=0)
