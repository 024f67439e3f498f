"""Training-step cost on one batch: a TriAlign step, a BC step, our DPO step, and HF TRL's DPOTrainer.

    .venv/bin/python benchmarks/bench_train.py [--data_dir runs/rollout/truthfulqa] [--batch_size 1] [--steps 2]

All variants take the first training batch of the same data (the demo rollout if it exists, else a synthetic one from
tests/data_factory.py) and the model, LoRA and settings of the shipped configs (configs/trialign.yaml,
configs/baselines/bc.yaml, configs/baselines/dpo.yaml). TRL gets the same model and LoRA, and the DPO pairs built the
way `PairwiseDPO` builds them: for each (item, group, turn), the sample with the highest stored return against the one
with the lowest (ties give no pair); the prompt is the winner's state s_t, so TRL runs each pair's history once per
pair where our step runs each episode's turns in one sequence. TRL's reference is the adapter-disabled model, as ours.

Each variant runs in its own process, so that its peak memory (resident set size, `getrusage`) is its own. Reported:
seconds per optimizer step (median over `--steps` after one warm-up step), assistant tokens per second (the action
tokens a step trains on: every valid turn of every episode for ours; chosen + rejected completions for TRL), peak RSS,
and the cost of a TriAlign step per item-group over a TRL DPO step per item-group (target: at most 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"trialign": "configs/trialign.yaml", "bc": "configs/baselines/bc.yaml", "dpo": "configs/baselines/dpo.yaml"}
VARIANTS = ("trialign", "bc", "dpo", "trl_dpo")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def synthetic_data(folder: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from data_factory import write_synthetic_rollout

    names = ["neutral", "retired_farmer", "phd_researcher", "english_learner", "teenager", "devout_believer"]
    return str(write_synthetic_rollout(folder, items=8, groups=names, samples=2, turns=2, seed=0))


def build(config: str, data_dir: str, batch_size: int, root: str):
    """The module and data module of a shipped config, and the first training batch (rows and collated)."""
    from trialign.lightning_cli import make_cli

    cli = make_cli(["--config", str(ROOT / config), "--data.data_dir", data_dir, "--data.batch_size", str(batch_size),
                    "--trainer.default_root_dir", root], run=False)
    rows = next(iter(cli.datamodule.make_dataloader("train").dataset))
    return cli.model, cli.datamodule, rows, cli.datamodule.collator(rows)


def time_steps(step, steps: int) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def run_module(variant: str, data_dir: str, batch_size: int, steps: int, root: str) -> dict:
    import torch

    module, _, rows, batch = build(CONFIGS[variant], data_dir, batch_size, root)
    module.configure_model()
    optimizer = module.configure_optimizers()
    module.train()

    def step():
        loss, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    times = time_steps(step, steps)
    valid = batch["turn_mask"].bool()
    return {"seconds": statistics.median(times), "tokens": int(batch["num_tokens"][valid].sum()),
            "item_groups": len(rows) * len(module.group_names), "threads": torch.get_num_threads()}


def dpo_pairs(rows: list[dict]) -> list[dict]:
    """Best-vs-worst pairs by stored return within each (item, group, turn), as conversational TRL examples."""
    pairs = []
    for row in rows:
        for group in row["groups"]:
            episodes = group["episodes"]
            for t in range(max(len(e["turns"]) for e in episodes)):
                present = [e for e in episodes if len(e["turns"]) > t]
                ranked = sorted(present, key=lambda e: -e["turns"][t]["ret"])
                best, worst = ranked[0], ranked[-1]
                if best["turns"][t]["ret"] <= worst["turns"][t]["ret"]:
                    continue
                prompt = [{"role": "system", "content": group["system"]}] if group["system"] else []
                for turn in best["turns"][:t]:
                    prompt += [{"role": "user", "content": turn["user"]},
                               {"role": "assistant", "content": turn["assistant"]}]
                prompt.append({"role": "user", "content": best["turns"][t]["user"]})
                pairs.append({"prompt": prompt,
                              "chosen": [{"role": "assistant", "content": best["turns"][t]["assistant"]}],
                              "rejected": [{"role": "assistant", "content": worst["turns"][t]["assistant"]}]})
    return pairs


def run_trl(data_dir: str, batch_size: int, steps: int, root: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trialign.backbone import attach_lora, load_model

    module, datamodule, rows, batch = build(CONFIGS["dpo"], data_dir, batch_size, root)
    pairs = dpo_pairs(rows)
    if not pairs:
        raise SystemExit("bench: the batch has no (item, group, turn) with two different returns: no DPO pairs")
    policy = attach_lora(load_model(module.policy.source), module.policy.lora, ("default",))  # TRL wants "default"
    tokenizer = datamodule.tokenizer
    tokenizer.padding_side = "right"
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    config = DPOConfig(output_dir=os.path.join(root, "trl"), per_device_train_batch_size=len(pairs),
                       max_steps=steps + 1, learning_rate=5e-4, beta=float(module.objective.beta),
                       max_length=datamodule.max_length, logging_steps=1, report_to="none", save_strategy="no",
                       use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, gradient_checkpointing=False)
    dataset = Dataset.from_list(pairs * (steps + 1))
    trainer = DPOTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Timer()])
    # TRL stacks chosen and rejected rows; `completion_mask` marks their assistant tokens.
    tokens = int(next(iter(trainer.get_train_dataloader()))["completion_mask"].sum())
    trainer.train()
    return {"seconds": statistics.median(times[1:]), "tokens": tokens, "pairs": len(pairs),
            "item_groups": len(rows) * len(module.group_names), "threads": torch.get_num_threads()}


def child(variant: str, data_dir: str, batch_size: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        if variant == "trl_dpo":
            result = run_trl(data_dir, batch_size, steps, root)
        else:
            result = run_module(variant, data_dir, batch_size, steps, root)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(ROOT / "runs/rollout/truthfulqa"))
    parser.add_argument("--batch_size", type=int, default=1, help="items per batch")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data_dir, args.batch_size, args.steps)
        return
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir if Path(args.data_dir).is_dir() else synthetic_data(Path(scratch) / "data")
        print(f"data: {data_dir} ({'demo rollout' if data_dir == args.data_dir else 'synthetic'}), "
              f"batch of {args.batch_size} item(s)")
        results = {}
        for variant in args.variants:
            if variant == "trl_dpo":
                try:
                    import trl  # noqa: F401
                except ImportError:
                    print("trl_dpo: skipped (pip install trl, the `bench` extra)")
                    continue
            done = subprocess.run([sys.executable, __file__, "--child", variant, "--data_dir", data_dir,
                                   "--batch_size", str(args.batch_size), "--steps", str(args.steps)],
                                  capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{variant}: failed\n{done.stderr[-2000:]}")
                continue
            results[variant] = result = json.loads(lines[-1][len("RESULT "):])
            print(f"{variant:9s} {result['seconds']:8.2f} s/step  {result['tokens'] / result['seconds']:8.1f} "
                  f"assistant tok/s  peak RSS {result['peak_rss_mb']:7.0f} MB  "
                  f"({result['tokens']} tokens, {result['item_groups']} item-groups"
                  f"{', %d pairs' % result['pairs'] if 'pairs' in result else ''})")
        if "trialign" in results and "trl_dpo" in results:
            ours, theirs = results["trialign"], results["trl_dpo"]
            ratio = (ours["seconds"] / ours["item_groups"]) / (theirs["seconds"] / theirs["item_groups"])
            print(f"TriAlign step / TRL DPO step, per item-group: {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
