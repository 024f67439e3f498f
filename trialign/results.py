"""``metrics.json``, the summary `trialign evaluate` writes and `trialign report` reads: one type, one writer, one
reader.

    {"label": str, "config": {...the EvaluateConfig...}, "task": str, "num_items": int, "groups": [str],
     "reference": str | null, "mode": "probe" | "generate", "seconds": float,
     "metrics": {name: {"value": float, "ci_low": float, "ci_high": float}},
     "lmeval_parity": null | {"documents": int, "trialign": {...}, "lm_eval": {...}, "difference": {...}}}

The reader checks the shape and names the file and field in one line; fields other than ``metrics`` may be missing
in files written by hand (they default to empty), never of another type.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trialign.errors import require
from trialign.fileio import read_json_bytes, typed_fields, write_json_atomic

METRICS_FILE = "metrics.json"


@dataclass
class EvaluationResult:
    """The contents of one ``metrics.json``."""

    metrics: dict[str, dict[str, float]]
    """Per metric name (`trialign.metric_names` for the summary ones, ``acc/<group>`` etc. per group): value and
    95% CI bounds (NaN when no bootstrap ran)."""
    label: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    task: str = ""
    num_items: int = 0
    groups: list[str] = field(default_factory=list)
    reference: str | None = None
    mode: str = ""
    seconds: float = 0.0
    """Wall time of the audit: loading the model (and adapter), then probing or generating; the bootstrap and the
    lm-eval parity check (`lmeval_parity["seconds"]` where it ran) are not in it."""
    lmeval_parity: dict[str, Any] | None = None
    """`trialign evaluate --lmeval-parity`: lm-eval's own acc/acc_norm on the documents beside the project's
    (`trialign.evaluate.lmeval_parity`); None otherwise."""
    probe_rechecked: int = 0
    """Probe contexts scored again in float32 because bf16 left their two best options closer than
    ``config["probe_recheck"]`` nats (`trialign.probe.AnswerProbe`'s `recheck_margin`); 0 in float32."""

    def write(self, folder: str | Path) -> Path:
        """Write ``<folder>/metrics.json`` atomically; returns its path."""
        path = Path(folder) / METRICS_FILE
        write_json_atomic(path, asdict(self))
        return path


def metrics_file(path: str | Path) -> Path:
    """A ``metrics.json`` path, or the evaluate output folder holding one."""
    path = Path(path)
    return path if path.suffix == ".json" else path / METRICS_FILE


_TYPES = {"label": str, "config": dict, "task": str, "num_items": int, "groups": list, "mode": str,
          "seconds": (int, float), "probe_rechecked": int}


def read_result(path: str | Path) -> tuple[EvaluationResult, str]:
    """A checked ``metrics.json`` (or the folder holding it) and the sha256 of its bytes."""
    path = metrics_file(path)
    document, raw = read_json_bytes(path, "metrics file")
    require(isinstance(document, dict), f"metrics file {path}: expected a JSON object")
    metrics = document.get("metrics")
    require(isinstance(metrics, dict) and metrics, f"metrics file {path}: expected a non-empty 'metrics' object")
    for name, entry in metrics.items():
        require(isinstance(entry, dict) and "value" in entry,
                f"metrics file {path}: metric '{name}' should be an object with 'value', 'ci_low', 'ci_high'")
    values = typed_fields(document, _TYPES, f"metrics file {path}")
    reference = document.get("reference")
    require(reference is None or isinstance(reference, str),
            f"metrics file {path}: 'reference' should be a group id or null, got {reference!r}")
    parity = document.get("lmeval_parity")
    require(parity is None or isinstance(parity, dict),
            f"metrics file {path}: 'lmeval_parity' should be an object or null, got {type(parity).__name__}")
    result = EvaluationResult(metrics=metrics, reference=reference, lmeval_parity=parity, **values)
    result.groups = [str(g) for g in result.groups]
    return result, hashlib.sha256(raw).hexdigest()
