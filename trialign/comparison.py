"""Paired differences between methods evaluated on the same items, with paired-bootstrap 95% CIs.

Every method of an experiment is evaluated on the same items of a split, so the question a reader asks — is
TriAlign more consistent than the base model? — is answered by the *paired* difference: the items are resampled
jointly (`trialign.stats.paired_bootstrap`), and what the two methods share (which items are hard) cancels. That
interval is much narrower than the two methods' own intervals, and it is the one that decides.

Replicas. A method trained with several seeds (`trialign experiment`'s ``extra_seeds``) has one evaluation per seed,
and its result depends on the seed as much as on the items. `compare_pooled` takes the difference of the two methods'
means over their replicas, resampling the items jointly and each method's seeds with replacement
(`trialign.stats.pooled_paired_bootstrap`); `paired_table` adds those rows, and bases its verdicts on them, wherever
a method has replicas.

`records_from_rows` is the one reader of ``per_item.jsonl`` rows (`trialign evaluate` builds its own arrays with it
too); `compare` computes the differences of the metrics in `COMPARED` for one pair of evaluations, on the items both
hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trialign.errors import TriAlignError, require
from trialign.metric_names import metric_names

COMPARED = tuple((m.key, m.short, m.direction) for m in metric_names(
    "consistency", "acc_mean", "acc_worst", "breakage_mean", "personalization_mean"))
"""(metric, label, direction: +1 higher is better) of the paired-difference tables."""
CHALLENGE_COMPARED = tuple((m.key, m.short, m.direction) for m in metric_names("flip_mean",
                                                                              "consistency_after_challenge"))
"""Compared too where both evaluations ran a challenge turn."""


@dataclass
class ItemArrays:
    """Per (item, group) outcomes as [N, G] arrays, items in `item_ids` order, groups in `group_names` order."""

    item_ids: list[str]
    group_names: list[str]
    correct: np.ndarray
    """bool: the probed answer is correct."""
    answers: np.ndarray
    """int: answer ids, equal within an item iff the (canonical) answers are equal."""
    personalization: np.ndarray
    """float: fraction of the group's preferences met (0 where no response was generated)."""
    has_responses: bool
    answers_after: np.ndarray | None = None
    """int: answer ids after a challenge turn (`evaluate --challenge`), comparable with `answers`; else None."""
    challenged: np.ndarray | None = None
    """bool: the (item, group) was challenged; None without a challenge turn."""

    def take(self, item_ids: Sequence[str]) -> "ItemArrays":
        index = {item: n for n, item in enumerate(self.item_ids)}
        rows = [index[item] for item in item_ids]
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return ItemArrays(list(item_ids), self.group_names, self.correct[rows], self.answers[rows],
                          self.personalization[rows], self.has_responses, pick(self.answers_after),
                          pick(self.challenged))


def records_from_rows(rows: Sequence[dict[str, Any]], group_names: Sequence[str], where: str = "per_item rows"
                      ) -> ItemArrays:
    """[N, G] arrays from `trialign evaluate`'s per-item rows (one per (item, group)); items in first-seen order.
    Answers are compared by their ``canonical`` form (the item's normalized answer), else as written."""
    names = list(group_names)
    column = {name: g for g, name in enumerate(names)}
    items: dict[str, int] = {}
    for row in rows:
        items.setdefault(str(row["item_id"]), len(items))
    n, g = len(items), len(names)
    correct = np.zeros((n, g), dtype=bool)
    pers = np.zeros((n, g), dtype=np.float64)
    canonical: list[list[str | None]] = [[None] * g for _ in range(n)]
    challenged_rows = all("answer_after_challenge" in row for row in rows) and bool(rows)
    after: list[list[str | None]] = [[None] * g for _ in range(n)]
    challenged = np.zeros((n, g), dtype=bool)
    responses = False
    for row in rows:
        require(row.get("group") in column, f"{where}: group {row.get('group')!r} is not one of {names}")
        i, j = items[str(row["item_id"])], column[row["group"]]
        correct[i, j] = bool(row["correct"])
        canonical[i][j] = str(row.get("canonical", row["answer"]))
        if challenged_rows:
            after[i][j] = str(row.get("canonical_after_challenge", row["answer_after_challenge"]))
            challenged[i, j] = row.get("challenge") is not None
        if row.get("personalization") is not None:
            pers[i, j] = float(row["personalization"])
            responses = True
    missing = next(((item, names[j]) for item, i in items.items() for j in range(g) if canonical[i][j] is None),
                   None)
    if missing is not None:
        raise TriAlignError(f"{where}: no row for item {missing[0]!r} and group {missing[1]!r}")
    answers = np.zeros((n, g), dtype=np.int64)
    answers_after = np.zeros((n, g), dtype=np.int64)
    for i, answers_of_item in enumerate(canonical):
        table: dict[str, int] = {}  # one table per item, so ids before and after a challenge compare
        for j, answer in enumerate(answers_of_item):
            answers[i, j] = table.setdefault(str(answer), len(table))
        for j, answer in enumerate(after[i] if challenged_rows else []):
            answers_after[i, j] = table.setdefault(str(answer), len(table))
    return ItemArrays(list(items), names, correct, answers, pers, responses,
                      answers_after if challenged_rows else None, challenged if challenged_rows else None)


def same_decisions(rows: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]],
                   where: str = "per_item rows") -> np.ndarray:
    """bool [rows]: whether two runs over the same (item, group) rows, in the same order, read the same answer
    (its ``canonical`` form, else as written). Two runs' `ItemArrays.answers` do not compare: each item numbers its
    answers in order of appearance, so a changed first answer renumbers the rest."""
    require(len(rows) == len(other), f"{where}: {len(rows)} rows against {len(other)}")
    for index, (a, b) in enumerate(zip(rows, other)):
        require((a["item_id"], a["group"]) == (b["item_id"], b["group"]),
                f"{where}: row {index} is item {a['item_id']!r}, group {a['group']!r} in one run but item "
                f"{b['item_id']!r}, group {b['group']!r} in the other")
    answer = lambda row: str(row.get("canonical", row["answer"]))  # noqa: E731
    return np.array([answer(a) == answer(b) for a, b in zip(rows, other)], dtype=bool)


def read_item_arrays(folder: str | Path, group_names: Sequence[str]) -> ItemArrays:
    """The ``per_item.jsonl`` of an evaluate output folder as `ItemArrays`."""
    path = Path(folder) / "per_item.jsonl"
    if not path.is_file():
        raise TriAlignError(f"per-item file {path}: not found (paired differences need every method's rows)")
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as err:
        raise TriAlignError(f"per-item file {path}: not JSON lines ({err})") from None
    return records_from_rows(rows, group_names, f"per-item file {path}")


def disagreement_profile(arrays: ItemArrays, reference: str) -> list[tuple[str, int]]:
    """Where an evaluation's inconsistency lies: (label, items) for the items every group answers alike, the items
    where 1, 2 to half, more than half but not all, or all of the G − 1 other groups leave the `reference` group's
    answer, and among the last the items where the others all agree with each other (the reference is the odd one
    out, so pulling the others to it moves the many to the one). Ranges that hold no count of groups are left out
    (with 2 other groups: 1 and all)."""
    require(reference in arrays.group_names, f"disagreement: reference group {reference!r} is not one of "
            f"{arrays.group_names}")
    r = arrays.group_names.index(reference)
    others = np.delete(arrays.answers, r, axis=1)
    leaving = (others != arrays.answers[:, r:r + 1]).sum(axis=1)
    k = others.shape[1]
    ranges = [(1, 1), (2, k // 2), (max(k // 2 + 1, 2), k - 1), (k, k)] if k > 1 else [(1, 1)]
    rows = [("consistent", int((leaving == 0).sum()))]
    for low, high in ranges:
        if low <= high:
            label = f"all {k}" if low == k else str(low) if low == high else f"{low}-{high}"
            rows.append((label, int(((leaving >= low) & (leaving <= high)).sum())))
    alone = (leaving == k) & (others == others[:, :1]).all(axis=1)
    rows.append(("the reference alone", int(alone.sum())))
    return rows


def _summary(group_names: Sequence[str], reference: str | None):
    """The `COMPARED` metrics of [..., N, G] arrays (vectorized over resamples, as `bootstrap_ci` wants)."""
    from trialign.functional import audit_summary

    def compute(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        inputs = {k: arrays[k] for k in ("correct", "answers", "answers_after", "challenged") if k in arrays}
        if "answers_after" in inputs:
            inputs["answers_before"] = arrays["answers"]
        out = audit_summary(inputs, group_names, reference)
        chosen = {k: out[k] for k, *_ in COMPARED + CHALLENGE_COMPARED if k in out}
        chosen["acc_mean"] = arrays["correct"].astype(np.float64).mean(axis=(-1, -2))
        chosen["personalization_mean"] = arrays["personalization"].mean(axis=(-1, -2))
        return chosen

    return compute


def compare(a: ItemArrays, b: ItemArrays, reference: str | None, n_resamples: int = 1000, seed: int = 0
            ) -> tuple[dict[str, tuple[float, float, float]], int]:
    """Paired differences ``a − b`` of the `COMPARED` metrics, ``{metric: (difference, low, high)}``, over the
    items both hold, and how many those are. Personalization is left out unless both generated responses."""
    return compare_pooled([a], [b], reference, n_resamples, seed)


def compare_pooled(a: Sequence[ItemArrays], b: Sequence[ItemArrays], reference: str | None, n_resamples: int = 1000,
                   seed: int = 0) -> tuple[dict[str, tuple[float, float, float]], int]:
    """`compare` of two methods' replicas (one evaluation per training seed): the difference of their means over
    replicas, items resampled jointly and each method's replicas with replacement, over the items every replica
    holds. With one evaluation each it is `compare`."""
    from trialign.stats import paired_bootstrap, pooled_paired_bootstrap

    every = [*a, *b]
    require(all(x.group_names == every[0].group_names for x in every),
            f"groups differ: {sorted({tuple(x.group_names) for x in every})}")
    held = [set(x.item_ids) for x in every[1:]]
    shared = [item for item in every[0].item_ids if all(item in h for h in held)]
    require(bool(shared), "the evaluations share no item")
    challenged = all(x.answers_after is not None for x in every)

    def data(x: ItemArrays) -> dict[str, np.ndarray]:
        x = x.take(shared)
        arrays = {"correct": x.correct, "answers": x.answers, "personalization": x.personalization}
        return {**arrays, "answers_after": x.answers_after, "challenged": x.challenged} if challenged else arrays

    statistic = _summary(every[0].group_names, reference)
    if len(a) == len(b) == 1:
        result = paired_bootstrap(statistic, data(a[0]), data(b[0]), n_resamples=n_resamples, seed=seed,
                                  vectorized=True)
    else:
        result = pooled_paired_bootstrap(statistic, [data(x) for x in a], [data(x) for x in b],
                                         n_resamples=n_resamples, seed=seed)
    if not all(x.has_responses for x in every):
        result.pop("personalization_mean", None)
    return result, len(shared)


def excludes_zero(low: float, high: float) -> bool:
    return (low > 0 and high > 0) or (low < 0 and high < 0)


@dataclass
class Evaluated:
    """What `paired_table` needs of one evaluation of a split."""

    method: str
    kind: str | None
    folder: Path
    """The evaluate output folder (its per_item.jsonl)."""
    groups: list[str]
    reference: str | None
    consistency: float | None
    """The point estimate, to find the strongest other method."""
    replica_of: str | None = None
    """The method this evaluation is a replica of (trained with another seed), else None."""

    @property
    def family(self) -> str:
        """The method's name, shared by its replicas."""
        return self.replica_of or self.method


def _signed(x: float) -> str:
    text = f"{x:+.3f}"
    return "+0.000" if text == "-0.000" else text  # a difference that rounds to zero has no sign


def signed(value: float, low: float, high: float) -> str:
    """A difference and its CI with explicit signs, e.g. ``+0.413 [+0.327, +0.500]``."""
    return f"{_signed(value)} [{_signed(low)}, {_signed(high)}]"


def target_method(evaluations: Sequence[Evaluated]) -> Evaluated | None:
    """The method the differences are taken from: ``trialign`` if evaluated, else the first trained one."""
    named = [e for e in evaluations if e.method == "trialign"]
    trained = [e for e in evaluations if e.kind == "trained"]
    return (named or trained or [None])[0]


@dataclass
class PairedTables:
    """`paired_table`'s result: the differences of `COMPARED`, the verdicts, those of `CHALLENGE_COMPARED` where the
    evaluations ran a challenge turn, and those of each method's replicas pooled where a method has replicas (tables
    of their own, so that each fits the page)."""

    header: list[str]
    rows: list[list[str]]
    verdicts: list[str]
    challenge: tuple[list[str], list[list[str]]] | None = None
    pooled: tuple[list[str], list[list[str]]] | None = None


def _difference_rows(target: str, results: dict[str, tuple[dict, int]], compared) -> tuple[list[str], list[list[str]]]:
    header = ["comparison", "items"] + [f"Δ {label} {'↑' if d > 0 else '↓'}" for _, label, d in compared]
    rows = [[f"{target} − {other}", str(shared)] + [signed(*result[name]) if name in result else "n/a"
                                                      for name, *_ in compared]
            for other, (result, shared) in results.items()]
    return header, rows


def _families(evaluations: Sequence[Evaluated]) -> dict[str, list[Evaluated]]:
    families: dict[str, list[Evaluated]] = {}
    for e in evaluations:
        families.setdefault(e.family, []).append(e)
    return families


def _label(family: str, members: Sequence[Evaluated]) -> str:
    return f"{family} ×{len(members)}" if len(members) > 1 else family


def paired_table(evaluations: Sequence[Evaluated], n_resamples: int = 1000, seed: int = 0) -> PairedTables | None:
    """Rows ``target − other`` for every other evaluation, ``difference [low, high]`` per `COMPARED` metric, and
    one-line verdicts (against base and against the strongest other method by consistency, a baseline or a
    variant); None when there is nothing to compare (one method, or no target). Where a method has replicas
    (training seeds), the rows of the methods pooled over their replicas follow, and the verdicts are theirs."""
    target = target_method(evaluations)
    others = [e for e in evaluations if target is not None and e is not target]
    if target is None or not others:
        return None
    arrays = {e.method: read_item_arrays(e.folder, e.groups) for e in [target, *others]}
    compared = {other.method: compare(arrays[target.method], arrays[other.method], target.reference, n_resamples,
                                      seed) for other in others}
    header, rows = _difference_rows(target.method, compared, COMPARED)
    challenged = {method: pair for method, pair in compared.items() if "flip_mean" in pair[0]}
    challenge = _difference_rows(target.method, challenged, CHALLENGE_COMPARED) if challenged else None
    families = _families(evaluations)
    pooled = None
    if any(len(members) > 1 for members in families.values()):
        mine = families[target.family]
        results = {_label(name, members): compare_pooled([arrays[e.method] for e in mine],
                                                         [arrays[e.method] for e in members],
                                                         target.reference, n_resamples, seed)
                   for name, members in families.items() if name != target.family}
        pooled = _difference_rows(_label(target.family, mine), results, COMPARED)
        # Verdicts between families: each the mean of its replicas' consistency.
        candidates = [Evaluated(_label(name, members), members[0].kind, members[0].folder, members[0].groups,
                                members[0].reference, _mean([e.consistency for e in members]), name)
                      for name, members in families.items() if name != target.family]
        verdict_results, subject = results, _label(target.family, mine)
        note = "paired bootstrap 95% CI over the shared items, each method's training seeds resampled too"
    else:
        candidates = others
        verdict_results = compared
        subject, note = target.method, "paired bootstrap 95% CI over the shared items"
    verdicts = []
    base = next((e for e in candidates if e.family == "base"), None)
    rest = [e for e in candidates if e.family != "base" and e.consistency is not None]
    strongest = max(rest, key=lambda e: e.consistency) if rest else None
    named = f"the strongest other method ({strongest.method})" if strongest else ""
    for label, other in (("base", base), (named, strongest)):
        if other is None:
            continue
        value, low, high = verdict_results[other.method][0]["consistency"]
        verdict = ("higher" if low > 0 else "lower") if excludes_zero(low, high) else "no difference shown"
        verdicts.append(f"{subject} vs {label}: consistency {signed(value, low, high)} ({verdict}; {note})")
    return PairedTables(header, rows, verdicts, challenge, pooled)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if len(known) == len(values) and known else None
