"""Generated tokens/s of the rollout's batched sampling against one `generate` call per episode, on the same items.

    .venv/bin/python benchmarks/bench_rollout.py                      # embedded model, 1 item x 9 groups x 2 samples
    .venv/bin/python benchmarks/bench_rollout.py --items 4 --max-new-tokens 64

Both sides use `HFSampler` (same model, same prompts, same sampling settings, log mu included): the batched side
samples every episode of the items in one call, as `trialign rollout` does per turn (left padding, one KV cache,
repeated prompts prefilled once); the reference calls it once per episode. Prints both rates and the speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="truthfulqa_mc1")
    parser.add_argument("--items", type=int, default=1)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from trialign.backbone import load_model_and_tokenizer
    from trialign.groups import load_groups
    from trialign.prompts import build_messages
    from trialign.rollout.sampler import HFSampler
    from trialign.tasks import load_task

    model, tokenizer = load_model_and_tokenizer(args.model)
    groups = load_groups("default")
    items = load_task(args.task, limit=args.items)
    prompts = [list(tokenizer(tokenizer.apply_chat_template(build_messages(item, group), tokenize=False,
                                                            add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"])
               for item in items for group in groups for _ in range(args.samples)]
    sampler = HFSampler(model, tokenizer)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0}
    sampler.sample(prompts[:2], max_new_tokens=2, temperature=1.0, seed=0)  # warm-up

    start = time.perf_counter()
    batched = sampler.sample(prompts, seed=0, **settings).samples
    batched_seconds = time.perf_counter() - start
    batched_tokens = sum(s.num_sampled for s in batched)

    start = time.perf_counter()
    single_tokens = 0
    for index, prompt in enumerate(prompts):
        single_tokens += sum(s.num_sampled for s in sampler.sample([prompt], seed=index, **settings).samples)
    single_seconds = time.perf_counter() - start

    batched_rate, single_rate = batched_tokens / batched_seconds, single_tokens / single_seconds
    print(f"{len(items)} items x {len(groups)} groups x {args.samples} samples = {len(prompts)} episodes, "
          f"max_new_tokens={args.max_new_tokens}, model={args.model}, torch threads={torch.get_num_threads()}")
    print(f"batched rollout (1 generate call) : {batched_tokens:6d} tokens in {batched_seconds:7.1f} s = "
          f"{batched_rate:7.1f} tokens/s")
    print(f"one generate call per episode     : {single_tokens:6d} tokens in {single_seconds:7.1f} s = "
          f"{single_rate:7.1f} tokens/s")
    print(f"speed-up: {batched_rate / single_rate:.1f}x")


if __name__ == "__main__":
    main()
