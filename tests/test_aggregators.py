"""Aggregators against hand-computed NumPy weights, including the α-fair limits and GR-DPO's update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trialign.errors import TriAlignError
from trialign.modules.aggregators import AlphaFair, GroupRobust, MaxMin, NashSocialWelfare, Utilitarian

UTILITIES = np.array([0.8, 0.2, 0.5, 1.1])
LOSSES = np.array([1.5, 0.3, 2.0, 0.7])


def _call(aggregator, losses=LOSSES, utilities=UTILITIES, present=None):
    present = None if present is None else torch.tensor(present)
    return aggregator(torch.tensor(losses, dtype=torch.float32), torch.tensor(utilities, dtype=torch.float32),
                      present).numpy()


def test_utilitarian_is_uniform():
    np.testing.assert_allclose(_call(Utilitarian()), np.full(4, 0.25), rtol=1e-6)


def test_nash_weights_inverse_utilities_with_floor():
    expected = (1 / UTILITIES) / (1 / UTILITIES).sum()
    np.testing.assert_allclose(_call(NashSocialWelfare()), expected, rtol=1e-5)
    clamped = np.maximum(np.array([0.0, 0.5]), 0.01)
    np.testing.assert_allclose(_call(NashSocialWelfare(eps=0.01), np.zeros(2), np.array([0.0, 0.5])),
                               (1 / clamped) / (1 / clamped).sum(), rtol=1e-5)


def test_maxmin_softmax_of_negative_utilities():
    tau = 0.3
    logits = -UTILITIES / tau
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(_call(MaxMin(temperature=tau)), expected, rtol=1e-5)


def test_alpha_fair_limits():
    np.testing.assert_allclose(_call(AlphaFair(alpha=0.0)), _call(Utilitarian()), rtol=1e-6)
    np.testing.assert_allclose(_call(AlphaFair(alpha=1.0)), _call(NashSocialWelfare()), rtol=1e-6)
    expected = UTILITIES**-2.0 / (UTILITIES**-2.0).sum()
    np.testing.assert_allclose(_call(AlphaFair(alpha=2.0)), expected, rtol=1e-5)
    worst = _call(AlphaFair(alpha=50.0))
    assert worst[np.argmin(UTILITIES)] > 0.999 and np.isfinite(worst).all()  # (0.2/0.5)^50 ≈ 1e-20


def test_absent_groups_get_zero_weight_and_the_rest_renormalize():
    present = [True, False, True, True]
    weights = _call(NashSocialWelfare(), present=present)
    kept = 1 / UTILITIES[[0, 2, 3]]
    np.testing.assert_allclose(weights, np.insert(kept / kept.sum(), 1, 0.0), rtol=1e-5)
    assert weights.sum() == pytest.approx(1.0)


def test_weights_are_detached():
    losses = torch.tensor(LOSSES, dtype=torch.float32, requires_grad=True)
    utilities = torch.tensor(UTILITIES, dtype=torch.float32, requires_grad=True)
    for aggregator in (Utilitarian(), NashSocialWelfare(), MaxMin(), AlphaFair(alpha=2.0), GroupRobust()):
        assert not aggregator(losses, utilities).requires_grad


def test_group_robust_multiplicative_update_over_two_steps():
    eta = 0.5
    second_losses = np.array([0.1, 2.5, 0.4, 1.0])
    aggregator = GroupRobust(step_size=eta).train()
    first = _call(aggregator)
    expected = np.full(4, 0.25) * np.exp(eta * LOSSES)
    expected /= expected.sum()
    np.testing.assert_allclose(first, expected, rtol=1e-5)
    second = _call(aggregator, losses=second_losses)
    expected = expected * np.exp(eta * second_losses)
    expected /= expected.sum()
    np.testing.assert_allclose(second, expected, rtol=1e-5)
    np.testing.assert_allclose(aggregator.weights.numpy(), expected, rtol=1e-5)


def test_group_robust_does_not_update_in_eval_mode():
    aggregator = GroupRobust(step_size=0.5).train()
    trained = _call(aggregator)
    aggregator.eval()
    np.testing.assert_allclose(_call(aggregator, losses=np.array([9.0, 0.0, 0.0, 0.0])), trained, rtol=1e-6)
    np.testing.assert_allclose(aggregator.weights.numpy(), trained, rtol=1e-6)


def test_group_robust_absent_group_is_not_updated():
    aggregator = GroupRobust(step_size=1.0).train()
    _call(aggregator, present=[True, False, True, True])
    expected = np.exp(LOSSES * np.array([1, 0, 1, 1]))
    np.testing.assert_allclose(aggregator.weights.numpy(), expected / expected.sum(), rtol=1e-5)


def test_group_robust_state_dict_round_trip():
    aggregator = GroupRobust(step_size=0.5).train()
    _call(aggregator)
    state = aggregator.state_dict()
    assert "group_log_weights" in state
    restored = GroupRobust(step_size=0.5)
    restored.load_state_dict(state)
    np.testing.assert_allclose(restored.weights.numpy(), aggregator.weights.numpy())
    np.testing.assert_allclose(_call(restored.train()), _call(aggregator), rtol=1e-6)


@pytest.mark.parametrize("make, field", [(lambda: NashSocialWelfare(eps=0), "eps"),
                                         (lambda: MaxMin(temperature=0), "temperature"),
                                         (lambda: AlphaFair(alpha=-1), "alpha"),
                                         (lambda: GroupRobust(step_size=0), "step_size")])
def test_invalid_settings_name_the_field(make, field):
    with pytest.raises(TriAlignError, match=field):
        make()
