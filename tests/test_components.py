"""Group value heads, SNIS group utilities with their EMA, and the reference-KL estimator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trialign.errors import TriAlignError
from trialign.modules.heads import GroupValueHeads, ValueHead
from trialign.modules.kl import k3_per_token, reference_kl
from trialign.modules.utility import GroupUtility, snis_group_means

GROUPS = ["teen", "retiree", "non_native"]


# --- value heads -------------------------------------------------------------------------------------------------

def test_group_value_heads_use_each_rows_own_head():
    torch.manual_seed(0)
    heads = GroupValueHeads(GROUPS, hidden_size=8, init_std=0.5)
    hidden = torch.randn(5, 8)
    group_index = torch.tensor([0, 2, 2, 1, 0])
    values = heads(hidden, group_index)
    expected = [heads[GROUPS[g]](hidden[i]).item() for i, g in enumerate(group_index.tolist())]
    # One batched matmul against five one-row ones: float32 kernels that round differently (on an AMX Xeon a value
    # of 0.004 differs in its 5th significant digit), so an absolute float32 tolerance, not a relative one.
    np.testing.assert_allclose(values.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert values.shape == (5,)


def test_only_heads_of_present_groups_get_gradient():
    heads = GroupValueHeads(GROUPS, hidden_size=4)
    heads(torch.randn(3, 4), torch.tensor([0, 0, 2])).sum().backward()
    assert heads["teen"].linear.weight.grad.abs().sum() > 0
    assert heads["non_native"].linear.weight.grad.abs().sum() > 0
    assert heads["retiree"].linear.weight.grad is None or heads["retiree"].linear.weight.grad.abs().sum() == 0


def test_value_heads_start_small_and_are_keyed_by_group():
    torch.manual_seed(0)
    heads = GroupValueHeads(GROUPS, hidden_size=576)
    assert set(heads.state_dict()) == {f"heads.{g}.linear.{p}" for g in GROUPS for p in ("weight", "bias")}
    hidden = torch.randn(64, 576, dtype=torch.bfloat16)  # a bf16 backbone's hidden state
    values = heads(hidden, torch.zeros(64, dtype=torch.long))
    assert values.dtype == torch.float32 and values.abs().max() < 0.2
    assert ValueHead(576).linear.bias.abs().sum() == 0


@pytest.mark.parametrize("names, expected", [([], "at least one"), (["a", "a"], "unique"), (["a.b"], "'.'")])
def test_bad_group_names_are_reported(names, expected):
    with pytest.raises(TriAlignError, match=expected):
        GroupValueHeads(names, hidden_size=4)


def test_group_index_out_of_range_is_reported():
    with pytest.raises(ValueError, match="group_index"):
        GroupValueHeads(GROUPS, hidden_size=4)(torch.zeros(1, 4), torch.tensor([3]))


# --- group utilities -----------------------------------------------------------------------------------------------

def _snis_reference(rewards, log_ratio, group_index, num_groups):
    out = np.zeros(num_groups)
    for g in range(num_groups):
        members = group_index == g
        if members.any():
            w = np.exp(log_ratio[members] - log_ratio[members].max())
            out[g] = (w / w.sum()) @ rewards[members]
    return out


def test_snis_with_equal_log_ratios_is_the_mean_reward():
    rewards = torch.tensor([1.0, 0.0, 1.5, 0.5, 1.2])
    group_index = torch.tensor([0, 0, 1, 1, 1])
    means, present = snis_group_means(rewards, torch.full((5,), -3.7), group_index, 3)
    np.testing.assert_allclose(means.numpy(), [0.5, (1.5 + 0.5 + 1.2) / 3, 0.0], rtol=1e-6)
    assert present.tolist() == [True, True, False]


def test_snis_weights_against_numpy_with_extreme_log_ratios():
    rng = np.random.default_rng(0)
    rewards = rng.uniform(0, 1.5, size=12)
    log_ratio = rng.normal(scale=50.0, size=12)  # multi-token ratios: plain exp would overflow
    group_index = rng.integers(0, 3, size=12)
    means, _ = snis_group_means(torch.tensor(rewards), torch.tensor(log_ratio), torch.tensor(group_index), 3)
    np.testing.assert_allclose(means.numpy(), _snis_reference(rewards, log_ratio, group_index, 3), rtol=1e-5)


def test_ema_across_two_steps_and_absent_groups_keep_their_average():
    utility = GroupUtility(GROUPS, ema=0.9).train()
    zeros = torch.zeros(4)
    first = utility(torch.tensor([1.0, 0.0, 0.5, 0.25]), zeros, zeros, torch.tensor([0, 0, 1, 1]))
    # First sighting sets the average; group 2 is unseen and reports the mean of the seen ones.
    np.testing.assert_allclose(first.numpy(), [0.5, 0.375, 0.4375], rtol=1e-6)
    second = utility(torch.tensor([1.0, 0.8]), torch.zeros(2), torch.zeros(2), torch.tensor([0, 2]))
    np.testing.assert_allclose(second.numpy(), [0.9 * 0.5 + 0.1 * 1.0, 0.375, 0.8], rtol=1e-6)
    assert not second.requires_grad


def test_utility_uses_the_policy_log_ratio():
    utility = GroupUtility(["only"], ema=0.0)
    logp_policy = torch.tensor([0.0, np.log(3.0)], requires_grad=True)
    value = utility(torch.tensor([0.0, 1.0]), logp_policy, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert value.item() == pytest.approx(0.75)  # weights 1/4, 3/4
    assert not value.requires_grad


def test_utility_does_not_update_in_eval_mode_and_state_round_trips():
    utility = GroupUtility(GROUPS, ema=0.5).train()
    index = torch.tensor([0, 1, 2])
    utility(torch.tensor([1.0, 0.5, 0.2]), torch.zeros(3), torch.zeros(3), index)
    state = {k: v.clone() for k, v in utility.state_dict().items()}
    utility.eval()
    preview = utility(torch.tensor([0.0, 0.0, 0.0]), torch.zeros(3), torch.zeros(3), index)
    np.testing.assert_allclose(preview.numpy(), [0.5, 0.25, 0.1], rtol=1e-6)
    assert all(torch.equal(state[k], v) for k, v in utility.state_dict().items())
    restored = GroupUtility(GROUPS, ema=0.5)
    restored.load_state_dict(state)
    np.testing.assert_allclose(restored.utilities().numpy(), [1.0, 0.5, 0.2], rtol=1e-6)


def test_utilities_are_floored_at_eps():
    utility = GroupUtility(["a", "b"], eps=0.01)
    value = utility(torch.tensor([0.0, 1.0]), torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]))
    np.testing.assert_allclose(value.numpy(), [0.01, 1.0])


@pytest.mark.parametrize("kwargs, field", [({"ema": 1.0}, "ema"), ({"eps": 0.0}, "eps")])
def test_invalid_utility_settings_name_the_field(kwargs, field):
    with pytest.raises(TriAlignError, match=field):
        GroupUtility(GROUPS, **kwargs)


# --- reference KL --------------------------------------------------------------------------------------------------

def test_k3_against_numpy_and_masking():
    rng = np.random.default_rng(0)
    policy = rng.normal(-2.0, 1.0, size=(3, 6))
    ref = policy + rng.normal(0.0, 0.5, size=(3, 6))
    mask = rng.uniform(size=(3, 6)) < 0.6
    policy[~mask] = np.nan  # prompt/padding positions may hold anything
    r = policy - ref
    expected = np.mean((np.exp(r) - 1 - r)[mask])
    p = torch.tensor(policy, requires_grad=True)
    kl = reference_kl(p, torch.tensor(ref), torch.tensor(mask))
    assert kl.item() == pytest.approx(expected)
    kl.backward()
    grad = p.grad.numpy()
    # d/dlogπ (e^r − 1 − r) = e^r − 1, averaged over the masked tokens.
    np.testing.assert_allclose(grad[mask], ((np.exp(r) - 1) / mask.sum())[mask])
    assert (grad[~mask] == 0).all()


def test_k3_is_zero_when_policy_equals_reference_and_nonnegative():
    x = torch.randn(4, 5)
    assert reference_kl(x, x.clone(), torch.ones(4, 5, dtype=torch.bool)).item() == 0.0
    assert (k3_per_token(torch.randn(100), torch.randn(100)) >= 0).all()
    assert torch.isfinite(k3_per_token(torch.tensor([-500.0]), torch.tensor([0.0]))).all()


def test_k3_mean_estimates_the_forward_kl_on_reference_samples():
    """The data's tokens come from the reference (the behaviour policy): there the mean of k3 is KL(π_ref‖π)
    (checked on two small categorical distributions)."""
    generator = torch.Generator().manual_seed(0)
    policy = torch.tensor([0.6, 0.3, 0.1])
    reference = torch.tensor([0.2, 0.5, 0.3])
    draws = torch.multinomial(reference, 200_000, replacement=True, generator=generator)
    estimate = k3_per_token(policy.log()[draws], reference.log()[draws]).mean().item()
    exact = (reference * (reference / policy).log()).sum().item()
    assert estimate == pytest.approx(exact, rel=0.02)


def test_k3_gradient_stays_bounded_where_the_policy_dropped_a_reference_token():
    """A token the reference writes (log 0.5) that the policy has driven to log 1e-6: the loss grows linearly and its
    gradient in log π is at most 1 in size (the reverse-KL form's gradient would be about 5e5)."""
    logp = torch.tensor([math.log(1e-6)], requires_grad=True)
    value = reference_kl(logp[None], torch.tensor([[math.log(0.5)]]), torch.ones(1, 1, dtype=torch.bool))
    value.backward()
    assert value.item() == pytest.approx(math.log(0.5 / 1e-6) - 1 + 2e-6, rel=1e-4)
    assert -1.0 <= logp.grad.item() < -0.99


# --- configuration -------------------------------------------------------------------------------------------------

def _concrete_subclasses(base):
    """The package's concrete subclasses of `base` (not those other test modules define, e.g. to inject a NaN)."""
    found = []
    for sub in base.__subclasses__():
        if not getattr(sub, "__abstractmethods__", None) and sub.__module__.startswith("trialign."):
            found.append(sub)
        found.extend(_concrete_subclasses(sub))
    return found


def test_every_component_builds_from_class_path_with_defaults():
    """Variants are swapped by `class_path` in YAML: each must build through jsonargparse from its defaults."""
    from jsonargparse import ArgumentParser

    from trialign.modules.aggregators import Aggregator
    from trialign.modules.objectives import PolicyObjective
    from trialign.modules.penalties import InconsistencyPenalty
    from trialign.modules.values import ValueEstimator

    for base in (Aggregator, PolicyObjective, InconsistencyPenalty, ValueEstimator):
        classes = _concrete_subclasses(base)
        assert len(classes) >= 3, base
        for cls in classes:
            parser = ArgumentParser(exit_on_error=False)
            parser.add_subclass_arguments(base, "component")
            config = parser.parse_object({"component": {"class_path": f"{cls.__module__}.{cls.__name__}"}})
            built = parser.instantiate_classes(config).component
            assert type(built) is cls


def test_nested_penalty_and_group_names_from_config():
    from jsonargparse import ArgumentParser

    from trialign.modules.penalties import CombinedPenalty, GoldLogProbShortfall, InconsistencyPenalty

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(InconsistencyPenalty, "penalty")
    parser.add_class_arguments(GroupUtility, "utility")
    config = parser.parse_object({
        "penalty": {"class_path": "trialign.modules.penalties.CombinedPenalty",
                    "init_args": {"free_form": {"class_path": "trialign.modules.penalties.GoldLogProbShortfall",
                                                "init_args": {"free_form_only": False}}}},
        "utility": {"group_names": GROUPS, "ema": 0.5},
    })
    built = parser.instantiate_classes(config)
    assert isinstance(built.penalty, CombinedPenalty) and isinstance(built.penalty.free_form, GoldLogProbShortfall)
    assert built.penalty.free_form.free_form_only is False
    assert built.utility.group_names == GROUPS and built.utility.ema == 0.5
