"""ARC (AI2 Reasoning Challenge, Clark et al. 2018): grade-school science multiple-choice questions.

Tasks ``arc_easy`` (570 items) and ``arc_challenge`` (299 items), the validation splits (the only ones shipped; the
test splits are left for final reporting elsewhere). Options keep the source's order and text; the gold option is
the one whose label equals ``answerKey``. Labels are letters ``A``–``E`` on most items and digits ``1``–``4`` on a
few: the label itself is never shown (options are scored as text), so they only need to be matched, which is done
after normalising digits to letters (``"1"`` -> ``"A"``). Items have 3 to 5 options.
"""

from __future__ import annotations

from typing import Any

from trialign.errors import TriAlignError
from trialign.tasks.datafiles import benchmark_jsonl
from trialign.tasks.hub import load_hub_rows
from trialign.tasks.item import Item

FILES = {"arc_easy": "arc/ARC-Easy-validation.jsonl", "arc_challenge": "arc/ARC-Challenge-validation.jsonl"}
HUB_DATASET = "allenai/ai2_arc"
HUB_CONFIGS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}


def normalize_label(label: Any) -> str:
    """``"1"``–``"9"`` -> ``"A"``–``"I"``; letters stay (upper case)."""
    text = str(label).strip().upper()
    return chr(ord("A") + int(text) - 1) if text.isdigit() and 1 <= int(text) <= 26 else text


def arc_items(task: str, records: list[dict[str, Any]], origin: str) -> list[Item]:
    items = []
    for index, record in enumerate(records):
        where = f"{origin} record {index}"
        try:
            texts = [str(t).strip() for t in record["choices"]["text"]]
            labels = [normalize_label(label) for label in record["choices"]["label"]]
            key = normalize_label(record["answerKey"])
        except (KeyError, TypeError):
            raise TriAlignError(f"{where}: expected 'choices': {{'text': [...], 'label': [...]}} and 'answerKey'"
                                ) from None
        if len(texts) != len(labels) or key not in labels:
            raise TriAlignError(f"{where}: answerKey {record.get('answerKey')!r} is not one of the labels {labels}")
        items.append(Item(
            id=f"{task}/{index:04d}", task=task, question=str(record["question"]).strip(), gold=labels.index(key),
            options=tuple(texts), meta={"source_id": record.get("id"), "source_index": index}))
    return items


def load_local(task: str, seed: int) -> list[Item]:
    return arc_items(task, *benchmark_jsonl(FILES[task]))


def load_hub(task: str, seed: int) -> list[Item]:
    return arc_items(task, load_hub_rows(HUB_DATASET, HUB_CONFIGS[task], "validation"),
                     f"hub dataset {HUB_DATASET!r}")
