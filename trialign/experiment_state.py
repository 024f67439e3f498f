"""``experiment.json``, the state `trialign experiment` keeps in its run folder and `trialign report` reads: one
type, one writer, one reader.

    {"format": "trialign-experiment", "name": str, "config": {...the resolved ExperimentConfig...},
     "done": {step: {"seconds": float}}, "methods": [{"name", "kind", ...}],
     "evaluations": [{"method", "split", "path"}], "fingerprints": {...}}

``done`` is what makes a rerun resume: a step listed there is skipped. The reader checks each field's type and
names the file and field in one line; fields may be missing in files written by hand (they default to empty).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trialign.errors import require
from trialign.fileio import read_json_bytes, typed_fields, write_json_atomic

STATE_FILE = "experiment.json"
FORMAT = "trialign-experiment"


@dataclass
class ExperimentState:
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    """`ExperimentConfig.content()`: a rerun with another config is refused (or, with --overwrite, starts over)."""
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Finished steps and their seconds of work (``seconds``); a step copied from another experiment also names
    that experiment's folder (``reused_from``) and keeps the seconds measured there."""
    methods: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, str]] = field(default_factory=list)
    """One entry per (method, split): the evaluate output folder, relative to the run folder."""
    fingerprints: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def step_seconds(self) -> float:
        """Seconds of work over the finished steps (what the README quotes as step time)."""
        return sum(float(d.get("seconds", 0.0)) for d in self.done.values())

    def write(self, path: str | Path) -> None:
        write_json_atomic(Path(path), asdict(self))


_FIELDS = {"name": str, "config": dict, "done": dict, "methods": list, "evaluations": list, "fingerprints": dict,
           "format": str}


def read_state(path: str | Path, what: str = "experiment state") -> ExperimentState:
    """The checked state in `path` (``experiment.json``); one-line errors name the file and field."""
    path = Path(path)
    document, _ = read_json_bytes(path, what)
    require(isinstance(document, dict), f"{what} {path}: expected a JSON object")
    values = typed_fields(document, _FIELDS, f"{what} {path}")
    require(document.get("format") in (None, FORMAT),
            f"{what} {path}: format {document.get('format')!r}, expected {FORMAT!r}")
    return ExperimentState(**values)
