"""Answer probe throughput: `AnswerProbe.score_options` against a naive loop, on the same contexts, in one run.

The contexts are what `evaluate --mode probe` scores: TruthfulQA MC1 items (the shipped copy) asked by every group of
the bundled ``default`` group file (persona + preference instructions + question with its options, chat template,
"Final answer:"). The naive reference runs one forward pass per (context, option) pair over context + continuation,
without batching or prefix reuse, and sums the continuation's log-probabilities. Prints both rates in items per
second (an item = one question asked by all groups), the speed-up in wall-clock and in CPU time (steadier when other
processes share the cores), and the largest difference between the two methods' log-likelihoods.

    .venv/bin/python benchmarks/bench_probe.py --items 4
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from trialign.backbone import DEFAULT_MODEL, load_model_and_tokenizer  # noqa: E402
from trialign.groups import load_groups  # noqa: E402
from trialign.probe import AnswerProbe, render_context  # noqa: E402
from trialign.tokens import TARGET_DELIMITER  # noqa: E402
from trialign.prompts import build_messages  # noqa: E402
from trialign.tasks import load_task  # noqa: E402


@torch.inference_mode()
def naive_logliks(model, tokenizer, contexts: list[str], options: list[list[str]]) -> list[list[float]]:
    """One forward per (context, option): context + continuation tokens (lm-eval's encoding), full logits."""
    results = []
    for context, choices in zip(contexts, options):
        trimmed = context.rstrip()
        context_ids = tokenizer(trimmed, add_special_tokens=False).input_ids
        row = []
        for choice in choices:
            whole = tokenizer(context + TARGET_DELIMITER + choice, add_special_tokens=False).input_ids
            continuation = whole[len(context_ids) :]
            logprobs = model(torch.tensor([context_ids + continuation])).logits[0].log_softmax(-1)
            positions = torch.arange(len(context_ids) - 1, len(context_ids) - 1 + len(continuation))
            row.append(float(logprobs[positions, torch.tensor(continuation)].sum()))
        results.append(row)
    return results


def timed(run):
    """(result, wall seconds, CPU seconds of this process): CPU time is the steadier number on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=4, help="TruthfulQA MC1 items, each asked by every group")
    parser.add_argument("--groups", default="default", help="group file (bundled name or path)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model_and_tokenizer(args.model)
    items = load_task("truthfulqa_mc1", limit=args.items)
    groups = load_groups(args.groups)
    contexts = [render_context(tokenizer, build_messages(item, group)) for item in items for group in groups]
    options = [list(item.options) for item in items for _ in groups]
    tokens = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in contexts]
    pairs = sum(len(o) for o in options)
    print(f"model {args.model}, {torch.get_num_threads()} threads; {len(items)} items x {len(groups)} groups = "
          f"{len(contexts)} contexts (mean {sum(tokens) / len(tokens):.0f} tokens), {pairs} (context, option) pairs",
          flush=True)

    probe = AnswerProbe(model, tokenizer, batch_size=args.batch_size)
    probe.score_options(contexts[:1], options[:1])  # warm-up
    fast, fast_wall, fast_cpu = timed(lambda: [s.logliks for s in probe.score_options(contexts, options)])
    slow, slow_wall, slow_cpu = timed(lambda: naive_logliks(model, tokenizer, contexts, options))

    difference = max(abs(a - b) for row_fast, row_slow in zip(fast, slow) for a, b in zip(row_fast, row_slow))
    for name, wall, cpu in (("naive loop", slow_wall, slow_cpu), ("probe", fast_wall, fast_cpu)):
        print(f"{name:<11}: {len(items) / wall:7.3f} items/s  ({wall:6.1f} s wall, {cpu:6.1f} s CPU, "
              f"{pairs / wall:6.1f} pairs/s)")
    print(f"speed-up   : {slow_wall / fast_wall:.2f}x wall, {slow_cpu / fast_cpu:.2f}x CPU time    "
          f"max |loglik difference| = {difference:.2e}")


if __name__ == "__main__":
    main()
