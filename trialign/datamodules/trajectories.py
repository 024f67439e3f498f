"""`GroupTrajectoryDataModule`: streams the offline rollout dataset as batches of B items × G groups × K samples.

Where each part lives: the format checks and the item index in `trialign.datamodules.reader`; the split, the
epoch plans, the streams and the loader in `trialign.datamodules.streams`; task items asked as the rollout asked its
own in `trialign.rollout.task_rows`; tokenization in `trialign.datamodules.collate`. This module joins them.

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

from typing import Any

from lightning.pytorch import LightningDataModule

from trialign.datamodules.collate import TrajectoryCollator
from trialign.datamodules.reader import RolloutIndex, scan_rollout
from trialign.datamodules.streams import ItemLoader, ItemStream, ValidationStream, check_batch_mix, split_items
from trialign.errors import TriAlignError
from trialign.prompts import LEGACY_PROBE_TEMPLATE, probe_template
from trialign.rollout.manifest import read_manifest
from trialign.rollout.task_rows import task_probe_rows

__all__ = ["GroupTrajectoryDataModule", "RolloutIndex", "scan_rollout", "split_items"]


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
