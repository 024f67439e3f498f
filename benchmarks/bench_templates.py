"""Probe templates against lm-evaluation-harness's zero-shot format, on the same items, in one run.

For every shipped multiple-choice task, the first ``--items`` items are scored by `AnswerProbe.score_options` (the
project's scorer: continuation " " + option text, lm-eval's encoding) in

* lm-eval's zero-shot format: plain text ``[context\\n\\n]Question: {question}\\nAnswer:``, no chat template, no
  persona (the format of lm-eval's ``arc_easy``; its acc for SmolLM2-135M-Instruct is quoted as 54.1 on ARC-Easy);
* each `trialign.prompts.PROBE_TEMPLATES` entry with the neutral (reference) group of the ``default`` group file,
  rendered as the rollout and evaluation render it (`build_messages` + `render_context`).

It prints acc (and acc_norm) per task and template and each template's difference to lm-eval's acc. With
``--groups`` it also asks every group of the default file and prints the mean accuracy over groups and the
consistency rate (all groups pick the same option), the numbers the persona changes.

    .venv/bin/python benchmarks/bench_templates.py --items 200
    .venv/bin/python benchmarks/bench_templates.py --items 100 --tasks arc_easy --groups
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from trialign.backbone import DEFAULT_MODEL, load_model_and_tokenizer  # noqa: E402
from trialign.groups import load_groups, reference_group  # noqa: E402
from trialign.probe import AnswerProbe, option_accuracy, render_context  # noqa: E402
from trialign.prompts import PROBE_TEMPLATES, build_messages  # noqa: E402
from trialign.tasks import load_task  # noqa: E402

MC_TASKS = ("arc_easy", "arc_challenge", "truthfulqa_mc1", "bbq_age")


def lm_eval_context(item) -> str:
    question = f"Question: {item.question.strip()}\nAnswer:"
    return f"{item.context.strip()}\n\n{question}" if item.context.strip() else question


def accuracy(probe, items, contexts) -> tuple[float, float, list[int]]:
    scores = probe.score_options(contexts, [list(i.options) for i in items])
    acc = option_accuracy(scores, items)
    return acc["acc"], acc["acc_norm"], [s.acc_choice for s in scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--tasks", nargs="+", default=list(MC_TASKS))
    parser.add_argument("--templates", nargs="+", default=list(PROBE_TEMPLATES))
    parser.add_argument("--groups", action="store_true", help="also every default group: mean acc, consistency")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    probe = AnswerProbe(model, tokenizer, batch_size=32)
    groups = load_groups("default")
    neutral = reference_group(groups)
    print(f"model {args.model}, first {args.items} items per task, neutral group {neutral.id!r}, torch threads "
          f"{torch.get_num_threads()}")
    header = "| task | format | acc | acc_norm | acc − lm-eval acc |"
    if args.groups:
        header += f" mean acc ({len(groups)} groups) | consistency |"
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for task in args.tasks:
        items = [i for i in load_task(task, limit=args.items) if i.has_options]
        started = time.perf_counter()
        base, base_norm, _ = accuracy(probe, items, [lm_eval_context(i) for i in items])
        row = f"| {task} | lm-eval zero-shot | {base:.3f} | {base_norm:.3f} | 0 |"
        print(row + (" – | – |" if args.groups else ""), flush=True)
        for name in args.templates:
            contexts = [render_context(tokenizer, build_messages(i, neutral, template=name),
                                       answer_prefix=PROBE_TEMPLATES[name].answer_prefix) for i in items]
            acc, acc_norm, _ = accuracy(probe, items, contexts)
            row = f"| {task} | {name} | {acc:.3f} | {acc_norm:.3f} | {acc - base:+.3f} |"
            if args.groups:
                per_group = []
                for group in groups:
                    contexts = [render_context(tokenizer, build_messages(i, group, template=name),
                                               answer_prefix=PROBE_TEMPLATES[name].answer_prefix) for i in items]
                    per_group.append(accuracy(probe, items, contexts))
                mean = sum(a for a, _, _ in per_group) / len(per_group)
                same = sum(len({c[n] for _, _, c in per_group}) == 1 for n in range(len(items))) / len(items)
                row += f" {mean:.3f} | {same:.3f} |"
            print(row, flush=True)
        print(f"<!-- {task}: {len(items)} items, {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
