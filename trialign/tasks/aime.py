"""AIME 2024 and AIME 2025 (contests I and II, 15 problems each): 30 numeric items per year.

AIME answers are integers 0–999; some copies zero-pad them (``"025"``), so the gold is stored as the plain integer
string (``"25"``, the raw value in ``meta["answer_raw"]``) and answers are compared numerically. Item ids name the
contest and problem, e.g. ``aime2024/2024-I-02``: taken from the AoPS wiki URL where a record has one (the 2024
copy, whose file order follows the URLs sorted as text: 1, 10–15, 2–9), otherwise from the record's position in
a file that lists contest I problems 1–15 then contest II problems 1–15 (the 2025 copy). Items keep file order.
No license is stated for either copy; the problems are (c) the MAA (see ATTRIBUTION.md).
"""

from __future__ import annotations

import re
from typing import Any

from trialign.errors import TriAlignError
from trialign.tasks.datafiles import benchmark_jsonl
from trialign.tasks.hub import load_hub_rows
from trialign.tasks.item import Item

FILES = {"aime2024": "aime/aime_2024.jsonl", "aime2025": "aime/aime_2025.jsonl"}
YEARS = {"aime2024": 2024, "aime2025": 2025}
PROBLEMS_PER_CONTEST = 15
_URL = re.compile(r"(\d{4})_AIME_(I{1,2})_Problems/Problem_(\d+)")


def problem_id(record: dict[str, Any], position: int, year: int) -> str:
    """``<year>-<I|II>-<problem number, 2 digits>`` from the record's URL, else from its position."""
    match = _URL.search(str(record.get("url") or ""))
    if match:
        return f"{match.group(1)}-{match.group(2)}-{int(match.group(3)):02d}"
    contest = "I" if position < PROBLEMS_PER_CONTEST else "II"
    return f"{year}-{contest}-{position % PROBLEMS_PER_CONTEST + 1:02d}"


def aime_items(task: str, records: list[dict[str, Any]], origin: str) -> list[Item]:
    items = []
    for position, record in enumerate(records):
        raw = str(record.get("answer", "")).strip()
        if not re.fullmatch(r"\d+", raw):
            raise TriAlignError(f"{origin} record {position}: field 'answer' must be an integer 0-999, got {raw!r}")
        question = record.get("problem") or record.get("question") or ""
        if not question.strip():
            raise TriAlignError(f"{origin} record {position}: field 'problem' (or 'question') is empty")
        meta = {"source_index": position, "answer_raw": raw}
        meta.update({key: record[key] for key in ("url", "solution") if record.get(key)})
        items.append(Item(
            id=f"{task}/{problem_id(record, position, YEARS[task])}", task=task, question=question.strip(),
            gold=str(int(raw)), answer_type="numeric", meta=meta,
        ))
    return items


def load_local(task: str, seed: int) -> list[Item]:
    return aime_items(task, *benchmark_jsonl(FILES[task]))


def load_hub(task: str, seed: int) -> list[Item]:
    if task == "aime2024":
        return aime_items(task, load_hub_rows("HuggingFaceH4/aime_2024", None, "train"), "hub HuggingFaceH4/aime_2024")
    rows = load_hub_rows("opencompass/AIME2025", "AIME2025-I", "test")
    rows += load_hub_rows("opencompass/AIME2025", "AIME2025-II", "test")
    return aime_items(task, rows, "hub opencompass/AIME2025")
