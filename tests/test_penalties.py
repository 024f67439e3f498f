"""Inconsistency penalties against NumPy: JSD limits and a random case, variance, shortfall, combination."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trialign.modules.penalties import (CombinedPenalty, GoldLogProbShortfall, GoldLogProbVariance, JensenShannon,
                                        NoPenalty)


def _call(penalty, option_logprobs, option_mask, gold_logprob, group_mask, has_options):
    return penalty(torch.as_tensor(option_logprobs), torch.as_tensor(option_mask), torch.as_tensor(gold_logprob),
                   torch.as_tensor(group_mask), torch.as_tensor(has_options))


def _option_batch(option_logprobs, option_mask=None, group_mask=None):
    option_logprobs = torch.as_tensor(option_logprobs, dtype=torch.float64)
    b, g, o = option_logprobs.shape
    option_mask = torch.ones(b, o, dtype=torch.bool) if option_mask is None else torch.as_tensor(option_mask)
    group_mask = torch.ones(b, g, dtype=torch.bool) if group_mask is None else torch.as_tensor(group_mask)
    return option_logprobs, option_mask, torch.zeros(b, g, dtype=torch.float64), group_mask, torch.ones(b, dtype=bool)


def _entropy(p):
    p = p[p > 0]
    return -(p * np.log(p)).sum()


def _jsd_reference(logits, option_mask, group_mask):
    """Generalized JSD with uniform weights, per item, over valid options and present groups."""
    out = []
    for b in range(logits.shape[0]):
        x = logits[b][group_mask[b]][:, option_mask[b]]
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(_entropy(p.mean(0)) - np.mean([_entropy(row) for row in p]))
    return np.array(out)


def test_jsd_identical_distributions_is_zero():
    logits = np.tile(np.array([-1.0, -2.0, -0.5]), (1, 4, 1))
    assert _call(JensenShannon(), *_option_batch(logits)).item() == pytest.approx(0.0, abs=1e-12)


def test_jsd_two_one_hot_distributions_is_log_two():
    one_hot = np.array([[[0.0, -np.inf], [-np.inf, 0.0]]])  # probability 0 written as −inf
    assert _call(JensenShannon(), *_option_batch(one_hot)).item() == pytest.approx(math.log(2))
    # G disjoint one-hot answers reach the maximum, log G.
    four = np.where(np.eye(4) > 0, 0.0, -1e4)[None]
    assert _call(JensenShannon(), *_option_batch(four)).item() == pytest.approx(math.log(4))


def test_jsd_random_case_with_padding_matches_numpy_and_has_finite_gradients():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(3, 4, 5))
    option_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=bool)
    group_mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0]], dtype=bool)
    padded = logits.copy()
    padded[~np.broadcast_to(option_mask[:, None, :], logits.shape)] = np.nan  # padding must not leak
    padded[1, 1] = [np.inf, -np.inf, np.nan, 1e30, 0.0]  # nor an absent group's row
    x = torch.tensor(padded, requires_grad=True)
    _, om, gold, gm, has = _option_batch(padded, option_mask, group_mask)
    loss = JensenShannon()(x, om, gold, gm, has)
    assert loss.item() == pytest.approx(_jsd_reference(logits, option_mask, group_mask).mean())
    loss.backward()
    grad = x.grad.numpy()
    assert np.isfinite(grad).all()
    assert np.abs(grad[0]).sum() > 0  # gradient reaches the answer-probe log-probabilities
    assert (grad[1, 1] == 0).all() and (grad[1, :, 3:] == 0).all()  # absent group, padded options


def test_jsd_of_nearly_agreeing_groups_keeps_its_digits_in_float32():
    # Groups that almost agree (JSD ~ 1e-6, where a trained policy sits) — a difference of two entropies of size
    # log(4) would keep only ~1 significant digit in fp32; the KL-to-mixture form keeps about 5.
    rng = np.random.default_rng(3)
    base = rng.normal(size=(2, 1, 4))
    logits = base + 1e-3 * rng.normal(size=(2, 6, 4))
    reference = _jsd_reference(logits, np.ones((2, 4), bool), np.ones((2, 6), bool)).mean()  # float64
    assert 1e-7 < reference < 1e-5
    x = torch.tensor(logits, dtype=torch.float32)
    _, om, gold, gm, has = _option_batch(logits)
    assert JensenShannon()(x, om, gold.float(), gm, has).item() == pytest.approx(reference, rel=1e-3)


def test_jsd_ignores_free_form_items_and_single_group_items():
    logits = np.random.default_rng(1).normal(size=(3, 2, 3))
    x, om, gold, gm, has = _option_batch(logits, group_mask=[[True, True], [True, False], [True, True]])
    has = torch.tensor([True, True, False])
    expected = _jsd_reference(logits[:1], np.ones((1, 3), bool), np.ones((1, 2), bool)).mean()
    assert JensenShannon()(x, om, gold, gm, has).item() == pytest.approx(expected)


def _gold_batch():
    gold = np.array([[-0.5, -1.5, -1.0, np.nan], [-2.0, -0.1, -0.3, -0.2], [-1.0, -1.0, -4.0, -1.0]])
    group_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=bool)
    has_options = np.array([False, False, True])
    return gold, group_mask, has_options


def _gold_args(gold, group_mask, has_options):
    b, g = gold.shape
    g_t = torch.tensor(gold, requires_grad=True)
    return g_t, (torch.zeros(b, g, 1, dtype=torch.float64), torch.ones(b, 1, dtype=torch.bool), g_t,
                 torch.tensor(group_mask), torch.tensor(has_options))


def test_gold_variance_free_form_and_all_items():
    gold, group_mask, has_options = _gold_batch()
    per_item = [np.var(gold[b][group_mask[b]]) for b in range(3)]
    g_t, args = _gold_args(gold, group_mask, has_options)
    loss = GoldLogProbVariance()(*args)
    assert loss.item() == pytest.approx(np.mean(per_item[:2]))
    loss.backward()
    assert np.isfinite(g_t.grad.numpy()).all() and g_t.grad[0, 3] == 0 and (g_t.grad[2] == 0).all()
    assert GoldLogProbVariance(free_form_only=False)(*args).item() == pytest.approx(np.mean(per_item))


def test_gold_shortfall_penalizes_only_groups_below_the_mean():
    gold, group_mask, has_options = _gold_batch()

    def reference(x):
        return np.mean(np.maximum(x.mean() - x, 0.0) ** 2)

    g_t, args = _gold_args(gold, group_mask, has_options)
    loss = GoldLogProbShortfall()(*args)
    assert loss.item() == pytest.approx(np.mean([reference(gold[b][group_mask[b]]) for b in range(2)]))
    loss.backward()
    # Item 1: mean −0.65; only group 0 (−2.0) is below it, and it is pushed up (negative gradient of the loss).
    grad = g_t.grad.numpy()[1]
    assert grad[0] < 0
    # Groups above the mean only feel the penalty through the mean: their gradient is positive and equal.
    assert grad[1] == pytest.approx(grad[2]) and grad[1] > 0


def test_combined_penalty_averages_over_all_counted_items():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4, 3))
    gold, group_mask, has_options = _gold_batch()
    args = (torch.tensor(logits), torch.ones(3, 3, dtype=torch.bool), torch.tensor(gold), torch.tensor(group_mask),
            torch.tensor(has_options))
    jsd = _jsd_reference(logits[2:], np.ones((1, 3), bool), group_mask[2:])[0]
    variances = [np.var(gold[b][group_mask[b]]) for b in range(2)]
    assert CombinedPenalty()(*args).item() == pytest.approx((jsd + sum(variances)) / 3)
    shortfall = CombinedPenalty(free_form=GoldLogProbShortfall())(*args).item()
    assert shortfall < CombinedPenalty()(*args).item()


def test_no_penalty_is_zero_in_input_dtype():
    gold, group_mask, has_options = _gold_batch()
    _, args = _gold_args(gold, group_mask, has_options)
    value = NoPenalty()(*args)
    assert value.item() == 0.0 and value.dtype == torch.float64 and value.dim() == 0


def test_empty_selection_is_zero():
    x, om, gold, gm, has = _option_batch(np.zeros((2, 3, 2)))
    assert JensenShannon()(x, om, gold, gm, torch.zeros(2, dtype=torch.bool)).item() == 0.0


def test_mismatched_shapes_are_reported():
    x, om, gold, gm, has = _option_batch(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="option_mask"):
        JensenShannon()(x, om[:, :3], gold, gm, has)
    with pytest.raises(ValueError, match="option_logprobs"):
        JensenShannon()(x[:, :, 0], om, gold, gm, has)


def test_anchored_penalty_matches_numpy_and_leaves_the_reference_without_gradient():
    from trialign.modules.penalties import AnchoredToReference

    rng = np.random.default_rng(5)
    logits = rng.normal(-5, 3, size=(3, 4, 3))
    option_mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=bool)
    group_mask = np.ones((3, 4), dtype=bool)
    group_mask[2, 3] = False  # group 3 absent on item 2
    reference = 1
    expected = []
    for b in range(3):
        x = logits[b][:, option_mask[b]]
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        others = [g for g in range(4) if g != reference and group_mask[b, g]]
        expected.append(np.mean([(p[reference] * np.log(p[reference] / p[g])).sum() for g in others]))
    tensor = torch.tensor(logits, requires_grad=True)
    value = AnchoredToReference(reference_index=reference)(
        tensor, torch.tensor(option_mask), torch.zeros(3, 4), torch.tensor(group_mask), torch.ones(3, dtype=bool))
    assert value.item() == pytest.approx(np.mean(expected), rel=1e-9)
    value.backward()
    assert tensor.grad[:, reference].abs().sum() == 0  # the anchor is held fixed
    assert tensor.grad[:, [0, 2, 3]].abs().sum() > 0


def test_anchored_to_the_reference_model_matches_numpy_over_every_group():
    from trialign.modules.penalties import AnchoredToReference

    rng = np.random.default_rng(7)
    logits = rng.normal(-5, 3, size=(2, 3, 4))
    anchor = rng.normal(-5, 3, size=(2, 4))
    option_mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)
    group_mask = np.ones((2, 3), dtype=bool)
    group_mask[1, 2] = False
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(  # noqa: E731
        -1, keepdims=True)
    expected = []
    for b in range(2):
        a = softmax(anchor[b][option_mask[b]])
        kls = [(a * np.log(a / softmax(logits[b, g][option_mask[b]]))).sum() for g in range(3) if group_mask[b, g]]
        expected.append(np.mean(kls))  # the reference group (0) counts too
    tensor = torch.tensor(logits, requires_grad=True)
    penalty = AnchoredToReference(reference_index=0, anchor="reference_model")
    assert penalty.needs_anchor and CombinedPenalty(options=penalty).needs_anchor
    assert not AnchoredToReference(reference_index=0).needs_anchor and not CombinedPenalty().needs_anchor
    args = (tensor, torch.tensor(option_mask), torch.zeros(2, 3), torch.tensor(group_mask), torch.ones(2, dtype=bool))
    value = penalty(*args, anchor=torch.tensor(anchor))
    assert value.item() == pytest.approx(np.mean(expected), rel=1e-9)
    value.backward()
    assert tensor.grad[:, 0].abs().sum() > 0  # the persona-free answer is held to the reference model too
    with pytest.raises(ValueError, match="needs the reference model's distribution"):
        penalty(*args)
    with pytest.raises(ValueError, match="anchor"):
        penalty(*args, anchor=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="AnchoredToReference.anchor: expected one of current, reference_model"):
        AnchoredToReference(anchor="neutral")


@pytest.mark.parametrize("temperature", [0.0, 0.25, 1.0])
def test_sharpened_anchor_matches_numpy(temperature):
    """KL(q || p_g) with q = softmax(log p_ref / T) over the valid options; T = 0: the cross-entropy of each persona
    to the reference group's argmax."""
    from trialign.modules.penalties import AnchoredToReference

    rng = np.random.default_rng(11)
    logits = rng.normal(-5, 3, size=(3, 4, 3))
    option_mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=bool)
    logits[1, 0, 2] = 50.0  # a padded option larger than every valid one: never the argmax
    group_mask = np.ones((3, 4), dtype=bool)
    group_mask[0, 2] = False
    expected = []
    for b in range(3):
        x = logits[b][:, option_mask[b]]
        log_p = x - x.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        if temperature == 0:
            q = np.eye(len(log_p[0]))[np.argmax(log_p[0])]
        else:
            z = log_p[0] / temperature
            q = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        kls = [(q * (np.log(np.where(q > 0, q, 1)) - log_p[g])).sum() for g in (1, 2, 3) if group_mask[b, g]]
        expected.append(np.mean(kls))
    tensor = torch.tensor(logits, requires_grad=True)
    value = AnchoredToReference(reference_index=0, temperature=temperature)(
        tensor, torch.tensor(option_mask), torch.zeros(3, 4), torch.tensor(group_mask), torch.ones(3, dtype=bool))
    assert value.item() == pytest.approx(np.mean(expected), rel=1e-9)
    value.backward()
    assert tensor.grad[:, 0].abs().sum() == 0 and torch.isfinite(tensor.grad).all()
    with pytest.raises(ValueError, match="AnchoredToReference.temperature: expected a number >= 0, got -1"):
        AnchoredToReference(temperature=-1)


def test_anchored_penalty_needs_the_reference_group(tiny_model_dir):
    from trialign.errors import TriAlignError
    from trialign.modules.aggregators import NashSocialWelfare
    from trialign.modules.objectives import AdvantageWeighted
    from trialign.modules.penalties import AnchoredToReference
    from trialign.modules.trialign_module import TriAlignModule
    from trialign.modules.values import MonteCarlo

    make = lambda reference: TriAlignModule(["teen", "neutral"], MonteCarlo(), AdvantageWeighted(),  # noqa: E731
                                            NashSocialWelfare(), CombinedPenalty(options=AnchoredToReference()),
                                            model=tiny_model_dir, reference_group=reference)
    with pytest.raises(TriAlignError, match="model.penalty: AnchoredToReference needs model.reference_group"):
        make(None)
    assert make("neutral").penalty.options.reference_index == 1
