"""Two-process DDP on CPU (gloo) against one process on the same data and weights: the same validation metrics.

One DDP `fit` of a tiny model logs the audit metrics before training (step 0) and after it; single-process
`validate` runs of the untrained model and of the DDP run's last checkpoint must give the same numbers. The data
module deals validation items to ranks by item and the metrics sum their states across ranks, so nothing may differ
but float summation order.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from data_factory import write_synthetic_rollout

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ("val/consistency", "val/consistent_correct", "val/acc_worst", "val/acc_gap", "val/breakage_mean")


def trialign(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "trialign", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def logged_rows(root: Path) -> list[dict[str, float]]:
    """Rows of the CSV logger holding validation metrics, in order."""
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    with open(path) as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return [row for row in rows if "val/consistency" in row]


@pytest.mark.slow
def test_two_process_ddp_gives_the_validation_metrics_of_one_process(tmp_path, tiny_model_dir):
    data = write_synthetic_rollout(tmp_path / "data", items=14, groups=["neutral", "teenager", "retired_farmer"],
                                   seed=2,
                                   config={"groups": "default", "expression": "explicit", "system_prompt": "none"})
    # Validation: 4 held-out rollout items and 5 TruthfulQA items (the config's val_task) asked under the personas.
    common = ["--config", str(ROOT / "configs/trialign.yaml"), "--data.val_limit", "5", "--model.model", tiny_model_dir,
              "--model.lora.target_modules", "all-linear", "--data.data_dir", str(data), "--data.val_fraction", "0.3",
              "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.enable_progress_bar", "false",
              "--model.optimizer.init_args.lr", "0.01"]  # large enough for 2 steps to change the answers
    trialign("fit", *common, "--config", str(ROOT / "configs/strategy/ddp_cpu.yaml"), "--trainer.max_steps", "2",
             "--trainer.default_root_dir", str(tmp_path / "ddp"), "--trainer.logger.save_dir", str(tmp_path / "ddp"),
             cwd=tmp_path)
    before, after = logged_rows(tmp_path / "ddp")
    assert before["step"] == 0 and after["step"] == 2

    trialign("validate", *common, "--trainer.default_root_dir", str(tmp_path / "base"),
             "--trainer.logger.save_dir", str(tmp_path / "base"), cwd=tmp_path)
    trialign("validate", *common, "--trainer.default_root_dir", str(tmp_path / "trained"),
             "--trainer.logger.save_dir", str(tmp_path / "trained"),
             "--ckpt_path", str(tmp_path / "ddp/checkpoints/last.ckpt"), cwd=tmp_path)
    (single_before,) = logged_rows(tmp_path / "base")
    (single_after,) = logged_rows(tmp_path / "trained")
    for name in (*AUDIT, *[k for k in before if k.startswith("val/acc/")]):
        assert before[name] == pytest.approx(single_before[name], abs=1e-9), name
        assert after[name] == pytest.approx(single_after[name], abs=1e-9), name
    assert before["val/penalty"] == pytest.approx(single_before["val/penalty"], rel=1e-3)
    assert after["val/penalty"] == pytest.approx(single_after["val/penalty"], rel=1e-3)
    assert after["val/penalty"] != pytest.approx(before["val/penalty"], rel=1e-2)  # training changed the policy
    assert (tmp_path / "ddp/adapter/adapter_model.safetensors").is_file()
