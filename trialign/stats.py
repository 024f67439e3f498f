"""Bootstrap confidence intervals over items (DESIGN.md, "Metrics": every reported number comes with a CI).

`bootstrap_ci` is the plain *percentile* bootstrap (Efron & Tibshirani 1993, ch. 13): resample the N items with
replacement, recompute the statistic on each resample, and report the ``(1 − confidence)/2`` and
``(1 + confidence)/2`` quantiles of the resampled values (NumPy's default linear interpolation) around the
statistic on the full data. Items — not (item, group) pairs — are the resampling unit, because the groups of one
item are coupled (consistency and breakage compare them). No bias correction or acceleration (BCa): the audit
statistics are rates and means, for which the percentile interval is the customary choice.

`paired_bootstrap` gives the interval of a *difference* between two methods evaluated on the same items: the items
are resampled jointly, so what the methods share (the items' difficulty) cancels.

All resample indices are drawn at once as an ``[n_resamples, N]`` integer array from
``numpy.random.default_rng(seed)``, so the result is a pure function of the data and the seed. With
``vectorized=True`` the statistic sees many resamples per call (leading axis); the functions in
`trialign.functional` support that directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from trialign.errors import TriAlignError, require

SCALAR_KEY = "value"
"""Result key used when the statistic returns a single number instead of a dict."""

_MAX_ELEMENTS_PER_CHUNK = 1 << 24
"""Vectorized mode evaluates resamples in chunks of at most this many gathered data elements (~64-128 MB)."""


def _as_float_dict(value: Any, where: str) -> dict[str, float]:
    items = value.items() if isinstance(value, Mapping) else [(SCALAR_KEY, value)]
    out: dict[str, float] = {}
    for key, v in items:
        array = np.asarray(_to_numpy(v), dtype=np.float64)
        if array.size != 1:
            raise TriAlignError(f"statistic: expected a number for {key!r} {where}, got shape {array.shape}")
        out[str(key)] = float(array.reshape(()))
    return out


def _to_numpy(value: Any) -> Any:
    # torch tensors (possibly on a GPU) come back from the functional metrics; avoid importing torch here.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    return value


def _as_array_dict(value: Any, count: int) -> dict[str, np.ndarray]:
    items = value.items() if isinstance(value, Mapping) else [(SCALAR_KEY, value)]
    out: dict[str, np.ndarray] = {}
    for key, v in items:
        array = np.asarray(_to_numpy(v), dtype=np.float64)
        if array.shape != (count,):
            raise TriAlignError(
                f"statistic: with vectorized=True expected one value per resample, shape ({count},), "
                f"for {key!r}, got {array.shape}"
            )
        out[str(key)] = array
    return out


def resample_indices(num_items: int, n_resamples: int, seed: int) -> np.ndarray:
    """The ``[n_resamples, num_items]`` item indices (drawn with replacement) used by `bootstrap_ci`."""
    return np.random.default_rng(seed).integers(0, num_items, size=(n_resamples, num_items))


def bootstrap_ci(
    statistic: Callable[[dict[str, np.ndarray]], float | Mapping[str, float]],
    data: Mapping[str, np.ndarray],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    vectorized: bool = False,
) -> dict[str, tuple[float, float, float]]:
    """Percentile-bootstrap CIs over items: ``{name: (point, low, high)}``.

    Args:
        statistic: maps a dict of arrays (same keys as `data`, first axis = items) to a number or a dict of
            numbers (0-d tensors are fine). A single number is reported under the key ``"value"``.
        data: arrays whose first axis indexes the same N >= 1 items (e.g. ``correct`` [N, G]).
        n_resamples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling; equal seeds give equal intervals.
        vectorized: call `statistic` on a chunk of resamples at once: it then gets arrays ``[R, N, ...]`` and must
            return one value per resample (shape ``[R]``, or a dict of them).

    ``point`` is the statistic on the full data; ``low``/``high`` are the percentile interval of the resampled
    statistics. Resamples on which a value is NaN (e.g. a rate whose denominator happens to be empty) are left out
    of that value's quantiles; if all are NaN, the bounds are NaN.
    """
    require(isinstance(data, Mapping) and len(data) > 0, "data: expected a non-empty dict of arrays")
    arrays = {str(key): np.asarray(value) for key, value in data.items()}
    sizes = {key: (array.shape[0] if array.ndim else None) for key, array in arrays.items()}
    num_items = next(iter(sizes.values()))
    require(
        num_items is not None and num_items >= 1 and all(size == num_items for size in sizes.values()),
        f"data: expected arrays sharing a first (item) axis of length >= 1, got lengths {sizes}",
    )
    require(int(n_resamples) >= 1, f"n_resamples: expected >= 1, got {n_resamples}")
    require(0.0 < confidence < 1.0, f"confidence: expected a number in (0, 1), got {confidence}")

    point = _as_float_dict(statistic(arrays), "on the full data")
    indices = resample_indices(num_items, int(n_resamples), seed)
    if vectorized:
        resampled = _vectorized_values(statistic, arrays, indices)
    else:
        rows = [_as_float_dict(statistic({k: a[row] for k, a in arrays.items()}), "on a resample") for row in indices]
        resampled = {key: np.array([row[key] for row in rows], dtype=np.float64) for key in point}
    require(
        set(resampled) == set(point),
        f"statistic: returned keys {sorted(resampled)} on resamples but {sorted(point)} on the full data",
    )

    return {key: (value, *_percentile_interval(resampled[key], confidence)) for key, value in point.items()}


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of resampled values, NaN resamples left out (NaN bounds if all are NaN)."""
    if np.isnan(values).all():
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _vectorized_values(
    statistic: Callable[[dict[str, np.ndarray]], Any], arrays: dict[str, np.ndarray], indices: np.ndarray
) -> dict[str, np.ndarray]:
    """The statistic on every resample, evaluated chunk by chunk on ``[R, N, ...]`` gathered arrays."""
    elements_per_resample = sum(max(array.size, 1) for array in arrays.values())
    chunk = max(1, _MAX_ELEMENTS_PER_CHUNK // elements_per_resample)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, indices.shape[0], chunk):
        rows = indices[start : start + chunk]
        parts.append(_as_array_dict(statistic({k: a[rows] for k, a in arrays.items()}), rows.shape[0]))
    require(
        all(set(part) == set(parts[0]) for part in parts),
        "statistic: returned different keys on different chunks of resamples",
    )
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def paired_bootstrap(
    statistic: Callable[[dict[str, np.ndarray]], float | Mapping[str, float]],
    data_a: Mapping[str, np.ndarray],
    data_b: Mapping[str, np.ndarray],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    vectorized: bool = False,
) -> dict[str, tuple[float, float, float]]:
    """Percentile-bootstrap CIs of ``statistic(a) − statistic(b)`` for two methods evaluated on the *same* N items
    (row n of every array of `data_a` and `data_b` is the same item): ``{name: (difference, low, high)}``.

    The items are resampled jointly — one index draw serves both methods — so the interval is that of the paired
    difference, much narrower than the two methods' own intervals when their per-item outcomes are correlated (as
    they are for two adapters of one model). Same arguments and conventions as `bootstrap_ci`.
    """
    require(set(data_a) == set(data_b), f"data_b: expected the keys of data_a {sorted(data_a)}, got {sorted(data_b)}")
    joint = {**{f"a\0{k}": v for k, v in data_a.items()}, **{f"b\0{k}": v for k, v in data_b.items()}}

    def difference(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        first = statistic({k[2:]: v for k, v in arrays.items() if k.startswith("a\0")})
        second = statistic({k[2:]: v for k, v in arrays.items() if k.startswith("b\0")})
        if not isinstance(first, Mapping):
            first, second = {SCALAR_KEY: first}, {SCALAR_KEY: second}
        return {key: _to_numpy(first[key]) - _to_numpy(second[key]) for key in first}

    return bootstrap_ci(difference, joint, n_resamples=n_resamples, confidence=confidence, seed=seed,
                        vectorized=vectorized)


def pooled_paired_bootstrap(
    statistic: Callable[[dict[str, np.ndarray]], Any],
    replicas_a: Sequence[Mapping[str, np.ndarray]],
    replicas_b: Sequence[Mapping[str, np.ndarray]],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Percentile-bootstrap CIs of the difference of two methods' statistics, each the mean over its *replicas* (the
    same method trained with different seeds), all evaluated on the same N items: ``{name: (difference, low, high)}``.

    A method's result depends on its training seed as well as on the items, so both are resampled. Each resample
    draws the items once for every replica of both methods (the `paired_bootstrap` draw, the same indices for the
    same `seed`), and, for each method on its own, its replicas with replacement; the resampled value is the mean of
    the statistic over the drawn replicas minus the same for the other method. With one replica each this is
    `paired_bootstrap`. With few replicas the seed part of the interval is coarse: like any bootstrap of a mean of k
    values, it is narrower than the usual standard error by sqrt((k-1)/k) (0.82 for three seeds); more seeds
    sharpen it.

    `statistic` is vectorized (arrays ``[R, N, ...]`` in, one value per resample out, as with
    ``vectorized=True``); each replica maps the keys to arrays whose first axis is the same N items.
    """
    require(len(replicas_a) >= 1 and len(replicas_b) >= 1, "replicas: expected at least one per method")
    keys = set(replicas_a[0])
    for name, replicas in (("replicas_a", replicas_a), ("replicas_b", replicas_b)):
        for replica in replicas:
            require(set(replica) == keys, f"{name}: expected every replica to hold the keys {sorted(keys)}, "
                                          f"got {sorted(replica)}")
    all_arrays = [{str(k): np.asarray(v) for k, v in r.items()} for r in (*replicas_a, *replicas_b)]
    lengths = {a.shape[0] if a.ndim else None for r in all_arrays for a in r.values()}
    require(len(lengths) == 1 and None not in lengths and next(iter(lengths)) >= 1,
            "replicas: expected arrays sharing a first (item) axis of length >= 1, got lengths "
            f"{sorted(lengths, key=str)}")
    require(int(n_resamples) >= 1, f"n_resamples: expected >= 1, got {n_resamples}")
    require(0.0 < confidence < 1.0, f"confidence: expected a number in (0, 1), got {confidence}")
    num_items = next(iter(lengths))
    indices = resample_indices(num_items, int(n_resamples), seed)
    whole = np.arange(num_items)[None, :]
    points = [_vectorized_values(statistic, arrays, whole) for arrays in all_arrays]
    resampled = [_vectorized_values(statistic, arrays, indices) for arrays in all_arrays]
    names = list(points[0])
    require(all(set(p) == set(names) for p in points + resampled),
            "statistic: returned different keys for different replicas")
    draw = np.random.default_rng([seed, 1])  # the replicas' draw, independent of the items'
    count_a = len(replicas_a)
    pick_a = draw.integers(0, count_a, size=(int(n_resamples), count_a))
    pick_b = draw.integers(0, len(replicas_b), size=(int(n_resamples), len(replicas_b)))
    out: dict[str, tuple[float, float, float]] = {}
    for key in names:
        point_a = np.mean([p[key][0] for p in points[:count_a]])
        point_b = np.mean([p[key][0] for p in points[count_a:]])
        table_a = np.stack([r[key] for r in resampled[:count_a]], axis=1)  # [R, replicas]
        table_b = np.stack([r[key] for r in resampled[count_a:]], axis=1)
        diffs = (np.take_along_axis(table_a, pick_a, axis=1).mean(1)
                 - np.take_along_axis(table_b, pick_b, axis=1).mean(1))
        out[key] = (float(point_a - point_b), *_percentile_interval(diffs, confidence))
    return out
