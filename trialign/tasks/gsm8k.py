"""GSM8K (Cobbe et al., 2021) test split: 1319 grade-school math word problems as numeric items.

The gold answer is the number after the final ``####`` of the worked solution, with thousands separators removed
(``"1,450,000"`` -> ``"1450000"``); answers are compared numerically (`Item.is_correct`). The worked solution is kept
in ``meta["solution"]``. Only the test split is shipped; the paper does not name a split.
"""

from __future__ import annotations

from typing import Any

from trialign.errors import TriAlignError
from trialign.tasks.datafiles import benchmark_jsonl
from trialign.tasks.hub import load_hub_rows
from trialign.tasks.item import Item

TEST_FILE = "gsm8k/test.jsonl"
HUB_DATASET = "openai/gsm8k"


def final_answer(solution: str, where: str) -> str:
    """The number after the last ``####`` of a GSM8K solution; `where` names the record in the error."""
    head, marker, tail = solution.rpartition("####")
    answer = tail.strip().replace(",", "")
    if not marker or not answer:
        raise TriAlignError(f"{where}: field 'answer' has no final '#### <number>' line")
    return answer


def gsm8k_items(task: str, records: list[dict[str, Any]], origin: str) -> list[Item]:
    return [
        Item(
            id=f"{task}/{index:04d}", task=task, question=record["question"].strip(),
            gold=final_answer(record["answer"], f"{origin} record {index}"), answer_type="numeric",
            meta={"source_index": index, "solution": record["answer"]},
        )
        for index, record in enumerate(records)
    ]


def load_local(task: str, seed: int) -> list[Item]:
    return gsm8k_items(task, *benchmark_jsonl(TEST_FILE))


def load_hub(task: str, seed: int) -> list[Item]:
    return gsm8k_items(task, load_hub_rows(HUB_DATASET, "main", "test"), f"hub dataset {HUB_DATASET!r}")
