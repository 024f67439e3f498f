"""A second epoch over cross-group states with the trunk memo (`model.trunk_memo_gib`) against the first.

    .venv/bin/python benchmarks/bench_trunk_memo.py [--data_dir runs/rollout/arc_easy] [--items 8] [--fp32]

Builds `configs/trialign.yaml`'s module (LoRA on layers 22-29 of 30, the training precision of the shipped config:
bf16 autocast where native), takes the first `--items` cross-group states of the rollout, and runs:

1. epoch 1: optimizer steps on batches of 2 states, the memo recording every probe row (the full forward) and the
   reference's output that the context KL compares with;
2. epoch 2: the same states paired differently (so padded differently), replayed: the policy through layers 22-29,
   the reference from the memo;
3. epoch 2 again from the same weights with the memo off (the full forward), for the losses to compare.

Prints each epoch's seconds, the ratio epoch 2 / epoch 1, and both epoch-2 loss sequences with their largest
difference (in fp32 they agree to rounding; under bf16 the first step agrees and AdamW carries bf16 rounding into
the later ones). The optimizer steps of epoch 2 are undone between (3) and (2) by restoring the adapters, so both
start from the same weights.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import build  # noqa: E402


def state_items(datamodule, count: int) -> list[dict]:
    found = []
    for rows in datamodule.make_dataloader("train").dataset:
        found += [r for r in rows if r.get("kind") == "state"]
        if len(found) >= count:
            return found[:count]
    raise SystemExit(f"bench_trunk_memo: the rollout has fewer than {count} cross-group states")


def epoch(module, optimizer, batches, bf16: bool) -> tuple[float, list[float]]:
    start, losses = time.perf_counter(), []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return time.perf_counter() - start, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(ROOT / "runs/rollout/arc_easy"))
    parser.add_argument("--items", type=int, default=8, help="cross-group states per epoch (2 a step)")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 (default: the config's precision)")
    args = parser.parse_args()
    from trialign.backbone import native_bf16

    module, datamodule, _, _ = build("configs/trialign.yaml", args.data_dir, 2, "/tmp/bench_trunk_memo")
    module.configure_model()
    memo = module.policy.trunk_memo
    if memo is None:
        raise SystemExit("bench_trunk_memo: the config has no trunk memo (model.trunk_memo_gib: 0)")
    optimizer = module.configure_optimizers()
    module.train()
    bf16 = not args.fp32 and (native_bf16() if module.autocast is None else bool(module.autocast))
    items = state_items(datamodule, args.items)
    first = [datamodule.collator(items[i:i + 2]) for i in range(0, len(items), 2)]
    shifted = items[1:] + items[:1]  # other pairs, so other padding: the memo must serve rows, not batches
    again = [datamodule.collator(shifted[i:i + 2]) for i in range(0, len(shifted), 2)]
    print(f"threads {torch.get_num_threads()}, bf16 autocast {bf16}, trunk depth {module.policy.trunk_depth} of "
          f"{len(module.policy._decoder().layers)} layers, {args.items} states")
    seconds_1, _ = epoch(module, optimizer, first, bf16)
    weights = copy.deepcopy(module.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    replays, reference_replays = memo.replayed, memo.reference_replayed
    seconds_2, losses_2 = epoch(module, optimizer, again, bf16)
    replayed, reference_replayed = memo.replayed - replays, memo.reference_replayed - reference_replays
    module.load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)
    module.policy.trunk_memo = None
    seconds_full, losses_full = epoch(module, optimizer, again, bf16)
    gap = max(abs(a - b) for a, b in zip(losses_2, losses_full))
    print(f"epoch 1 (records): {seconds_1:.1f} s; epoch 2 replayed ({replayed} policy forward passes through the "
          f"adapted layers only, {reference_replayed} reference passes with no layer; "
          f"{memo.rows.nbytes / 2**20:.0f} MiB): {seconds_2:.1f} s = {seconds_2 / seconds_1:.2f} of epoch 1; "
          f"epoch 2 in full: {seconds_full:.1f} s; largest loss difference {gap:.2e} "
          f"(replayed {', '.join(f'{x:.4f}' for x in losses_2)}; full {', '.join(f'{x:.4f}' for x in losses_full)})")


if __name__ == "__main__":
    main()
