"""Value estimators against hand-computed NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trialign.errors import TriAlignError
from trialign.modules.values import Expectile, MonteCarlo, TDLambda, lambda_returns

GAMMA = 0.9


def _batch(seed: int = 0):
    """Three episodes of lengths 3, 2, 1 padded to T = 3; padding holds NaN to prove it never leaks."""
    rng = np.random.default_rng(seed)
    lengths = [3, 2, 1]
    mask = np.array([[t < n for t in range(3)] for n in lengths])
    rewards = rng.uniform(0, 1.5, size=(3, 3))
    values = rng.normal(size=(3, 3))
    returns = np.zeros((3, 3))
    for b, n in enumerate(lengths):
        for t in range(n):
            returns[b, t] = sum(GAMMA ** (k - t) * rewards[b, k] for k in range(t, n))
    rewards[~mask] = np.nan
    values[~mask] = np.nan
    returns[~mask] = np.nan
    return rewards, values, returns, mask, lengths


def _tensors(rewards, values, returns, mask):
    v = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    return v, torch.tensor(rewards), torch.tensor(returns), torch.tensor(mask)


def test_monte_carlo_loss_advantages_and_gradients():
    rewards, values, returns, mask, _ = _batch()
    v, r, R, m = _tensors(rewards, values, returns, mask)
    loss, adv = MonteCarlo()(v, r, R, m)
    expected_loss = np.mean((returns[mask] - values[mask]) ** 2)
    assert loss.item() == pytest.approx(expected_loss)
    np.testing.assert_allclose(adv.numpy()[mask], (returns - values)[mask])
    assert (adv.numpy()[~mask] == 0).all()
    assert not adv.requires_grad
    loss.backward()
    grad = v.grad.numpy()
    np.testing.assert_allclose(grad[mask], -2 * (returns - values)[mask] / mask.sum())
    assert (grad[~mask] == 0).all()


def _lambda_return_reference(rewards, values, lengths, gamma, lam):
    """G^λ_t = (1−λ) Σ_{n=1}^{L−t−1} λ^{n−1} G^(n)_t + λ^{L−t−1} G^(L−t)_t, from n-step returns."""
    out = np.zeros_like(rewards)
    for b, length in enumerate(lengths):
        def n_step(t, n):
            bootstrap = values[b, t + n] if t + n < length else 0.0
            return sum(gamma**k * rewards[b, t + k] for k in range(n)) + gamma**n * bootstrap

        for t in range(length):
            horizon = length - t
            total = sum((1 - lam) * lam ** (n - 1) * n_step(t, n) for n in range(1, horizon))
            out[b, t] = total + lam ** (horizon - 1) * n_step(t, horizon)
    return out


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_lambda_returns_match_n_step_reference(lam):
    rewards, values, returns, mask, lengths = _batch(seed=1)
    got = lambda_returns(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), GAMMA, lam).numpy()
    np.testing.assert_allclose(got[mask], _lambda_return_reference(rewards, values, lengths, GAMMA, lam)[mask])
    assert (got[~mask] == 0).all()


def test_td_lambda_one_is_monte_carlo_and_zero_is_one_step():
    rewards, values, returns, mask, lengths = _batch(seed=2)
    v, r, R, m = _tensors(rewards, values, returns, mask)
    mc_loss, mc_adv = MonteCarlo()(v, r, R, m)
    td1_loss, td1_adv = TDLambda(gamma=GAMMA, lam=1.0)(v, r, R, m)
    assert td1_loss.item() == pytest.approx(mc_loss.item())
    np.testing.assert_allclose(td1_adv.numpy(), mc_adv.numpy())

    _, td0_adv = TDLambda(gamma=GAMMA, lam=0.0)(v, r, R, m)
    one_step = np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        for t in range(n):
            next_value = values[b, t + 1] if t + 1 < n else 0.0  # V(s_T) = 0 at the episode end
            one_step[b, t] = rewards[b, t] + GAMMA * next_value
    np.testing.assert_allclose(td0_adv.numpy()[mask], (one_step - values)[mask])
    assert not td0_adv.requires_grad


def test_td_target_does_not_backpropagate_into_bootstrap_values():
    rewards, values, returns, mask, _ = _batch(seed=3)
    v, r, R, m = _tensors(rewards, values, returns, mask)
    loss, _ = TDLambda(gamma=GAMMA, lam=0.0)(v, r, R, m)
    loss.backward()
    target = lambda_returns(r, torch.tensor(values), m, GAMMA, 0.0).numpy()
    # Only the regression term contributes: d/dV_t (target_t − V_t)^2 with target held fixed.
    np.testing.assert_allclose(v.grad.numpy()[mask], (-2 * (target - values) / mask.sum())[mask])


def test_expectile_half_at_median_and_asymmetric():
    rewards, values, returns, mask, _ = _batch(seed=4)
    v, r, R, m = _tensors(rewards, values, returns, mask)
    mc_loss, _ = MonteCarlo()(v, r, R, m)
    half_loss, half_adv = Expectile(tau=0.5)(v, r, R, m)
    assert half_loss.item() == pytest.approx(0.5 * mc_loss.item())  # IQL's unscaled weight: τ=0.5 is half MSE

    loss, adv = Expectile(tau=0.7)(v, r, R, m)
    u = (returns - values)[mask]
    expected = np.mean(np.where(u < 0, 0.3, 0.7) * u**2)
    assert loss.item() == pytest.approx(expected)
    np.testing.assert_allclose(adv.numpy()[mask], u)
    assert not adv.requires_grad

    # Under-estimating by 1 costs 0.7, over-estimating by 1 costs 0.3.
    one = torch.ones(1, 1, dtype=torch.float64)
    keep = torch.ones(1, 1, dtype=torch.bool)
    under, _ = Expectile(tau=0.7)(one * 0, one, one, keep)
    over, _ = Expectile(tau=0.7)(one * 2, one, one, keep)
    assert under.item() == pytest.approx(0.7) and over.item() == pytest.approx(0.3)


def test_empty_mask_gives_zero_loss_with_graph():
    v = torch.zeros(2, 3, requires_grad=True)
    loss, adv = MonteCarlo()(v, torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0 and loss.requires_grad and (adv == 0).all()


@pytest.mark.parametrize("make, field", [(lambda: TDLambda(gamma=1.5), "gamma"), (lambda: TDLambda(lam=-0.1), "lam"),
                                         (lambda: Expectile(tau=1.0), "tau")])
def test_invalid_settings_name_the_field(make, field):
    with pytest.raises(TriAlignError, match=field):
        make()
