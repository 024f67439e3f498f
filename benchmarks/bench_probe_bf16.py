"""The answer probe in float32 and in bf16: decision agreement, metric differences and speed.

An answer is the argmax of the option log-likelihoods, so bf16 rounding flips it only where two options are within
its precision. This runs `trialign.evaluate.run_audit` (the evaluation's own code path) on the same items and groups
in each `--precisions` entry (`trialign evaluate --probe-precision`; ``bfloat16+recheck`` is ``bfloat16`` with near
ties, closer than `--recheck` nats, scored again in float32, which ``auto`` picks where bf16 is native), and prints
for each against float32

* the share of (item, group) decisions that agree (compared by answer, `trialign.comparison.same_decisions`), and of
  items whose consistency verdict agrees;
* accuracy and consistency (the metrics a reader compares);
* the largest difference of an option log-likelihood;
* the seconds of the probe pass (the model is loaded once, and a warm-up batch runs first in each precision), the
  contexts rechecked, and the largest margin (in that precision) of a decision that flipped.

Whether bf16 is native here (`trialign.backbone.native_bf16`) is printed first: without it bf16 is emulated and
slower.

    .venv/bin/python benchmarks/bench_probe_bf16.py --task arc_easy --offset 68 --limit 150
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from trialign.backbone import DEFAULT_MODEL, load_model_and_tokenizer, native_bf16  # noqa: E402
from trialign.comparison import same_decisions  # noqa: E402
from trialign.evaluate import EvaluateConfig, run_audit  # noqa: E402
from trialign.groups import load_groups  # noqa: E402
from trialign.probe import OptionScores  # noqa: E402
from trialign.tasks import load_task  # noqa: E402

PRECISIONS = ("float32", "autocast", "bfloat16", "bfloat16+recheck")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--adapter", default=None, help="a trained adapter to probe (as `evaluate --adapter`)")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--offset", type=int, default=68)
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--groups", default="default")
    parser.add_argument("--probe-template", default="question_answer")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--recheck", type=float, default=EvaluateConfig.probe_recheck,
                        help="the margin in nats below which bfloat16+recheck scores a context again in float32")
    args = parser.parse_args()

    print(f"native bf16 on this machine: {native_bf16()}")
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.adapter:
        from trialign.backbone import load_adapter

        model = load_adapter(model, args.adapter)
    model.eval()
    items = load_task(args.task, limit=args.offset + args.limit)[args.offset:]
    groups = load_groups(args.groups)
    config = EvaluateConfig(model=args.model, task=args.task, probe_template=args.probe_template, mode="probe",
                            bootstrap=0)
    precisions = ["float32"] + [p for p in args.precisions if p != "float32"]
    runs, seconds = {}, {}
    for name in precisions:
        precision, recheck = name.split("+")[0], args.recheck if name.endswith("+recheck") else 0.0
        run = dataclasses.replace(config, probe_precision=precision, probe_recheck=recheck)
        run_audit(run, model, tokenizer, items[:2], groups[:2], progress=False)  # warm-up
        started = time.perf_counter()
        runs[name] = run_audit(run, model, tokenizer, items, groups, progress=False)
        seconds[name] = time.perf_counter() - started
    consistent = lambda r: (r.answers == r.answers[:, :1]).all(1)  # noqa: E731
    full = runs["float32"]
    print(f"{args.task}: {len(items)} items x {len(groups)} groups ({len(full.rows)} decisions)")
    for name, run in runs.items():
        same = same_decisions(full.rows, run.rows)
        gap = max(abs(a - b) for x, y in zip(full.rows, run.rows)
                  for a, b in zip(x["option_logprobs"], y["option_logprobs"]))
        rechecked = f", {run.rechecked} contexts rechecked" if name.endswith("+recheck") else ""
        # How close the options were where a decision flipped: what `--recheck` must cover.
        flipped = [OptionScores(logliks=row["option_logprobs"], num_tokens=[], num_chars=[]).margin()
                   for row, agree in zip(run.rows, same) if not agree]
        if flipped:
            rechecked += f"; flipped decisions had margins up to {max(flipped):.3f} nats"
        print(f"  {name:17s} probe {seconds[name]:6.1f} s ({seconds['float32'] / seconds[name]:.2f}x){rechecked}; "
              f"accuracy {run.correct.mean():.4f}, consistency {consistent(run).mean():.4f}; decisions that agree "
              f"{same.mean():.4f} ({int((~same).sum())} differ), consistency verdicts "
              f"{(consistent(full) == consistent(run)).mean():.4f}; largest option log-likelihood difference "
              f"{gap:.4f} nats")


if __name__ == "__main__":
    main()
