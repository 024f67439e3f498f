"""The truth term on cross-group states (`trialign.modules.truth`) against a NumPy computation."""

from __future__ import annotations

import numpy as np
import torch

from trialign.modules.truth import expected_truth, truth_loss


def numpy_reference(option_logprobs, option_mask, correct, group_mask, has_options):
    B, G, _ = option_logprobs.shape
    loss, mean, present = np.zeros(G), np.zeros(G), np.zeros(G, dtype=bool)
    for g in range(G):
        logs, probs = [], []
        for b in range(B):
            if not (group_mask[b, g] and has_options[b] and correct[b].any()):
                continue
            x = option_logprobs[b, g][option_mask[b]]
            p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
            gold = p[correct[b][option_mask[b]]].sum()
            logs.append(np.log(gold))
            probs.append(gold)
        if logs:
            loss[g], mean[g], present[g] = -np.mean(logs), np.mean(probs), True
    return loss, mean, present


def test_truth_loss_and_expected_truth_match_numpy():
    rng = np.random.default_rng(0)
    B, G, O = 5, 3, 4
    option_logprobs = rng.normal(-10, 4, size=(B, G, O))
    option_mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=bool)
    option_logprobs[~np.broadcast_to(option_mask[:, None, :], (B, G, O))] = np.nan  # padding may hold anything
    correct = np.zeros((B, O), dtype=bool)
    correct[0, 2] = correct[1, 0] = correct[1, 1] = correct[2, 1] = correct[3, 3] = True  # item 1: two correct
    group_mask = np.ones((B, G), dtype=bool)
    group_mask[3, 1] = False  # group 1 not probed on item 3
    has_options = np.array([True, True, True, True, False])  # item 4 is free-form: not counted
    args = [torch.tensor(a) for a in (option_logprobs, option_mask, correct, group_mask, has_options)]
    loss, present = truth_loss(*args)
    mean, mean_present = expected_truth(*args)
    ref_loss, ref_mean, ref_present = numpy_reference(option_logprobs, option_mask, correct, group_mask, has_options)
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-6)
    assert present.tolist() == mean_present.tolist() == ref_present.tolist() == [True, True, True]


def test_truth_loss_gradient_raises_the_gold_option():
    logits = torch.tensor([[[-3.0, -1.0, -2.0]]], requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    correct = torch.tensor([[False, False, True]])
    loss, _ = truth_loss(logits, mask, correct, torch.ones(1, 1, dtype=torch.bool), torch.tensor([True]))
    loss.sum().backward()
    assert logits.grad[0, 0, 2] < 0 and logits.grad[0, 0, 1] > 0 and logits.grad[0, 0, 0] > 0


def test_groups_without_states_are_absent_and_zero():
    logits = torch.zeros(2, 2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    correct = torch.tensor([[True, False], [False, True]])
    group_mask = torch.tensor([[True, False], [True, False]])
    loss, present = truth_loss(logits, mask, correct, group_mask, torch.tensor([True, True]))
    assert present.tolist() == [True, False] and loss[1].item() == 0.0
    assert abs(loss[0].item() - np.log(2.0)) < 1e-6
