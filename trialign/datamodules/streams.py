"""Item streams: the train/validation split, each epoch's plan per rank, and the batches of rows it yields.

The rules (split by item, sharded by item across ranks, the batch mix of states and episodes, deterministic order,
resumable) are described in `trialign.datamodules.trajectories`' docstring; this module implements them.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trialign.errors import TriAlignError

log = logging.getLogger(__name__)

# Stream epochs reserved per training epoch: pass c over the episode items in epoch e re-seeds as e·_PASSES + c.
_PASSES = 1_000_000


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
