"""TruthfulQA (Lin et al., 2022), original 817-question release: MC1, MC2 and generation items.

* ``truthfulqa_mc1`` / ``truthfulqa_mc2``: option items from ``mc_task.json``. The source lists the correct
  answer(s) first, so the options are shuffled per item with a permutation derived from sha256(seed, item id) —
  deterministic across runs, processes and Python versions (Python's ``hash()`` is salted per process) — and
  ``gold`` / ``correct_options`` are set after shuffling. MC1 has one correct option; for MC2 ``gold`` is the
  position of the source's first correct answer (the best answer) and ``correct_options`` holds all of them.
* ``truthfulqa_gen``: alias items from ``TruthfulQA.csv``: gold = Best Answer, aliases = Correct Answers,
  incorrect_aliases = Incorrect Answers (the CSV joins several answers with ``";"``).

Item ids use the row index in the source file, which is also the row order of the hub dataset
``truthfulqa/truthful_qa``: ``truthfulqa_mc1/0000`` is the first question of ``mc_task.json``, ``truthfulqa_gen/0000``
the first row of the CSV (the two files order questions differently). MC items from the shipped copy also carry
the CSV's category, type and source URL in ``meta`` (joined on the question text); hub MC items do not.
The paper does not say how TruthfulQA is presented; scoring MC by option choice follows the benchmark.
"""

from __future__ import annotations

import csv
import hashlib
import json
from typing import Any, Sequence

from trialign.errors import TriAlignError
from trialign.tasks.datafiles import benchmark_file
from trialign.tasks.hub import load_hub_rows
from trialign.tasks.item import Item

CSV_FILE = "truthfulqa/TruthfulQA.csv"
MC_FILE = "truthfulqa/mc_task.json"
HUB_DATASET = "truthfulqa/truthful_qa"


def seeded_permutation(n: int, key: str) -> list[int]:
    """A permutation of range(n) that depends only on `key` (Fisher–Yates driven by sha256 of key and step)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        draw = int.from_bytes(hashlib.sha256(f"{key}:{i}".encode()).digest()[:8], "big")
        j = draw % (i + 1)  # modulo bias below 1e-17 for option counts this small
        order[i], order[j] = order[j], order[i]
    return order


def split_answers(text: str) -> tuple[str, ...]:
    """The answers of a ``"a; b; c"`` CSV cell (some cells end with a stray ``;``)."""
    return tuple(part.strip() for part in text.split(";") if part.strip())


def mc_item(
    task: str, index: int, question: str, targets: Sequence[tuple[str, int]], seed: int, meta: dict[str, Any]
) -> Item:
    """One MC1/MC2 item with shuffled options; `targets` are (answer text, 1 if correct) in source order."""
    item_id = f"{task}/{index:04d}"
    labels = [int(label) for _, label in targets]
    if len(targets) < 2 or 1 not in labels or (task == "truthfulqa_mc1" and labels.count(1) != 1):
        raise TriAlignError(
            f"{task}: question {index} ({question[:60]!r}) has {len(targets)} options with {labels.count(1)} "
            "marked correct; expected at least 2 options and exactly one correct for MC1, at least one for MC2"
        )
    order = seeded_permutation(len(targets), f"{seed}:{item_id}")
    options = tuple(str(targets[source][0]) for source in order)
    correct = tuple(shown for shown, source in enumerate(order) if labels[source] == 1)
    best = order.index(labels.index(1))
    return Item(
        id=item_id, task=task, question=question.strip(), gold=best, answer_type="option", options=options,
        correct_options=correct, meta={"source_index": index, **meta},
    )


def gen_item(task: str, index: int, row: dict[str, Any]) -> Item:
    """One generation item from a row with keys question, best_answer, correct_answers, incorrect_answers, ..."""
    return Item(
        id=f"{task}/{index:04d}", task=task, question=row["question"].strip(), gold=row["best_answer"].strip(),
        answer_type="alias", aliases=tuple(row["correct_answers"]), incorrect_aliases=tuple(row["incorrect_answers"]),
        meta={"source_index": index, "category": row["category"], "type": row["type"], "source": row["source"]},
    )


def _read_csv_rows() -> list[dict[str, Any]]:
    # The file starts with a byte-order mark; utf-8-sig keeps it out of the first column name.
    with open(benchmark_file(CSV_FILE), encoding="utf-8-sig", newline="") as f:
        return [
            {
                "type": row["Type"], "category": row["Category"], "question": row["Question"],
                "best_answer": row["Best Answer"], "correct_answers": split_answers(row["Correct Answers"]),
                "incorrect_answers": split_answers(row["Incorrect Answers"]), "source": row["Source"],
            }
            for row in csv.DictReader(f)
        ]


def load_local(task: str, seed: int) -> list[Item]:
    csv_rows = _read_csv_rows()
    if task == "truthfulqa_gen":
        return [gen_item(task, index, row) for index, row in enumerate(csv_rows)]
    with open(benchmark_file(MC_FILE), encoding="utf-8") as f:
        records = json.load(f)
    # One CSV question differs from its mc_task.json twin only by a trailing space.
    by_question = {row["question"].strip(): row for row in csv_rows}
    targets_key = "mc1_targets" if task == "truthfulqa_mc1" else "mc2_targets"
    items = []
    for index, record in enumerate(records):
        row = by_question.get(record["question"].strip(), {})
        meta = {key: row[key] for key in ("category", "type", "source") if key in row}
        items.append(mc_item(task, index, record["question"], list(record[targets_key].items()), seed, meta))
    return items


def load_hub(task: str, seed: int) -> list[Item]:
    if task == "truthfulqa_gen":
        rows = load_hub_rows(HUB_DATASET, "generation", "validation")
        for row in rows:
            row["correct_answers"] = [a.strip() for a in row["correct_answers"] if a.strip()]
            row["incorrect_answers"] = [a.strip() for a in row["incorrect_answers"] if a.strip()]
        return [gen_item(task, index, row) for index, row in enumerate(rows)]
    rows = load_hub_rows(HUB_DATASET, "multiple_choice", "validation")
    targets_key = "mc1_targets" if task == "truthfulqa_mc1" else "mc2_targets"
    items = []
    for index, row in enumerate(rows):
        targets = list(zip(row[targets_key]["choices"], row[targets_key]["labels"]))
        items.append(mc_item(task, index, row["question"], targets, seed, {}))
    return items
