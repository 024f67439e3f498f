"""Cross-group truth metrics as torchmetrics `Metric`s (DESIGN.md, "Metrics").

Each class follows torchmetrics' own pattern (``regression/mae.py``, ``classification/group_fairness.py``): its
state is a few count/sum tensors — one slot per group (shape ``[G]``) for per-group quantities, one number for
per-item quantities (consistency counts, reference-correct items) — all registered with ``dist_reduce_fx="sum"``,
so states from several batches, ``merge_state`` or DDP ranks simply add up; ``full_state_update=False``; and
``compute`` calls the functional twin in `trialign.functional`, which documents the formulas and the conventions
chosen where the paper is silent (NaN for a zero denominator, population std, the Nash-welfare floor ``eps``).

Every ``update`` takes ``[B, G]`` inputs: B items of a batch × the G groups named in ``group_names``, in that
order. (As everywhere in torchmetrics, ``compute`` squeezes one-element results, so a ``[G]`` result is 0-d
when G = 1.) `audit_metrics` bundles the metrics into a `MetricCollection` whose ``update`` takes them all as keywords,
and `flatten_results` turns its output into flat ``name/<group>`` floats for TensorBoard tags and JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from trialign.errors import TriAlignError, require
from trialign.functional import (
    NASH_WELFARE_EPS,
    _breakage_rate_compute,
    _breakage_rate_update,
    _consistency_rate_compute,
    _consistency_rate_update,
    _consistent_correct_rate_compute,
    _consistent_correct_rate_update,
    _cross_group_disparity_compute,
    _flip_rate_compute,
    _flip_rate_update,
    _group_accuracy_compute,
    _group_accuracy_update,
    _group_personalization_compute,
    _group_personalization_update,
    _nash_welfare_compute,
    _nash_welfare_update,
)


def check_group_names(group_names: Sequence[str]) -> tuple[str, ...]:
    """`group_names` as a tuple, after checking it is a non-empty sequence of distinct non-empty strings."""
    require(
        not isinstance(group_names, str) and isinstance(group_names, Sequence),
        f"group_names: expected a list of group names, got {group_names!r}",
    )
    names = tuple(group_names)
    require(len(names) >= 1, "group_names: expected at least one group, got none")
    require(
        all(isinstance(name, str) and name for name in names),
        f"group_names: expected non-empty strings, got {list(names)}",
    )
    require(len(set(names)) == len(names), f"group_names: expected distinct names, got {list(names)}")
    return names


class _GroupMetric(Metric):
    """Holds the group names and checks that batches are ``[B, G]``."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, group_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group_names = check_group_names(group_names)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def _add_group_state(self, name: str, dtype: torch.dtype) -> None:
        self.add_state(name, default=torch.zeros(self.num_groups, dtype=dtype), dist_reduce_fx="sum")

    def _add_item_state(self, name: str) -> None:
        self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _check_batch(self, **inputs: Any) -> dict[str, Tensor]:
        """Each input as a tensor, after checking it is ``[B, G]`` with the same B for all of them."""
        checked: dict[str, Tensor] = {}
        batch_size: int | None = None
        for name, value in inputs.items():
            tensor = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
            if tensor.ndim != 2 or tensor.shape[1] != self.num_groups:
                raise TriAlignError(
                    f"`{name}` must have shape [B, G] = [B, {self.num_groups}] (items × groups "
                    f"{list(self.group_names)}), got {tuple(tensor.shape)}"
                )
            if batch_size is not None and tensor.shape[0] != batch_size:
                first = next(iter(checked))
                raise TriAlignError(
                    f"`{name}` must have the same number of items as `{first}` ({batch_size}), got {tensor.shape[0]}"
                )
            batch_size = tensor.shape[0]
            checked[name] = tensor
        return checked


class GroupAccuracy(_GroupMetric):
    """Accuracy of each group over all items seen → ``[G]`` (NaN before any item).

    ``update(correct)`` with ``correct`` bool ``[B, G]``: whether group g's answer to item i is correct.
    """

    higher_is_better = True
    correct_count: Tensor
    total: Tensor

    def __init__(self, group_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(group_names, **kwargs)
        self._add_group_state("correct_count", torch.long)
        self._add_group_state("total", torch.long)

    def update(self, correct: Tensor) -> None:
        count, total = _group_accuracy_update(self._check_batch(correct=correct)["correct"])
        self.correct_count += count
        self.total += total

    def compute(self) -> Tensor:
        return _group_accuracy_compute(self.correct_count, self.total)


class CrossGroupDisparity(GroupAccuracy):
    """How unequally the groups are served: worst-group accuracy, accuracy gap and accuracy std.

    Same state and ``update(correct)`` as `GroupAccuracy` (a `MetricCollection` shares it between the two);
    ``compute`` returns ``{"acc_worst": min_g acc_g, "acc_gap": max_g acc_g − min_g acc_g, "acc_std":
    population std (divisor G) of acc_g}``.
    """

    higher_is_better = None  # worst: higher is better; gap and std: lower is better

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return _cross_group_disparity_compute(self.correct_count, self.total)


class ConsistencyRate(_GroupMetric):
    """Fraction of items on which all groups give the same answer → scalar.

    ``update(answers)`` with ``answers`` integer ``[B, G]``: answer ids, equal within a row iff two groups gave the
    same answer to that item (the caller maps free-form answers to ids per item, e.g. by
    `Item.canonical_answer`).
    """

    higher_is_better = True
    consistent: Tensor
    items: Tensor

    def __init__(self, group_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(group_names, **kwargs)
        self._add_item_state("consistent")
        self._add_item_state("items")

    def update(self, answers: Tensor) -> None:
        consistent, items = _consistency_rate_update(self._check_batch(answers=answers)["answers"])
        self.consistent += consistent
        self.items += items

    def compute(self) -> Tensor:
        return _consistency_rate_compute(self.consistent, self.items)


class ConsistentCorrectRate(_GroupMetric):
    """Fraction of items on which all groups give the same answer *and* every group is correct → scalar.

    ``update(answers, correct)``, both ``[B, G]`` (see `ConsistencyRate` and `GroupAccuracy`).
    """

    higher_is_better = True
    consistent_correct: Tensor
    items: Tensor

    def __init__(self, group_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(group_names, **kwargs)
        self._add_item_state("consistent_correct")
        self._add_item_state("items")

    def update(self, answers: Tensor, correct: Tensor) -> None:
        batch = self._check_batch(answers=answers, correct=correct)
        consistent_correct, items = _consistent_correct_rate_update(batch["answers"], batch["correct"])
        self.consistent_correct += consistent_correct
        self.items += items

    def compute(self) -> Tensor:
        return _consistent_correct_rate_compute(self.consistent_correct, self.items)


class BreakageRate(_GroupMetric):
    """PERG breakage: among items the `reference` group answers correctly, the fraction group g answers wrongly.

    The reference is normally the no-persona group, so this is "correct without a persona, wrong with it". With
    ``R`` the items (over all updates) where the reference is correct, ``breakage[g] = |{i in R : g wrong on i}| /
    |R|``; the reference's own slot is 0, and every other slot is NaN while ``|R| = 0``. ``compute`` returns
    ``{"breakage": [G], "breakage_mean": mean over the G − 1 non-reference groups}`` (equal to the pooled fraction,
    since all groups share the denominator |R|). ``update(correct)`` as in `GroupAccuracy`. Needs G >= 2.
    """

    higher_is_better = False
    broken: Tensor
    reference_correct: Tensor

    def __init__(self, group_names: Sequence[str], reference: str, **kwargs: Any) -> None:
        super().__init__(group_names, **kwargs)
        require(
            reference in self.group_names,
            f"reference: expected one of group_names {list(self.group_names)}, got {reference!r}",
        )
        require(self.num_groups >= 2, f"group_names: breakage needs a group besides the reference {reference!r}")
        self.reference = reference
        self.reference_index = self.group_names.index(reference)
        self._add_group_state("broken", torch.long)
        self._add_item_state("reference_correct")

    def update(self, correct: Tensor) -> None:
        broken, reference_correct = _breakage_rate_update(
            self._check_batch(correct=correct)["correct"], self.reference_index
        )
        self.broken += broken
        self.reference_correct += reference_correct

    def compute(self) -> dict[str, Tensor]:
        return _breakage_rate_compute(self.broken, self.reference_correct, self.reference_index)


class FlipRate(_GroupMetric):
    """Fraction of challenged answers that changed after a challenge turn, per group.

    ``update(answers_before, answers_after, challenged)``: answer ids ``[B, G]`` before and after the turn, and a
    bool mask ``[B, G]`` of the (item, group) episodes that were challenged. ``compute`` returns ``{"flip": [G]
    (NaN for a group never challenged), "flip_mean": changed / challenged pooled over all groups,
    "consistency_after_challenge": the consistency rate of the answers after the turn}``.
    """

    higher_is_better = False
    flipped: Tensor
    challenged: Tensor
    consistent_after: Tensor
    items: Tensor

    def __init__(self, group_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(group_names, **kwargs)
        self._add_group_state("flipped", torch.long)
        self._add_group_state("challenged", torch.long)
        self._add_item_state("consistent_after")
        self._add_item_state("items")

    def update(self, answers_before: Tensor, answers_after: Tensor, challenged: Tensor) -> None:
        batch = self._check_batch(answers_before=answers_before, answers_after=answers_after, challenged=challenged)
        flipped, challenged_count = _flip_rate_update(**batch)
        self.flipped += flipped
        self.challenged += challenged_count
        consistent, items = _consistency_rate_update(batch["answers_after"])
        self.consistent_after += consistent
        self.items += items

    def compute(self) -> dict[str, Tensor]:
        return {**_flip_rate_compute(self.flipped, self.challenged),
                "consistency_after_challenge": _consistency_rate_compute(self.consistent_after, self.items)}


class GroupPersonalization(_GroupMetric):
    """Mean personalization score per group → ``[G]``.

    ``update(personalization)`` with floats ``[B, G]`` in [0, 1]: the fraction of group g's verifiable preferences
    its response to item i satisfies.
    """

    higher_is_better = True
    personalization_sum: Tensor
    personalization_count: Tensor

    def __init__(self, group_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(group_names, **kwargs)
        self._add_group_state("personalization_sum", torch.get_default_dtype())
        self._add_group_state("personalization_count", torch.long)

    def update(self, personalization: Tensor) -> None:
        total, count = _group_personalization_update(
            self._check_batch(personalization=personalization)["personalization"]
        )
        self.personalization_sum += total.to(self.personalization_sum.dtype)
        self.personalization_count += count

    def compute(self) -> Tensor:
        return _group_personalization_compute(self.personalization_sum, self.personalization_count)


class NashWelfare(_GroupMetric):
    """Nash social welfare ``sum_g log(max(U_g, eps))``, ``U_g`` the mean per-item utility of group g → scalar.

    ``update(utility)`` with floats ``[B, G]`` (per-item reward, e.g. truth + alpha·pers). ``eps`` (default 1e-6)
    keeps a group with zero mean utility finite (it contributes log(1e-6) ≈ −13.8); NaN before any item.
    """

    higher_is_better = True
    utility_sum: Tensor
    utility_count: Tensor

    def __init__(self, group_names: Sequence[str], eps: float = NASH_WELFARE_EPS, **kwargs: Any) -> None:
        super().__init__(group_names, **kwargs)
        require(eps > 0, f"eps: expected a positive floor on group utility, got {eps}")
        self.eps = float(eps)
        self._add_group_state("utility_sum", torch.get_default_dtype())
        self._add_group_state("utility_count", torch.long)

    def update(self, utility: Tensor) -> None:
        total, count = _nash_welfare_update(self._check_batch(utility=utility)["utility"])
        self.utility_sum += total.to(self.utility_sum.dtype)
        self.utility_count += count

    def compute(self) -> Tensor:
        return _nash_welfare_compute(self.utility_sum, self.utility_count, eps=self.eps)


def audit_metrics(
    group_names: Sequence[str],
    reference: str | None = None,
    *,
    with_flip_rate: bool = False,
    probe_only: bool = False,
    eps: float = NASH_WELFARE_EPS,
) -> MetricCollection:
    """All audit metrics in one `MetricCollection` (evaluation's, and with `probe_only` training validation's).

    Update it with keywords: ``update(correct=, answers=, personalization=, utility=)`` plus ``answers_before=,
    answers_after=, challenged=`` when `with_flip_rate`; each metric takes the ones it needs. Breakage is included
    when `reference` names a group. ``compute()`` returns ``acc`` [G], ``acc_worst``, ``acc_gap``, ``acc_std``,
    ``consistency``, ``consistent_correct``, ``personalization`` [G], ``nash_welfare`` and, when included,
    ``breakage`` [G], ``breakage_mean``, ``flip`` [G], ``flip_mean``; pass it to `flatten_results`. `probe_only`
    leaves out personalization and Nash welfare (answers read by the probe, no response: ``update(correct=,
    answers=)``).
    """
    names = check_group_names(group_names)
    metrics: dict[str, Metric] = {
        "acc": GroupAccuracy(names),
        "acc_disparity": CrossGroupDisparity(names),
        "consistency": ConsistencyRate(names),
        "consistent_correct": ConsistentCorrectRate(names),
    }
    if not probe_only:
        metrics["personalization"] = GroupPersonalization(names)
        metrics["nash_welfare"] = NashWelfare(names, eps=eps)
    if reference is not None:
        metrics["breakage"] = BreakageRate(names, reference)
    if with_flip_rate:
        metrics["flip"] = FlipRate(names)
    return MetricCollection(metrics)


PER_GROUP_RESULTS = ("acc", "breakage", "flip", "personalization")
"""Keys of `audit_metrics` results that hold one value per group (torchmetrics squeezes them to 0-d when G = 1)."""


def flatten_results(results: Mapping[str, Any], group_names: Sequence[str]) -> dict[str, float]:
    """Flat ``{name: float}`` from metric outputs: a ``[G]`` value ``v`` under key ``k`` becomes ``k/<group>``.

    A value is per-group when it is 1-d or its key is in `PER_GROUP_RESULTS`; other scalars keep their key;
    nested dicts (a metric's dict output) are merged in. E.g. ``{"acc": tensor([.5, .7]),
    "acc_gap": tensor(.2)}`` with groups ``("a", "b")`` → ``{"acc/a": .5, "acc/b": .7, "acc_gap": .2}``.
    """
    names = check_group_names(group_names)
    flat: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            flat.update(flatten_results(value, names))
            continue
        array = np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=np.float64)
        per_group = array.ndim == 1 or key in PER_GROUP_RESULTS
        if per_group and array.size == len(names) and array.ndim <= 1:
            flat.update({f"{key}/{name}": float(v) for name, v in zip(names, array.reshape(-1))})
        elif not per_group and array.ndim == 0:
            flat[key] = float(array)
        else:
            raise TriAlignError(
                f"results[{key!r}]: expected a scalar or one value per group ({len(names)}), got shape {array.shape}"
            )
    return flat
