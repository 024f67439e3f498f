"""A rollout killed with SIGKILL mid-run and rerun with the same command equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_rollout import assert_same_rows, load_rows

ITEMS = 5


def command(model_dir: str, output: Path) -> list[str]:
    return [sys.executable, "-m", "trialign", "rollout", "--model", model_dir, "--limit", str(ITEMS),
            "--items-per-shard", "1", "--group-ids", "neutral", "teenager", "--samples", "2", "--turns", "2",
            "--max-new-tokens", "8", "--threads", "1", "--no-progress", "--output", str(output)]


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(tiny_model_dir, killed), env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not list(killed.glob("shard-*.parquet")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard written in 600 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = {p.name: p.read_bytes() for p in killed.glob("shard-*.parquet")}
    assert 1 <= len(written) < ITEMS, "the run finished before it could be killed"

    rerun = subprocess.run(command(tiny_model_dir, killed), env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"wrote {ITEMS - len(written)} shard(s)" in rerun.stdout
    for name, data in written.items():  # shards finished before the kill are kept, not regenerated
        assert (killed / name).read_bytes() == data
    assert not list(killed.glob(".shard-*"))  # no temporary file left behind

    reference = tmp_path / "uninterrupted"
    run = subprocess.run(command(tiny_model_dir, reference), env=environment(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = load_rows(killed)
    ids = [row["item_id"] for row in rows]
    assert len(ids) == len(set(ids)) == ITEMS
    assert_same_rows(rows, load_rows(reference))
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == list(range(ITEMS))
    assert [i for s in manifest["shards"] for i in s["item_ids"]] == ids
