"""Where the time goes against this machine's limits: matmul peaks, then the probe, a training step and generation.

    .venv/bin/python benchmarks/roofline.py [--items 8] [--data_dir runs/rollout/arc_easy] [--threads N]

1. **Peaks**: 2048 x 2048 matrix products in fp32 and bf16 on this process's threads (GFLOP/s, best of 5).
2. **Answer probe** (`AnswerProbe.answer`, fp32): `--items` ARC-Easy items x 9 default groups with the default
   template, as `trialign evaluate` asks them.
3. **Training steps** of `configs/trialign.yaml` on the rollout in `--data_dir` (default: the demo's): a batch of
   cross-group states only and a batch holding an episode item, each in fp32 and under bf16 autocast.
4. **Generation** (`generate_texts`, greedy, the evaluation's generate mode): one response of 32 new tokens per
   (item, group) of 2 items, in fp32 and under bf16 autocast (tokens/s).

FLOPs are counted, not estimated: each workload runs once under `torch.utils.flop_counter.FlopCounterMode` (the
matmuls and attention it executes, forward and backward), then again timed without it. Achieved GFLOP/s is
counted FLOPs / seconds, and the fraction is of the peak of the precision the workload's matmuls ran in. Elementwise
work (norms, softmax, the optimizer) counts no FLOPs, so a low fraction means time spent outside matrix products or
in small ones, not necessarily a slow kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """GFLOP/s of the best of `repeats` size x size matrix products on `device` (benchmarks/gpu_scale.py: 8192 in
    bf16 on a GPU)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    best = min(_seconds(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _seconds(work, device: str = "cpu") -> float:
    """Wall time of `work()`; on a GPU, from and to an idle device."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    work()
    sync()
    return time.perf_counter() - start


def counted(work) -> int:
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def line(name: str, flops: int, seconds: float, peak: float, extra: str = "") -> str:
    achieved = flops / seconds / 1e9
    return (f"{name:<44} {seconds:7.2f} s  {flops / 1e9:9.1f} GFLOP  {achieved:7.1f} GFLOP/s  "
            f"{100 * achieved / peak:5.1f}% of peak{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=8, help="ARC-Easy items for the probe")
    parser.add_argument("--data_dir", default=str(ROOT / "runs/rollout/arc_easy"), help="rollout for the steps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from trialign.backbone import load_model_and_tokenizer, native_bf16

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}; cpu capability {torch.backends.cpu.get_cpu_capability()}; "
          f"native bf16: {native_bf16()}")
    print(f"matmul 2048^2 peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s\n")

    # 2. The answer probe.
    from trialign.groups import load_groups
    from trialign.probe import AnswerProbe, render_context
    from trialign.prompts import build_messages, probe_template
    from trialign.tasks import load_task

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    template = probe_template("question_answer")
    groups = load_groups("default")
    items = load_task("arc_easy", limit=args.items)
    pairs = [(item, group) for item in items for group in groups]
    contexts = [render_context(tokenizer, build_messages(item, group, template=template),
                               answer_prefix=template.answer_prefix) for item, group in pairs]
    probe = AnswerProbe(model, tokenizer, batch_size=32)
    work = lambda: probe.answer([item for item, _ in pairs], contexts)  # noqa: E731
    work()  # warm-up
    flops = counted(work)
    seconds = _seconds(work)
    print(line(f"probe, {len(items)} items x {len(groups)} groups, fp32", flops, seconds, peaks["fp32"],
               f"  ({len(pairs) / seconds:.1f} contexts/s)"))

    # 3. Training steps.
    from bench_train import build
    from bench_train_bf16 import first_batches, optimizer_step

    module, datamodule, _, _ = build("configs/trialign.yaml", args.data_dir, 2, "/tmp/roofline")
    module.configure_model()
    optimizer = module.configure_optimizers()
    module.train()
    for kind, rows in first_batches(datamodule).items():
        batch = datamodule.collator(rows)
        for precision in ("fp32", "bf16"):
            step = lambda bf16=precision == "bf16": optimizer_step(module, optimizer, batch, bf16)  # noqa: E731
            step()
            flops = counted(step)
            seconds = statistics.median(step() for _ in range(2))
            print(line(f"training step, {kind}, {precision}", flops, seconds, peaks[precision]))

    # 4. Generation.
    from trialign.generation import generate_texts

    chats = [tokenizer.apply_chat_template(build_messages(item, group, template=template), tokenize=False,
                                           add_generation_prompt=True) for item in items[:2] for group in groups]
    for precision in ("fp32", "bf16"):
        run = lambda precision=precision: generate_texts(  # noqa: E731
            model, tokenizer, chats, max_new_tokens=32, batch_size=32, autocast=precision == "bf16")
        run()
        flops = counted(run)
        start = time.perf_counter()
        texts = run()
        seconds = time.perf_counter() - start
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        print(line(f"generation, {len(chats)} responses, {precision}", flops, seconds, peaks[precision],
                   f"  ({tokens / seconds:.1f} generated tokens/s)"))


if __name__ == "__main__":
    main()
