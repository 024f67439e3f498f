"""The rollout's ``manifest.json``: one dataclass, one reader, one writer.

The rollout writes it (`trialign.rollout.command`), training reads it (`trialign.datamodules`: the group order, how
items were asked), the experiment reads its fingerprints, and test fixtures write it through the same class, so no
reader has to be lenient about a shape the real producer never writes.

Layout (JSON object; unknown keys are refused on read)::

    format            "trialign-rollout"
    schema_version    the row schema's version (`trialign.rollout.schema.SCHEMA_VERSION`)
    config            the rollout settings that decide the content (`RolloutConfig.content()`)
    model             {"source": str, "weights_fingerprint": sha256 hex or null until the model is loaded}
    seed, task        as in config (kept at the top for readers)
    group_ids         the dataset's group order
    reference_group   the neutral group's id, or null
    counts            {"items", "states", "groups", "samples", "turns", "episodes", "assistant_turns"}
    num_files         shard files the dataset is split into
    data_files        the shard glob, for `datasets.load_dataset("parquet", data_files=...)`
    shards            [{"index", "file", "items", "item_ids"}] of the shards written so far
    complete          every shard written
    launch_id         processes of one launch share it (torchrun's run id)
    created_at, updated_at
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trialign.errors import TriAlignError
from trialign.fileio import write_json_atomic
from trialign.groups import check_group_ids
from trialign.rollout.schema import SCHEMA_VERSION

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "trialign-rollout"
DATA_FILES = "shard-*.parquet"
COUNT_KEYS = ("items", "states", "groups", "samples", "turns", "episodes", "assistant_turns")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class ShardEntry:
    index: int
    file: str
    items: int
    item_ids: list[str]


@dataclass
class RolloutManifest:
    config: dict[str, Any]
    model_source: str
    group_ids: list[str]
    seed: int = 0
    task: str = ""
    reference_group: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    num_files: int = 1
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    launch_id: str = ""
    weights_fingerprint: str | None = None
    created_at: str = field(default_factory=_now)
    updated_at: str | None = None

    # --- JSON ------------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION, "config": self.config,
            "model": {"source": self.model_source, "weights_fingerprint": self.weights_fingerprint},
            "seed": self.seed, "task": self.task, "group_ids": list(self.group_ids),
            "reference_group": self.reference_group, "counts": dict(self.counts), "num_files": self.num_files,
            "data_files": DATA_FILES, "shards": [dataclasses.asdict(s) for s in self.shards],
            "complete": self.complete, "launch_id": self.launch_id, "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, data: Any, path: Path) -> "RolloutManifest":
        """Checked: every error is one line naming `path` and the key."""
        if not isinstance(data, dict):
            raise TriAlignError(f"{path}: expected a JSON object")
        if data.get("format") != MANIFEST_FORMAT:
            raise TriAlignError(f"{path}: not a trialign rollout manifest (format {data.get('format')!r}, expected "
                                f"{MANIFEST_FORMAT!r})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TriAlignError(f"{path}: schema_version {version!r}, expected {SCHEMA_VERSION} (the dataset was "
                                "written by another version of trialign: re-run the rollout with --overwrite)")
        known = set(cls.__dataclass_fields__) - {"model_source", "weights_fingerprint"} | {
            "format", "schema_version", "model", "data_files"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TriAlignError(f"{path}: unknown key(s) {', '.join(unknown)}")
        ids = data.get("group_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(g, str) and g for g in ids):
            raise TriAlignError(f"{path}: group_ids must be a non-empty list of group id strings, got {ids!r}")
        check_group_ids(ids, f"{path} group_ids")
        if len(set(ids)) != len(ids):
            raise TriAlignError(f"{path}: group_ids has duplicates: {ids}")
        model = data.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("source"), str):
            raise TriAlignError(f"{path}: model must be {{'source': str, 'weights_fingerprint': str | null}}, "
                                f"got {model!r}")
        if not isinstance(data.get("config"), dict):
            raise TriAlignError(f"{path}: config must be a mapping of rollout settings, got {data.get('config')!r}")
        try:
            shards = [ShardEntry(int(s["index"]), str(s["file"]), int(s["items"]), list(s["item_ids"]))
                      for s in data.get("shards", [])]
        except (KeyError, TypeError, ValueError):
            raise TriAlignError(f"{path}: shards must be a list of {{index, file, items, item_ids}}") from None
        return cls(
            config=data["config"], model_source=model["source"], weights_fingerprint=model.get("weights_fingerprint"),
            group_ids=ids, seed=int(data.get("seed", 0)), task=str(data.get("task", "")),
            reference_group=data.get("reference_group"), counts=dict(data.get("counts", {})),
            num_files=int(data.get("num_files", 1)), shards=shards, complete=bool(data.get("complete", False)),
            launch_id=str(data.get("launch_id", "")), created_at=str(data.get("created_at", "")),
            updated_at=data.get("updated_at"))

    @property
    def template(self):
        """The `ProbeTemplate` the rollout asked its items with (datasets that record none used the legacy one)."""
        from trialign.prompts import LEGACY_PROBE_TEMPLATE, probe_template

        return probe_template(self.config.get("probe_template", LEGACY_PROBE_TEMPLATE))

    @property
    def item_ids(self) -> list[str]:
        """Ids of the items in the shards written so far, in shard order."""
        return [item for shard in self.shards for item in shard.item_ids]


def manifest_path(folder: str | Path) -> Path:
    return Path(folder).expanduser() / MANIFEST


def read_manifest(folder: str | Path) -> RolloutManifest | None:
    """The folder's manifest, or None when it has none; a one-line error naming the file when it is not valid."""
    path = manifest_path(folder)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TriAlignError(f"{path}: not valid JSON ({err})") from None
    return RolloutManifest.from_json(data, path)


def write_manifest(folder: str | Path, manifest: RolloutManifest) -> None:
    """Atomically, with `updated_at` set to now."""
    manifest.updated_at = _now()
    write_json_atomic(manifest_path(folder), manifest.to_json())
