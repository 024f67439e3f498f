"""`python -m trialign fit|validate|test`: LightningCLI over `TriAlignModule` and `GroupTrajectoryDataModule`.

Configs are parsed in omegaconf mode, so a YAML can interpolate values (``${model.model}``); an interpolation is
resolved when its file is read, so command-line overrides do not reach it.
Components are swapped by class_path, from a file or inline:
``--model.aggregator configs/components/aggregator/maxmin.yaml``. Several ``--config`` files merge in order
(``--config configs/trialign.yaml --config configs/strategy/ddp_cpu.yaml``).

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
"""

from __future__ import annotations

import os
import sys
import warnings
from argparse import ArgumentError
from typing import Sequence

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

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

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.get("validate_before_fit", True) and not config.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.get("validate_after_fit", True) and self.model.last_validated_step != self.trainer.global_step:
            self.trainer.validate(self.model, datamodule=self.datamodule)


def make_cli(args: Sequence[str], run: bool = True, cli_class: type[TriAlignCLI] = TriAlignCLI) -> TriAlignCLI:
    """The CLI on `args` (with `run=False`, no subcommand: it parses and instantiates only)."""
    return cli_class(
        TriAlignModule,
        GroupTrajectoryDataModule,
        args=list(args),
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
        raise TriAlignError(f"{argv[0]}: {err} (run `python -m trialign {argv[0]} --help` for the options)") from None
    except SystemExit as exit_:  # --help, --print_config
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    return 0
