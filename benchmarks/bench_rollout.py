"""Generated tokens/s of the rollout's sampling backends on the same prompts, in one run.

    .venv/bin/python benchmarks/bench_rollout.py                      # embedded model, 1 item x 9 groups x 2 samples
    .venv/bin/python benchmarks/bench_rollout.py --items 4 --max-new-tokens 64 --ct2 int8 float32

Every episode of the items is sampled in one call per backend, as `trialign rollout` does per turn:

* `HFSampler` batched (the reference: left padding, one KV cache, repeated prompts prefilled once, log mu from the
  sampling pass), and once per episode (`--no-single` skips it);
* transformers `generate` with a static KV cache and its forward compiled by `torch.compile` (`--compile`; the
  candidate the performance issue names first): the same left-padded prompts, one call to compile and warm up (timed
  separately), then the timed call at the same shapes;
* `--profile`: the batched HF call once more under `torch.profiler`, its operators by self CPU time (where the
  time goes: the matrix products, the KV cache's concatenation, the sampling draws);
* `CT2Sampler` (`backend: ct2`) for each `--ct2` compute type (the model converted once into a temporary cache),
  plus the transformers model's log mu of what it sampled (the rescoring `trialign rollout` adds, timed too), and
  the distance of the backend's own log-probabilities from it: mean |own - mu| per token.

Prints each rate and its speed-up over the batched HF sampler.
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
    parser.add_argument("--ct2", nargs="*", default=["int8"], help="CTranslate2 compute types to measure")
    parser.add_argument("--no-single", action="store_true", help="skip the one-call-per-episode HF reference")
    parser.add_argument("--compile", action="store_true",
                        help="also measure generate with a static cache and torch.compile (inductor)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the batched HF call and print its top operators by self CPU time")
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

    batched_rate = batched_tokens / batched_seconds
    print(f"{len(items)} items x {len(groups)} groups x {args.samples} samples = {len(prompts)} episodes, "
          f"max_new_tokens={args.max_new_tokens}, model={args.model}, torch threads={torch.get_num_threads()}")
    print(f"hf batched (1 generate call)          : {batched_tokens:6d} tokens in {batched_seconds:7.1f} s = "
          f"{batched_rate:7.1f} tokens/s (reference)")
    if not args.no_single:
        start = time.perf_counter()
        single_tokens = 0
        for index, prompt in enumerate(prompts):
            single_tokens += sum(s.num_sampled for s in sampler.sample([prompt], seed=index, **settings).samples)
        single_seconds = time.perf_counter() - start
        print(f"hf, one generate call per episode     : {single_tokens:6d} tokens in {single_seconds:7.1f} s = "
              f"{single_tokens / single_seconds:7.1f} tokens/s ({single_tokens / single_seconds / batched_rate:.2f}x)")
    if args.profile:
        profile_batched(sampler, prompts, settings)
    if args.compile:
        compiled_rate(model, tokenizer, prompts, args.max_new_tokens, batched_rate)
    if args.ct2:
        import tempfile

        from trialign.backbone import resolve_model_source
        from trialign.rollout.ct2 import CT2Sampler
        from trialign.rollout.sampler import score_actions

        location = resolve_model_source(args.model).location
        with tempfile.TemporaryDirectory() as cache:
            for compute_type in args.ct2:
                ct2 = CT2Sampler(location, tokenizer, cache_dir=cache, compute_type=compute_type,
                                 threads=torch.get_num_threads())
                ct2.sample(prompts[:2], max_new_tokens=2, temperature=1.0, seed=0)  # warm-up
                start = time.perf_counter()
                generation, own = ct2.sample_scored(prompts, seed=0, **settings)
                seconds = time.perf_counter() - start
                actions = [s.tokens + ([s.stop] if s.stop is not None else []) for s in generation.samples]
                start = time.perf_counter()
                with torch.no_grad():
                    mu = score_actions(model, tokenizer, prompts, actions)
                rescore = time.perf_counter() - start
                tokens = sum(len(a) for a in actions)
                distance = sum(abs(a - b) for a, b in zip(own, mu)) / tokens
                print(f"ct2 {compute_type:<13} (1 call)            : {tokens:6d} tokens in {seconds:7.1f} s = "
                      f"{tokens / seconds:7.1f} tokens/s ({tokens / seconds / batched_rate:.2f}x); with the log mu "
                      f"rescoring ({rescore:.1f} s): {tokens / (seconds + rescore):.1f} tokens/s "
                      f"({tokens / (seconds + rescore) / batched_rate:.2f}x); mean |own - mu| {distance:.4f} "
                      f"nats/token")

def profile_batched(sampler, prompts, settings: dict, rows: int = 12) -> None:
    """The batched call again under `torch.profiler` (CPU activities): each operator's share of self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sampler.sample(prompts, seed=0, **settings)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profile of the batched call ({total / 1e6:.1f} s of self CPU time under the profiler):")
    for event in events[:rows]:
        print(f"  {event.key:<52} {event.self_cpu_time_total / 1e6:7.2f} s {event.self_cpu_time_total / total:6.1%}"
              f"  ({event.count} calls)")


def compiled_rate(model, tokenizer, prompts, max_new_tokens: int, reference: float) -> None:
    """generate with `cache_implementation="static"` and the forward compiled (transformers compiles it itself
    when the cache is static; on CPU only when the compile config allows every device)."""
    from transformers import CompileConfig, GenerationConfig

    from trialign.tokens import left_pad, padding_id, stop_token_ids

    stops = stop_token_ids(tokenizer, model)
    ids, mask = left_pad(prompts, padding_id(tokenizer))
    compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    compile_config._compile_all_devices = True  # transformers' own switch: CPU is not on its default list
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              min_new_tokens=1, eos_token_id=stops, pad_token_id=padding_id(tokenizer),
                              cache_implementation="static", compile_config=compile_config)
    times = []
    with torch.inference_mode():
        for seed in (0, 1):  # the first call compiles; the second runs at the same shapes
            torch.manual_seed(seed)
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            times.append(time.perf_counter() - start)
    # Counted as the reference counts them: each row's tokens up to and including its stop token.
    rows = out[:, ids.shape[1]:].tolist()
    tokens = sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in rows)
    print(f"hf static cache + torch.compile       : {tokens:6d} tokens in {times[1]:7.1f} s = "
          f"{tokens / times[1]:7.1f} tokens/s ({tokens / times[1] / reference:.2f}x); the first call, which "
          f"compiles: {times[0]:.1f} s")


if __name__ == "__main__":
    main()
