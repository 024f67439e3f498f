"""Reading a rollout folder back for training: the format checks and the item index.

`scan_rollout` reads each file's schema and a few small columns before any training and raises one-line errors (the
full list is in `trialign.datamodules.trajectories`' docstring, "Checks first"); it returns a `RolloutIndex` the
data module plans its epochs from. The row format itself is `trialign.rollout.schema`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trialign.errors import TriAlignError
from trialign.groups import check_group_ids
from trialign.rollout.manifest import MANIFEST as MANIFEST_NAME, read_manifest
from trialign.rollout.schema import ROW_KINDS, features

log = logging.getLogger(__name__)


NONFINITE_SKIP_FIELDS = ("reward", "ret", "behavior_logprob")
"""Turn fields whose NaN/Inf makes the whole item skipped."""
_LIST_SEGMENTS = {"list", "element", "item", "array", "bag", "array_element"}  # Parquet's list encoding levels
ANSWER_TYPES = ("option", "numeric", "alias")


# ---------------------------------------------------------------------------------------------------- checks
def rollout_files(data_dir: str | Path) -> list[Path]:
    """The dataset's Parquet shards, sorted; hidden and temporary files (``.*``, ``_*``) are not shards."""
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise TriAlignError(f"data.data_dir '{data_dir}': folder not found (expected the output of "
                            "`python -m trialign rollout`)")
    files = sorted(p for p in folder.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise TriAlignError(f"data.data_dir '{data_dir}': no Parquet files (*.parquet) in the folder")
    return files


def _type_family(arrow_type) -> str:
    import pyarrow.types as pat

    if pat.is_string(arrow_type) or pat.is_large_string(arrow_type) or getattr(pat, "is_string_view",
                                                                              lambda _: False)(arrow_type):
        return "string"
    if pat.is_integer(arrow_type):
        return "integer"
    if pat.is_floating(arrow_type):
        return "float"
    if pat.is_list(arrow_type) or pat.is_large_list(arrow_type) or pat.is_fixed_size_list(arrow_type):
        return "list"
    if pat.is_struct(arrow_type):
        return "struct"
    return str(arrow_type)


def _compare_types(expected, actual, path: str, missing: list[str], wrong: list[str]) -> None:
    family, got = _type_family(expected), _type_family(actual)
    compatible = family == got or (family == "float" and got == "integer")
    if not compatible:
        wrong.append(f"{path} has type {actual}, expected {expected}")
    elif family == "list":
        _compare_types(expected.value_type, actual.value_type, path, missing, wrong)
    elif family == "struct":
        names = {actual.field(i).name: actual.field(i).type for i in range(actual.num_fields)}
        for i in range(expected.num_fields):
            child = expected.field(i)
            if child.name not in names:
                missing.append(f"{path}.{child.name}")
            else:
                _compare_types(child.type, names[child.name], f"{path}.{child.name}", missing, wrong)


def check_file_schema(path: str | Path, schema) -> None:
    """Raise a `TriAlignError` naming `path` and every missing column or wrongly typed one (nested ones included).

    Widths may differ (int64 for int32, float64 for float32); integers are accepted where floats are expected."""
    expected = features().arrow_schema
    missing: list[str] = []
    wrong: list[str] = []
    for name in expected.names:
        index = schema.get_field_index(name)
        if index < 0:
            missing.append(name)
        else:
            _compare_types(expected.field(name).type, schema.field(index).type, name, missing, wrong)
    if missing:
        raise TriAlignError(f"rollout file {path}: missing columns {', '.join(missing)}")
    if wrong:
        raise TriAlignError(f"rollout file {path}: wrong column types: {'; '.join(wrong)}")


def _leaf_columns(parquet_file, wanted: set[str]) -> list[str]:
    """Physical Parquet column paths (``groups.list.element.group``) of the logical leaves in `wanted`."""
    found = []
    for i in range(parquet_file.metadata.num_columns):
        physical = parquet_file.schema.column(i).path
        logical = ".".join(seg for seg in physical.split(".") if seg not in _LIST_SEGMENTS)
        if logical in wanted:
            found.append(physical)
    return found


@dataclass
class _FileScan:
    """What `scan_rollout` reads from one file, one entry per row."""

    item_ids: list[Any]
    kinds: list[Any]
    answer_types: list[Any]
    num_options: list[int]
    gold_index: list[Any]
    gold_text: list[Any]
    groups: list[list[Any]]
    """Group ids of each row, in row order."""
    episodes: list[list[int]]
    """Number of episodes (K) of each group of each row."""
    empty_episodes: list[bool]
    """Whether a row has an episode without turns."""
    max_turns: list[int]
    nonfinite: list[bool]
    """Whether a row has a NaN/Inf in one of `NONFINITE_SKIP_FIELDS`."""


def _scan_file(path: Path) -> _FileScan:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
        check_file_schema(path, parquet.schema_arrow)
        turn_leaves = {f"groups.episodes.turns.{name}" for name in NONFINITE_SKIP_FIELDS}
        wanted = {"item_id", "answer_type", "kind", "options", "gold_index", "gold_text", "groups.group"} | turn_leaves
        table = parquet.read(columns=_leaf_columns(parquet, wanted))
    except (pa.ArrowException, OSError) as err:
        # A shard cut short (a copy interrupted, a full disk) or not Parquet at all; the rollout itself writes
        # shards atomically, so rerunning it regenerates exactly the missing ones once this file is removed.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TriAlignError(f"rollout file {path}: not a readable Parquet file ({reason}); expected a complete shard "
                            "written by `python -m trialign rollout` (delete it and rerun the rollout to regenerate "
                            "it)") from None
    num_rows = table.num_rows

    def offsets_split(values: list[Any], parents: np.ndarray, count: int) -> list[list[Any]]:
        out: list[list[Any]] = [[] for _ in range(count)]
        for value, parent in zip(values, parents):
            out[parent].append(value)
        return out

    def parents(list_array) -> np.ndarray:
        return pc.list_parent_indices(list_array).to_numpy(zero_copy_only=False).astype(np.int64)

    def lengths(list_array) -> np.ndarray:
        return pc.list_value_length(list_array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)

    groups = table.column("groups").combine_chunks()
    group_struct = groups.flatten()
    group_row = parents(groups)
    episodes = pc.struct_field(group_struct, "episodes")
    group_k = lengths(episodes)
    episode_struct = episodes.flatten()
    episode_group = parents(episodes)
    turns = pc.struct_field(episode_struct, "turns")
    episode_t = lengths(turns)
    turn_struct = turns.flatten()
    turn_episode = parents(turns)
    bad_turn = np.zeros(len(turn_struct), dtype=bool)
    for name in NONFINITE_SKIP_FIELDS:
        values = pc.struct_field(turn_struct, name).to_numpy(zero_copy_only=False).astype(np.float64)
        bad_turn |= ~np.isfinite(values)
    nonfinite = np.zeros(num_rows, dtype=bool)
    nonfinite[group_row[episode_group[turn_episode[bad_turn]]]] = True
    empty = np.zeros(num_rows, dtype=bool)
    empty[group_row[episode_group[episode_t == 0]]] = True
    max_turns = np.zeros(num_rows, dtype=np.int64)
    if len(episode_t):
        np.maximum.at(max_turns, group_row[episode_group], episode_t)
    return _FileScan(
        item_ids=table.column("item_id").to_pylist(),
        kinds=table.column("kind").to_pylist(),
        answer_types=table.column("answer_type").to_pylist(),
        num_options=lengths(table.column("options").combine_chunks()).tolist(),
        gold_index=table.column("gold_index").to_pylist(),
        gold_text=table.column("gold_text").to_pylist(),
        groups=offsets_split(pc.struct_field(group_struct, "group").to_pylist(), group_row, num_rows),
        episodes=offsets_split(group_k.tolist(), group_row, num_rows),
        empty_episodes=empty.tolist(),
        max_turns=max_turns.tolist(),
        nonfinite=nonfinite.tolist(),
    )


@dataclass
class RolloutIndex:
    """What the data module knows about a rollout folder after `scan_rollout`."""

    data_dir: str
    """The folder."""
    files: list[str]
    """Its Parquet shards, sorted."""
    group_names: list[str]
    """Group ids in the dataset's order (the manifest's ``group_ids``, else the first row's)."""
    item_ids: list[str]
    """All items in file and row order, skipped ones included."""
    skipped_item_ids: list[str] = field(default_factory=list)
    """Items with a non-finite reward, return or behavior log-prob; never served."""
    samples: int = 0
    """K, episodes per (item, group)."""
    max_turns: int = 0
    """The longest episode, in turns."""
    state_item_ids: list[str] = field(default_factory=list)
    """Items whose rows are cross-group states (kind "state": s_0 of every group, no episodes)."""


def scan_rollout(data_dir: str | Path, groups: Sequence[str] | None = None) -> RolloutIndex:
    """Check a rollout folder (see the module docstring for every check) and index its items."""
    files = rollout_files(data_dir)
    folder = Path(data_dir).expanduser()
    manifest = read_manifest(folder)
    reference = list(manifest.group_ids) if manifest else None
    source = f"{folder / MANIFEST_NAME} group_ids" if manifest else "the first row's groups"
    item_ids: list[str] = []
    seen: dict[str, Path] = {}
    skipped: list[str] = []
    state_ids: list[str] = []
    samples, max_turns = 0, 0
    for path in files:
        scan = _scan_file(path)
        for r, item_id in enumerate(scan.item_ids):
            if not isinstance(item_id, str) or not item_id:
                raise TriAlignError(f"rollout file {path}: row {r} has an empty item_id")
            where = f"rollout file {path}, item {item_id!r}"
            if item_id in seen:
                raise TriAlignError(f"{where}: duplicate item_id (also in {seen[item_id]})")
            seen[item_id] = path
            row_groups = scan.groups[r]
            if not row_groups:
                raise TriAlignError(f"{where}: has no groups")
            if reference is None:
                reference = list(row_groups)
                check_group_ids(reference, f"{where}: groups.group")
            if len(set(row_groups)) != len(row_groups) or set(row_groups) != set(reference):
                missing = sorted(set(reference) - set(row_groups))
                unexpected = sorted(set(row_groups) - set(reference))
                raise TriAlignError(f"{where}: groups {row_groups} differ from {source} {reference} "
                                    f"(missing: {missing}, unexpected: {unexpected}, duplicated: "
                                    f"{sorted({g for g in row_groups if row_groups.count(g) > 1})})")
            kind = scan.kinds[r]
            if kind not in ROW_KINDS:
                raise TriAlignError(f"{where}: kind {kind!r}, expected one of {', '.join(ROW_KINDS)}")
            if kind == "state":
                if any(scan.episodes[r]):
                    raise TriAlignError(f"{where}: a 'state' row holds episodes; expected none")
                state_ids.append(item_id)
            for name, count in zip(row_groups, scan.episodes[r] if kind == "episodes" else []):
                if count == 0:
                    raise TriAlignError(f"{where}: group {name!r} has no episodes")
                samples = samples or count
                if count != samples:
                    raise TriAlignError(f"{where}: group {name!r} has {count} episodes but the dataset has K="
                                        f"{samples}; every group of every item needs the same number of samples")
            if scan.empty_episodes[r]:
                raise TriAlignError(f"{where}: an episode has no turns")
            _check_answer(where, scan, r)
            max_turns = max(max_turns, scan.max_turns[r])
            item_ids.append(item_id)
            if scan.nonfinite[r]:
                skipped.append(item_id)
    if not item_ids:
        raise TriAlignError(f"data.data_dir '{data_dir}': the Parquet files hold no rows (empty dataset)")
    assert reference is not None
    if groups is not None:
        _check_configured_groups(data_dir, reference, groups)
    if skipped:
        log.warning("data %s: skipped %d of %d items with a NaN/Inf %s (first: %s)", data_dir, len(skipped),
                    len(item_ids), "/".join(NONFINITE_SKIP_FIELDS), skipped[0])
    if len(skipped) == len(item_ids):
        raise TriAlignError(f"data.data_dir '{data_dir}': every item has a NaN/Inf reward, return or behavior "
                            "log-prob; nothing left to train on")
    return RolloutIndex(str(data_dir), [str(p) for p in files], reference, item_ids, skipped, samples, max_turns,
                        state_ids)


def _check_answer(where: str, scan: _FileScan, r: int) -> None:
    answer_type = scan.answer_types[r]
    if answer_type not in ANSWER_TYPES:
        raise TriAlignError(f"{where}: answer_type {answer_type!r}, expected one of {', '.join(ANSWER_TYPES)}")
    if answer_type == "option":
        count, gold = scan.num_options[r], scan.gold_index[r]
        if count < 2 or gold is None or not 0 <= gold < count:
            raise TriAlignError(f"{where}: an option item needs at least 2 options and gold_index in [0, {count}), "
                                f"got {count} options and gold_index {gold}")
    elif not (scan.gold_text[r] or "").strip():
        raise TriAlignError(f"{where}: a free-form item needs a non-empty gold_text")


def _check_configured_groups(data_dir, data_groups: Sequence[str], configured: Sequence[str]) -> None:
    unknown = [g for g in data_groups if g not in set(configured)]
    if unknown:
        raise TriAlignError(f"data.groups: the data in '{data_dir}' has group(s) {', '.join(unknown)} that the "
                            f"config does not list (configured: {', '.join(configured)})")
    absent = [g for g in configured if g not in set(data_groups)]
    if absent:
        raise TriAlignError(f"data.groups: group(s) {', '.join(absent)} are configured but not in the data in "
                            f"'{data_dir}' (data groups: {', '.join(data_groups)})")
