"""`trialign experiment`: config checks, the pipeline end to end on a tiny model, and a kill-then-rerun."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trialign.cli import main
from trialign.experiment import Experiment, ExperimentConfig, parse_config
from trialign.fileio import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def tiny_experiment(tmp_path: Path, model_dir: str, output: Path) -> Path:
    """An experiment YAML on the tiny model: 2 training items, 2 groups, TriAlign and BC for one step each."""
    rollout = tmp_path / "rollout.yaml"
    rollout.write_text(yaml.safe_dump({
        "model": model_dir, "task": "truthfulqa_mc1", "limit": 2, "group_ids": ["neutral", "teenager"],
        "samples": 2, "turns": 1, "max_new_tokens": 4, "items_per_shard": 1, "threads": 1, "progress": False}))
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "output": str(output), "model": model_dir, "rollout_config": str(rollout),
        "methods": {"trialign": str(ROOT / "configs/trialign.yaml"), "bc": str(ROOT / "configs/baselines/bc.yaml")},
        "fit_args": ["--model.lora.target_modules", "all-linear", "--trainer.max_steps", "2",
                     "--trainer.enable_progress_bar", "false", "--data.val_fraction", "0",
                     "--trainer.limit_val_batches", "0", "--validate_before_fit", "false",
                     "--validate_after_fit", "false"],
        "training_free": ["base", "pref_aligner"],
        "eval_limit": 2, "eval_groups": "default", "personalization_limit": 1, "max_new_tokens": 4,
        "transfer_task": "bbq_age", "transfer_limit": 2, "bootstrap": 20}, sort_keys=False))
    return config


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def all_metrics(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["metrics"]
            for p in sorted((out / "eval").glob("*/*/metrics.json"))}


def test_plan_holds_out_the_rollout_items_and_evaluates_pref_aligner_only_where_responses_exist(tmp_path):
    config = parse_config(["--config", str(tiny_experiment(tmp_path, "some/model", tmp_path / "out"))])
    experiment = Experiment(config)
    splits = experiment.splits()
    assert splits["main"]["offset"] == 2 and splits["main"]["task"] == "truthfulqa_mc1"
    assert splits["personalization"]["mode"] == "generate" and splits["transfer"]["task"] == "bbq_age"
    pairs = {(e["method"], e["split"]) for e in experiment.evaluations()}
    assert ("pref_aligner", "personalization") in pairs and ("pref_aligner", "main") not in pairs
    assert {("trialign", s) for s in splits} <= pairs and {("base", s) for s in splits} <= pairs
    keys = [step.key for step in experiment.steps()]
    assert keys[:3] == ["rollout", "fit/trialign", "fit/bc"] and keys[-1] == "report"


def test_eval_offset_moves_the_held_out_items_but_never_onto_the_rollouts(tmp_path):
    config = parse_config(["--config", str(tiny_experiment(tmp_path, "some/model", tmp_path / "out")),
                           "--set", "eval_offset=400"])
    splits = Experiment(config).splits()
    assert splits["main"]["offset"] == splits["personalization"]["offset"] == 400
    assert splits["transfer"].get("offset") is None  # another task: from its first item


def test_evaluation_starts_after_the_states_and_asks_with_the_rollouts_template(tmp_path):
    config = parse_config(["--config", str(tiny_experiment(tmp_path, "some/model", tmp_path / "out")),
                           "--set", "rollout_set={states_limit: 5, probe_template: system_persona}"])
    splits = Experiment(config).splits()
    assert splits["main"]["offset"] == 2 + 5  # the rollout's items with episodes, then its states
    assert {s["probe_template"] for s in splits.values()} == {"system_persona"}


def test_an_lmeval_task_keeps_its_include_path_in_every_split_that_asks_it(tmp_path):
    config = parse_config(["--config", str(tiny_experiment(tmp_path, "some/model", tmp_path / "out")),
                           "--set", "rollout_set={task: 'lmeval:my_task', task_path: my_tasks}",
                           "--set", "transfer_task=lmeval:other", "--set", "transfer_task_path=other_tasks"])
    splits = Experiment(config).splits()
    assert {name: (s["task"], s.get("task_path")) for name, s in splits.items()} == {
        "main": ("lmeval:my_task", "my_tasks"), "personalization": ("lmeval:my_task", "my_tasks"),
        "heldout_groups": ("lmeval:my_task", "my_tasks"), "transfer": ("lmeval:other", "other_tasks")}
    plain = Experiment(parse_config(["--config", str(tiny_experiment(tmp_path, "some/model", tmp_path / "o2"))]))
    assert not any("task_path" in s for s in plain.splits().values())  # unchanged settings: runs still resume


def test_an_experiment_built_on_another_plans_as_its_expansion_and_replaces_methods_whole(tmp_path):
    base = tiny_experiment(tmp_path, "some/model", tmp_path / "out")
    child = tmp_path / "dev" / "child.yaml"
    child.parent.mkdir()
    child.write_text("base: ../experiment.yaml\nname: child\neval_limit: 3\n"
                     f"methods:\n  dpo: {ROOT / 'configs/baselines/dpo.yaml'}\n")
    expanded = tmp_path / "expanded.yaml"
    values = yaml.safe_load(base.read_text())
    values.update(name="child", eval_limit=3, methods={"dpo": str(ROOT / "configs/baselines/dpo.yaml")})
    expanded.write_text(yaml.safe_dump(values))
    built, plain = (Experiment(parse_config(["--config", str(path)])) for path in (child, expanded))
    assert built.config == plain.config  # `methods` replaced whole: no trialign or bc from the base
    assert built.splits() == plain.splits() and built.splits()["main"]["limit"] == 3
    assert [s.key for s in built.steps()] == [s.key for s in plain.steps()]
    assert {m["name"] for m in built.methods()} == {"dpo", "base", "pref_aligner"}


def test_a_rollout_config_base_is_read_and_decides_the_rollout_step(tmp_path):
    config = tiny_experiment(tmp_path, "some/model", tmp_path / "out")
    rollout = tmp_path / "rollout.yaml"
    (tmp_path / "rollout_base.yaml").write_text(rollout.read_text())
    rollout.write_text("base: rollout_base.yaml\nlimit: 3\n")
    experiment = Experiment(parse_config(["--config", str(config)]))
    assert experiment.rollout_values["limit"] == 3 and experiment.rollout_values["task"] == "truthfulqa_mc1"
    assert experiment.splits()["main"]["offset"] == 3  # after the 3 items the child asks for
    before = experiment.step_inputs("rollout", sha256_file)
    base = tmp_path / "rollout_base.yaml"
    base.write_text(base.read_text().replace("samples: 2", "samples: 3"))
    after = Experiment(parse_config(["--config", str(config)])).step_inputs("rollout", sha256_file)
    assert before["rollout_file"] == after["rollout_file"] and before["rollout_bases"] != after["rollout_bases"]


def test_a_missing_experiment_base_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    config = tmp_path / "child.yaml"
    config.write_text("base: nowhere.yaml\nname: child\n")
    code = main(["experiment", "--config", str(config), "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "child.yaml" in err and "base 'nowhere.yaml' not found" in err
    assert not (tmp_path / "x").exists()


def test_challenge_ends_only_the_personalization_split_with_a_challenge_turn(tmp_path):
    path = str(tiny_experiment(tmp_path, "some/model", tmp_path / "out"))
    assert not any("challenge" in s for s in Experiment(parse_config(["--config", path])).splits().values())
    splits = Experiment(parse_config(["--config", path, "--set", "challenge=true"])).splits()
    assert [name for name, s in splits.items() if s.get("challenge")] == ["personalization"]
    from trialign.evaluate import EvaluateConfig

    EvaluateConfig(**splits["personalization"])  # a valid evaluate config (generate mode)


def finished_experiment(tmp_path: Path, config: ExperimentConfig) -> Experiment:
    """`config`'s folder as if every step had run: experiment.json with its done steps and the contents of its
    config files, and a marker file in each step's folder."""
    experiment = Experiment(config)
    state = experiment.prepare()
    for step in experiment.steps()[:-1]:
        folder, log_file = experiment.step_files(step.key)
        (experiment.out / folder).mkdir(parents=True)
        (experiment.out / folder / "marker.txt").write_text(step.key)
        (experiment.out / log_file).write_text(f"log of {step.key}")
        state.done[step.key] = {"seconds": 10.0}
    state.fingerprints = {"config_files": experiment.fingerprints()["config_files"]}  # no rollout manifest: configs
    experiment.save(state)
    return experiment


def test_reuse_copies_exactly_the_steps_whose_inputs_are_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = dict(rollout_config="configs/rollout/arc_easy.yaml", eval_limit=4, transfer_task=None,
                personalization_limit=0, heldout_groups=None)
    demo = finished_experiment(tmp_path, ExperimentConfig(
        output=str(tmp_path / "demo"), methods={"trialign": "configs/trialign.yaml"}, training_free=["base"],
        **base))
    full = Experiment(ExperimentConfig(
        output=str(tmp_path / "full"), reuse_from=str(demo.out), training_free=["base", "same_answer"],
        methods={"trialign": "configs/trialign.yaml", "bc": "configs/baselines/bc.yaml"}, **base))
    full.prepare()
    (source,) = full.open_reuse()
    reused = {step.key: full.reuse(step.key, source) for step in full.steps()}
    assert {k for k, v in reused.items() if v} == {"rollout", "fit/trialign", "eval/trialign/main", "eval/base/main"}
    assert reused["fit/trialign"] == {"seconds": 10.0, "reused_from": str(demo.out)}
    assert (full.out / "train/trialign/marker.txt").read_text() == "fit/trialign"
    assert (full.out / "logs/eval_base_main.log").read_text() == "log of eval/base/main"
    assert (demo.out / "train/trialign/marker.txt").is_file()  # copied, not moved
    assert not (full.out / "train/bc").exists() and not (full.out / "eval/same_answer").exists()

    # Another evaluation size reuses the rollout and the fit, no evaluation; another rollout setting nothing.
    for change, expected in (({"eval_limit": 5}, {"rollout", "fit/trialign"}),
                             ({"rollout_set": {"states_limit": 8}}, set())):
        other = Experiment(ExperimentConfig(**{**dataclasses.asdict(full.config), **change,
                                               "output": str(tmp_path / f"o{len(expected)}")}))
        other.prepare()
        (source,) = other.open_reuse()
        assert {s.key for s in other.steps() if other.reuse(s.key, source)} == expected

    # Another rollout's data (its shards' fingerprints differ, say a nondeterministic backend): only the rollout.
    state = json.loads((demo.out / "experiment.json").read_text())
    (demo.out / "experiment.json").write_text(json.dumps({**state, "fingerprints": {
        **state["fingerprints"], "rollout_shards": {"shard-00000-of-00001.parquet": "f" * 64}}}))
    other = Experiment(dataclasses.replace(full.config, output=str(tmp_path / "data")))
    other.prepare()
    (source,) = other.open_reuse()
    assert {s.key for s in other.steps() if other.reuse(s.key, source)} == {"rollout"}
    (demo.out / "experiment.json").write_text(json.dumps(state))

    # A method config whose content changed since the other experiment ran (its recorded hash differs): the fit
    # and its evaluations run again; the rollout and the base model's evaluation are still the same.
    state = json.loads((demo.out / "experiment.json").read_text())
    state["fingerprints"]["config_files"]["configs/trialign.yaml"] = "0" * 64
    (demo.out / "experiment.json").write_text(json.dumps(state))
    other = Experiment(dataclasses.replace(full.config, output=str(tmp_path / "changed")))
    other.prepare()
    (source,) = other.open_reuse()
    assert {s.key for s in other.steps() if other.reuse(s.key, source)} == {"rollout", "eval/base/main"}


def test_extra_seeds_fit_every_method_again_as_replicas_that_the_method_itself_does_not_see(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = dict(rollout_config="configs/rollout/arc_easy.yaml", eval_limit=4, transfer_task=None,
                personalization_limit=0, heldout_groups=None, training_free=["base"], fit_args=["--x", "1"])
    methods = {"trialign": "configs/trialign.yaml", "dpo": "configs/baselines/dpo.yaml"}
    demo = finished_experiment(tmp_path, ExperimentConfig(output=str(tmp_path / "demo"), methods=methods, **base))
    seeds = Experiment(ExperimentConfig(output=str(tmp_path / "seeds"), methods=methods, extra_seeds=[1, 2],
                                        reuse_from=str(demo.out), **base))
    fits = seeds.fits()
    assert list(fits) == ["trialign", "dpo", "trialign_seed1", "dpo_seed1", "trialign_seed2", "dpo_seed2"]
    assert fits["trialign"].args == ["--x", "1"] and fits["trialign"].replica_of is None
    assert fits["dpo_seed2"].args == ["--x", "1", "--seed_everything", "2", "--data.seed", "2"]
    assert fits["dpo_seed2"].config_file == "configs/baselines/dpo.yaml"
    entries = {m["name"]: m for m in seeds.methods()}
    assert entries["trialign_seed1"]["replica_of"] == "trialign" and entries["trialign_seed1"]["seed"] == 1
    assert "replica_of" not in entries["trialign"] and entries["base"]["kind"] == "training-free"
    keys = [s.key for s in seeds.steps()]
    assert "fit/dpo_seed1" in keys and "eval/trialign_seed2/main" in keys
    # The methods as configured are the same fits as in an experiment without replicas: they are reused; the
    # replicas, fitted with other seeds, are not (the other experiment has none).
    seeds.prepare()
    (source,) = seeds.open_reuse()
    reused = {key for key in keys if seeds.reuse(key, source)}
    assert reused == {"rollout", "fit/trialign", "fit/dpo", "eval/trialign/main", "eval/dpo/main", "eval/base/main"}
    # With several folders to reuse from, each step comes from the first that has it: here every step.
    done = finished_experiment(tmp_path, dataclasses.replace(seeds.config, output=str(tmp_path / "done"),
                                                             reuse_from=None))
    both = Experiment(dataclasses.replace(seeds.config, output=str(tmp_path / "both"),
                                          reuse_from=[str(demo.out), str(done.out)]))
    both.prepare()
    sources = both.open_reuse()
    # (the report is always rewritten)
    origin = {key: next(source[0].out.name for source in sources if both.reuse(key, source)) for key in keys[:-1]}
    assert origin == {key: "demo" if key in reused else "done" for key in keys[:-1]}


@pytest.mark.parametrize(("reuse", "expected"), [
    ("nowhere", "reuse_from nowhere: not an experiment folder (no experiment.json)"),
    ("SELF", "is this experiment's own output"),
])
def test_bad_reuse_from_is_a_one_line_error(tmp_path, capsys, monkeypatch, reuse, expected):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "x"
    code = main(["experiment", "--config", "configs/experiment/quick.yaml", "--output", str(out),
                 "--reuse-from", str(out) if reuse == "SELF" else reuse])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(("override", "expected"), [
    ("training_free=[oracle]", "training_free: unknown baseline(s) oracle"),
    ("methods={x: missing.yaml}", "methods.x: config file missing.yaml not found"),
    ("methods={base: configs/trialign.yaml}", "methods: name(s) base also used by a training-free baseline"),
    ("eval_limit=0", "eval_limit: expected a positive integer, got 0"),
    ("extra_seeds=[1, 1]", "extra_seeds: seeds repeat in [1, 1]"),
    ("eval_offset=3", "eval_offset: expected null or an item index >= 6 (the rollout uses items 0-5), got 3"),
    ("extra_seeds=[-1]", "extra_seeds: expected a list of integers >= 0, got [-1]"),
    (("methods={trialign: configs/trialign.yaml, trialign_seed1: configs/trialign.yaml}", "extra_seeds=[1]"),
     "methods: name(s) trialign_seed1 clash with a replica of extra_seeds"),
    ("rollout_config=nope.yaml", "rollout_config: config file nope.yaml not found"),
    ("probe_precision=fp8", "probe_precision: expected one of auto, float32, autocast, bfloat16, got 'fp8'"),
    ("probe_recheck=-0.5", "probe_recheck: expected >= 0 nats, got -0.5"),
])
def test_bad_experiment_settings_are_one_line_errors(tmp_path, capsys, monkeypatch, override, expected):
    monkeypatch.chdir(ROOT)
    sets = [arg for value in ((override,) if isinstance(override, str) else override) for arg in ("--set", value)]
    code = main(["experiment", "--config", "configs/experiment/quick.yaml", "--output", str(tmp_path / "x"), *sets])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_different_config_in_the_same_folder_is_refused_and_nothing_is_touched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "exp"
    config = ExperimentConfig(output=str(out), methods={"trialign": "configs/trialign.yaml"})
    state = Experiment(config).prepare()
    before = (out / "experiment.json").read_bytes()
    code = main(["experiment", "--config", "configs/experiment/quick.yaml", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds an experiment with a different config" in err and "--overwrite" in err
    assert (out / "experiment.json").read_bytes() == before and state.done == {}


@pytest.mark.slow
def test_pipeline_killed_then_rerun_gives_the_results_of_an_uninterrupted_run(tmp_path, tiny_model_dir):
    reference = tmp_path / "reference"
    (tmp_path / "a").mkdir()
    done = subprocess.run([sys.executable, "-m", "trialign", "experiment", "--config",
                           str(tiny_experiment(tmp_path / "a", tiny_model_dir, reference))],
                          env=environment(), capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((reference / "experiment.json").read_text())
    steps = ["rollout", "fit/trialign", "fit/bc"] + [f"eval/{e['method']}/{e['split']}" for e in state["evaluations"]]
    assert list(state["done"]) == steps + ["report"]
    assert (reference / "train/trialign/adapter/adapter_model.safetensors").is_file()
    # The keys tests/test_report.py's experiment.json fixture writes.
    assert set(state["fingerprints"]) == {"model_weights", "rollout_shards", "config_files"}
    assert state["fingerprints"]["model_weights"] and len(state["fingerprints"]["rollout_shards"]) == 2
    report = (reference / "report.md").read_text()
    for method in ("trialign", "bc", "base", "pref_aligner"):
        assert method in report
    html = (reference / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html

    # The same experiment, killed by SIGKILL as soon as the first method is trained (during the second fit).
    (tmp_path / "b").mkdir()
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "trialign", "experiment", "--config",
               str(tiny_experiment(tmp_path / "b", tiny_model_dir, killed))]
    process = subprocess.Popen(command, env=environment(), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    state_file = killed / "experiment.json"
    while not (state_file.is_file() and "fit/trialign" in json.loads(state_file.read_text()).get("done", {})):
        assert process.poll() is None, "the experiment ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the pipeline and the `fit` it started
    process.wait()
    assert "report" not in json.loads(state_file.read_text())["done"]

    rerun = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "done before, skipped" in rerun.stderr
    results = all_metrics(killed)
    assert sorted(results) == sorted(e["path"] for e in state["evaluations"])
    assert results == all_metrics(reference)

    # A third experiment with one more baseline, reusing the first: only that baseline's evaluations run.
    (tmp_path / "c").mkdir()
    extended = tmp_path / "extended"
    config = tiny_experiment(tmp_path / "c", tiny_model_dir, extended)
    values = yaml.safe_load(config.read_text())
    values["training_free"] = ["base", "same_answer", "pref_aligner"]
    config.write_text(yaml.safe_dump({**values, "name": "extended"}, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "trialign", "experiment", "--config", str(config),
                           "--reuse-from", str(reference)],
                          env=environment(), capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    extended_state = json.loads((extended / "experiment.json").read_text())
    ran = {key for key, entry in extended_state["done"].items() if "reused_from" not in entry}
    assert ran == {"report"} | {f"eval/same_answer/{s}" for s in ("main", "personalization", "heldout_groups",
                                                                  "transfer")}
    assert extended_state["done"]["fit/trialign"]["reused_from"] == str(reference)
    extended_results = all_metrics(extended)
    assert {k: v for k, v in extended_results.items() if "same_answer" not in k} == all_metrics(reference)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_experiment_configs_parse_and_plan_every_method(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    experiment = Experiment(parse_config(["--config", str(path.relative_to(ROOT))]))
    methods = {m["name"] for m in experiment.methods()}
    every = {"trialign", "bc", "dpo", "grdpo", "maxmin", "utilitarian", "trialign_no_penalty", "trialign_no_nsw",
             "base", "same_answer", "pref_aligner"}
    if path.stem == "quick":  # the smoke run trains TriAlign and two baselines only
        assert methods == {"trialign", "bc", "dpo", "base", "same_answer", "pref_aligner"}
    elif path.stem == "demo":  # fits 45 minutes: TriAlign, its no-penalty ablation, DPO, base, Pref-Aligner
        assert methods == {"trialign", "trialign_no_penalty", "dpo", "base", "pref_aligner"}
    elif path.stem == "seeds" or path.stem.startswith("dev"):  # trained x seeds 0, 1, 2 and base
        trained = set(experiment.config.methods)
        assert "trialign" in trained
        if path.stem == "seeds":
            assert trained == {"trialign", "dpo", "trialign_no_penalty"}
        assert methods == trained | {f"{m}_seed{s}" for m in trained for s in (1, 2)} | {"base"}
        splits = experiment.splits()
        # One probed split (and, where a development experiment asks, its first items in generate mode)
        assert set(splits) == ({"main", "personalization"} if experiment.config.personalization_limit else {"main"})
        # seeds: the demo's main split; dev: development items, after the demo's evaluation items (68-217)
        main_split = (splits["main"]["offset"], splits["main"]["limit"])
        assert main_split == ((68, 150) if path.stem == "seeds" else (400, 120))
        if "personalization" in splits:
            assert splits["personalization"]["offset"] == 400 and splits["personalization"]["mode"] == "generate"
        return
    else:
        assert methods == every
    assert {e["method"] for e in experiment.evaluations()} == methods
    splits = experiment.splits()
    assert set(splits) == {"main", "personalization", "heldout_groups", "transfer"}
    if path.stem in ("demo", "full"):  # the sizes a result needs (the "TriAlign works" issue): never smaller
        assert splits["main"]["limit"] >= 150 and splits["heldout_groups"]["limit"] == splits["main"]["limit"]
        assert splits["transfer"]["limit"] >= 100 and splits["personalization"]["limit"] >= 20
