"""Learning-rate schedules: the factors against hand-computed values, the rates a fit's optimizer steps really use,
exact resumption mid-schedule, and errors that name the field."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from test_module import cli_fit, make_batches, make_module, quiet_trainer
from trialign.errors import TriAlignError
from trialign.modules.schedules import lr_factor, total_fit_steps


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, [1, 1, 1, 1]),
    ("linear", 0, [1, 0.75, 0.5, 0.25]),
    ("cosine", 0, [1, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
    # two warm-up steps ramp 1/3, 2/3; the 4 steps after them decay as a 4-step schedule would
    ("linear", 2, [1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25]),
    ("constant", 2, [1 / 3, 2 / 3, 1, 1, 1, 1]),
])
def test_factors_equal_hand_computed_values(schedule, warmup, expected):
    total = len(expected)
    got = [lr_factor(step, total, schedule, warmup) for step in range(total)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_decay_never_reaches_zero_within_the_fit():
    assert lr_factor(29, 30, "linear") == pytest.approx(1 / 30)
    assert 0 < lr_factor(29, 30, "cosine") < 0.003


class RecordRates(Callback):
    """The learning rate each optimizer step used (read before the step, after the scheduler's previous update)."""

    def __init__(self):
        self.rates = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("schedule, warmup", [("linear", 0), ("cosine", 1), ("constant", 0)])
def test_a_fit_steps_the_schedule_every_optimizer_step(tmp_path, tiny_model_dir, embedded_tokenizer, schedule, warmup):
    batches, names = make_batches(embedded_tokenizer, count=2)
    module = make_module(tiny_model_dir, names, lr_schedule=schedule, warmup_steps=warmup,
                         optimizer=lambda params: torch.optim.AdamW(params, lr=0.01))
    record = RecordRates()
    trainer = quiet_trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert record.rates == pytest.approx([0.01 * lr_factor(s, 5, schedule, warmup) for s in range(5)], rel=1e-12)
    # the constant rate is the optimizer alone: no scheduler, as before schedules existed
    assert len(trainer.lr_scheduler_configs) == (0 if schedule == "constant" else 1)
    assert float(trainer.callback_metrics["train/lr"]) == pytest.approx(record.rates[-1], rel=1e-6)


def test_resuming_mid_schedule_equals_an_uninterrupted_fit(tmp_path, tiny_model_dir):
    schedule = ("--model.lr_schedule", "cosine", "--model.warmup_steps", "1")
    assert cli_fit(tmp_path, tiny_model_dir, tmp_path / "straight", 5, *schedule) == 0
    # the same 5-step fit stopped after its first epoch (cli_fit's 6 items in steps of 2: step 3), where resuming is
    # exact; the schedule spans max_steps in both parts
    assert cli_fit(tmp_path, tiny_model_dir, tmp_path / "resumed", 5, *schedule, "--trainer.max_epochs", "1") == 0
    assert cli_fit(tmp_path, tiny_model_dir, tmp_path / "resumed", 5, *schedule, "--ckpt_path", "last") == 0
    straight, resumed = (torch.load(tmp_path / name / "checkpoints/last.ckpt", weights_only=True)
                         for name in ("straight", "resumed"))
    assert straight["lr_schedulers"][0]["last_epoch"] == resumed["lr_schedulers"][0]["last_epoch"] == 5
    rate = resumed["optimizer_states"][0]["param_groups"][0]["lr"]  # after the last step: the schedule's end
    assert rate == pytest.approx(0.003 * lr_factor(5, 5, "cosine", 1), abs=1e-15)
    for key, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], tensor, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr_schedule": "exponential"}, r"model.lr_schedule: expected one of \['constant', 'linear', 'cosine'\]"),
    ({"warmup_steps": -1}, "model.warmup_steps: expected an integer >= 0, got -1"),
    ({"warmup_steps": 1.5}, "model.warmup_steps: expected an integer >= 0, got 1.5"),
])
def test_bad_schedule_settings_name_the_field(tiny_model_dir, kwargs, message):
    with pytest.raises(TriAlignError, match=message):
        make_module(tiny_model_dir, ["a", "b"], **kwargs)


class FakeTrainer:
    """max_steps, and an estimate that fails the test when read (Lightning's sets up the data loaders)."""

    def __init__(self, max_steps, estimate=None):
        self.max_steps, self.estimate = max_steps, estimate

    @property
    def estimated_stepping_batches(self):
        assert self.estimate is not None, "the estimate was read although max_steps is set"
        return self.estimate


def test_the_schedule_spans_max_steps_or_the_estimate_and_refuses_a_warmup_as_long_as_the_fit():
    assert total_fit_steps(FakeTrainer(30), 0) == 30
    assert total_fit_steps(FakeTrainer(-1, 12), 2) == 12
    with pytest.raises(TriAlignError, match="model.warmup_steps: 30 warm-up steps leave none of the fit's 30 steps"):
        total_fit_steps(FakeTrainer(30), 30)
    with pytest.raises(TriAlignError, match="needs trainer.max_steps or trainer.max_epochs"):
        total_fit_steps(FakeTrainer(-1, float("inf")), 0)
