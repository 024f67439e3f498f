"""`trialign experiment`: the end-to-end test of the paper's claim, resumable step by step.

    rollout -> fit TriAlign and every baseline -> evaluate every method (trained and training-free) -> report

One YAML file (`configs/experiment/demo.yaml`) names the rollout config, the training configs (one per method), the
training-free baselines and the evaluation splits. Everything is written under ``output``:

    experiment.json                 the resolved config, fingerprints, methods, evaluations, finished steps
    rollout/                        the offline dataset (`trialign rollout`)
    train/<method>/                 Lightning root of `trialign fit`: checkpoints/, adapter/, lightning_logs/
    eval/<method>/<split>/          `trialign evaluate` outputs (metrics.json, per_item.jsonl, tensorboard/)
    logs/<step>.log                 everything a subprocess printed
    report.md, report.html          `trialign report`

Evaluation splits, all on items the rollout never used (the task's items after the rollout's `limit`):

* ``main``: the training task under the training groups, answers probed directly (truth metrics);
* ``personalization``: a few of those items in generate mode, so responses exist whose preferences can be checked
  (this is the split where Pref-Aligner, which needs a response, is evaluated next to the others);
* ``heldout_groups``: the same items under personas never seen in training;
* ``transfer``: a task not used in training.

Resuming: a finished step is recorded in experiment.json and skipped when the command is rerun. A killed rollout
resumes from its written shards; a killed fit resumes from ``checkpoints/last.ckpt`` (``--ckpt_path last``); an
evaluation is redone (it writes its files atomically, so a half-finished one leaves nothing). Rerunning with a
different config is refused unless ``--overwrite``, which deletes this experiment's folder first.

Reusing other experiments' steps (``reuse_from: [runs/experiment/demo, ...]``, the first folder that has a step
wins): a step this experiment has not done is copied from such an experiment's folder when it finished there with
the same inputs: the rollout with the same model, rollout config content (wherever the file lies) and overrides; a
fit with that rollout (the same settings, and the same rollout shards and model weights by their fingerprints), the
same method name, config chain (contents) and `fit_args`; an evaluation of such a method (or the same training-free
baseline) on a split with the same settings, batch size, bootstrap, seed and probe precision. The other folder's
files are copied (never linked or moved), its measured seconds kept and marked ``reused_from``. The other
experiment's file contents are those it recorded after its rollout (``fingerprints.config_files``); a file it did
not record is never reused. Like a resume, a reuse trusts the code to be the one that ran the other experiment.
`make full` reuses the demo's steps this way.

Training seeds (``extra_seeds: [1, 2]``): every trained method is fitted again with each seed, as the replica
``<method>_seed<S>``, and each replica is evaluated on every split like a method of its own. The method as configured
keeps its name, folders and step inputs, so an experiment with replicas reuses another's fits of the methods.

Rollout and fits run as subprocesses (`python -m trialign ...`), so each gets a fresh process and a kill of one is
the same as a kill of a standalone run; evaluations run in this process and load the base model from its cache
(under a second).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trialign.backbone import DEFAULT_MODEL
from trialign.config_io import build_dataclass, collect_settings, config_chain, merge_chain, settings_parser
from trialign.errors import TriAlignError, require
from trialign.experiment_state import ExperimentState, read_state

log = logging.getLogger(__name__)

TRAINING_FREE = {
    "base": {},
    "same_answer": {"system_prompt": "same_answer"},
    "pref_aligner": {"pipeline": "pref_aligner"},
}
"""Training-free baselines: evaluate settings applied to the base model."""

SPLITS = ("main", "personalization", "heldout_groups", "transfer")


def replica_name(method: str, seed: int) -> str:
    """The name of trained method `method` fitted with training seed `seed` (`ExperimentConfig.extra_seeds`)."""
    return f"{method}_seed{seed}"


@dataclass
class ExperimentConfig:
    """Settings of `trialign experiment` (YAML keys; flags and ``--set key=value`` override them)."""

    name: str = "demo"
    """Name shown in the report."""
    output: str = "runs/experiment/demo"
    """Folder of everything this experiment writes."""
    model: str = DEFAULT_MODEL
    """Model source for the rollout's behavior policy, every trained method's backbone and the baselines."""
    rollout_config: str = "configs/rollout/truthfulqa.yaml"
    """`trialign rollout` config; its `task` and `limit` decide which items are used for training."""
    rollout_set: dict[str, Any] = field(default_factory=dict)
    """Overrides of rollout settings (e.g. ``{limit: 8}``)."""
    methods: dict[str, str] = field(default_factory=dict)
    """Trained methods: name -> `trialign fit` config file."""
    fit_args: list[str] = field(default_factory=list)
    """Extra `fit` flags for every method (e.g. ``[--trainer.max_steps, "8"]``)."""
    extra_seeds: list[int] = field(default_factory=list)
    """Training seeds besides each method's own: every trained method is fitted again with each seed S
    (`fit_args`, then ``--seed_everything S --data.seed S``), as the replica ``<method>_seed<S>``, and evaluated on
    every split. The report shows each replica and pools a method's replicas in its paired differences, seeds
    resampled with the items (`trialign.comparison`, "Replicas")."""
    training_free: list[str] = field(default_factory=lambda: list(TRAINING_FREE))
    """Training-free baselines, from: base, same_answer, pref_aligner."""
    eval_limit: int = 16
    """Held-out items of the training task for the `main` and `heldout_groups` splits."""
    eval_offset: int | None = None
    """The first of those items (the task's item index); null: the first item after the rollout's. Never one of
    the rollout's items (a development experiment sets it past the evaluation's items, e.g. ARC-Easy 400)."""
    eval_groups: str = "default"
    """Group file of the training groups (the rollout's)."""
    personalization_limit: int = 4
    """Held-out items evaluated in generate mode (the `personalization` split); 0 skips the split."""
    max_new_tokens: int = 64
    """Response length in the `personalization` split."""
    challenge: bool = False
    """End the `personalization` split with a challenge turn (`trialign evaluate --challenge`): the flip rate and the
    consistency after the user pushes back."""
    heldout_groups: str | None = "heldout"
    """Group file of personas never seen in training; null skips the split."""
    transfer_task: str | None = "bbq_age"
    """A task not used in training; null skips the split."""
    transfer_limit: int = 12
    """Items of the transfer task."""
    transfer_task_path: str | None = None
    """For an `lmeval:<task>` transfer task of your own: the folder of its lm-eval task YAML (`task_path` of
    `trialign evaluate`). The held-out splits take the rollout config's `task_path`."""
    batch_size: int = 32
    """Probe/generation batch size of the evaluations."""
    probe_precision: str = "auto"
    """Every evaluation's answer probe precision (`trialign evaluate --probe-precision`: auto, the default, is
    bfloat16 with near ties rechecked in float32 where bf16 is native, float32 elsewhere); the same for every
    method, so paired differences compare like with like."""
    probe_recheck: float = 0.2
    """Near ties under a reduced probe precision, scored again in float32 (`trialign evaluate --probe-recheck`)."""
    trunk_cache_gib: float = 4.0
    """Memory for the trunk cache shared by the evaluations (`trialign.trunk_cache`: the layers below the adapters
    run once for all methods on the same contexts; results equal the full forward's up to rounding); 0 turns it
    off."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% CIs."""
    seed: int = 0
    """Seed of the evaluations (the rollout and fit configs carry their own)."""
    reuse_from: list[str] | str | None = None
    """Other experiments' folders (one or several, the first that has a step wins): copy their finished steps whose
    inputs equal this experiment's instead of running them again (module docstring, "Reusing"). It does not decide
    the results, so a resume may add or drop it."""
    overwrite: bool = False
    """Delete an existing experiment with another config in `output` and start over."""

    def __post_init__(self) -> None:
        require(bool(self.methods) or bool(self.training_free), "methods: expected at least one method to compare")
        unknown = sorted(set(self.training_free) - set(TRAINING_FREE))
        require(not unknown, f"training_free: unknown baseline(s) {', '.join(unknown)}; expected "
                             f"{', '.join(TRAINING_FREE)}")
        clash = sorted(set(self.methods) & set(self.training_free))
        require(not clash, f"methods: name(s) {', '.join(clash)} also used by a training-free baseline")
        for name, path in self.methods.items():
            require(name.replace("_", "").replace("-", "").isalnum(),
                    f"methods: name '{name}' must be letters, digits, '_' or '-' (it names a folder)")
            require(Path(path).is_file(), f"methods.{name}: config file {path} not found")
        require(isinstance(self.extra_seeds, list) and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.extra_seeds),
            f"extra_seeds: expected a list of integers >= 0, got {self.extra_seeds!r}")
        require(len(set(self.extra_seeds)) == len(self.extra_seeds),
                f"extra_seeds: seeds repeat in {self.extra_seeds}")
        replicas = sorted(set(self.methods) & {replica_name(m, s) for m in self.methods for s in self.extra_seeds})
        require(not replicas, f"methods: name(s) {', '.join(replicas)} clash with a replica of extra_seeds")
        require(Path(self.rollout_config).is_file(), f"rollout_config: config file {self.rollout_config} not found")
        from trialign.evaluate import check_probe_precision

        check_probe_precision(self.probe_precision, self.probe_recheck)
        for name in ("eval_limit", "transfer_limit", "batch_size"):
            require(getattr(self, name) > 0, f"{name}: expected a positive integer, got {getattr(self, name)}")
        require(self.personalization_limit >= 0,
                f"personalization_limit: expected >= 0, got {self.personalization_limit}")
        require(bool(self.output), "output: expected a folder path")
        require(isinstance(self.trunk_cache_gib, (int, float)) and not isinstance(self.trunk_cache_gib, bool)
                and math.isfinite(self.trunk_cache_gib) and self.trunk_cache_gib >= 0,
                f"trunk_cache_gib: expected a number >= 0, got {self.trunk_cache_gib!r}")

    def content(self) -> dict[str, Any]:
        """The settings that decide the results (all but `overwrite` and `reuse_from`)."""
        data = dataclasses.asdict(self)
        data.pop("overwrite")
        data.pop("reuse_from")
        return data


@dataclass
class Step:
    """One resumable unit of work."""

    key: str
    """Unique name, e.g. ``fit/trialign`` or ``eval/bc/main``."""
    describe: str
    run: Any
    """Callable doing the work; raises on failure."""


@dataclass
class Fit:
    """One `trialign fit` of an experiment."""

    config_file: str
    args: list[str]
    """`fit` flags after the experiment's own (data, model, output): `fit_args`, and a replica's seed flags."""
    replica_of: str | None = None
    """The method a replica refits with another seed (None for the method itself)."""
    seed: int | None = None


def _parser() -> argparse.ArgumentParser:
    return settings_parser(ExperimentConfig, "python -m trialign experiment",
                           "Rollout, fit TriAlign and the baselines, evaluate them all, and write the report; "
                           "rerunning the same command resumes where it stopped.",
                           "experiment YAML (e.g. configs/experiment/demo.yaml); flags override it",
                           set_only=("fit_args",))  # its values are flags themselves: --set fit_args='[...]'



def parse_config(argv: Sequence[str]) -> ExperimentConfig:
    values, source = collect_settings(_parser().parse_args(list(argv)), "experiment")
    return build_dataclass(ExperimentConfig, values, source)


class Experiment:
    """The steps of one experiment and its state file."""

    def __init__(self, config: ExperimentConfig, python: str = sys.executable):
        self.config = config
        self.out = Path(config.output)
        self.python = python
        self.trunk_cache = None
        if config.trunk_cache_gib > 0:
            from trialign.trunk_cache import TrunkCache

            self.trunk_cache = TrunkCache(max_bytes=int(config.trunk_cache_gib * (1 << 30)))
        chain = config_chain(config.rollout_config)  # read once: its settings, and the files its step's inputs hash
        self.rollout_files = [str(path) for path, _ in chain]
        self.rollout_values = merge_chain(chain)  # as `trialign rollout` reads it (`read_settings`)
        self.rollout_values.update(config.rollout_set)
        self.task = self.rollout_values.get("task", "truthfulqa_mc1")
        require(self.task != "local", "rollout_config: a `local` task cannot be held out automatically; "
                                      "evaluate it with `trialign evaluate --task local`")
        limit = self.rollout_values.get("limit")
        require(isinstance(limit, int) and limit > 0,
                f"rollout_config: {config.rollout_config} must set `limit` (the number of training items) so "
                "the evaluation can use the items after them")
        states = self.rollout_values.get("states_limit", 0)
        self.train_items = limit + (states if isinstance(states, int) else 0)
        """Items of the task the rollout uses (episodes, then cross-group states); evaluation starts after them."""
        offset = config.eval_offset
        require(offset is None or (isinstance(offset, int) and not isinstance(offset, bool)
                                   and offset >= self.train_items),
                f"eval_offset: expected null or an item index >= {self.train_items} (the rollout uses items "
                f"0-{self.train_items - 1}), got {offset!r}")
        self.eval_offset = self.train_items if offset is None else offset
        self._fits = self._plan_fits()
        from trialign.prompts import DEFAULT_PROBE_TEMPLATE

        self.template = self.rollout_values.get("probe_template", DEFAULT_PROBE_TEMPLATE)
        """Every split asks its items as the rollout asked the training items."""

    # ---- state -----------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out / "experiment.json"

    def read_state(self) -> ExperimentState | None:
        if not self.state_path.is_file():
            return None
        try:
            return read_state(self.state_path)
        except TriAlignError as err:
            raise TriAlignError(f"{err}; pass --overwrite to start over") from None

    def prepare(self) -> ExperimentState:
        """Refuse another experiment's folder, replace it on --overwrite, or resume this one's state."""
        state = self.read_state()
        if state is not None and state.config != json.loads(json.dumps(self.config.content())):
            if not self.config.overwrite:
                old = state.config
                new = self.config.content()
                differs = sorted(k for k in set(old) | set(new) if old.get(k) != json.loads(json.dumps(new.get(k))))
                raise TriAlignError(f"output {self.out}: holds an experiment with a different config "
                                    f"({', '.join(differs) or 'format'} differ); pass --overwrite to replace it or "
                                    "choose another output")
            shutil.rmtree(self.out)
            state = None
        elif state is None and self.out.exists() and any(self.out.iterdir()):
            require(self.config.overwrite, f"output {self.out}: exists and is not an experiment folder; pass "
                                           "--overwrite to replace it or choose another output")
            shutil.rmtree(self.out)
        try:
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TriAlignError(f"output {self.out}: not writable ({err.strerror or err})")
        if state is None:
            state = ExperimentState(name=self.config.name, config=json.loads(json.dumps(self.config.content())))
        state.methods, state.evaluations = self.methods(), self.evaluations()
        self.save(state)
        return state

    def save(self, state: ExperimentState) -> None:
        state.write(self.state_path)

    # ---- what runs ---------------------------------------------------------------------------------------------
    def methods(self) -> list[dict[str, Any]]:
        trained = [{"name": name, "kind": "trained", "config_file": fit.config_file,
                    "adapter": str(self.out / "train" / name / "adapter"),
                    **({"replica_of": fit.replica_of, "seed": fit.seed} if fit.replica_of else {})}
                   for name, fit in self.fits().items()]
        free = [{"name": name, "kind": "training-free", "settings": TRAINING_FREE[name]}
                for name in self.config.training_free]
        return trained + free

    def fits(self) -> dict[str, Fit]:
        """Every trained model, by name: each method as configured, then its replicas (`extra_seeds`)."""
        return self._fits

    def _plan_fits(self) -> dict[str, Fit]:
        c = self.config
        fits = {name: Fit(path, list(c.fit_args)) for name, path in c.methods.items()}
        for seed in c.extra_seeds:
            for name, path in c.methods.items():
                flags = ["--seed_everything", str(seed), "--data.seed", str(seed)]
                fits[replica_name(name, seed)] = Fit(path, [*c.fit_args, *flags], replica_of=name, seed=seed)
        return fits

    def splits(self) -> dict[str, dict[str, Any]]:
        """Evaluate settings of each split (before the method's own)."""
        c = self.config
        held_out = {"task": self.task, "offset": self.eval_offset, "probe_template": self.template,
                    **({"task_path": self.rollout_values["task_path"]} if self.rollout_values.get("task_path") else {})}
        splits = {"main": {**held_out, "limit": c.eval_limit, "groups": c.eval_groups, "mode": "probe"}}
        if c.personalization_limit:
            splits["personalization"] = {**held_out, "limit": c.personalization_limit, "groups": c.eval_groups,
                                         "mode": "generate", "max_new_tokens": c.max_new_tokens,
                                         **({"challenge": True} if c.challenge else {})}
        if c.heldout_groups:
            splits["heldout_groups"] = {**held_out, "limit": c.eval_limit, "groups": c.heldout_groups,
                                        "mode": "probe"}
        if c.transfer_task:
            splits["transfer"] = {"task": c.transfer_task, "limit": c.transfer_limit, "groups": c.eval_groups,
                                  "mode": "probe", "probe_template": self.template,
                                  **({"task_path": c.transfer_task_path} if c.transfer_task_path else {})}
        return splits

    def evaluations(self) -> list[dict[str, str]]:
        out = []
        for method in self.methods():
            for split, settings in self.splits().items():
                if method["name"] == "pref_aligner" and settings["mode"] != "generate":
                    continue  # Pref-Aligner rewrites a response: only defined where responses are generated
                out.append({"method": method["name"], "split": split,
                            "path": str(Path("eval") / method["name"] / split)})
        return out

    def steps(self) -> list[Step]:
        steps = [Step("rollout", f"rollout ({self.task}, {self.train_items} items)", self.run_rollout)]
        for name, fit in self.fits().items():
            seed = f", seed {fit.seed}" if fit.replica_of else ""
            steps.append(Step(f"fit/{name}", f"fit {name} ({fit.config_file}{seed})",
                              lambda n=name, f=fit: self.run_fit(n, f)))
        methods = {m["name"]: m for m in self.methods()}
        splits = self.splits()
        for entry in self.evaluations():
            method, split = methods[entry["method"]], entry["split"]
            steps.append(Step(f"eval/{method['name']}/{split}", f"evaluate {method['name']} on {split}",
                              lambda m=method, s=split: self.run_evaluation(m, s, splits[s])))
        steps.append(Step("report", "report", self.run_report))
        return steps

    # ---- reusing another experiment's steps ----------------------------------------------------------------------
    def step_inputs(self, key: str, file_hash: Any) -> dict[str, Any] | None:
        """What decides the result of step `key` (None for the report, which is always rewritten). `file_hash(path)`
        gives a config file's content hash; it raises KeyError for a file whose content is unknown."""
        c = self.config
        # Files by content, not by path: a copy of a config in another folder decides the same.
        *bases, own = [file_hash(path) for path in self.rollout_files]  # paths as `fingerprints` has them
        rollout = {"model": c.model, "rollout_set": c.rollout_set, "rollout_file": own}
        if bases:  # a rollout config's `base:` files decide its settings too (absent without them: same key as before)
            rollout["rollout_bases"] = bases
        kind, _, rest = key.partition("/")
        if kind == "rollout":
            return rollout
        if kind == "fit":
            fit = self.fits()[rest]
            return {"rollout": rollout, "fit_args": fit.args,
                    "files": [file_hash(str(p)) for p, _ in config_chain(fit.config_file)]}
        if kind == "eval":
            name, split = rest.split("/")
            method = (self.step_inputs(f"fit/{name}", file_hash) if name in self.fits()
                      else {"training_free": TRAINING_FREE[name]})
            from trialign.evaluate import resolve_probe_precision

            # The precision as this machine runs it (`auto` differs between machines); the recheck margin only
            # matters below float32.
            precision = resolve_probe_precision(c.probe_precision)
            return {"method": method, "split": self.splits()[split], "batch_size": c.batch_size,
                    "bootstrap": c.bootstrap, "seed": c.seed, "probe_precision": precision,
                    **({} if precision == "float32" else {"probe_recheck": c.probe_recheck})}
        return None

    @staticmethod
    def step_files(key: str) -> list[str]:
        """The folders step `key` writes, relative to the run folder, and its log."""
        kind, _, rest = key.partition("/")
        folder = {"rollout": "rollout", "fit": f"train/{rest}", "eval": f"eval/{rest}"}.get(kind)
        return ([folder] if folder else []) + [f"logs/{key.replace('/', '_')}.log"]

    def open_reuse(self) -> list[tuple[Experiment, ExperimentState]]:
        """The experiments named by `reuse_from` and their states, in its order; one-line errors name the folder."""
        sources = self.config.reuse_from
        return [self._open_other(source) for source in ([sources] if isinstance(sources, str) else sources or [])]

    def _open_other(self, source: str) -> tuple[Experiment, ExperimentState]:
        where = f"reuse_from {source}"
        require(Path(source).resolve() != self.out.resolve(), f"{where}: is this experiment's own output")
        state_file = Path(source) / "experiment.json"
        require(state_file.is_file(), f"{where}: not an experiment folder (no experiment.json)")
        state = read_state(state_file)
        names = {f.name for f in dataclasses.fields(ExperimentConfig)}
        try:
            config = ExperimentConfig(**{k: v for k, v in state.config.items() if k in names})
        except (TriAlignError, TypeError) as err:
            raise TriAlignError(f"{where}: its config no longer loads ({err})") from None
        return Experiment(dataclasses.replace(config, trunk_cache_gib=0)), state

    def reuse(self, key: str, source: tuple[Experiment, ExperimentState],
              fingerprints: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Copy step `key` from the other experiment when it finished there with equal inputs; its done-entry or
        None. `fingerprints`: this experiment's (its state's, recorded after the rollout), else computed here."""
        other, state = source
        if key not in state.done:
            return None
        from trialign.fileio import sha256_file

        recorded = state.fingerprints.get("config_files", {})
        try:
            mine = self.step_inputs(key, sha256_file)
            theirs = other.step_inputs(key, recorded.__getitem__)
        except (KeyError, ValueError, OSError):
            return None  # a method the other experiment does not have, or a file whose content it did not record
        if mine is None or mine != theirs:
            return None
        if key != "rollout":  # a fit or evaluation also needs the same data and model weights, not only settings
            here = self.fingerprints() if fingerprints is None else fingerprints
            if any(here.get(k) != state.fingerprints.get(k) for k in ("model_weights", "rollout_shards")):
                return None
        files = self.step_files(key)
        if not all((other.out / f).exists() for f in files[:-1]):
            return None
        for relative in files:
            src, dst = other.out / relative, self.out / relative
            if not src.exists():
                continue
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        return {"seconds": float(state.done[key].get("seconds", 0.0)),
                "reused_from": str(state.done[key].get("reused_from", other.out))}

    # ---- the steps ---------------------------------------------------------------------------------------------
    def _subprocess(self, key: str, args: list[str]) -> None:
        log_path = self.out / "logs" / (key.replace("/", "_") + ".log")
        command = [self.python, "-m", "trialign", *args]
        show = sys.stderr.isatty()  # on a terminal the step's own progress bars show too; always in the log
        with open(log_path, "ab") as handle:
            handle.write(f"$ {' '.join(command)}\n".encode())
            handle.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            assert process.stdout is not None
            while chunk := process.stdout.read1(1 << 16):
                handle.write(chunk)
                handle.flush()
                if show:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
            returncode = process.wait()
        if returncode != 0:
            lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            errors = [line for line in lines if "error" in line.lower()]
            reason = (errors[-1] if errors else (lines[-1] if lines else "")).strip()
            raise TriAlignError(f"step {key}: `trialign {args[0]}` exited with status {returncode} "
                                f"({reason[:300]}); full output in {log_path}")

    def run_rollout(self) -> None:
        overrides = [f"{k}={json.dumps(v)}" for k, v in self.config.rollout_set.items()]
        args = ["rollout", "--config", self.config.rollout_config, "--model", self.config.model,
                "--output", str(self.out / "rollout")]
        for override in overrides:
            args += ["--set", override]
        self._subprocess("rollout", args)

    def run_fit(self, name: str, fit: Fit) -> None:
        root = self.out / "train" / name
        args = ["fit", "--config", fit.config_file, "--model.model", self.config.model,
                "--data.data_dir", str(self.out / "rollout"), "--trainer.default_root_dir", str(root), *fit.args]
        if (root / "checkpoints" / "last.ckpt").is_file():
            args += ["--ckpt_path", "last"]  # a killed fit continues where it stopped
        self._subprocess(f"fit/{name}", args)
        require((root / "adapter").is_dir(), f"step fit/{name}: finished without writing {root / 'adapter'}")

    def run_evaluation(self, method: dict[str, Any], split: str, settings: dict[str, Any]) -> None:
        from trialign.evaluate import EvaluateConfig, evaluate

        values = {**settings, **method.get("settings", {})}
        config = EvaluateConfig(
            model=self.config.model, adapter=method.get("adapter"),
            output=str(self.out / "eval" / method["name"] / split),
            overwrite=True, label=method["name"], batch_size=self.config.batch_size, bootstrap=self.config.bootstrap,
            probe_precision=self.config.probe_precision, probe_recheck=self.config.probe_recheck,
            seed=self.config.seed, **values)
        evaluate(config, progress=sys.stderr.isatty(), trunk_cache=self.trunk_cache)

    def run_report(self) -> None:
        from trialign.report import from_experiment, write_report

        write_report(from_experiment(self.out, title=f"TriAlign experiment: {self.config.name}"), self.out)

    def fingerprints(self) -> dict[str, Any]:
        """sha256 of the model weights (from the rollout manifest), the rollout shards and every config file."""
        from trialign.fileio import sha256_file

        from trialign.rollout.manifest import read_manifest

        found: dict[str, Any] = {}
        manifest = read_manifest(self.out / "rollout")
        if manifest is not None:
            found["model_weights"] = manifest.weights_fingerprint
            found["rollout_shards"] = {entry.file: sha256_file(self.out / "rollout" / entry.file)
                                       for entry in manifest.shards}
        # Each config and the files it builds on (`base:`): a change to the shared base changes every method.
        files = [*self.rollout_files, *(str(path) for config in self.config.methods.values()
                                        for path, _ in config_chain(config))]
        found["config_files"] = {path: sha256_file(path) for path in dict.fromkeys(files)}
        return found


def run(config: ExperimentConfig) -> ExperimentState:
    """Run every unfinished step in order; returns the final state (also in experiment.json)."""
    experiment = Experiment(config)
    sources = experiment.open_reuse()
    state = experiment.prepare()
    steps = experiment.steps()
    started = time.perf_counter()
    for number, step in enumerate(steps, 1):
        if step.key in state.done:
            log.info("[%d/%d] %s: done before, skipped", number, len(steps), step.describe)
            continue
        entry = next((found for source in sources
                      if (found := experiment.reuse(step.key, source, state.fingerprints or None)) is not None), None)
        if entry is not None:
            state.done[step.key] = entry
            if step.key == "rollout":
                state.fingerprints = experiment.fingerprints()
            experiment.save(state)
            log.info("[%d/%d] %s: reused from %s (%.0f s there)", number, len(steps), step.describe,
                     entry["reused_from"], entry["seconds"])
            continue
        log.info("[%d/%d] %s ...", number, len(steps), step.describe)
        t0 = time.perf_counter()
        step.run()
        seconds = time.perf_counter() - t0
        state.done[step.key] = {"seconds": round(seconds, 1)}
        if step.key == "rollout":
            state.fingerprints = experiment.fingerprints()
        experiment.save(state)
        log.info("[%d/%d] %s: %.0f s", number, len(steps), step.describe, seconds)
    total = state.step_seconds()
    reused = sum(float(d["seconds"]) for d in state.done.values() if "reused_from" in d)
    reused_note = f", {reused:.0f} s reused" if reused else ""
    print(f"\nexperiment {config.name}: {len(steps)} steps, {total:.0f} s of work "
          f"({time.perf_counter() - started:.0f} s in this run{reused_note})\nreport: {experiment.out / 'report.md'}, "
          f"{experiment.out / 'report.html'}")
    return state


def main(argv: Sequence[str]) -> int:
    run(parse_config(argv))
    return 0
