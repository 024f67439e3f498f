"""Every shipped training config parses with the CLI (`run=False`), every component class has a config and every
component config names a class, and bad input through the CLI is a one-line error naming the problem."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.strategies import DDPStrategy

from data_factory import NO_TASK_VALIDATION, write_synthetic_rollout
from trialign.lightning_cli import TriAlignCLI, make_cli
from trialign.modules import aggregators, objectives, penalties, values

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
READ_BY_OTHER_COMMANDS = ("rollout", "audit", "groups", "experiment", "lmeval")  # lmeval: tests/test_lmeval.py
METHOD_CONFIGS = sorted([CONFIGS / "trialign.yaml", *(CONFIGS / "baselines").glob("*.yaml")])
COMPONENT_KINDS = {
    "aggregator": (aggregators, aggregators.Aggregator),
    "penalty": (penalties, penalties.InconsistencyPenalty),
    "value": (values, values.ValueEstimator),
    "objective": (objectives, objectives.PolicyObjective),
}
COMPONENT_CONFIGS = sorted((CONFIGS / "components").glob("*/*.yaml"))
VARIANT_CONFIGS = sorted((CONFIGS / "variants").glob("*.yaml"))
"""Variants of TriAlign's settings (`base: ../trialign.yaml`), compared on development items (experiment/dev.yaml)."""
BASELINES = ("bc", "dpo", "grdpo", "maxmin", "utilitarian", "trialign_no_penalty", "trialign_no_nsw")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small rollout whose groups include the configs' reference group."""
    return str(write_synthetic_rollout(tmp_path_factory.mktemp("data"), items=6, groups=["neutral", "teen", "farmer"]))


def parse(config: Path, data_dir: str, tmp_path: Path, *extra: str) -> TriAlignCLI:
    return make_cli(["--config", str(config), "--data.data_dir", data_dir, "--trainer.default_root_dir",
                     str(tmp_path), *NO_TASK_VALIDATION, *extra], run=False)


def class_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def merged(config: Path) -> dict:
    """The settings a method config ends up with: its `base:` chain merged key by key, later files winning."""
    from trialign.config_io import config_chain

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(a[key], value) if isinstance(value, dict) and isinstance(a.get(key), dict) and \
                "class_path" not in value else value
        return out

    result: dict = {}
    for _, settings in config_chain(config):
        result = merge(result, settings)
    return result


def test_every_method_config_builds_on_the_shared_base():
    from trialign.config_io import config_chain

    for config in METHOD_CONFIGS:
        chain = [path.resolve() for path, _ in config_chain(config)]
        assert chain == [(CONFIGS / "method_base.yaml").resolve(), config.resolve()], config
        own = yaml.safe_load(config.read_text())
        assert "data" not in own and "lora" not in own["model"]  # said once, in the base


def test_every_shipped_yaml_is_covered_by_a_test():
    covered = set(METHOD_CONFIGS) | set(COMPONENT_CONFIGS) | set((CONFIGS / "strategy").glob("*.yaml"))
    covered |= set(VARIANT_CONFIGS)
    covered.add(CONFIGS / "method_base.yaml")
    shipped = {p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] not in READ_BY_OTHER_COMMANDS}
    assert shipped == covered
    assert {p.stem for p in (CONFIGS / "baselines").glob("*.yaml")} == set(BASELINES)


@pytest.mark.parametrize("config", VARIANT_CONFIGS, ids=lambda p: p.stem)
def test_a_variant_is_trialign_with_the_settings_it_names_changed(config, data_dir, tmp_path):
    from trialign.config_io import config_chain

    assert [p for p, _ in config_chain(config)][-2:] == [(CONFIGS / "trialign.yaml").resolve(), config.resolve()]
    own = yaml.safe_load(config.read_text())
    variant, trialign = parse(config, data_dir, tmp_path), parse(CONFIGS / "trialign.yaml", data_dir, tmp_path)
    named = {(section, key) for section in ("model", "trainer") for key in own.get(section, {})}
    named.discard(("trainer", "default_root_dir"))  # its own log folder
    assert named and set(own) <= {"base", "trainer", "model"} and "default_root_dir" in own["trainer"]

    def setting(cli, section, key):  # the live attribute, or the parsed setting the module keeps (the optimizer's)
        obj = getattr(cli, section)
        return getattr(obj, key) if hasattr(obj, key) else obj.hparams[key]

    changed = {(section, key) for section, key in named
               if setting(variant, section, key) != setting(trialign, section, key)}
    assert changed == named  # every setting it names is one it changes


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_method_config_parses_and_builds_its_components(config, data_dir, tmp_path):
    cli = parse(config, data_dir, tmp_path)
    raw = merged(config)["model"]
    for kind in COMPONENT_KINDS:
        assert class_path(type(getattr(cli.model, kind))) == raw[kind]["class_path"], kind
    assert cli.model.group_names == ["neutral", "teen", "farmer"]  # linked from the data
    assert cli.datamodule.tokenizer_source == raw["model"]  # linked from the model
    assert cli.trainer.max_steps == merged(config)["trainer"]["max_steps"]
    assert cli.model.adapter_dir == str(tmp_path / "adapter")
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")


def test_the_method_and_its_baselines_differ_where_they_should(data_dir, tmp_path):
    def built(name):
        path = CONFIGS / "trialign.yaml" if name == "trialign" else CONFIGS / "baselines" / f"{name}.yaml"
        model = parse(path, data_dir, tmp_path).model
        return (type(model.objective).__name__, type(model.aggregator).__name__, type(model.penalty).__name__,
                model.penalty_coef > 0)

    assert built("trialign") == ("AdvantageWeighted", "NashSocialWelfare", "CombinedPenalty", True)
    assert built("bc") == ("FilteredBC", "Utilitarian", "NoPenalty", False)
    assert built("dpo") == ("PairwiseDPO", "Utilitarian", "NoPenalty", False)
    assert built("grdpo") == ("PairwiseDPO", "GroupRobust", "NoPenalty", False)
    assert built("maxmin") == ("AdvantageWeighted", "MaxMin", "NoPenalty", False)
    assert built("utilitarian") == ("AdvantageWeighted", "Utilitarian", "NoPenalty", False)
    assert built("trialign_no_penalty") == ("AdvantageWeighted", "NashSocialWelfare", "NoPenalty", False)
    assert built("trialign_no_nsw") == ("AdvantageWeighted", "Utilitarian", "CombinedPenalty", True)


@pytest.mark.parametrize("config", COMPONENT_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_component_config_swaps_in_from_the_command_line(config, data_dir, tmp_path):
    kind = config.parent.name
    cli = parse(CONFIGS / "trialign.yaml", data_dir, tmp_path, f"--model.{kind}", str(config))
    component = getattr(cli.model, kind)
    raw = yaml.safe_load(config.read_text())
    assert class_path(type(component)) == raw["class_path"]
    for name, value in (raw.get("init_args") or {}).items():
        if not isinstance(value, dict):
            assert getattr(component, name) == value, name


def concrete_classes(module, base) -> set[str]:
    return {class_path(cls) for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, base) and cls is not base and not inspect.isabstract(cls)
            and cls.__module__ == module.__name__}


def test_every_component_class_has_a_config_and_every_config_a_class():
    for kind, (module, base) in COMPONENT_KINDS.items():
        configs = {yaml.safe_load(p.read_text())["class_path"] for p in (CONFIGS / "components" / kind).glob("*.yaml")}
        assert configs == concrete_classes(module, base), kind
    assert {p.parent.name for p in COMPONENT_CONFIGS} == set(COMPONENT_KINDS)


def test_ddp_cpu_strategy_config_builds_a_two_process_gloo_trainer(data_dir, tmp_path):
    cli = parse(CONFIGS / "trialign.yaml", data_dir, tmp_path, "--config", str(CONFIGS / "strategy/ddp_cpu.yaml"))
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DDPStrategy) and strategy.process_group_backend == "gloo"
    assert cli.trainer.num_devices == 2 and strategy.root_device.type == "cpu"


def test_fsdp_strategy_config_parses(data_dir, tmp_path):
    """Parsed only: building an FSDP trainer needs GPUs, which the development machine does not have."""

    class ParseOnly(TriAlignCLI):
        def instantiate_classes(self) -> None:
            pass

    cli = make_cli(["--config", str(CONFIGS / "trialign.yaml"), "--config", str(CONFIGS / "strategy/fsdp.yaml"),
                    "--data.data_dir", data_dir], run=False, cli_class=ParseOnly)
    trainer = cli.config.trainer
    assert trainer.strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    assert trainer.precision == "bf16-mixed" and trainer.accelerator == "gpu"
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert set(trainer.strategy.init_args.auto_wrap_policy) == {LlamaDecoderLayer}
    assert set(trainer.strategy.init_args.activation_checkpointing_policy) == {LlamaDecoderLayer}
    assert cli.config.model.probe_share_prefix is False


def run_trialign(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trialign", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_unknown_class_path_is_a_one_line_error_naming_it(data_dir, tmp_path):
    done = run_trialign("fit", "--config", str(CONFIGS / "trialign.yaml"), *NO_TASK_VALIDATION,
                        "--data.data_dir", data_dir,
                        "--model.aggregator", "trialign.modules.aggregators.NashWelfareTypo", cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "trialign.modules.aggregators.NashWelfareTypo" in errors[0]
    assert "model.aggregator" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_reference_group_missing_from_the_data_is_a_one_line_error(data_dir, tmp_path):
    done = run_trialign("validate", "--config", str(CONFIGS / "trialign.yaml"), *NO_TASK_VALIDATION,
                        "--data.data_dir", data_dir,
                        "--model.reference_group", "nobody", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "trialign validate: error: model.reference_group: 'nobody' is not one of the data's groups "
        "['neutral', 'teen', 'farmer']")


def test_an_overlay_overrides_its_base_key_by_key(data_dir, tmp_path):
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(f"base: {CONFIGS / 'trialign.yaml'}\ntrainer:\n  max_steps: 7\nmodel:\n  penalty_coef: 2.5\n")
    cli = parse(overlay, data_dir, tmp_path)  # a chain of three: method_base -> trialign -> mine
    assert cli.trainer.max_steps == 7 and cli.model.penalty_coef == 2.5
    assert type(cli.model.aggregator).__name__ == "NashSocialWelfare" and cli.model.context_kl_coef == 1.0
    assert cli.trainer.gradient_clip_val == 1.0  # from the shared base


@pytest.mark.parametrize("case, message", [
    ("missing", "base 'nowhere.yaml' not found"),
    ("loop", "its 'base' chain loops back to it"),
    ("not_a_path", "'base' must be a path to another config file, got 3"),
])
def test_a_bad_base_is_a_one_line_error_naming_the_file(tmp_path, case, message):
    config = tmp_path / "a.yaml"
    if case == "missing":
        config.write_text("base: nowhere.yaml\n")
    elif case == "loop":
        config.write_text("base: b.yaml\n")
        (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    else:
        config.write_text("base: 3\n")
    result = run_trialign("fit", "--config", str(config), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0] and "a.yaml" in lines[0], lines
