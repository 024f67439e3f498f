"""Percentile bootstrap over items: coverage of the point, width, determinism, and agreement with a naive loop."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest

from trialign import stats
from trialign.errors import TriAlignError
from trialign.functional import audit_summary
from trialign.stats import bootstrap_ci


def mean_correct(data):
    return float(data["correct"].mean())


def bernoulli(num_items: int, p: float = 0.3, seed: int = 0) -> dict[str, np.ndarray]:
    return {"correct": np.random.default_rng(seed).random(num_items) < p}


def naive_percentile_bootstrap(statistic, data, n_resamples, confidence, seed):
    """One resample at a time: draw N indices, recompute, then take the percentiles."""
    rng = np.random.default_rng(seed)
    num_items = len(next(iter(data.values())))
    values = []
    for _ in range(n_resamples):
        rows = rng.integers(0, num_items, size=num_items)
        values.append(statistic({k: v[rows] for k, v in data.items()}))
    tail = (1 - confidence) / 2
    ordered = np.sort(values)
    # Linear interpolation between order statistics, written out (NumPy's default "linear" quantile).
    bounds = []
    for q in (tail, 1 - tail):
        position = q * (n_resamples - 1)
        below, above = math.floor(position), math.ceil(position)
        bounds.append(ordered[below] + (ordered[above] - ordered[below]) * (position - below))
    return statistic(data), bounds[0], bounds[1]


def test_matches_naive_loop_on_a_small_case():
    data = {"correct": np.array([1, 0, 1, 1, 0, 1, 0], dtype=bool)}
    got = bootstrap_ci(mean_correct, data, n_resamples=50, confidence=0.9, seed=3)
    want = naive_percentile_bootstrap(mean_correct, data, 50, 0.9, 3)
    assert set(got) == {"value"}
    np.testing.assert_allclose(got["value"], want, rtol=0, atol=1e-12)


def test_interval_contains_point_and_matches_normal_approximation():
    data = bernoulli(2000)
    point, low, high = bootstrap_ci(mean_correct, data, n_resamples=2000, seed=1)["value"]
    assert low < point < high
    assert point == pytest.approx(data["correct"].mean())
    # For a mean of 0/1 values the 95% interval is about p ± 1.96·sqrt(p(1−p)/N).
    half_width = 1.96 * math.sqrt(point * (1 - point) / 2000)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)


def test_interval_narrows_with_more_items():
    small = bootstrap_ci(mean_correct, bernoulli(100, seed=4), n_resamples=500)["value"]
    large = bootstrap_ci(mean_correct, bernoulli(2500, seed=4), n_resamples=500)["value"]
    # The width scales like 1/sqrt(N): 25x the items, about 1/5 the width.
    assert (large[2] - large[1]) < 0.4 * (small[2] - small[1])


def test_deterministic_for_a_seed():
    data = bernoulli(300, seed=2)
    first = bootstrap_ci(mean_correct, data, n_resamples=200, seed=7)
    assert bootstrap_ci(mean_correct, data, n_resamples=200, seed=7) == first
    assert bootstrap_ci(mean_correct, data, n_resamples=200, seed=8) != first


def test_confidence_widens_interval():
    data = bernoulli(400, seed=5)
    _, low90, high90 = bootstrap_ci(mean_correct, data, n_resamples=400, confidence=0.9)["value"]
    _, low99, high99 = bootstrap_ci(mean_correct, data, n_resamples=400, confidence=0.99)["value"]
    assert low99 <= low90 and high90 <= high99 and (high99 - low99) > (high90 - low90)


def test_audit_summary_vectorized_equals_loop_and_resamples_whole_items(monkeypatch):
    rng = np.random.default_rng(0)
    groups = ["none", "a", "b"]
    answers = rng.integers(0, 3, size=(60, 3))
    answers[:20] = answers[:20, :1]  # a third of the items are consistent
    data = {"correct": answers == 0, "answers": answers, "utility": rng.random((60, 3))}
    statistic = partial(audit_summary, group_names=groups, reference="none")
    loop = bootstrap_ci(statistic, data, n_resamples=120, seed=4)
    vectorized = bootstrap_ci(statistic, data, n_resamples=120, seed=4, vectorized=True)
    monkeypatch.setattr(stats, "_MAX_ELEMENTS_PER_CHUNK", 60 * 3 * 3 * 7)  # 7 resamples per chunk, last one short
    chunked = bootstrap_ci(statistic, data, n_resamples=120, seed=4, vectorized=True)
    assert chunked == vectorized
    assert set(loop) == set(vectorized) >= {"acc/a", "acc_gap", "breakage_mean", "consistency", "nash_welfare"}
    for key in loop:
        np.testing.assert_allclose(loop[key], vectorized[key], rtol=1e-6, atol=1e-6, err_msg=key)
    point, low, high = loop["consistency"]
    assert point == pytest.approx(np.mean([len(set(row)) == 1 for row in answers.tolist()]))
    assert low <= point <= high


def test_nan_resamples_are_left_out_of_the_quantiles():
    data = {"x": np.arange(10.0)}

    def mean_or_nan_without_zero(d):
        return float(d["x"].mean()) if (d["x"] == 0).any() else math.nan

    point, low, high = bootstrap_ci(mean_or_nan_without_zero, data, n_resamples=200)["value"]
    assert point == 4.5 and not math.isnan(low) and low <= high
    all_nan = bootstrap_ci(lambda d: math.nan, data, n_resamples=20)["value"]
    assert math.isnan(all_nan[1]) and math.isnan(all_nan[2])


def test_input_errors():
    with pytest.raises(TriAlignError, match="data: expected arrays sharing a first"):
        bootstrap_ci(mean_correct, {"correct": np.ones(3), "other": np.ones(4)})
    with pytest.raises(TriAlignError, match="data: expected a non-empty dict"):
        bootstrap_ci(mean_correct, {})
    with pytest.raises(TriAlignError, match=r"confidence: expected a number in \(0, 1\)"):
        bootstrap_ci(mean_correct, bernoulli(5), confidence=95)
    with pytest.raises(TriAlignError, match="n_resamples: expected >= 1"):
        bootstrap_ci(mean_correct, bernoulli(5), n_resamples=0)
    with pytest.raises(TriAlignError, match="statistic: expected a number for 'value'"):
        bootstrap_ci(lambda d: d["correct"], bernoulli(5))
    with pytest.raises(TriAlignError, match=r"vectorized=True expected one value per resample, shape \(10,\)"):
        bootstrap_ci(mean_correct, bernoulli(5), n_resamples=10, vectorized=True)


def test_paired_bootstrap_matches_a_numpy_reference():
    from trialign.stats import paired_bootstrap

    rng = np.random.default_rng(3)
    hard = rng.random(40) < 0.5  # shared item difficulty: both methods fail the hard items more often
    a = (rng.random(40) < np.where(hard, 0.3, 0.9)).astype(float)
    b = (rng.random(40) < np.where(hard, 0.1, 0.8)).astype(float)
    result = paired_bootstrap(lambda d: d["x"].mean(-1), {"x": a}, {"x": b}, n_resamples=500, seed=7,
                              vectorized=True)
    diff, low, high = result["value"]
    # Reference: the same index draw applied to both arrays, the difference of the means per resample.
    idx = np.random.default_rng(7).integers(0, 40, size=(500, 40))
    diffs = a[idx].mean(1) - b[idx].mean(1)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert (low, high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
    # Paired is narrower than the two unpaired intervals combined would suggest.
    unpaired = np.random.default_rng(8).integers(0, 40, size=(500, 40))
    independent = a[idx].mean(1) - b[unpaired].mean(1)
    assert high - low < np.subtract(*np.quantile(independent, [0.975, 0.025]))


def test_paired_bootstrap_needs_the_same_keys():
    from trialign.stats import paired_bootstrap

    with pytest.raises(TriAlignError, match="data_b: expected the keys of data_a"):
        paired_bootstrap(lambda d: d["x"].mean(), {"x": np.ones(3)}, {"y": np.ones(3)})


def test_pooled_paired_bootstrap_resamples_items_jointly_and_each_methods_seeds_against_a_numpy_reference():
    from trialign.stats import paired_bootstrap, pooled_paired_bootstrap

    rng = np.random.default_rng(5)
    hard = rng.random(30) < 0.5
    # Three seeds of method a (the seed shifts its success rate), two of method b, on the same 30 items.
    a = [(rng.random(30) < np.where(hard, 0.3, 0.9) - shift).astype(float) for shift in (0.0, 0.1, 0.2)]
    b = [(rng.random(30) < np.where(hard, 0.1, 0.7)).astype(float) for _ in range(2)]
    mean = lambda d: d["x"].mean(-1)  # noqa: E731
    result = pooled_paired_bootstrap(mean, [{"x": x} for x in a], [{"x": x} for x in b], n_resamples=400, seed=3)
    diff, low, high = result["value"]
    assert diff == pytest.approx(np.mean([x.mean() for x in a]) - np.mean([x.mean() for x in b]))
    # Reference: one item draw for all five arrays; per resample, each method's seeds drawn with replacement.
    idx = np.random.default_rng(3).integers(0, 30, size=(400, 30))
    seeds = np.random.default_rng([3, 1])
    pick_a, pick_b = seeds.integers(0, 3, size=(400, 3)), seeds.integers(0, 2, size=(400, 2))
    diffs = [np.mean([a[k][idx[r]].mean() for k in pick_a[r]]) - np.mean([b[k][idx[r]].mean() for k in pick_b[r]])
             for r in range(400)]
    assert (low, high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
    # The seeds' spread widens the interval beyond that of the items alone (every seed of a pooled per item).
    items_only = paired_bootstrap(mean, {"x": np.mean(a, 0)}, {"x": np.mean(b, 0)}, n_resamples=400, seed=3,
                                  vectorized=True)["value"]
    assert high - low > items_only[2] - items_only[1]
    # One replica each: exactly the paired bootstrap.
    single = pooled_paired_bootstrap(mean, [{"x": a[0]}], [{"x": b[0]}], n_resamples=400, seed=3)["value"]
    paired = paired_bootstrap(mean, {"x": a[0]}, {"x": b[0]}, n_resamples=400, seed=3, vectorized=True)["value"]
    assert single == pytest.approx(paired)
    with pytest.raises(TriAlignError, match="replicas_b: expected every replica to hold the keys"):
        pooled_paired_bootstrap(mean, [{"x": a[0]}], [{"y": b[0]}])
    with pytest.raises(TriAlignError, match="first .item. axis"):
        pooled_paired_bootstrap(mean, [{"x": a[0]}], [{"x": b[0][:5]}])
