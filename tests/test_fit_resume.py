"""A `fit` killed with SIGKILL at a random step and rerun with ``--ckpt_path last`` ends where an uninterrupted run
ends: the same adapter and value-head weights, bit for bit, and the same final validation metrics (CPU,
deterministic mode). While the killed run writes ``last.ckpt`` after every step, every read of it finds a complete
checkpoint (the write is atomic)."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_factory import NO_TASK_VALIDATION, write_synthetic_rollout
from trialign.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5


def command(model_dir: str, data: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trialign", "fit", "--config", str(ROOT / "configs/trialign.yaml"),
            "--model.model", model_dir, "--model.lora.target_modules", "all-linear", "--data.data_dir", str(data),
            "--trainer.max_steps", str(STEPS), "--trainer.deterministic", "true",
            "--trainer.default_root_dir", str(root), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(root), "--trainer.enable_progress_bar", "false", *NO_TASK_VALIDATION,
            "--data.val_fraction", "0.25", *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def final_validation(root: Path) -> dict[str, float]:
    """The validation metrics logged last (the newest logger version: the resumed run's)."""
    path = max(root.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    with open(path) as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if "val/consistency" in row][-1]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    data = write_synthetic_rollout(tmp_path / "data", items=8, groups=["neutral", "teen", "retiree"], seed=3)
    rng = random.Random()
    kill_after, delay = rng.randint(1, STEPS - 2), rng.uniform(0.0, 0.3)
    context = f"killed after step {kill_after} + {delay:.2f} s"

    straight = tmp_path / "straight"
    done = subprocess.run(command(tiny_model_dir, data, straight), env=environment(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(command(tiny_model_dir, data, killed), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline, seen = time.monotonic() + 600, -1
    try:
        while seen < kill_after:
            assert process.poll() is None, f"{context}: the run ended first\n{process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"{context}: no checkpoint of step {kill_after} in 600 s"
            if last.exists():
                seen = load_checkpoint(last, mmap=True)["global_step"]  # never a partial file
            time.sleep(0.05)
        time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted_at = load_checkpoint(last)["global_step"]
    assert kill_after <= interrupted_at < STEPS, context

    resumed = subprocess.run(command(tiny_model_dir, data, killed, "--ckpt_path", "last"), env=environment(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, f"{context}\n{resumed.stderr[-3000:]}"
    assert not list(killed.glob("checkpoints/.*.partial")), context

    for name in ("adapter_model.safetensors", "value_heads.safetensors"):
        expected, got = load_file(straight / "adapter" / name), load_file(killed / "adapter" / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{context}: {name} {key}"
    expected, got = final_validation(straight), final_validation(killed)
    assert expected["step"] == got["step"] == STEPS
    assert {k: v for k, v in expected.items() if k.startswith("val/")} == \
        {k: v for k, v in got.items() if k.startswith("val/")}, context
