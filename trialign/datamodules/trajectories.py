"""`GroupTrajectoryDataModule`: streams the offline rollout dataset as batches of B items × G groups × K samples.

DESIGN.md "Data": the rollout writes Parquet shards with one row per item holding all groups' episodes
(`trialign.rollout.schema`) plus ``manifest.json``. This module reads them back for training:

* **Checks first.** `scan_rollout` reads each file's schema and a few small columns (item ids, group ids and the
  reward/return/behavior-log-prob leaves) before any training, and raises a one-line `TriAlignError` naming the
  folder or file for: no Parquet files or no rows, a file that is not readable Parquet (truncated, not Parquet),
  missing columns (all named, nested ones as ``groups.episodes.turns.ret``), wrong column types, duplicate item ids,
  group ids that are not plain names (they name folders later, so a path in the data cannot escape the run folder),
  a bad manifest, rows whose group set
  differs from the manifest's (or from the first row's when there is no manifest), groups the config does not know
  or configured groups the data lacks, a K (samples per group) that differs across groups or items, episodes
  without turns, a row kind other than "episodes"/"state" or a state row holding episodes, and option items
  without valid options. T may differ between episodes: the collator pads turns
  and masks them (``turn_mask``).
* **Non-finite values are skipped, not fatal.** An item with a NaN/Inf ``reward``, ``ret`` or
  ``behavior_logprob`` in any turn of any group is dropped whole (its groups must stay together), with one warning
  giving the count; `skipped_item_ids` lists them.
* **Split by item.** The train/validation split ranks items by ``sha256(seed, item_id)`` and puts the first
  ``round(val_fraction · n)`` (at least one when ``val_fraction > 0`` and n ≥ 2) in validation: deterministic for a
  seed, exact in size, never the same item in both. The split is made before skipping, so skipping an item does not
  move others between splits. The test loader streams the validation items.
* **Sharded by item across ranks.** A row is an item, so a rank always gets all groups of its items. Training:
  each epoch, a permutation of the training items seeded by (seed, epoch) is dealt to ranks round-robin and cut to
  ``n // world_size`` items per rank, so every rank runs the same number of steps (up to world_size − 1 items sit
  out each epoch, different ones each epoch). Validation: items are dealt round-robin with nothing dropped, and each
  rank splits its items into the same number of batches (``ceil(n / (world_size · B))``) so ranks stay in step;
  batches may then hold fewer than B items.
* **Cross-group states.** Rows of kind ``"state"`` (every group's first state s_0 of an item, no episodes;
  `trialign.rollout.schema`) are items like the others: split, shuffled and dealt to ranks by item with the episode
  items, so each epoch's seeded permutation mixes the two kinds and a batch of B items holds both in the dataset's
  proportion on average (deterministic for a seed; all groups of a state on one rank). The collator gives a state
  row probe sequences only; `TriAlignModule` applies the penalty and the truth term to every row's s_0 and the
  episode terms to the episode rows.
* **Batch mix.** States are cheap and many, episodes expensive and few, so in one permutation most batches hold no
  episode and the episode terms (policy, value, KL) act on a few steps only. With ``episodes_per_batch = k`` every
  training batch holds k episode items and B − k states: the state items define the epoch (split, permuted and
  dealt to ranks as above, B − k per batch) and the episode items cycle, each pass over them a new seeded
  permutation dealt to ranks the same way (ranks disjoint, deterministic for a seed, resumable like the rest).
* **Validation on task items.** A rollout is expensive per item, so its held-out items are few. With ``val_task``
  (e.g. the rollout's own task), validation also probes ``val_limit`` of that task's items — items the rollout did
  not use, after the first ``val_offset`` in the task's stable order — under every group's persona, asked exactly as
  the rollout asked its own (groups file, persona expression, system prompt and preference lines from
  ``manifest.json``). These rows have no episodes (`TrajectoryCollator` "probe-only rows"); the validation metrics
  are computed over both kinds of items together. They are dealt to ranks like the rollout's validation items.
* **Deterministic order.** Streaming (the default) reads rows with HF `datasets` in streaming mode; training rows go
  through its seeded shuffle (shard order + a buffer of `shuffle_buffer` rows) re-seeded per epoch with
  ``set_epoch``. Every rank and every DataLoader worker reads the same stream and keeps its own items and batches
  (batch j goes to worker j mod num_workers), so the batches do not depend on `num_workers`. With
  ``streaming=False`` the files are loaded into memory once and training items are visited in the permutation's
  order (an exact global shuffle).
* **Resumable.** Under a Lightning trainer the train loader takes its epoch from the trainer and, when the fit loop
  restarts mid-epoch from a checkpoint, skips the batches that epoch already consumed, so ``--ckpt_path last``
  continues the same batch sequence.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trialign.datamodules.collate import TrajectoryCollator
from trialign.errors import TriAlignError
from trialign.groups import check_group_ids
from trialign.prompts import LEGACY_PROBE_TEMPLATE, probe_template
from trialign.rollout.manifest import MANIFEST as MANIFEST_NAME, read_manifest
from trialign.rollout.schema import ROW_KINDS, answer_columns, features

log = logging.getLogger(__name__)

# Stream epochs reserved per training epoch: pass c over the episode items in epoch e re-seeds as e·_PASSES + c.
_PASSES = 1_000_000

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


# ---------------------------------------------------------------------------------------------------- split & plan
def split_items(item_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) item ids, each in the input order; see the module docstring."""
    if not 0.0 <= val_fraction < 1.0:
        raise TriAlignError(f"data.val_fraction: expected a value in [0, 1), got {val_fraction}")
    count = len(item_ids)
    num_val = int(round(val_fraction * count))
    if val_fraction > 0 and count >= 2:
        num_val = min(max(num_val, 1), count - 1)
    rank = sorted(item_ids, key=lambda item: hashlib.sha256(f"{seed}\x00{item}".encode()).digest())
    val = set(rank[:num_val])
    return [i for i in item_ids if i not in val], [i for i in item_ids if i in val]


def epoch_plan(item_ids: Sequence[str], batch_size: int, rank: int, world_size: int, epoch: int, seed: int,
               train: bool) -> tuple[list[str], list[int]]:
    """This rank's items for one epoch and its batch sizes (see "Sharded by item" in the module docstring)."""
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(len(item_ids))
        per_rank = len(item_ids) // world_size
        mine = [item_ids[i] for i in order[rank::world_size][:per_rank]]
        sizes = [batch_size] * (per_rank // batch_size) + ([per_rank % batch_size] if per_rank % batch_size else [])
        return mine, sizes
    mine = list(item_ids[rank::world_size])
    num_batches = math.ceil(len(item_ids) / (world_size * batch_size))
    base, extra = divmod(len(mine), max(num_batches, 1))
    sizes = [base + 1] * extra + [base] * (num_batches - extra)
    return mine, [s for s in sizes if s > 0]


# ---------------------------------------------------------------------------------------------------- streaming
class ItemStream(IterableDataset):
    """Yields this rank's rollout rows of one split, as one list of rows per batch."""

    def __init__(self, files: Sequence[str], item_ids: Sequence[str], batch_size: int, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, streaming: bool = True, shuffle_buffer: int = 64,
                 episodes_per_batch: int | None = None, state_item_ids: Sequence[str] = ()):
        if world_size < 1 or not 0 <= rank < world_size:
            raise TriAlignError(f"rank {rank} / world size {world_size}: expected 0 <= rank < world size")
        self.files = list(files)
        self.item_ids = list(item_ids)
        self.episodes_per_batch = episodes_per_batch if train else None
        """k: episode items per training batch, the other B − k being states (None: one mixed permutation)."""
        states = set(state_item_ids)
        self.state_ids = [i for i in self.item_ids if i in states]
        self.episode_ids = [i for i in self.item_ids if i not in states]
        if self.episodes_per_batch is not None:
            check_batch_mix(len(self.state_ids), len(self.episode_ids), batch_size, self.episodes_per_batch,
                            world_size)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.skip_batches = 0
        """Batches of the epoch to skip on the next iteration (set when resuming mid-epoch)."""
        self._in_memory = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self, epoch: int | None = None) -> tuple[list[str], list[int]]:
        """This rank's items of the epoch and its batch sizes; with a batch mix, its state items and the number of
        states in each batch (each batch also holds `episodes_per_batch` episode items)."""
        epoch = self.epoch if epoch is None else epoch
        if self.episodes_per_batch is not None:
            return epoch_plan(self.state_ids, self.batch_size - self.episodes_per_batch, self.rank, self.world_size,
                              epoch, self.seed, True)
        return epoch_plan(self.item_ids, self.batch_size, self.rank, self.world_size, epoch, self.seed, self.train)

    def _episode_rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This rank's episode items, over and over: each pass a new seeded order (a mixed batch's episode part)."""
        for cycle in itertools.count():
            order = np.random.default_rng([self.seed, epoch, cycle, 1]).permutation(len(self.episode_ids))
            mine = [self.episode_ids[i] for i in order[self.rank::self.world_size]]
            mine = mine[:len(self.episode_ids) // self.world_size]
            # A distinct stream epoch per (epoch, pass) re-seeds the streaming shuffle.
            rows = (self._streamed_rows(epoch * _PASSES + cycle, set(mine)) if self.streaming
                    else self._memory_rows(mine))
            yield from rows

    def __len__(self) -> int:
        return len(self.plan()[1])

    def _streamed_rows(self, epoch: int, wanted: set[str]) -> Iterator[dict[str, Any]]:
        from datasets import load_dataset

        stream = load_dataset("parquet", data_files=self.files, split="train", streaming=True)
        if self.train:
            # One input shard at a time: interleaving shards uses reader threads that datasets waits 5 s to join.
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer, max_buffer_input_shards=1)
        stream.set_epoch(epoch)
        # `.iter` rather than `iter(stream)`: inside a DataLoader worker the latter would give this worker only
        # some files, while every worker must see the whole stream to pick its batches.
        for chunk in stream.iter(batch_size=16):
            for i, item_id in enumerate(chunk["item_id"]):
                if item_id in wanted:
                    yield {key: values[i] for key, values in chunk.items()}

    def _memory_rows(self, mine: list[str]) -> Iterator[dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from datasets import Dataset

        if self._in_memory is None:
            table = pa.concat_tables([pq.read_table(f) for f in self.files], promote_options="default")
            data = Dataset(table)
            self._in_memory = (data, {item: i for i, item in enumerate(data["item_id"])})
        data, position = self._in_memory
        for item_id in mine:
            yield data[position[item_id]]

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return self._batches(self.epoch, self.skip_batches)

    def _batches(self, epoch: int, skip: int) -> Iterator[list[dict[str, Any]]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        mine, sizes = self.plan(epoch)
        if not sizes:
            return
        rows = self._streamed_rows(epoch, set(mine)) if self.streaming else self._memory_rows(mine)
        if self.episodes_per_batch is not None:
            yield from self._mixed_batches(rows, sizes, self._episode_rows(epoch), skip, worker_id, num_workers)
            return
        ends = np.cumsum(sizes)
        batch, position, current = 0, 0, []
        for row in rows:
            ours = batch >= skip and (batch - skip) % num_workers == worker_id
            if ours:
                current.append(row)
            position += 1
            if position == ends[batch]:
                if ours:
                    yield current
                current = []
                batch += 1
                if batch == len(sizes):
                    return
        if batch < len(sizes):
            raise TriAlignError(f"rollout files changed while training: expected {int(ends[-1])} items for rank "
                                f"{self.rank}, the stream held {position}")


    def _mixed_batches(self, state_rows: Iterator[dict[str, Any]], sizes: list[int],
                       episode_rows: Iterator[dict[str, Any]], skip: int, worker_id: int, num_workers: int
                       ) -> Iterator[list[dict[str, Any]]]:
        """Batch j: the next sizes[j] state rows, then the next `episodes_per_batch` episode rows."""
        for batch, size in enumerate(sizes):
            current = list(itertools.islice(state_rows, size)) + list(itertools.islice(episode_rows,
                                                                                      self.episodes_per_batch))
            if len(current) < size + self.episodes_per_batch:
                raise TriAlignError(f"rollout files changed while training: rank {self.rank}'s batch {batch} "
                                    f"has {len(current)} of its {size + self.episodes_per_batch} items")
            if batch >= skip and (batch - skip) % num_workers == worker_id:
                yield current


def check_batch_mix(num_states: int, num_episodes: int, batch_size: int, episodes_per_batch: int,
                    world_size: int) -> None:
    """One-line errors for a batch mix the training items cannot fill (see "Batch mix" in the module docstring)."""
    where = "data.episodes_per_batch"
    if not 1 <= episodes_per_batch < batch_size:
        raise TriAlignError(f"{where}: expected 1 to batch_size − 1 ({batch_size - 1}) episode items per batch, "
                            f"got {episodes_per_batch}")
    if num_states < world_size:
        raise TriAlignError(f"{where}: the training items hold {num_states} cross-group state(s) for {world_size} "
                            "rank(s); a mixed batch needs states (rollout states_limit) or leave it null")
    if num_episodes // world_size < episodes_per_batch:
        raise TriAlignError(f"{where}: {episodes_per_batch} episode items per batch, but the training items hold "
                            f"{num_episodes} with episodes ({num_episodes // world_size} per rank for {world_size} "
                            "rank(s))")


class ValidationStream(IterableDataset):
    """The held-out rollout items of an `ItemStream`, then the probe-only task rows (see "Validation on task
    items"), dealt to ranks and batched as the rollout's validation items are."""

    def __init__(self, items: ItemStream, task_rows: Sequence[dict[str, Any]]):
        self.items = items
        ids = [str(row["item_id"]) for row in task_rows]
        mine, self.sizes = epoch_plan(ids, items.batch_size, items.rank, items.world_size, 0, items.seed, train=False)
        by_id = {str(row["item_id"]): row for row in task_rows}
        self.mine = [by_id[item_id] for item_id in mine]
        self.seed = items.seed
        self.item_ids = items.item_ids + ids
        self.skip_batches = 0

    @property
    def epoch(self) -> int:
        return self.items.epoch

    def set_epoch(self, epoch: int) -> None:
        self.items.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.items) + len(self.sizes)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        yield from self.items
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        start = 0
        for batch, size in enumerate(self.sizes):
            if batch % num_workers == worker_id:
                yield self.mine[start : start + size]
            start += size


def task_probe_rows(data_dir: str | Path, group_names: Sequence[str], exclude: Sequence[str], task: str,
                    limit: int, offset: int = 0) -> list[dict[str, Any]]:
    """Probe-only rows (`trialign.datamodules.collate`) of `limit` items of `task` after its first `offset`, leaving
    out items in `exclude` (the rollout's), each asked under every group of `group_names` as the rollout at
    `data_dir` asked its own: its manifest's groups file, persona expression, system prompt and preference lines."""
    from trialign.groups import load_groups, select_groups
    from trialign.prompts import build_messages, resolve_system_prompt
    from trialign.tasks import load_task

    manifest = read_manifest(data_dir)
    settings = manifest.config if manifest else None
    needed = ("groups", "expression", "system_prompt")
    if not isinstance(settings, dict) or any(key not in settings for key in needed):
        raise TriAlignError(f"data.val_task: {Path(data_dir) / MANIFEST_NAME} does not record how the rollout asked "
                            f"its items (config.{', config.'.join(needed)}), so task items cannot be asked alike")
    try:
        groups = select_groups(load_groups(settings["groups"]), list(group_names))
    except TriAlignError as err:
        raise TriAlignError(f"data.val_task: the rollout's groups ({settings['groups']}): {err}") from None
    system = resolve_system_prompt(settings["system_prompt"]) or ""
    skip = set(exclude)
    try:
        items = load_task(task)
    except TriAlignError as err:
        raise TriAlignError(f"data.val_task: {err}") from None
    rows: list[dict[str, Any]] = []
    for item in items[offset:]:
        if len(rows) == limit:
            break
        if item.id in skip:
            continue
        row_groups = []
        for group in groups:
            messages = build_messages(item, group, expression=settings["expression"], system_prompt=system,
                                      show_preferences=settings.get("show_preferences", True),
                                      template=manifest.template)
            first = messages[0]
            row_groups.append({"group": group.id, "system": first["content"] if first["role"] == "system" else "",
                               "user": messages[-1]["content"]})
        rows.append({"item_id": item.id, "probe_only": True, **answer_columns(item), "groups": row_groups})
    if not rows:
        raise TriAlignError(f"data.val_task: task {task} has no items after the first {offset} that the rollout "
                            "did not use")
    if len(rows) < limit:
        log.warning("data: val_task %s has %d items left to validate on, fewer than val_limit=%d", task, len(rows),
                    limit)
    return rows


class ItemLoader(DataLoader):
    """A DataLoader over an `ItemStream` that knows its epoch and, under a trainer, its resume position.

    `position(num_batches)` returns (epoch, batches of that epoch already consumed); without it, `set_epoch` sets the
    epoch."""

    def __init__(self, stream: ItemStream, collate_fn: Callable, num_workers: int = 0,
                 position: Callable[[int], tuple[int, int]] | None = None):
        super().__init__(stream, batch_size=None, collate_fn=collate_fn, num_workers=num_workers)
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        if self.position is not None:
            epoch, done = self.position(len(self.dataset))
            self.dataset.set_epoch(epoch)
            self.dataset.skip_batches = done
        iterator = super().__iter__()  # the stream (or each worker's copy) has captured epoch and skip by now
        self.dataset.skip_batches = 0
        return iterator

    # Lightning's resumable-loader protocol. The position itself comes from the trainer's progress (`position`); the
    # state only lets a resumed run notice that its data would be served in another order.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.dataset.epoch, "seed": self.dataset.seed, "num_items": len(self.dataset.item_ids)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        now = self.state_dict()
        if any(state.get(key) != now[key] for key in ("seed", "num_items")):
            log.warning("data: resuming with seed %s and %s training items, the checkpoint had seed %s and %s items; "
                        "batches will not continue the checkpointed order", now["seed"], now["num_items"],
                        state.get("seed"), state.get("num_items"))


# ---------------------------------------------------------------------------------------------------- data module
class GroupTrajectoryDataModule(LightningDataModule):
    """Batches of B items with all their groups' episodes, tokenized for training (see the module docstring)."""

    def __init__(
        self,
        data_dir: str,
        tokenizer: str,
        batch_size: int = 2,
        val_fraction: float = 0.2,
        max_length: int = 512,
        seed: int = 0,
        num_workers: int = 0,
        groups: list[str] | None = None,
        streaming: bool = True,
        probe_answer_prefix: str | None = None,
        shuffle_buffer: int = 64,
        val_task: str | None = None,
        val_limit: int = 24,
        val_offset: int = 0,
        episodes_per_batch: int | None = None,
    ):
        """
        Args:
            data_dir: rollout folder (Parquet shards + manifest.json).
            tokenizer: model source whose tokenizer and chat template render the episodes (linked from the model).
            batch_size: items per batch; a batch holds B·G·K episodes.
            val_fraction: fraction of items held out for validation (and test).
            max_length: longest episode sequence in tokens; later turns that do not fit are dropped and counted.
            seed: seeds the split, the per-epoch item permutation and the stream shuffle.
            num_workers: DataLoader worker processes (each reads the stream; tokenization is split between them).
            groups: expected group ids; the data must have exactly these (order is taken from the data).
            streaming: stream rows from the files (True) or load them into memory (False).
            probe_answer_prefix: text after which the answer probe scores the options; None (the default): the
                answer prefix of the probe template the rollout recorded (``Final answer:`` for datasets without one).
            shuffle_buffer: rows in the streaming shuffle buffer.
            val_task: a task (as in `trialign evaluate --task`) whose items validation also probes, under every
                group's persona rendered as the rollout rendered its own (see "Validation on task items").
            val_limit: how many of `val_task`'s items.
            val_offset: items of `val_task` (in its stable order) passed over before they are taken.
            episodes_per_batch: k: every training batch holds k items with episodes and B − k cross-group states,
                the episode items cycling (see "Batch mix"); None: episode and state items in one permutation.
        """
        super().__init__()
        if batch_size < 1:
            raise TriAlignError(f"data.batch_size: expected a positive number of items, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise TriAlignError(f"data.val_fraction: expected a value in [0, 1), got {val_fraction}")
        if max_length < 2:
            raise TriAlignError(f"data.max_length: expected at least 2 tokens, got {max_length}")
        if num_workers < 0:
            raise TriAlignError(f"data.num_workers: expected 0 or more, got {num_workers}")
        if shuffle_buffer < 1:
            raise TriAlignError(f"data.shuffle_buffer: expected at least 1 row, got {shuffle_buffer}")
        if groups is not None and (not groups or len(set(groups)) != len(groups)):
            raise TriAlignError(f"data.groups: expected a non-empty list of distinct group ids, got {groups}")
        if val_task is not None and val_limit < 1:
            raise TriAlignError(f"data.val_limit: expected a positive number of items, got {val_limit}")
        if val_offset < 0:
            raise TriAlignError(f"data.val_offset: expected 0 or more, got {val_offset}")
        if episodes_per_batch is not None and not 1 <= episodes_per_batch < batch_size:
            raise TriAlignError(f"data.episodes_per_batch: expected 1 to batch_size − 1 ({batch_size - 1}) episode "
                                f"items per batch, or null, got {episodes_per_batch}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.tokenizer_source = tokenizer
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.seed = seed
        self.num_workers = num_workers
        self.groups = list(groups) if groups is not None else None
        self.streaming = streaming
        self.probe_answer_prefix = probe_answer_prefix
        self.shuffle_buffer = shuffle_buffer
        self.val_task = val_task
        self.val_limit = val_limit
        self.val_offset = val_offset
        self.episodes_per_batch = episodes_per_batch
        self._index: RolloutIndex | None = None
        self._task_rows: list[dict[str, Any]] | None = None
        self._tokenizer = None
        self._collator: TrajectoryCollator | None = None

    @property
    def index(self) -> RolloutIndex:
        """The checked index of the rollout folder (scanned on first use)."""
        if self._index is None:
            self._index = scan_rollout(self.data_dir, self.groups)
        return self._index

    @property
    def group_names(self) -> list[str]:
        """The dataset's group ids in its order; the CLI links this to ``model.group_names``."""
        return list(self.index.group_names)

    @property
    def skipped_item_ids(self) -> list[str]:
        return list(self.index.skipped_item_ids)

    def split(self) -> tuple[list[str], list[str]]:
        """(train, validation) item ids, skipped items removed."""
        train, val = split_items(self.index.item_ids, self.val_fraction, self.seed)
        skipped = set(self.index.skipped_item_ids)
        return [i for i in train if i not in skipped], [i for i in val if i not in skipped]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from trialign.backbone import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_source)
        return self._tokenizer

    @property
    def collator(self) -> TrajectoryCollator:
        if self._collator is None:
            prefix = self.probe_answer_prefix
            if prefix is None:
                manifest = read_manifest(self.data_dir)
                prefix = (manifest.template if manifest else probe_template(LEGACY_PROBE_TEMPLATE)).answer_prefix
            self._collator = TrajectoryCollator(self.tokenizer, self.group_names, self.max_length, prefix)
        return self._collator

    @property
    def task_rows(self) -> list[dict[str, Any]]:
        """Probe-only rows of the `val_task` items (empty without `val_task`); built on first use."""
        if self._task_rows is None:
            self._task_rows = [] if self.val_task is None else task_probe_rows(
                self.data_dir, self.group_names, self.index.item_ids, self.val_task, self.val_limit, self.val_offset)
        return self._task_rows

    def setup(self, stage: str | None = None) -> None:
        self.task_rows  # noqa: B018 - a bad val_task fails before any step
        train, _ = self.split()
        _, world_size = self._distributed()
        if stage in (None, "fit") and len(train) < world_size:
            raise TriAlignError(f"data.data_dir '{self.data_dir}': {len(train)} training item(s) for {world_size} "
                                "rank(s); lower data.val_fraction or add items")
        if stage in (None, "fit") and self.episodes_per_batch is not None:
            states = set(self.index.state_item_ids)
            num_states = sum(item in states for item in train)
            check_batch_mix(num_states, len(train) - num_states, self.batch_size, self.episodes_per_batch, world_size)
        self.collator  # noqa: B018 - load the tokenizer on every rank before the loops start

    def _distributed(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _train_position(self, num_batches: int) -> tuple[int, int]:
        """(epoch, batches of it already consumed) from the trainer's fit loop, for a loader of `num_batches`."""
        trainer = self.trainer
        fit_loop = trainer.fit_loop
        # Lightning's own sampler epoch: epochs processed, which is one ahead of current_epoch when resuming from a
        # checkpoint written at an epoch's end.
        epoch = int(fit_loop.epoch_progress.current.processed)
        if not fit_loop.restarting:
            return epoch, 0
        done = int(fit_loop.epoch_loop.batch_progress.current.ready)
        limit = trainer.limit_train_batches
        if isinstance(limit, float):
            num_batches = int(num_batches * limit) if limit < 1.0 else num_batches
        elif limit is not None:
            num_batches = min(num_batches, int(limit))
        # A checkpoint from the epoch's last batch resumes at the next epoch, as Lightning's loop does.
        return (epoch + 1, 0) if done >= num_batches else (epoch, done)

    def make_dataloader(self, split: str, rank: int | None = None, world_size: int | None = None) -> ItemLoader:
        """The loader of `split` ("train" or "val") for one rank (default: the trainer's, else 0 of 1)."""
        if split not in ("train", "val"):
            raise TriAlignError(f"split: expected 'train' or 'val', got {split!r}")
        default_rank, default_world = self._distributed()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        train, val = self.split()
        stream = ItemStream(self.index.files, train if split == "train" else val, self.batch_size,
                            train=split == "train", seed=self.seed, rank=rank, world_size=world_size,
                            streaming=self.streaming, shuffle_buffer=self.shuffle_buffer,
                            episodes_per_batch=self.episodes_per_batch, state_item_ids=self.index.state_item_ids)
        if split == "val" and self.task_rows:
            stream = ValidationStream(stream, self.task_rows)
        position = self._train_position if split == "train" and self.trainer is not None else None
        return ItemLoader(stream, self.collator, num_workers=self.num_workers, position=position)

    def train_dataloader(self) -> ItemLoader:
        return self.make_dataloader("train")

    def val_dataloader(self) -> ItemLoader:
        return self.make_dataloader("val")

    def test_dataloader(self) -> ItemLoader:
        return self.make_dataloader("val")
