"""Security rules for what users hand the framework: nothing is unpickled beyond tensors and plain data, YAML is read
with safe loaders, a model's own Python code runs only when the user turns trust_remote_code on, and names read from
data cannot make a path leave the run folder. Each attack leaves a marker file if it works; none may appear.

Bad inputs of the same files in general (truncated, wrong types, ...) are in test_bad_inputs.py.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from trialign.cli import main
from trialign.errors import TriAlignError

PACKAGE = Path(__file__).resolve().parents[1] / "trialign"
ROOT = PACKAGE.parent


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_source_never_unpickles_or_loads_unsafe_yaml_or_enables_remote_code(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    for node, name in calls(tree):
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
        if name in ("torch.load", "torch.serialization.load"):
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{where} without weights_only=True")
        if name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve"):
            problems.append(f"{where}: pickle-like loading")
        if name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
            problems.append(f"{where}: use yaml.safe_load")
        if name in ("eval", "exec"):
            problems.append(f"{where}: evaluates text as code")
        if isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value:
            problems.append(f"{where} with allow_pickle=True")
        remote = keywords.get("trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is not False:
            problems.append(f"{where} with trust_remote_code={remote.value!r}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + \
                node.args.kw_defaults
            for argument, default in zip(arguments, defaults):
                if argument.arg == "trust_remote_code" and not (isinstance(default, ast.Constant)
                                                                and default.value is False):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: trust_remote_code must "
                                    "default to False")
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "trust_remote_code":
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: setting trust_remote_code must default "
                                "to False")
    assert not problems, problems


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_carrying_code_is_refused_and_not_run(tmp_path, tiny_model_dir, capsys):
    from data_factory import NO_TASK_VALIDATION, write_synthetic_rollout

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "gift.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "callbacks": {"x": Payload(marker)}}, checkpoint)
    data = write_synthetic_rollout(tmp_path / "data", items=4, groups=["neutral", "teen"])
    code = main(["validate", "--config", str(ROOT / "configs/trialign.yaml"), "--model.model", tiny_model_dir,
                 "--data.data_dir", str(data), "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--ckpt_path", str(checkpoint), *NO_TASK_VALIDATION])
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint {checkpoint}: holds Python objects such as posix.system" in err, err
    assert "weights_only=True" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


YAML_PAYLOAD = "!!python/object/apply:os.system ['touch {marker}']"


def test_yaml_python_tags_are_refused_in_every_file_a_user_writes(tmp_path, tiny_model_dir, capsys):
    from data_factory import NO_TASK_VALIDATION, write_synthetic_rollout
    from trialign.groups import load_groups

    marker = tmp_path / "pwned"
    payload = YAML_PAYLOAD.format(marker=marker)
    data = write_synthetic_rollout(tmp_path / "data", items=4, groups=["neutral", "teen"])
    fit = ["fit", "--config", str(ROOT / "configs/trialign.yaml"), "--model.model", tiny_model_dir,
           "--data.data_dir", str(data), "--trainer.default_root_dir", str(tmp_path / "run"), *NO_TASK_VALIDATION]
    files = {name: tmp_path / f"{name}.yaml" for name in ("config", "component", "rollout", "groups", "evaluate")}
    files["config"].write_text(f"trainer:\n  max_steps: {payload}\n")
    files["component"].write_text(f"class_path: trialign.modules.aggregators.MaxMin\ninit_args:\n  "
                                  f"temperature: {payload}\n")
    files["rollout"].write_text(f"samples: {payload}\n")
    files["groups"].write_text(f"groups:\n  - id: x\n    name: {payload}\n")
    files["evaluate"].write_text(f"limit: {payload}\n")
    commands = {
        "config": [*fit, "--config", str(files["config"])],
        "component": [*fit, "--model.aggregator", str(files["component"])],
        "rollout": ["rollout", "--config", str(files["rollout"]), "--output", str(tmp_path / "out")],
        "evaluate": ["evaluate", "--config", str(files["evaluate"]), "--output", str(tmp_path / "out")],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert "python/object/apply" in capsys.readouterr().err, name
    with pytest.raises(TriAlignError, match="python/object/apply"):
        load_groups(str(files["groups"]))
    assert main(["rollout", "--set", f"samples={payload}", "--output", str(tmp_path / "out")]) == 2  # kept as text
    assert not marker.exists() and not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def remote_code_model(folder: Path, marker: Path, source: str) -> Path:
    """A copy of the tiny model whose config maps the Auto classes to Python code in the folder (the hub's
    trust_remote_code mechanism); importing that code creates `marker`."""
    shutil.copytree(source, folder)
    (folder / "custom_llama.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_llama", auto_map={"AutoConfig": "custom_llama.CustomConfig",
                                                       "AutoModelForCausalLM": "custom_llama.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_models_own_code_does_not_run_unless_asked(tmp_path, tiny_model_dir, capsys):
    from trialign.backbone import load_model

    marker = tmp_path / "pwned"
    model = remote_code_model(tmp_path / "model", marker, tiny_model_dir)
    with pytest.raises(TriAlignError, match=r"needs custom Python code shipped with it \(trust_remote_code\)"):
        load_model(str(model))
    code = main(["rollout", "--model", str(model), "--task", "truthfulqa_mc1", "--limit", "1", "--group-ids",
                 "neutral", "--samples", "1", "--turns", "1", "--no-progress", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"model source '{model}': the model needs custom Python code" in err, err
    assert not marker.exists()


def test_group_names_from_data_cannot_name_a_folder_outside_the_run(tiny_model_dir, tmp_path):
    """Per-group adapters are exported to <adapter_dir>/<group>/: a group id is checked where it is read (data:
    test_bad_inputs.py) and again where it becomes a folder name."""
    from trialign.modules.aggregators import Utilitarian
    from trialign.modules.objectives import AdvantageWeighted
    from trialign.modules.penalties import NoPenalty
    from trialign.modules.trialign_module import TriAlignModule
    from trialign.modules.values import MonteCarlo

    for hostile in (str(tmp_path / "outside"), "../outside", "a/b", "..", "x y"):
        with pytest.raises(TriAlignError, match="model.group_names: group id .* must be non-empty letters"):
            TriAlignModule(["neutral", hostile], MonteCarlo(), AdvantageWeighted(), Utilitarian(), NoPenalty(),
                           model=tiny_model_dir, per_group_adapters=True)
    assert not (tmp_path / "outside").exists()
