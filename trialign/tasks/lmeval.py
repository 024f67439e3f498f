"""Tasks ``lmeval:<name>``: any lm-evaluation-harness task, asked under every persona (optional extra ``lmeval``).

lm-eval (``pip install 'trialign[lmeval]'``) holds most benchmarks researchers use; this bridge reads a task's
documents through its own `TaskManager` (``task_path``: a folder of the user's task YAML files, or one such file,
as lm-eval's ``include_path``) and its ``doc_to_text``, ``doc_to_choice`` and ``doc_to_target``, from the split
lm-eval itself would evaluate (`Task.eval_docs`: test, else validation). Every document becomes an `Item`:

* id ``lmeval:<name>/<document index>`` (stable: the split's order), ``meta["lmeval_text"]`` the document's prompt
  exactly as lm-eval renders it zero-shot (`Task.fewshot_context` with no examples), ``meta["doc_id"]`` its index;
* the question is that prompt without lm-eval's own framing: a ``Question:`` label (anything before it is the
  item's context passage) and a final ``Answer:`` cue are dropped, because the probe template supplies its own
  (`trialign.prompts.PROBE_TEMPLATES`); a prompt without them is the question as it stands;
* ``multiple_choice``: the options are ``doc_to_choice``, the gold one ``doc_to_target`` (an index, an option's text,
  or a list of indices: several correct options);
* ``generate_until``: items checked numerically (`Item.is_correct`), the gold answer the number after a final
  ``####`` of the target (GSM8K's convention) or the target's only number. Other targets, and other output types,
  are refused in one line: the project has no answer check for them.

`lmeval_accuracy` scores the same documents with lm-eval itself (`lm_eval.simple_evaluate` on the model in hand),
the reference for the parity check of `trialign evaluate --lmeval-parity`: the project's scorer in lm-eval's
prompt format (`lmeval_context`, no chat template, no persona) must give the same ``acc``.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

from trialign.errors import TriAlignError
from trialign.tasks.item import Item, parse_number

log = logging.getLogger(__name__)

PREFIX = "lmeval:"
OUTPUT_TYPES = ("multiple_choice", "generate_until")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")
"""`datasets` builders that read the user's own files: everything else lm-eval names is a hub dataset."""
_FRAMED = re.compile(r"^(?P<context>.*?)(?:^|\n)\s*Question:\s*(?P<question>.*?)\s*(?:\n\s*Answer:\s*)?$", re.S)
_ANSWER_CUE = re.compile(r"\s*\n?\s*Answer:\s*$")


def is_lmeval_task(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _task_name(name: str) -> str:
    """lm-eval's name of ``lmeval:<task>`` (given with or without the prefix)."""
    return name[len(PREFIX):] if is_lmeval_task(name) else name


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TriAlignError("task lmeval:*: lm-eval is not installed; install it with "
                            "`pip install 'trialign[lmeval]'`") from None
    return TaskManager


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's task index (its own tasks plus `include_path`), built once per path: indexing reads every task
    YAML lm-eval ships, several seconds."""
    TaskManager = _lm_eval()
    if include_path is not None:
        path = Path(include_path)
        if not path.exists():
            raise TriAlignError(f"task_path: lm-eval include path {include_path} does not exist (expected a folder "
                                "of task YAML files, or one such file)")
        include_path = str(path.parent if path.is_file() else path)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=include_path)


def load_lmeval_task(name: str, include_path: str | None = None):
    """The lm-eval `Task` object of ``lmeval:<task>`` (`name` with or without the prefix)."""
    task_name = _task_name(name)
    manager = task_manager(include_path)
    where = f"task {PREFIX}{task_name}"
    if task_name not in manager.all_subtasks:
        if task_name in manager.all_groups or task_name in manager.all_tags:
            raise TriAlignError(f"{where}: is a group of lm-eval tasks; name one of its tasks "
                                f"(`lm-eval ls tasks` lists them)")
        close = difflib.get_close_matches(task_name, manager.all_subtasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TriAlignError(f"{where}: unknown lm-eval task{hint} (a task of your own: give its YAML folder as "
                            "task_path)")
    try:
        tasks = manager.load(task_name)["tasks"]
    except ConnectionError as err:  # datasets' offline mode and unreachable hubs both land here
        raise TriAlignError(f"{where}: its dataset is on the Hugging Face hub and could not be reached ("
                            f"{str(err).splitlines()[0]}); run with network access, or point a task YAML at local "
                            "files (dataset_path: json, dataset_kwargs.data_files)") from None
    except (FileNotFoundError, ValueError) as err:
        raise TriAlignError(f"{where}: lm-eval could not load its documents ({str(err).splitlines()[0]})") from None
    return tasks[task_name]


def _question_and_context(text: str) -> tuple[str, str]:
    match = _FRAMED.match(text)
    if match and match["question"].strip():
        return match["question"].strip(), match["context"].strip()
    return _ANSWER_CUE.sub("", text).strip(), ""


def _gold_option(target: Any, choices: list[str], where: str) -> tuple[int, tuple[int, ...]]:
    if isinstance(target, list):
        indices = tuple(_gold_option(t, choices, where)[0] for t in target)
        if not indices:
            raise TriAlignError(f"{where}: doc_to_target is an empty list")
        return indices[0], indices
    if isinstance(target, str) and target in choices:
        return choices.index(target), (choices.index(target),)
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        target = int(target.strip())
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
        return target, (target,)
    raise TriAlignError(f"{where}: doc_to_target {target!r} is neither an option index in [0, {len(choices)}) nor "
                        "one of the options")


def _numeric_gold(target: Any, where: str) -> str:
    text = str(target[0] if isinstance(target, list) and target else target)
    head, marker, tail = text.rpartition("####")
    candidate = tail if marker else text
    value = parse_number(candidate)
    if value is None or (not marker and len(re.findall(r"\d+(?:\.\d+)?", candidate.replace(",", ""))) != 1):
        raise TriAlignError(f"{where}: target {text[:60]!r} is not a number; a generate_until task is read only "
                            "where its answers are numeric (checked as numbers, like GSM8K)")
    return candidate.strip().replace(",", "")


def lmeval_items(name: str, include_path: str | None = None) -> list[Item]:
    """Every document of the split lm-eval evaluates for ``lmeval:<task>``, as `Item`s (module docstring)."""
    task = load_lmeval_task(name, include_path)
    item_task = PREFIX + _task_name(name)
    output_type = task.config.output_type
    if output_type not in OUTPUT_TYPES:
        raise TriAlignError(f"task {item_task}: output type {output_type!r} is not supported (expected one of "
                            f"{', '.join(OUTPUT_TYPES)})")
    items = []
    for index, doc in enumerate(task.eval_docs):
        where = f"task {item_task} document {index}"
        text, prompt = task.doc_to_text(doc), task.fewshot_context(doc, 0)
        if not isinstance(text, str) or not isinstance(prompt, str):
            raise TriAlignError(f"{where}: doc_to_text gives several contexts (a task whose context varies with the "
                                "choice, like winogrande); only tasks with one prompt per document are read")
        question, context = _question_and_context(text)
        meta = {"lmeval_text": prompt, "doc_id": index, "target_delimiter": task.config.target_delimiter}
        if output_type == "multiple_choice":
            choices = task.doc_to_choice(doc)
            if not isinstance(choices, list) or len(choices) < 2:
                raise TriAlignError(f"{where}: doc_to_choice gave {choices!r}; a multiple_choice document needs at "
                                    "least 2 choices")
            choices = [str(c) for c in choices]
            gold, correct = _gold_option(task.doc_to_target(doc), choices, where)
            items.append(Item(id=f"{item_task}/{index:05d}", task=item_task, question=question, gold=gold,
                              options=tuple(choices), correct_options=correct, context=context, meta=meta))
        else:
            gold = _numeric_gold(task.doc_to_target(doc), where)
            items.append(Item(id=f"{item_task}/{index:05d}", task=item_task, question=question, gold=gold,
                              answer_type="numeric", context=context, meta=meta))
    if not items:
        raise TriAlignError(f"task {item_task}: lm-eval gives no documents in its evaluation split")
    return items


def lmeval_context(item: Item) -> str:
    """The item's prompt as lm-eval renders it zero-shot (no chat template, no persona): the context the options
    are scored after in the parity check."""
    if "lmeval_text" not in item.meta:
        raise TriAlignError(f"item {item.id}: not an lm-eval document (no lm-eval prompt to score after)")
    return item.meta["lmeval_text"]


def lmeval_accuracy(model, tokenizer, name: str, doc_ids: list[int], include_path: str | None = None,
                    batch_size: int = 16) -> dict[str, float]:
    """lm-eval's own ``acc`` and ``acc_norm`` of `model` on documents `doc_ids` of ``lmeval:<task>`` (zero-shot,
    `lm_eval.simple_evaluate` with its HF wrapper around the model in hand)."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    task_name = _task_name(name)
    task = load_lmeval_task(name, include_path)  # the same one-line errors as the items; lm-eval runs this object
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=wrapper, tasks=[task], task_manager=task_manager(include_path),
                              samples={task_name: list(doc_ids)}, bootstrap_iters=0, log_samples=False,
                              num_fewshot=0)
    scores = results["results"][task_name]
    return {metric: float(scores[f"{metric},none"]) for metric in ("acc", "acc_norm") if f"{metric},none" in scores}
