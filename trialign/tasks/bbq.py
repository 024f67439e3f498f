"""BBQ (Parrish et al., 2022), the six shipped categories, as 3-option items with a context passage.

Each record becomes an option item: ``context`` = the BBQ context, ``question``, options ``(ans0, ans1, ans2)`` in
source order (BBQ already varies the position of the correct answer, so nothing is shuffled), ``gold = label``.
``meta`` keeps what bias analyses need: category, context_condition (``ambig``/``disambig``), question_polarity
(``neg``/``nonneg``), ``unknown_index`` (the "can't be determined" option, which is gold for every ambiguous
context), the three answer tags, stereotyped_groups, subcategory, question_index and example_id.

Tasks: ``bbq_<category>`` (e.g. ``bbq_age``) for one category in file order, and ``bbq`` for all six with the
categories interleaved round-robin (Age 0, Disability 0, ..., Sexual orientation 0, Age 1, ...), so that any
``limit`` covers every category; once a category runs out the others continue. Item ids are
``<task>/<Category>-<example_id>``. The other five upstream categories (gender identity, race/ethnicity, SES and
their intersections) were not available as unmodified copies and are not shipped.
"""

from __future__ import annotations

from itertools import zip_longest
from typing import Any, Callable

from trialign.errors import TriAlignError
from trialign.tasks.datafiles import benchmark_jsonl
from trialign.tasks.hub import load_hub_rows
from trialign.tasks.item import Item

CATEGORIES = ("Age", "Disability_status", "Nationality", "Physical_appearance", "Religion", "Sexual_orientation")
CATEGORY_TASKS = {f"bbq_{category.lower()}": category for category in CATEGORIES}
HUB_DATASET = "oskarvanderwal/bbq"


def bbq_item(task: str, record: dict[str, Any], origin: str) -> Item:
    category, example_id = record["category"], int(record["example_id"])
    tags = tuple(str(record["answer_info"][f"ans{k}"][1]) for k in range(3))
    if tags.count("unknown") != 1:
        raise TriAlignError(
            f"{origin} example_id {example_id}: field 'answer_info' has {tags.count('unknown')} 'unknown' answers; "
            "expected exactly one"
        )
    extra = record.get("additional_metadata") or {}
    return Item(
        id=f"{task}/{category}-{example_id:04d}", task=task, question=record["question"].strip(),
        gold=int(record["label"]), answer_type="option", options=tuple(str(record[f"ans{k}"]) for k in range(3)),
        context=record["context"].strip(),
        meta={
            "category": category, "context_condition": record["context_condition"],
            "question_polarity": record["question_polarity"], "unknown_index": tags.index("unknown"),
            "answer_tags": tags, "stereotyped_groups": tuple(extra.get("stereotyped_groups") or ()),
            "subcategory": extra.get("subcategory", "None"), "question_index": str(record["question_index"]),
            "example_id": example_id,
        },
    )


def interleave(per_category: list[list[Item]]) -> list[Item]:
    """Round-robin over the categories' lists, skipping those that have run out."""
    return [item for row in zip_longest(*per_category) for item in row if item is not None]


def _local_records(category: str) -> tuple[list[dict[str, Any]], str]:
    return benchmark_jsonl(f"bbq/{category}.jsonl")


def _hub_records(category: str) -> tuple[list[dict[str, Any]], str]:
    return load_hub_rows(HUB_DATASET, category, "test"), f"hub dataset {HUB_DATASET!r} config {category!r}"


def _load(task: str, read: Callable[[str], tuple[list[dict[str, Any]], str]]) -> list[Item]:
    categories = CATEGORIES if task == "bbq" else (CATEGORY_TASKS[task],)
    per_category = []
    for category in categories:
        records, origin = read(category)
        per_category.append([bbq_item(task, record, origin) for record in records])
    return interleave(per_category)


def load_local(task: str, seed: int) -> list[Item]:
    return _load(task, _local_records)


def load_hub(task: str, seed: int) -> list[Item]:
    return _load(task, _hub_records)
