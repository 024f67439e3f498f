"""Task names and `load_task`, the one entry point that turns a benchmark name into a list of `Item`s.

Each task has a loader for the shipped copy (``source="local"``, the default; works offline) and one for the
Hugging Face hub (``source="hub"``); both build the same items. Any lm-evaluation-harness task is a task too, as
``lmeval:<name>`` (`trialign.tasks.lmeval`, the optional extra ``lmeval``). ``limit`` keeps the first items in the
task's stable order (file order; for ``bbq`` the categories interleaved), so a small limit is a reproducible prefix,
not a sample. ``seed`` only changes the option order of the TruthfulQA MC tasks; every other task is independent of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from trialign.errors import TriAlignError
from trialign.tasks import aime, arc, bbq, gsm8k, lmeval, local, truthfulqa
from trialign.tasks.item import Item

Loader = Callable[[str, int], list[Item]]


@dataclass(frozen=True)
class TaskSpec:
    """How to load one task from the shipped copy and from the hub."""

    description: str
    """One line for task listings."""
    load_local: Loader
    """(task name, seed) -> items, from the files shipped in ``trialign/data/benchmarks``."""
    load_hub: Loader
    """(task name, seed) -> the same items, from the hub dataset named in `trialign.tasks.hub`."""


_TRUTHFULQA = (truthfulqa.load_local, truthfulqa.load_hub)
_BBQ = (bbq.load_local, bbq.load_hub)
TASKS: dict[str, TaskSpec] = {
    "truthfulqa_mc1": TaskSpec("TruthfulQA MC1: 817 questions, one correct option", *_TRUTHFULQA),
    "truthfulqa_mc2": TaskSpec("TruthfulQA MC2: 817 questions, several correct options", *_TRUTHFULQA),
    "truthfulqa_gen": TaskSpec("TruthfulQA generation: 817 free-form questions with answer aliases", *_TRUTHFULQA),
    "gsm8k": TaskSpec("GSM8K test: 1319 math word problems, numeric answers", gsm8k.load_local, gsm8k.load_hub),
    "aime2024": TaskSpec("AIME 2024 I+II: 30 problems, integer answers", aime.load_local, aime.load_hub),
    "aime2025": TaskSpec("AIME 2025 I+II: 30 problems, integer answers", aime.load_local, aime.load_hub),
    "arc_easy": TaskSpec("ARC-Easy validation: 570 grade-school science questions, 3-5 options", arc.load_local,
                         arc.load_hub),
    "arc_challenge": TaskSpec("ARC-Challenge validation: 299 harder science questions, 3-5 options", arc.load_local,
                              arc.load_hub),
    "bbq": TaskSpec("BBQ, six categories interleaved: 3-option questions about a context", *_BBQ),
    **{task: TaskSpec(f"BBQ {category}: 3-option questions about a context", *_BBQ)
       for task, category in bbq.CATEGORY_TASKS.items()},
}
LOCAL_TASK = local.TASK
TASK_NAMES: tuple[str, ...] = (*TASKS, LOCAL_TASK)
SOURCES = ("local", "hub")


def load_task(
    name: str, *, limit: int | None = None, seed: int = 0, source: str = "local", path: str | None = None
) -> list[Item]:
    """The items of task `name` (one of `TASK_NAMES`), in stable order, at most `limit` of them.

    `source` is ``"local"`` (the shipped copy) or ``"hub"`` (Hugging Face hub, needs network). `path` is the
    user's JSONL/CSV file for task ``local`` (format in `trialign.tasks.local`), the lm-eval include path (a folder
    of task YAML files, or one) for ``lmeval:<task>`` (`trialign.tasks.lmeval`), and must be None otherwise.
    """
    _checked_limit(limit)
    if lmeval.is_lmeval_task(name):
        if source != "local":
            raise TriAlignError(f"--source: task {name!r} loads its documents where its lm-eval YAML says; leave "
                                "source at 'local'")
        items = lmeval.lmeval_items(name, include_path=path)
        return items if limit is None else items[:limit]
    if name not in TASK_NAMES:
        raise TriAlignError(f"task: unknown task {name!r}; expected one of: {', '.join(TASK_NAMES)}, or "
                            f"{lmeval.PREFIX}<an lm-evaluation-harness task>")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TriAlignError(f"--seed: expected an integer, got {seed!r}")
    if source not in SOURCES:
        raise TriAlignError(f"--source: expected one of {SOURCES}, got {source!r}")
    if name == LOCAL_TASK:
        if path is None:
            raise TriAlignError("--path: task 'local' needs the path of a .jsonl or .csv file with your questions")
        if source != "local":
            raise TriAlignError("--source: task 'local' reads the file given by --path; use source 'local'")
        items = local.load_file(path)
    else:
        if path is not None:
            raise TriAlignError(f"--path: only task 'local' reads a file; task {name!r} got path {path!r}")
        spec = TASKS[name]
        items = (spec.load_local if source == "local" else spec.load_hub)(name, seed)
    return items if limit is None else items[:limit]


def _checked_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise TriAlignError(f"--limit: expected a positive integer, got {limit!r}")
    return limit
