"""Cross-group metrics: torchmetrics classes and functional twins against NumPy references and a hand example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from trialign import functional as F
from trialign.errors import TriAlignError
from trialign.metrics import (
    BreakageRate,
    ConsistencyRate,
    ConsistentCorrectRate,
    CrossGroupDisparity,
    FlipRate,
    GroupAccuracy,
    GroupPersonalization,
    NashWelfare,
    audit_metrics,
    flatten_results,
)

GROUPS = ("none", "young", "old")
EPS = 1e-6


# ------------------------------------------------------------------------------------------ NumPy references
def ref_accuracy(correct):
    return correct.mean(axis=0)


def ref_disparity(correct):
    acc = ref_accuracy(correct)
    return {"acc_worst": acc.min(), "acc_gap": acc.max() - acc.min(), "acc_std": np.std(acc, ddof=0)}


def ref_consistency(answers):
    return np.mean([len(set(row)) == 1 for row in answers.tolist()])


def ref_consistent_correct(answers, correct):
    return np.mean([len(set(a)) == 1 and all(c) for a, c in zip(answers.tolist(), correct.tolist())])


def ref_breakage(correct, reference):
    num_items, num_groups = correct.shape
    on_reference = [i for i in range(num_items) if correct[i, reference]]
    rates = np.zeros(num_groups)
    for g in range(num_groups):
        if g != reference:
            wrong = sum(1 for i in on_reference if not correct[i, g])
            rates[g] = wrong / len(on_reference) if on_reference else math.nan
    others = [rates[g] for g in range(num_groups) if g != reference]
    return {"breakage": rates, "breakage_mean": float(np.mean(others))}


def ref_flip(before, after, challenged):
    num_items, num_groups = before.shape
    flips, counts = np.zeros(num_groups), np.zeros(num_groups)
    for i in range(num_items):
        for g in range(num_groups):
            if challenged[i, g]:
                counts[g] += 1
                flips[g] += before[i, g] != after[i, g]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"flip": flips / counts, "flip_mean": flips.sum() / counts.sum(),
                "consistency_after_challenge": ref_consistency(after)}


def ref_nash(utility, eps=EPS):
    return float(sum(math.log(max(u, eps)) for u in utility.mean(axis=0)))


def random_inputs(seed: int, num_items: int = 40, num_groups: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Few answer ids so that some items are consistent; correctness tied to answer 0 as the gold.
    answers = rng.integers(0, 2, size=(num_items, num_groups))
    answers[rng.random(num_items) < 0.4] = answers[0, 0]  # force some all-equal rows
    return {
        "correct": answers == 0,
        "answers": answers,
        "personalization": rng.random((num_items, num_groups)).astype(np.float32),
        "utility": (rng.random((num_items, num_groups)) * 1.5).astype(np.float32),
        "answers_before": answers,
        "answers_after": rng.integers(0, 2, size=(num_items, num_groups)),
        "challenged": rng.random((num_items, num_groups)) < 0.6,
    }


def batches(data: dict[str, np.ndarray], sizes: list[int]):
    start = 0
    for size in sizes:
        yield {k: torch.as_tensor(v[start : start + size]) for k, v in data.items()}
        start += size


def close(actual, expected, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               atol=atol, rtol=1e-5, equal_nan=True)


def make_all():
    """Each metric with the update keys it takes."""
    return [
        (GroupAccuracy(GROUPS), ("correct",)),
        (CrossGroupDisparity(GROUPS), ("correct",)),
        (ConsistencyRate(GROUPS), ("answers",)),
        (ConsistentCorrectRate(GROUPS), ("answers", "correct")),
        (BreakageRate(GROUPS, reference="none"), ("correct",)),
        (FlipRate(GROUPS), ("answers_before", "answers_after", "challenged")),
        (GroupPersonalization(GROUPS), ("personalization",)),
        (NashWelfare(GROUPS), ("utility",)),
    ]


def reference_value(metric, data):
    if isinstance(metric, CrossGroupDisparity):
        return ref_disparity(data["correct"])
    if isinstance(metric, GroupAccuracy):
        return ref_accuracy(data["correct"])
    if isinstance(metric, ConsistencyRate):
        return ref_consistency(data["answers"])
    if isinstance(metric, ConsistentCorrectRate):
        return ref_consistent_correct(data["answers"], data["correct"])
    if isinstance(metric, BreakageRate):
        return ref_breakage(data["correct"], 0)
    if isinstance(metric, FlipRate):
        return ref_flip(data["answers_before"], data["answers_after"], data["challenged"])
    if isinstance(metric, GroupPersonalization):
        return data["personalization"].mean(axis=0)
    return ref_nash(data["utility"])


def assert_same(actual, expected):
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            close(actual[key], expected[key])
    else:
        close(actual, expected)


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metrics_match_numpy_reference_over_batches(seed):
    data = random_inputs(seed)
    for metric, keys in make_all():
        for batch in batches(data, [7, 13, 20]):
            metric.update(**{k: batch[k] for k in keys})
        assert_same(metric.compute(), reference_value(metric, data))


@pytest.mark.parametrize("seed", [0, 5])
def test_functional_twins_match_numpy_reference(seed):
    data = random_inputs(seed, num_items=25, num_groups=4)
    close(F.group_accuracy(data["correct"]), ref_accuracy(data["correct"]))
    assert_same(F.cross_group_disparity(data["correct"]), ref_disparity(data["correct"]))
    close(F.consistency_rate(data["answers"]), ref_consistency(data["answers"]))
    close(F.consistent_correct_rate(data["answers"], data["correct"]),
          ref_consistent_correct(data["answers"], data["correct"]))
    assert_same(F.breakage_rate(data["correct"], 2), ref_breakage(data["correct"], 2))
    assert_same(F.flip_rate(data["answers_before"], data["answers_after"], data["challenged"]),
                ref_flip(data["answers_before"], data["answers_after"], data["challenged"]))
    close(F.group_personalization(data["personalization"]), data["personalization"].mean(axis=0))
    close(F.nash_welfare(data["utility"]), ref_nash(data["utility"]))


def test_functional_leading_dimensions_equal_per_slice():
    stacked = {k: np.stack([random_inputs(s, num_items=15)[k] for s in range(4)]) for k in ("correct", "answers")}
    accuracy = F.group_accuracy(stacked["correct"])
    consistency = F.consistency_rate(stacked["answers"])
    breakage = F.breakage_rate(stacked["correct"], 1)
    assert accuracy.shape == (4, 3) and consistency.shape == (4,) and breakage["breakage_mean"].shape == (4,)
    for r in range(4):
        close(accuracy[r], F.group_accuracy(stacked["correct"][r]))
        close(consistency[r], F.consistency_rate(stacked["answers"][r]))
        close(breakage["breakage"][r], F.breakage_rate(stacked["correct"][r], 1)["breakage"])


# A tiny example computed by hand. Groups (none, young, old); gold answer is 1 for items 0-1 and 0 for items 2-3.
HAND = {
    "answers": np.array([[1, 1, 1], [1, 0, 1], [2, 2, 2], [0, 1, 1]]),
    "correct": np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 0, 0]], dtype=bool),
    "personalization": np.array([[1, 0.5, 0], [0, 0.5, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32),
    "utility": np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=np.float32),
    "answers_before": np.array([[1, 1, 1], [1, 0, 1], [2, 2, 2], [0, 1, 1]]),
    "answers_after": np.array([[1, 1, 1], [1, 1, 1], [0, 2, 2], [0, 1, 0]]),
    "challenged": np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1], [0, 0, 1]], dtype=bool),
}
HAND_EXPECTED = {
    "acc/none": 3 / 4, "acc/young": 1 / 4, "acc/old": 2 / 4,
    # mean 1/2, deviations (1/4, -1/4, 0): population variance (1/16 + 1/16) / 3 = 1/24
    "acc_worst": 1 / 4, "acc_gap": 1 / 2, "acc_std": math.sqrt(1 / 24),
    # items 0 and 2 are all-equal; only item 0 is all-equal and all-correct
    "consistency": 2 / 4, "consistent_correct": 1 / 4,
    # "none" is correct on items {0, 1, 3}; young is wrong on 1 and 3, old on 3
    "breakage/none": 0.0, "breakage/young": 2 / 3, "breakage/old": 1 / 3, "breakage_mean": 1 / 2,
    "personalization/none": 0.5, "personalization/young": 0.5, "personalization/old": 0.25,
    # mean utilities (3/4, 1/4, 0): the last is floored at eps
    "nash_welfare": math.log(0.75) + math.log(0.25) + math.log(1e-6),
    # none: challenged on 0,1,2, changed on 2; young: on 0,1, changed on 1; old: on 1,2,3, changed on 3
    "flip/none": 1 / 3, "flip/young": 1 / 2, "flip/old": 1 / 3, "flip_mean": 3 / 8,
    # after the challenge, items 0 and 1 are all-equal ([1, 1, 1] twice), items 2 and 3 are not
    "consistency_after_challenge": 2 / 4,
}


def test_hand_computed_example_through_the_collection():
    collection = audit_metrics(GROUPS, reference="none", with_flip_rate=True)
    collection.update(**{k: torch.as_tensor(v) for k, v in HAND.items()})
    flat = flatten_results(collection.compute(), GROUPS)
    assert set(flat) == set(HAND_EXPECTED)
    for key, expected in HAND_EXPECTED.items():
        assert flat[key] == pytest.approx(expected, abs=1e-6), key
    assert flat["nash_welfare"] == pytest.approx(-15.489486, abs=1e-5)


def test_audit_summary_equals_flattened_collection():
    data = random_inputs(7, num_items=30)
    collection = audit_metrics(GROUPS, reference="old", with_flip_rate=True)
    for batch in batches(data, [10, 10, 10]):
        collection.update(**batch)
    flat = flatten_results(collection.compute(), GROUPS)
    summary = F.audit_summary(data, GROUPS, reference="old")
    assert set(summary) == set(flat)
    for key in flat:
        assert float(summary[key]) == pytest.approx(flat[key], abs=1e-6, nan_ok=True), key


def test_collection_shares_accuracy_state_and_stays_correct_over_updates():
    data = random_inputs(3, num_items=36)
    collection = audit_metrics(GROUPS, reference="none")
    for batch in batches(data, [12, 12, 12]):
        collection.update(**{k: batch[k] for k in ("correct", "answers", "personalization", "utility")})
    groups = [sorted(members) for members in collection.compute_groups.values()]
    assert ["acc", "acc_disparity"] in groups
    result = collection.compute()
    close(result["acc"], ref_accuracy(data["correct"]))
    close(result["acc_gap"], ref_disparity(data["correct"])["acc_gap"])
    close(result["personalization"], data["personalization"].mean(axis=0))
    close(result["nash_welfare"], ref_nash(data["utility"]))


@pytest.mark.parametrize("seed", [0, 1])
def test_merged_metrics_equal_one_metric_over_all_data(seed):
    data = random_inputs(seed, num_items=30)
    first_half = {k: torch.as_tensor(v[:11]) for k, v in data.items()}
    second_half = {k: torch.as_tensor(v[11:]) for k, v in data.items()}
    for (whole, keys), (part_a, _), (part_b, _) in zip(make_all(), make_all(), make_all()):
        whole.update(**{k: torch.as_tensor(data[k]) for k in keys})
        part_a.update(**{k: first_half[k] for k in keys})
        part_b.update(**{k: second_half[k] for k in keys})
        part_a.merge_state(part_b)
        assert_same(part_a.compute(), whole.compute())


def test_states_are_per_group_sums_reduced_across_ranks():
    for metric, _ in make_all():
        assert metric.full_state_update is False
        assert metric._defaults, type(metric).__name__
        for name, default in metric._defaults.items():
            assert metric._reductions[name] is dim_zero_sum, f"{type(metric).__name__}.{name}"
            assert default.shape in ((len(GROUPS),), ()), f"{type(metric).__name__}.{name}: {default.shape}"


def test_distributed_sync_sums_the_other_rank_state():
    # Two "ranks": rank 0 syncs through a fake all-gather that returns [own state, rank 1 state] per state, in the
    # order torchmetrics gathers them; the synced result must equal one metric over both ranks' data.
    data = random_inputs(11, num_items=20)
    rank0_data = {k: torch.as_tensor(v[:8]) for k, v in data.items()}
    rank1_data = {k: torch.as_tensor(v[8:]) for k, v in data.items()}
    for (whole, keys), (rank1, _) in zip(make_all(), make_all()):
        pending: list[str] = []

        def gather(tensor, group=None, _rank1=rank1, _pending=pending):
            return [tensor, getattr(_rank1, _pending.pop(0))]

        rank0 = type(whole)(GROUPS, **({"reference": "none"} if isinstance(whole, BreakageRate) else {}),
                            dist_sync_fn=gather, distributed_available_fn=lambda: True)
        rank0.update(**{k: rank0_data[k] for k in keys})
        rank1.update(**{k: rank1_data[k] for k in keys})
        whole.update(**{k: torch.as_tensor(data[k]) for k in keys})
        pending.extend(rank0._reductions)
        assert_same(rank0.compute(), whole.compute())
        assert not pending


def test_zero_denominators_give_nan_and_reference_slot_zero():
    breakage = BreakageRate(GROUPS, reference="young")
    breakage.update(torch.tensor([[True, False, True], [True, False, False]]))
    result = breakage.compute()
    assert result["breakage"][1] == 0 and torch.isnan(result["breakage"][[0, 2]]).all()
    assert torch.isnan(result["breakage_mean"])

    flips = FlipRate(GROUPS)
    before, after = torch.tensor([[0, 0, 0], [1, 1, 1]]), torch.tensor([[1, 0, 0], [1, 1, 1]])
    flips.update(before, after, torch.tensor([[True, False, False], [True, False, False]]))
    result = flips.compute()
    close(result["flip"], [0.5, math.nan, math.nan])
    close(result["flip_mean"], 0.5)

    with pytest.warns(UserWarning, match="compute"):
        assert torch.isnan(GroupAccuracy(GROUPS).compute()).all()


def test_nash_welfare_eps_floor():
    metric = NashWelfare(["a", "b"], eps=1e-3)
    metric.update(torch.tensor([[0.0, 0.5], [0.0, 0.5]]))
    assert float(metric.compute()) == pytest.approx(math.log(1e-3) + math.log(0.5))
    with pytest.raises(TriAlignError, match="eps"):
        NashWelfare(["a"], eps=0.0)


def test_shape_and_input_errors_name_the_argument():
    accuracy = GroupAccuracy(["a", "b"])
    with pytest.raises(TriAlignError, match=r"`correct` must have shape \[B, G\] = \[B, 2\].*\(4, 3\)"):
        accuracy.update(torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TriAlignError, match=r"`correct` must have shape \[B, G\]"):
        accuracy.update(torch.ones(4, dtype=torch.bool))
    with pytest.raises(TriAlignError, match="`correct` must be bool"):
        accuracy.update(torch.full((2, 2), 0.5))
    with pytest.raises(TriAlignError, match=r"`correct` must have the same number of items as `answers` \(3\)"):
        ConsistentCorrectRate(["a", "b"]).update(torch.zeros(3, 2, dtype=torch.long), torch.ones(2, 2, dtype=bool))
    with pytest.raises(TriAlignError, match="`answers` must hold integer answer ids"):
        ConsistencyRate(["a", "b"]).update(torch.zeros(3, 2))
    with pytest.raises(TriAlignError, match=r"`personalization` must lie in \[0.0, 1.0\]"):
        GroupPersonalization(["a", "b"]).update(torch.full((1, 2), 1.5))
    with pytest.raises(TriAlignError, match=r"`answers_after` must have shape \[B, G\] = \[B, 2\]"):
        FlipRate(["a", "b"]).update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                                    torch.ones(2, 2, dtype=torch.bool))
    # integer 0/1 correctness (as stored in rollout rows) is accepted
    accuracy.update(torch.tensor([[1, 0]], dtype=torch.int8))
    close(accuracy.compute(), [1.0, 0.0])


def test_group_name_and_reference_errors():
    with pytest.raises(TriAlignError, match="group_names: expected at least one group"):
        GroupAccuracy([])
    with pytest.raises(TriAlignError, match="group_names: expected distinct names"):
        GroupAccuracy(["a", "a"])
    with pytest.raises(TriAlignError, match="group_names: expected a list"):
        GroupAccuracy("ab")
    with pytest.raises(TriAlignError, match=r"reference: expected one of group_names \['a', 'b'\], got 'c'"):
        BreakageRate(["a", "b"], reference="c")
    with pytest.raises(TriAlignError, match="breakage needs a group besides the reference"):
        BreakageRate(["a"], reference="a")
    single = audit_metrics(["only"])
    single.update(correct=torch.tensor([[True], [False]]), answers=torch.tensor([[0], [1]]),
                  personalization=torch.tensor([[0.5], [1.0]]), utility=torch.tensor([[1.0], [0.0]]))
    flat = flatten_results(single.compute(), ["only"])
    assert flat["acc/only"] == 0.5 and flat["acc_gap"] == 0.0 and flat["consistency"] == 1.0


def test_flatten_results_names_and_errors():
    flat = flatten_results({"acc": torch.tensor([0.5, 0.75]), "acc_gap": torch.tensor(0.25),
                            "breakage": {"breakage_mean": 0.1}}, ["a", "b"])
    assert flat == {"acc/a": 0.5, "acc/b": 0.75, "acc_gap": 0.25, "breakage_mean": pytest.approx(0.1)}
    with pytest.raises(TriAlignError, match=r"results\['acc'\]: expected a scalar or one value per group \(2\)"):
        flatten_results({"acc": torch.zeros(3)}, ["a", "b"])
