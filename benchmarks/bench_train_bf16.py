"""Training-step time in fp32 and under bf16 autocast (`model.autocast`), on the same batches of the shipped config.

    .venv/bin/python benchmarks/bench_train_bf16.py [--data_dir runs/rollout/arc_easy] [--steps 3]

Takes the first batch of cross-group states only and the first batch holding an episode item from the rollout (the
demo's, by default), builds `configs/trialign.yaml`'s module once, and times optimizer steps alternating fp32 and
bf16 (one warm-up each, then the median of `--steps`), so that both see the same load. Also prints whether this
device has native bf16 (`trialign.backbone.native_bf16`): where it does not, bf16 is emulated and slower, and
`model.autocast: null` keeps fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import build  # noqa: E402


def first_batches(datamodule) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for rows in datamodule.make_dataloader("train").dataset:
        kind = "states" if all(r.get("kind") == "state" for r in rows) else "with an episode item"
        found.setdefault(kind, rows)
        if len(found) == 2:
            break
    return found


def optimizer_step(module, optimizer, batch, bf16: bool) -> float:
    """One optimizer step of `module` on `batch`, its forward under bf16 autocast or not; returns its seconds."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = module.compute_loss(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(ROOT / "runs/rollout/arc_easy"))
    parser.add_argument("--batch_size", type=int, default=2, help="items per batch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision and batch")
    args = parser.parse_args()
    from trialign.backbone import native_bf16

    module, datamodule, _, _ = build("configs/trialign.yaml", args.data_dir, args.batch_size, "/tmp/bench_bf16")
    module.configure_model()
    optimizer = module.configure_optimizers()
    module.train()
    print(f"threads {torch.get_num_threads()}, native bf16: {native_bf16()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for kind, rows in first_batches(datamodule).items():
        batch = datamodule.collator(rows)
        step = lambda bf16: optimizer_step(module, optimizer, batch, bf16)  # noqa: E731
        step(False), step(True)  # warm-up
        times = {False: [], True: []}
        for _ in range(args.steps):
            for bf16 in (False, True):
                times[bf16].append(step(bf16))
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"{kind} ({len(rows)} items): fp32 {fp32:.2f} s/step, bf16 autocast {bf16:.2f} s/step, "
              f"{fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
