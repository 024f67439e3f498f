"""The answer probe in float32 and under bf16 autocast: decision agreement, metric differences and speed.

An answer is the argmax of the option log-likelihoods, so bf16 rounding flips it only where two options are within
its precision. This runs `trialign.evaluate.run_audit` (the evaluation's own code path) twice on the same items and
groups, in the model's float32 and with ``probe_autocast``, and prints

* the share of (item, group) decisions that agree, and of items whose consistency verdict agrees;
* accuracy and consistency in each precision (the metrics a reader compares);
* the largest difference of an option log-likelihood;
* the seconds of each probe pass (the model is loaded once, and a warm-up batch runs first in each precision).

Whether bf16 is native here (`trialign.backbone.native_bf16`) is printed first: without it autocast is emulated and
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
from trialign.tasks import load_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--adapter", default=None, help="a trained adapter to probe (as `evaluate --adapter`)")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--offset", type=int, default=68)
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--groups", default="default")
    parser.add_argument("--probe-template", default="question_answer")
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
    runs, seconds = {}, {}
    for name, autocast in (("float32", False), ("bf16", True)):
        run = dataclasses.replace(config, probe_autocast=autocast)
        run_audit(run, model, tokenizer, items[:2], groups[:2], progress=False)  # warm-up
        started = time.perf_counter()
        runs[name] = run_audit(run, model, tokenizer, items, groups, progress=False)
        seconds[name] = time.perf_counter() - started
    full, half = runs["float32"], runs["bf16"]
    same = same_decisions(full.rows, half.rows)
    consistent = lambda r: (r.answers == r.answers[:, :1]).all(1)  # noqa: E731
    logprob_gap = max(abs(a - b) for x, y in zip(full.rows, half.rows)
                      for a, b in zip(x["option_logprobs"], y["option_logprobs"]))
    print(f"{args.task}: {len(items)} items x {len(groups)} groups ({same.size} decisions)")
    print(f"  decisions that agree: {same.mean():.4f} ({int((~same).sum())} differ)")
    print(f"  items whose consistency verdict agrees: {(consistent(full) == consistent(half)).mean():.4f}")
    for name, run in runs.items():
        print(f"  {name:8s} accuracy {run.correct.mean():.4f}  consistency {consistent(run).mean():.4f}  "
              f"probe {seconds[name]:.1f} s")
    print(f"  largest option log-likelihood difference: {logprob_gap:.4f} nats")
    print(f"  speed-up: {seconds['float32'] / seconds['bf16']:.2f}x")


if __name__ == "__main__":
    main()
