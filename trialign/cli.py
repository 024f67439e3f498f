"""`python -m trialign <command>`: one entry point for every job.

* ``fit | validate | test`` — LightningCLI over `TriAlignModule` + `GroupTrajectoryDataModule`
  (trialign/lightning_cli.py).
* ``rollout`` — generate the offline multi-group trajectory dataset (trialign/rollout/command.py).
* ``evaluate`` — the truth-consistency audit of a model under every persona (trialign/evaluate.py).
* ``experiment`` — the end-to-end pipeline: rollout, fit TriAlign and the baselines, evaluate, report
  (trialign/experiment.py).
* ``report`` — results table, per-group charts and trade-off plot as Markdown and HTML (trialign/report.py).

A `TriAlignError` (bad input a user can fix) is printed as one line and exits with status 2; add ``--debug`` to
any command for the full traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Sequence

from trialign.errors import TriAlignError

COMMANDS = {
    "fit": ("trialign.lightning_cli", "main", "train a model (LightningCLI)"),
    "validate": ("trialign.lightning_cli", "main", "run validation (LightningCLI)"),
    "test": ("trialign.lightning_cli", "main", "run the test loop (LightningCLI)"),
    "rollout": ("trialign.rollout.command", "main", "generate the offline multi-group trajectory dataset"),
    "evaluate": ("trialign.evaluate", "main", "audit truth accuracy and cross-group consistency under personas"),
    "experiment": ("trialign.experiment", "main", "rollout -> fit every method -> evaluate -> report, resumable"),
    "report": ("trialign.report", "main", "Markdown + self-contained HTML report of evaluated methods"),
}

USAGE = "usage: python -m trialign {" + ",".join(COMMANDS) + "} [--debug] ...\n\n" + "\n".join(
    f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trialign: error: unknown command '{command}'; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    module_name, function_name, _ = COMMANDS[command]
    run = getattr(importlib.import_module(module_name), function_name)
    try:
        # LightningCLI reads the subcommand itself; the others take only their own arguments.
        return int(run(argv if module_name == "trialign.lightning_cli" else rest) or 0)
    except TriAlignError as err:
        if debug:
            raise
        print(f"trialign {command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"trialign {command}: interrupted", file=sys.stderr)
        return 130
