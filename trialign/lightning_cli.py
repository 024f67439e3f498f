"""`python -m trialign fit|validate|test`: LightningCLI over `TriAlignModule` and `GroupTrajectoryDataModule`.

Configs are parsed in omegaconf mode, so a YAML can interpolate values (``${model.model}``); an interpolation is
resolved when its file is read, so command-line overrides do not reach it.
Components are swapped by class_path, from a file or inline:
``--model.aggregator configs/components/aggregator/maxmin.yaml``. Several ``--config`` files merge in order
(``--config configs/trialign.yaml --config configs/strategy/ddp_cpu.yaml``), and a file may build on another with
``base: <path>`` (`expand_config_files`): every method config builds on `configs/method_base.yaml`.

Bad input is one line on stderr and exit status 2: the parser is told not to exit, and its error (an unknown
class_path, a wrong type, a missing file) becomes a `TriAlignError`.

Shared values are linked, not repeated: the data's group names become the module's, and the module's model source is
the data's tokenizer. A `ModelCheckpoint` is part of the CLI (``--checkpoint.*``, ``save_last`` on); its folder
defaults to ``<trainer.default_root_dir>/checkpoints`` — a fixed folder (not the logger's versioned one), so that
``fit --ckpt_path last`` of a new process finds the previous run's ``last.ckpt``. Adapters and value heads are
exported to ``<trainer.default_root_dir>/adapter`` unless ``--model.adapter_dir`` says otherwise.

``fit`` first runs one validation pass (``--validate_before_fit``, on by default unless resuming), so the step-0
audit metrics (``val/consistency``, ...) are in TensorBoard next to the trained ones (Lightning's own sanity check
logs nothing and is off by default), and validates the final weights after training (``--validate_after_fit``)
unless the last step was just validated.

Preemption and bad input. Checkpoints go through `trialign.checkpoints.SafeCheckpointIO`: written atomically,
CRC-checked and loaded with ``weights_only=True``. A job killed at any point (SIGKILL included) and rerun with
``--ckpt_path last`` continues from the last step's checkpoint and ends with the weights and validation metrics of an
uninterrupted run (CPU; tests/test_fit_resume.py). Before anything is written the CLI checks the output folders
(``trainer.default_root_dir``, ``checkpoint.dirpath``, ``model.adapter_dir`` must be folders or creatable), the model
source, and the checkpoint to resume (``--ckpt_path``, ``last`` resolved as Lightning does): a bad one is a one-line
error naming it. A loss term or gradient that turns NaN/Inf stops training before the optimizer step, naming the step
and the term; the last checkpoint on disk stays the last good one (`TriAlignModule` "divergence guard").

Determinism. With the same config and seed, two CPU runs give bit-identical adapters, value heads and validation
metrics (``--trainer.deterministic true`` is accepted; on CPU the kernels used are deterministic either way), also
across a kill and resume. On GPUs this is not guaranteed: cuBLAS and atomic-add kernels (scatter/index_add in the
loss, attention backward) may sum in a different order from run to run, and ``deterministic: true`` only helps where
PyTorch has a deterministic kernel (it raises where it has none; set ``CUBLAS_WORKSPACE_CONFIG=:4096:8``). bf16/fp16
runs also round differently on different GPU models. Expect results equal up to floating-point noise there, not bits.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Sequence

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from trialign.checkpoints import find_last_checkpoint, load_checkpoint, use_safe_checkpoint_io
from trialign.config_io import instantiating_from_cli
from trialign.datamodules.trajectories import GroupTrajectoryDataModule
from trialign.errors import TriAlignError
from trialign.modules.trialign_module import TriAlignModule

TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,
    "default_root_dir": "runs/trialign",
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "enable_progress_bar": True,
}
"""Defaults for a CPU machine; every one can be overridden in a config or on the command line. The logger is
Lightning's default: TensorBoard under ``<default_root_dir>/lightning_logs/version_<n>``."""


class TriAlignCLI(LightningCLI):
    """LightningCLI with TriAlign's links, checkpoint callback, and validation before and after `fit`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Not at the end of an epoch: when max_steps stops training mid-epoch, Lightning still ends the epoch, and a
        # checkpoint written then resumes at the *next* epoch — a different batch sequence from an uninterrupted run.
        # Step checkpoints (`every_n_train_steps`) resume mid-epoch exactly.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.save_on_train_epoch_end": False})
        parser.add_argument("--validate_before_fit", type=bool, default=True,
                            help="fit: run one validation pass before training so step-0 metrics are logged")
        parser.add_argument("--validate_after_fit", type=bool, default=True,
                            help="fit: validate the final weights unless the last step was just validated")
        parser.link_arguments("data.group_names", "model.group_names", apply_on="instantiate")
        parser.link_arguments("model.model", "data.tokenizer", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        # Folders that a later run must find again are fixed (not the logger's versioned folder) and derived from
        # default_root_dir here rather than interpolated in the YAML: an interpolation is resolved when its file is
        # read, so `--trainer.default_root_dir` on the command line would not move them.
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or "."
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if config.model.adapter_dir is None:
            config.model.adapter_dir = os.path.join(root, "adapter")
        # Checked before anything is built or written: a run that fails later would leave a half-made log folder.
        for field, value in (("trainer.default_root_dir", root), ("checkpoint.dirpath", config.checkpoint.dirpath),
                             ("model.adapter_dir", config.model.adapter_dir)):
            _require_folder(field, value)
        from trialign.backbone import resolve_model_source

        resolve_model_source(config.model.model)

    def instantiate_classes(self) -> None:
        with instantiating_from_cli():
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_safe_checkpoint_io(trainer)
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> None:
        """Verify the checkpoint to resume or evaluate right after parsing: LightningCLI reads its hyper-parameters
        next, and the trainer would write logs before loading it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in (None, "best", "hpc") or (isinstance(ckpt_path, str) and "://" in ckpt_path):
            return
        if ckpt_path == "last":
            folder = config.checkpoint.dirpath or os.path.join(config.trainer.default_root_dir or ".", "checkpoints")
            last = find_last_checkpoint(folder)
            # None: Lightning warns and starts from scratch, so a job's rerun command can always say `last`.
            if last is not None:
                load_checkpoint(last, mmap=True)
            return
        load_checkpoint(ckpt_path, mmap=True)

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.get("validate_before_fit", True) and not config.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.get("validate_after_fit", True) and self.model.last_validated_step != self.trainer.global_step:
            self.trainer.validate(self.model, datamodule=self.datamodule)


def _require_folder(field: str, value: str | os.PathLike) -> None:
    """`value` must be a folder or a path where one can be created (no file in the way)."""
    path = Path(value).expanduser()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                what = "it is a file" if existing == path else f"{existing} is a file"
                raise TriAlignError(f"{field} '{value}': expected a folder (or a path where one can be created), but "
                                    f"{what}")
            return


def make_cli(args: Sequence[str], run: bool = True, cli_class: type[TriAlignCLI] = TriAlignCLI) -> TriAlignCLI:
    """The CLI on `args` (with `run=False`, no subcommand: it parses and instantiates only)."""
    return cli_class(
        TriAlignModule,
        GroupTrajectoryDataModule,
        args=expand_config_files(args),
        run=run,
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; `argv` starts with the subcommand (``fit``, ``validate`` or ``test``). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("fit", "validate", "test"):
        raise TriAlignError(f"training command: expected fit, validate or test, got {argv[:1]}")
    # LightningCLI warns when `args` is given while sys.argv holds arguments too; here they are the same ones, and
    # sys.argv must stay as it is: DDP's launcher starts the other ranks with it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        make_cli(argv)
    except ArgumentError as err:
        # jsonargparse's report (e.g. an unknown class_path, with what it tried) in one line, without the usage.
        raise TriAlignError(f"{argv[0]}: {_component_file_error(argv, str(err)) or err} (run `python -m trialign "
                            f"{argv[0]} --help` for the options)") from None
    except SystemExit as exit_:  # --help, --print_config
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    return 0


def expand_config_files(argv: Sequence[str]) -> list[str]:
    """`argv` with each ``--config`` file checked and its ``base`` chain spelled out (`config_io.config_chain`):
    ``--config overlay.yaml`` becomes ``--config base.yaml --config <overlay's settings>``, the overlay given inline
    without its ``base`` key (jsonargparse reads a config from a path or from YAML text). A missing or malformed
    file is a one-line error naming it (and the line): the parser's own report shows neither the file nor, for a
    missing one, the option."""
    import yaml

    from trialign.config_io import config_chain

    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if not (Path(value).expanduser().is_file() or value.endswith((".yaml", ".yml", ".json"))):
            out += ["--config", value]  # inline YAML text
            continue
        chain = config_chain(Path(value).expanduser())
        if len(chain) == 1:
            out += ["--config", value]  # as given, so the parser resolves the file's relative paths as before
            continue
        out += ["--config", str(chain[0][0])]  # the root holds no 'base': the file itself
        out += [x for _, settings in chain[1:] for x in ("--config", yaml.safe_dump(settings, sort_keys=False))]
    return out


class _Parsed(Exception):
    """Raised by `_ParseOnly` once the arguments parsed."""


class _ParseOnly(TriAlignCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed


_FILE_LOOP = re.compile(r'Parser key "([^"]+)": Config file loop detected: (.+?) -> \2$')


def _component_file_error(argv: list[str], message: str) -> str | None:
    """The real problem behind jsonargparse's "Config file loop detected: F -> F".

    When a component file given on the command line (``--model.aggregator my.yaml``) has a bad ``init_args`` entry,
    jsonargparse retries the file while it is still being read and reports that retry as a loop, hiding the cause.
    Parsing again with the file's content inline gives the real message (e.g. "Option 'epsilon' is not accepted")."""
    found = _FILE_LOOP.search(" ".join(message.split()))
    if not found:
        return None
    key, path = found.groups()
    flag = f"--{key}"
    for i, arg in enumerate(argv[:-1]):
        if arg == flag and Path(argv[i + 1]).expanduser().resolve() == Path(path).resolve():
            try:
                inline = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                return None
            try:
                make_cli([*argv[:i + 1], inline, *argv[i + 2:]], cli_class=_ParseOnly)
            except ArgumentError as err:
                reason = re.sub(r"^.*? either not accessible or invalid - ", "", " ".join(str(err).split()))
                return f"{key} from component file {path}: {reason}"
            except (_Parsed, SystemExit):
                return None
    return f"{key}: component file {path} does not fit (check its class_path and init_args)"
