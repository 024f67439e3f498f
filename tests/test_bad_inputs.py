"""A catalogue of bad inputs, each through the command line, each held to the same contract:

* exit status 2 (a `TriAlignError`), and exactly one stderr line reading ``trialign <command>: error: ...`` that
  names the field or file and says what was expected;
* no traceback (unless ``--debug``: see the subprocess tests at the end);
* nothing already on disk changed: every case runs against a workspace holding the inputs and a finished earlier run
  (its checkpoints, exported adapters and logs), and bad ``fit`` runs point at that run's folder. The workspace is
  hashed before and after; only cases whose error can only show once the trainer has started (a model whose weights
  do not load, a checkpoint of another model config) may add a new, separate ``lightning_logs/version_*`` folder.

The cases run in this process through `trialign.cli.main` (imports paid once); a few subprocesses at the end prove
the exit status and the absence of a traceback end to end. Loader-level checks of the same inputs (message details,
every variant of a malformed group file, ...) stay with their modules' tests: test_datamodule.py, test_groups.py,
test_rollout.py, test_evaluate.py, test_configs.py.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from data_factory import NO_TASK_VALIDATION, synthetic_rows, write_rollout_rows, write_synthetic_rollout
from trialign.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["neutral", "teen", "retiree"]


@dataclass
class World:
    """The workspace every case runs against."""

    root: Path
    model: str
    data: Path
    run: Path
    """A finished `fit` run: checkpoints/last.ckpt, adapter/, lightning_logs/."""

    def input(self, name: str) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def fit(self, *extra: str, root: Path | None = None) -> list[str]:
        return ["fit", "--config", str(ROOT / "configs/trialign.yaml"), *NO_TASK_VALIDATION,
                "--model.model", self.model,
                "--model.lora.target_modules", "all-linear", "--data.data_dir", str(self.data),
                "--trainer.default_root_dir", str(root or self.run), "--trainer.max_steps", "1",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--validate_before_fit", "false", "--validate_after_fit", "false", *extra]

    def rollout(self, *extra: str) -> list[str]:
        return ["rollout", "--model", self.model, "--task", "truthfulqa_mc1", "--limit", "2", "--group-ids", "neutral",
                "teenager", "--samples", "1", "--turns", "1", "--max-new-tokens", "4", "--no-progress", "--output",
                str(self.root / "rollout_out"), *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    data = write_synthetic_rollout(root / "data", items=6, groups=GROUPS, seed=4)
    w = World(root, tiny_model_dir, data, root / "run")
    assert main(w.fit()) == 0
    assert (w.run / "checkpoints/last.ckpt").is_file() and (w.run / "adapter/adapter_model.safetensors").is_file()
    return w


@dataclass
class Bad:
    argv: list[str]
    names: str
    """The field or file the message must name."""
    expects: str
    """What the message must say was expected (or what is wrong)."""
    may_add: str = ""
    """A regular expression of the new files this case may leave (relative to the workspace); none by default."""


NEW_LOG_VERSION = r"run/lightning_logs/version_\d+/[^/]+"
"""For errors that can only show once the trainer has started: Lightning's logger has opened a new version folder."""
MANIFEST_LOCK = r".*/\.manifest\.lock"
"""The rollout's (empty) advisory lock file, taken to read an existing folder's manifest safely: other processes
of a sharded rollout may be writing it."""


CASES: dict[str, Callable[[World], Bad]] = {}


def case(function: Callable[[World], Bad]) -> Callable[[World], Bad]:
    CASES[function.__name__] = function
    return function


def write_rows(w: World, name: str, rows: list[dict], groups=GROUPS, **kwargs) -> Path:
    return write_rollout_rows(w.input(name), rows, groups, **kwargs)


# --- command-line flags -------------------------------------------------------------------------------------------
@case
def flag_of_the_wrong_type(w):
    return Bad(w.fit("--trainer.max_steps", "many"), "trainer.max_steps", "Expected a <class 'int'>")


@case
def flag_that_does_not_exist(w):
    return Bad(w.fit("--trainer.max_stepz", "3"), "--trainer.max_stepz", "unrecognized arguments")


@case
def coefficient_out_of_range(w):
    return Bad(w.fit("--model.kl_coef", "-0.5"), "model.kl_coef", "expected a finite value >= 0")


@case
def reference_group_the_data_lacks(w):
    return Bad(w.fit("--model.reference_group", "teenager"), "model.reference_group", "is not one of the data's groups")


@case
def rollout_count_of_the_wrong_type(w):
    return Bad(w.rollout("--samples", "two"), "--samples", "invalid int value")


# --- checkpoints given on the command line --------------------------------------------------------------------------
@case
def checkpoint_that_does_not_exist(w):
    return Bad(w.fit("--ckpt_path", str(w.run / "checkpoints/nope.ckpt")), "nope.ckpt", "file not found")


@case
def truncated_checkpoint(w):
    path = w.input("truncated.ckpt")
    data = (w.run / "checkpoints/last.ckpt").read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return Bad(w.fit("--ckpt_path", str(path)), str(path), "expected a complete torch.save zip archive")


@case
def checkpoint_with_a_flipped_byte(w):
    path = w.input("flipped.ckpt")
    data = bytearray((w.run / "checkpoints/last.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return Bad(w.fit("--ckpt_path", str(path)), str(path), "does not match its CRC-32 checksum")


@case
def resume_last_when_last_ckpt_is_truncated(w):
    """A node died while something (not trialign: its writes are atomic) copied the run folder."""
    copy = w.root / "inputs" / "copied_run"
    shutil.copytree(w.run, copy)
    last = copy / "checkpoints/last.ckpt"
    last.write_bytes(last.read_bytes()[:4096])
    return Bad(w.fit("--ckpt_path", "last", root=copy), str(last), "truncated or not a PyTorch checkpoint")


@case
def checkpoint_of_another_model_config(w):
    path = w.input("other_config.ckpt")
    checkpoint = torch.load(w.run / "checkpoints/last.ckpt", weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "value_heads" not in k}
    torch.save(checkpoint, path)
    return Bad(w.fit("--ckpt_path", str(path)), str(path), "missing trainable weights", may_add=NEW_LOG_VERSION)


# --- YAML configs ---------------------------------------------------------------------------------------------------
@case
def config_file_that_does_not_exist(w):
    path = w.root / "inputs" / "mising.yaml"
    return Bad(w.fit("--config", str(path)), str(path), "not found")


@case
def config_file_with_a_yaml_syntax_error(w):
    path = w.input("syntax.yaml")
    path.write_text("trainer:\n  max_steps: [1\nmodel: {}\n")
    return Bad(w.fit("--config", str(path)), str(path), "line 3 invalid YAML")


@case
def config_file_that_is_a_list(w):
    path = w.input("list.yaml")
    path.write_text("- trainer\n- model\n")
    return Bad(w.fit("--config", str(path)), str(path), "expected a mapping of settings, got list")


@case
def config_key_that_does_not_exist(w):
    path = w.input("unknown_key.yaml")
    path.write_text("trainer:\n  max_stepz: 3\n")
    return Bad(w.fit("--config", str(path)), "trainer.max_stepz", "does not accept option")


@case
def config_value_of_the_wrong_type(w):
    path = w.input("wrong_type.yaml")
    path.write_text("model:\n  value_coef: half\n")
    return Bad(w.fit("--config", str(path)), "model.value_coef", "Expected a <class 'float'>")


@case
def component_file_with_an_unknown_argument(w):
    path = w.input("aggregator.yaml")
    path.write_text("class_path: trialign.modules.aggregators.NashSocialWelfare\ninit_args:\n  epsilon: 0.1\n")
    return Bad(w.fit("--model.aggregator", str(path)), f"model.aggregator from component file {path}",
               "Option 'epsilon' is not accepted")


@case
def component_class_that_does_not_exist(w):
    path = w.input("no_such_class.yaml")
    path.write_text("model:\n  penalty:\n    class_path: trialign.modules.penalties.NoSuchPenalty\n")
    return Bad(w.fit("--config", str(path)), "trialign.modules.penalties.NoSuchPenalty", "model.penalty")


@case
def rollout_config_with_an_unknown_setting(w):
    path = w.input("rollout_unknown.yaml")
    path.write_text("samples: 2\nsampels: 3\n")
    return Bad(w.rollout("--config", str(path)), f"config file {path}", "unknown setting(s) sampels; known: alpha")


@case
def rollout_config_value_of_the_wrong_type(w):
    path = w.input("rollout_type.yaml")
    path.write_text("temperature: hot\n")
    return Bad(w.rollout("--config", str(path)), f"config file {path}: temperature", "expected a number")


# --- group files ----------------------------------------------------------------------------------------------------
@case
def group_file_that_does_not_exist(w):
    path = w.root / "inputs" / "groupz.yaml"
    return Bad(w.rollout("--groups", str(path)), str(path), "group file not found")


@case
def group_id_that_is_a_path(w):
    path = w.input("groups_path_id.yaml")
    path.write_text("groups:\n  - id: ../../outside\n    name: Outside\n    explicit: I live outside.\n"
                    "    implicit: hi from outside\n")
    return Bad(w.rollout("--groups", str(path)), str(path), "must be non-empty letters, digits, '_' or '-'")


@case
def group_file_with_a_duplicate_id(w):
    path = w.input("groups_duplicate.yaml")
    group = "  - id: teen\n    name: Teen\n    explicit: I am 15.\n    implicit: sup\n"
    path.write_text("groups:\n" + group + group)
    return Bad(w.rollout("--groups", str(path), "--group-ids", "teen"), str(path), "duplicate group id 'teen'")


# --- datasets -------------------------------------------------------------------------------------------------------
@case
def dataset_with_missing_columns(w):
    rows, _ = synthetic_rows(items=3, groups=GROUPS)
    for row in rows:
        del row["question"]
    folder = write_rows(w, "data_missing_column", rows, shards=1, typed=False)
    return Bad(w.fit("--data.data_dir", str(folder)), str(folder / "shard-00000.parquet"), "missing columns question")


@case
def dataset_column_of_the_wrong_type(w):
    rows, _ = synthetic_rows(items=3, groups=GROUPS)
    for row in rows:
        for group in row["groups"]:
            for episode in group["episodes"]:
                for turn in episode["turns"]:
                    turn["reward"] = str(turn["reward"])
    folder = write_rows(w, "data_wrong_type", rows, shards=1, typed=False)
    return Bad(w.fit("--data.data_dir", str(folder)), "groups.episodes.turns.reward",
               "has type string, expected float")


@case
def empty_dataset(w):
    folder = write_rows(w, "data_empty", [], shards=1)
    return Bad(w.fit("--data.data_dir", str(folder)), "data.data_dir", "hold no rows (empty dataset)")


@case
def truncated_parquet_shard(w):
    rows, _ = synthetic_rows(items=4, groups=GROUPS)
    folder = write_rows(w, "data_truncated", rows, shards=2)
    shard = folder / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    return Bad(w.fit("--data.data_dir", str(folder)), str(shard), "not a readable Parquet file")


@case
def duplicate_item_ids_across_shards(w):
    rows, _ = synthetic_rows(items=4, groups=GROUPS)
    rows[3]["item_id"] = rows[0]["item_id"]
    folder = write_rows(w, "data_duplicates", rows, shards=2)
    return Bad(w.fit("--data.data_dir", str(folder)), "'synthetic/0000'", "duplicate item_id")


@case
def dataset_manifest_that_is_not_json(w):
    rows, _ = synthetic_rows(items=3, groups=GROUPS)
    folder = write_rows(w, "data_manifest", rows, shards=1)
    (folder / "manifest.json").write_text('{"schema_version": 1, "group_ids": [')
    return Bad(w.fit("--data.data_dir", str(folder)), str(folder / "manifest.json"), "not valid JSON")


@case
def dataset_group_id_that_is_a_path(w):
    groups = ["neutral", "/tmp/elsewhere", "retiree"]
    rows, _ = synthetic_rows(items=3, groups=groups)
    folder = write_rows(w, "data_group_path", rows, groups=None, shards=1)  # no manifest: ids come from the rows
    return Bad(w.fit("--data.data_dir", str(folder), "--model.per_group_adapters", "true"), "groups.group",
               "group id '/tmp/elsewhere' must be non-empty letters")


@case
def dataset_folder_that_does_not_exist(w):
    return Bad(w.fit("--data.data_dir", str(w.root / "no_rollout_here")), "data.data_dir", "folder not found")


# --- model sources --------------------------------------------------------------------------------------------------
@case
def model_folder_that_does_not_exist(w):
    missing = str(w.root / "no_model_here")
    return Bad(w.fit("--model.model", missing), f"model source '{missing}'", "tried the embedded aliases")


@case
def model_folder_without_config(w):
    folder = w.input("not_a_model")
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    return Bad(w.fit("--model.model", str(folder)), str(folder), "has no config.json (not a Hugging Face model)")


@case
def model_with_truncated_weights(w):
    folder = w.input("truncated_model")
    shutil.copytree(w.model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return Bad(w.fit("--model.model", str(folder)), str(folder), "complete safetensors weights",
               may_add=NEW_LOG_VERSION)


@case
def gguf_file_that_does_not_exist(w):
    path = str(w.root / "inputs" / "model.Q4.gguf")
    return Bad(w.rollout("--model", path), path, "GGUF file not found")


# --- output paths ---------------------------------------------------------------------------------------------------
@case
def run_folder_that_is_a_file(w):
    blocker = w.input("a_file")
    blocker.write_text("keep me")
    return Bad(w.fit(root=blocker), "trainer.default_root_dir", "expected a folder")


@case
def adapter_folder_that_is_a_file(w):
    blocker = w.input("adapter_file")
    blocker.write_text("keep me")
    return Bad(w.fit("--model.adapter_dir", str(blocker)), "model.adapter_dir", "expected a folder")


@case
def checkpoint_folder_below_a_file(w):
    blocker = w.input("ckpt_blocker")
    blocker.write_text("keep me")
    return Bad(w.fit("--checkpoint.dirpath", str(blocker / "checkpoints")), "checkpoint.dirpath",
               f"expected a folder (or a path where one can be created), but {blocker} is a file")


@case
def rollout_output_holding_another_tools_manifest(w):
    folder = w.input("foreign_output")
    folder.mkdir()
    (folder / "manifest.json").write_text('{"format": "someone-elses"}')
    argv = w.rollout()
    argv[argv.index("--output") + 1] = str(folder)
    return Bad(argv, f"output {folder}", "not a trialign rollout manifest", may_add=MANIFEST_LOCK)


# --- the other commands ---------------------------------------------------------------------------------------------
@case
def evaluate_flag_of_the_wrong_type(w):
    return Bad(["evaluate", "--model", w.model, "--limit", "many"], "--limit", "invalid int value: 'many'")


@case
def evaluate_task_that_does_not_exist(w):
    return Bad(["evaluate", "--model", w.model, "--task", "truthfulqa_mc3", "--limit", "1",
                "--output", str(w.root / "eval_out")], "task", "unknown task 'truthfulqa_mc3'")


@case
def evaluate_probe_precision_that_does_not_exist(w):
    return Bad(["evaluate", "--model", w.model, "--limit", "1", "--probe-precision", "half",
                "--output", str(w.root / "eval_out")], "probe_precision",
               "expected one of auto, float32, autocast, bfloat16, got 'half'")


@case
def experiment_config_that_does_not_exist(w):
    missing = w.input("missing_experiment.yaml")
    return Bad(["experiment", "--config", str(missing)], f"config file {missing}", "not found")


@case
def report_flag_that_does_not_exist(w):
    return Bad(["report", "--experiment", str(w.run), "--colour"], "--colour", "unrecognized arguments")


@case
def report_folder_without_experiment_json(w):
    return Bad(["report", "--experiment", str(w.run)], f"experiment file {w.run / 'experiment.json'}", "not found")


# --------------------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


# `validate` and `test` parse their flags and configs with fit's LightningCLI: fit's cases cover them.
SAME_PARSER_AS_FIT = {"validate", "test"}


def test_the_catalogue_covers_every_command(tmp_path, tiny_model_dir):
    """Every command of `trialign.cli.COMMANDS` has bad-input cases here, and every case runs a real command.
    The cases are built against a scratch workspace: building a case writes its inputs, once per workspace."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, run / "checkpoints" / "last.ckpt")
    scratch = World(tmp_path, tiny_model_dir, write_synthetic_rollout(tmp_path / "data", groups=GROUPS), run)
    covered = {CASES[name](scratch).argv[0] for name in CASES}
    assert covered <= set(COMMANDS), covered - set(COMMANDS)
    assert covered == set(COMMANDS) - SAME_PARSER_AS_FIT, sorted(set(COMMANDS) - SAME_PARSER_AS_FIT - covered)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(world, capsys, name):
    bad = CASES[name](world)
    before = snapshot(world.root)
    capsys.readouterr()
    code = main(bad.argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    (line,) = errors
    assert line.startswith(f"trialign {bad.argv[0]}: error: ")
    assert bad.names in line, line
    assert bad.expects in line, line
    after = snapshot(world.root)
    assert {k: v for k, v in after.items() if k in before} == before, "a file was changed or removed"
    added = sorted(set(after) - set(before))
    assert all(bad.may_add and re.fullmatch(bad.may_add, k) for k in added), added
    old_versions = {Path(k).parts[2] for k in before if k.startswith("run/lightning_logs/")}
    assert not any(Path(k).parts[2] in old_versions for k in added if k.startswith("run/lightning_logs/")), added


# --- end to end: exit status and tracebacks in a real process --------------------------------------------------------
def run_process(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trialign", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_process_exits_2_with_one_line_and_shows_the_traceback_only_with_debug(world, tmp_path):
    argv = CASES["truncated_parquet_shard"](world).argv
    done = run_process(*argv, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("trialign fit: error: rollout file ")
    debug = run_process(*argv, "--debug", cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "trialign.errors.TriAlignError: rollout file " in debug.stderr


@pytest.mark.slow
def test_process_refuses_a_yaml_python_tag_without_running_it(world, tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "rollout.yaml"
    config.write_text(f"samples: !!python/object/apply:os.system ['touch {marker}']\n")
    done = run_process("rollout", "--config", str(config), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"trialign rollout: error: config file {config}: line 1 ")
    assert not marker.exists() and not (tmp_path / "out").exists()
