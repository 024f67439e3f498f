"""benchmarks/gpu_scale.py: its FLOP count against hand-computed products and `FlopCounterMode`, its CPU version (a
2-process DDP fit of a tiny model, as CI runs it) end to end, and the FSDP fit it builds for GPUs (parsed only here).
Also the gradient clipping that the first FSDP fit on a GPU needed (`TriAlignModule.configure_gradient_clipping`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_scale  # noqa: E402


def test_counted_flops_of_a_linear_layer_forward_and_backward_are_the_hand_computed_products():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with gpu_scale.CountedFlops() as counter:
        layer(x).sum().backward()
    # forward x @ W^T, backward grad_x = g @ W and grad_W = g^T @ x: three products of 8 x 64 x 32, 2 FLOPs each.
    assert counter.total == 3 * 2 * 8 * 64 * 32
    assert counter.attention == 0


def test_counted_flops_equal_flop_counter_mode_on_a_model_step(embedded_tokenizer):
    model = make_tiny_model(len(embedded_tokenizer)).train()
    ids = torch.randint(0, len(embedded_tokenizer), (3, 17))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    with gpu_scale.CountedFlops() as counter:
        step()
    with FlopCounterMode(display=False) as reference:
        step()
    assert counter.total == reference.get_total_flops() > 0


def fsdp_config(tmp_path, model_dir: str, checkpointing: bool):
    from data_factory import write_synthetic_rollout
    from trialign.lightning_cli import TriAlignCLI, make_cli

    class ParseOnly(TriAlignCLI):
        def instantiate_classes(self) -> None:
            pass

    args = SimpleNamespace(tiny=False, checkpointing=checkpointing, batch_size=4, steps=12, warmup=2, profile=None)
    data = write_synthetic_rollout(tmp_path / "data", groups=["neutral", "teenager"])
    argv = gpu_scale.fit_args(args, Path(model_dir), data, tmp_path)
    assert argv[0] == "fit"
    return make_cli(argv[1:], run=False, cli_class=ParseOnly).config


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_gpu_fit_is_the_shipped_fsdp_config_with_the_meter(tmp_path, tiny_model_dir, checkpointing):
    config = fsdp_config(tmp_path, tiny_model_dir, checkpointing)
    trainer = config.trainer
    assert trainer.strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    assert trainer.precision == "bf16-mixed" and trainer.max_steps == 12 and trainer.limit_val_batches == 0
    policy = trainer.strategy.init_args.activation_checkpointing_policy
    assert (policy is not None) == checkpointing
    assert [c.class_path for c in trainer.callbacks] == ["gpu_scale.StepMeter"]
    assert trainer.callbacks[0].init_args.warmup == 2
    assert config.model.lora.target_modules == "all-linear" and config.data.batch_size == 4
    assert config.checkpoint.save_last is False and config.validate_before_fit is False


@pytest.mark.slow
def test_the_cpu_version_fits_with_two_process_ddp_and_reports_counted_throughput(tmp_path):
    output = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_scale.py"), "--tiny", "--steps", "3",
                           "--warmup", "1", "--batch_size", "2", "--work", str(tmp_path / "work"),
                           "--output", str(output)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["strategy"] == "DDPStrategy" and report["world_size"] == 2 and report["timed_steps"] == 2
    assert report["parameters"] == sum(p.numel() for p in make_tiny_model(49152).parameters())
    assert report["tokens_per_step"] > 0 and report["tokens_per_s"] > 0
    # Every token runs forward through the decoder layers at least once (2 FLOPs per weight); no step executes more
    # than policy forward, backward and a reference forward through every weight, the output head included.
    layers = report["parameters"] - 49152 * 64
    assert 2 * layers <= report["flops_per_token"] <= 8 * report["parameters"]
    assert 0 < report["fraction_of_measured_peak"] < 1
    assert f"{report['tokens_per_s']:.0f} tokens/s" in done.stdout


class _RecordingFSDPModel:
    def __init__(self) -> None:
        self.clipped: list[float] = []

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.clipped.append(max_norm)


def test_gradient_clipping_under_fsdp_goes_through_the_root_fsdp_module(tiny_model_dir):
    from lightning.pytorch.strategies import FSDPStrategy

    from trialign.modules.aggregators import NashSocialWelfare
    from trialign.modules.objectives import AdvantageWeighted
    from trialign.modules.penalties import CombinedPenalty
    from trialign.modules.trialign_module import TriAlignModule
    from trialign.modules.values import MonteCarlo

    module = TriAlignModule(["neutral", "teenager"], MonteCarlo(), AdvantageWeighted(), NashSocialWelfare(),
                            CombinedPenalty(), model=tiny_model_dir)
    strategy = FSDPStrategy()
    strategy._model = _RecordingFSDPModel()
    module._trainer = SimpleNamespace(strategy=strategy)
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm=None)
    module.configure_gradient_clipping(None, gradient_clip_val=None, gradient_clip_algorithm=None)
    assert strategy.model.clipped == [1.0, 0.5]


def test_trace_summary_counts_overlapping_kernels_once_and_ranks_them(tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"cat": "kernel", "name": "gemm", "ts": 0, "dur": 400},
        {"cat": "kernel", "name": "add", "ts": 300, "dur": 200},      # overlaps the gemm by 100 us
        {"cat": "kernel", "name": "add", "ts": 1000, "dur": 100},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # not a kernel
    ]}))
    summary = gpu_scale.trace_summary(trace, seconds=0.002)
    assert summary["kernels"] == 3
    assert summary["gpu_busy_seconds"] == pytest.approx(600e-6)  # [0, 500) and [1000, 1100)
    assert summary["gpu_busy_fraction"] == pytest.approx(0.3)
    assert summary["top_kernels"] == [{"name": "gemm", "seconds": pytest.approx(400e-6)},
                                      {"name": "add", "seconds": pytest.approx(300e-6)}]
