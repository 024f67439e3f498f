"""The trunk cache of an experiment's evaluations: a probe recorded once, replayed for another method.

Runs `trialign.evaluate.run_audit` (the evaluation's own code path) on the same items and groups

1. with the adapter and an empty `TrunkCache` (a full forward that records the trunk's output),
2. with the adapter again, without the cache (the reference result),
3. with the base model on the recorded cache (replayed: only the layers from the adapter's lowest one run),
4. with the base model without the cache,

and prints each pass's seconds, the cache's size, the replay's speed-up over the full forward, and how far the
replayed results are from the full ones (decisions that agree; the largest option log-likelihood difference).

    .venv/bin/python benchmarks/bench_trunk_cache.py --adapter runs/experiment/demo/train/trialign/adapter
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from trialign.backbone import DEFAULT_MODEL, load_adapter, load_model_and_tokenizer  # noqa: E402
from trialign.comparison import same_decisions  # noqa: E402
from trialign.evaluate import EvaluateConfig, run_audit  # noqa: E402
from trialign.groups import load_groups  # noqa: E402
from trialign.tasks import load_task  # noqa: E402
from trialign.trunk_cache import TrunkCache, lowest_adapted_layer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--adapter", required=True, help="a trained adapter (as `evaluate --adapter`)")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--offset", type=int, default=68)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--groups", default="default")
    parser.add_argument("--probe-template", default="question_answer")
    args = parser.parse_args()

    base, tokenizer = load_model_and_tokenizer(args.model)
    base.eval()
    adapted, _ = load_model_and_tokenizer(args.model)
    adapted = load_adapter(adapted, args.adapter)
    print(f"lowest adapted layer: {lowest_adapted_layer(adapted)} of {adapted.config.num_hidden_layers}")
    items = load_task(args.task, limit=args.offset + args.limit)[args.offset:]
    groups = load_groups(args.groups)
    config = EvaluateConfig(model=args.model, task=args.task, probe_template=args.probe_template, mode="probe",
                            bootstrap=0)
    run_audit(config, base, tokenizer, items[:2], groups[:2], progress=False)  # warm-up
    cache = TrunkCache()
    runs, seconds = {}, {}
    for name, model, trunk_cache in (("adapter, recording", adapted, cache), ("adapter, full", adapted, None),
                                     ("base, replayed", base, cache), ("base, full", base, None)):
        started = time.perf_counter()
        runs[name] = run_audit(config, model, tokenizer, items, groups, progress=False, trunk_cache=trunk_cache)
        seconds[name] = time.perf_counter() - started
    print(f"{args.task}: {len(items)} items x {len(groups)} groups; cache {cache.nbytes / 2**20:.0f} MiB, "
          f"{cache.hits} replayed calls")
    for name, value in seconds.items():
        print(f"  {name:20s} {value:7.1f} s")
    for replayed, full in (("base, replayed", "base, full"), ("adapter, recording", "adapter, full")):
        a, b = runs[replayed], runs[full]
        gap = max(abs(x - y) for p, q in zip(a.rows, b.rows)
                  for x, y in zip(p["option_logprobs"], q["option_logprobs"]))
        print(f"  {replayed} vs {full}: decisions agree {same_decisions(a.rows, b.rows).mean():.4f}, largest option "
              f"log-likelihood difference {gap:.4f} nats")
    print(f"  replay speed-up over the full forward: {seconds['base, full'] / seconds['base, replayed']:.2f}x")


if __name__ == "__main__":
    main()
