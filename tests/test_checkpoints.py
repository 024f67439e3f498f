"""`trialign.checkpoints`: atomic writes (also under SIGKILL), CRC-verified `weights_only` loads with one-line errors,
and the training CLI using them. The resume of a killed `fit` is in test_fit_resume.py; a corrupt checkpoint given
to the CLI is in test_bad_inputs.py."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from trialign import checkpoints
from trialign.checkpoints import SafeCheckpointIO, atomic_save, find_last_checkpoint, load_checkpoint
from trialign.errors import TriAlignError


def sample(value: float = 1.0) -> dict:
    """A checkpoint-like dictionary: tensors, nested plain data, numbers."""
    return {"state_dict": {"w": torch.full((64, 64), value), "b": torch.arange(8.0)}, "global_step": int(value),
            "hyper_parameters": {"group_names": ["a", "b"], "lora": {"r": 4}, "lr": 1e-3, "name": None}}


def one_line_error(path) -> str:
    with pytest.raises(TriAlignError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_save_and_load_round_trip_with_the_usual_permissions(tmp_path):
    path = atomic_save(sample(3.0), tmp_path / "deep" / "last.ckpt")
    loaded = load_checkpoint(path)
    assert loaded["global_step"] == 3 and loaded["hyper_parameters"] == sample()["hyper_parameters"]
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64, 64), 3.0))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_save_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = atomic_save(sample(1.0), tmp_path / "last.ckpt")
    before = path.read_bytes()

    def half_then_die(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(sample(2.0), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_partial_files_of_a_killed_writer_are_never_resumed_and_are_cleaned_up(tmp_path):
    atomic_save(sample(1.0), tmp_path / "last.ckpt")
    time.sleep(0.01)
    atomic_save(sample(2.0), tmp_path / "last-v1.ckpt")  # Lightning's name when last.ckpt belongs to an older run
    time.sleep(0.01)
    stale = tmp_path / ".last.ckpt.k1ll3d.partial"
    stale.write_bytes(b"cut short")
    assert find_last_checkpoint(tmp_path) == tmp_path / "last-v1.ckpt"  # newest complete one, as Lightning picks
    atomic_save(sample(3.0), tmp_path / "last.ckpt")
    assert not stale.exists()
    assert find_last_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    assert find_last_checkpoint(tmp_path / "missing") is None


WRITER = """
import sys, torch
from trialign.checkpoints import atomic_save
data = torch.empty(2_000_000)
version = 0
while True:
    version += 1
    atomic_save({"version": version, "data": data.fill_(version)}, sys.argv[1])
    print(version, flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_saving_leaves_a_complete_checkpoint(tmp_path):
    """A writer saving 8 MB checkpoints in a loop is killed at a random moment: the file on disk is one complete
    version, never a mix or a truncation."""
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "1", writer.stderr.read()
        time.sleep(random.uniform(0.0, 0.5))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    loaded = load_checkpoint(path)
    assert loaded["version"] >= 1 and bool((loaded["data"] == loaded["version"]).all())
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]


def flip_tensor_byte(data: bytes) -> bytes:
    """`data` with one byte flipped inside the first tensor's values (not in the archive's headers)."""
    offset = data.index(torch.full((64, 64), 1.0).numpy().tobytes()[:64]) + 100
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


@pytest.mark.parametrize("damage, expected", [
    (lambda data: data[: len(data) // 2], "truncated or not a PyTorch checkpoint"),
    (lambda data: b"", "truncated or not a PyTorch checkpoint (0 bytes"),
    (flip_tensor_byte, "does not match its CRC-32 checksum"),
    (lambda data: b"seed_everything: 0\ntrainer: {}\n", "expected a complete torch.save zip archive"),
], ids=["truncated", "empty", "flipped-byte", "not-a-checkpoint"])
def test_damaged_checkpoints_are_one_line_errors_naming_the_file(tmp_path, damage, expected):
    path = atomic_save(sample(), tmp_path / "last.ckpt")
    path.write_bytes(damage(path.read_bytes()))
    assert expected in one_line_error(path)


def test_a_flipped_byte_loads_silently_with_plain_torch_load(tmp_path):
    """Why `load_checkpoint` checks the CRCs: torch.load does not."""
    path = atomic_save(sample(), tmp_path / "x.ckpt")
    path.write_bytes(flip_tensor_byte(path.read_bytes()))
    assert not torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], sample()["state_dict"]["w"])
    assert "CRC-32" in one_line_error(path)


def test_missing_file_and_non_dictionary(tmp_path):
    assert "file not found" in one_line_error(tmp_path / "nope.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    assert "expected a checkpoint dictionary, got list" in one_line_error(tmp_path / "list.ckpt")


def test_the_training_cli_writes_through_safe_checkpoint_io(tmp_path, tiny_model_dir):
    from data_factory import NO_TASK_VALIDATION, write_synthetic_rollout
    from trialign.lightning_cli import make_cli

    data = write_synthetic_rollout(tmp_path / "data", items=4, groups=["neutral", "teen"])
    cli = make_cli(["--config", "configs/trialign.yaml", "--model.model", tiny_model_dir, "--data.data_dir", str(data),
                    "--trainer.default_root_dir", str(tmp_path / "run"), *NO_TASK_VALIDATION], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is SafeCheckpointIO
    io = cli.trainer.strategy.checkpoint_io
    io.save_checkpoint(sample(5.0), tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert io.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
