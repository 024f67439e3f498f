"""The venv holds exactly the pinned stack of constraints.txt (what scripts/setup_env.sh installs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_env", ROOT / "scripts" / "check_env.py")
check_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_env)


@pytest.mark.pinned
def test_the_environment_holds_exactly_the_constraints_versions():
    pins = check_env.read_constraints(ROOT / "constraints.txt")
    assert {"torch", "transformers", "peft", "lightning", "datasets", "jsonargparse", "torchmetrics"} <= set(pins)
    assert check_env.differences(pins, check_env.installed()) == []


def test_differences_name_each_mismatch_and_match_local_labels():
    pins = {"torch": "2.13.0", "peft": "0.21.2", "numpy": "2.4.6"}
    have = {"torch": "2.13.0", "peft": "0.22.0", "tqdm": "4.70.1"}  # torch 2.13.0+cpu reads as 2.13.0
    assert check_env.public("2.13.0+cpu") == "2.13.0"
    assert check_env.differences(pins, have) == [
        "peft: 0.22.0 installed, 0.21.2 pinned", "numpy: pinned at 2.4.6 but not installed",
        "tqdm: 4.70.1 installed but not pinned"]


def test_constraints_file_lines_are_exact_pins(tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("# header\ntorch==2.13.0\npeft>=0.21\n")
    with pytest.raises(SystemExit, match=r"constraints.txt:3: expected 'name==version', got 'peft>=0.21'"):
        check_env.read_constraints(bad)
