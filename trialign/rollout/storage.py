"""The dataset folder: Parquet shards written atomically, and a manifest merged safely by concurrent writers.

Layout of an output folder::

    manifest.json                      what the dataset is (config, model + weights fingerprint, counts, shards)
    shard-00000-of-00016.parquet       items 0 .. items_per_shard-1, one row each (`trialign.rollout.schema`)
    shard-00001-of-00016.parquet       ...
    .manifest.lock                     advisory lock for manifest updates (POSIX `flock`)

A shard is written by HF `datasets` to a hidden temporary file beside its final name and renamed into place, so
it either exists complete or not at all: a shard is *done* iff its final file exists. The manifest is rewritten
the same way under the lock, so processes of one sharded launch can record their shards concurrently; shards found
on disk but missing from the manifest (a process killed between the rename and the manifest update) are added
back by the next process that takes the lock. `datasets.load_dataset("parquet", data_files=<folder>/shard-*.parquet)`
loads every shard as one dataset (hidden temporary files never match).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from trialign.errors import TriAlignError
from trialign.rollout.manifest import MANIFEST, RolloutManifest, read_manifest, write_manifest

try:  # POSIX only; elsewhere concurrent writers to one folder are not supported (single processes are fine).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = ".manifest.lock"
_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.parquet$")


def shard_name(index: int, total: int) -> str:
    return f"shard-{index:05d}-of-{total:05d}.parquet"


class DatasetFolder:
    """One rollout output folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def ensure_writable(self) -> None:
        """Create the folder if needed and prove a file can be written in it; a one-line error otherwise."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except OSError as err:
            raise TriAlignError(f"output {self.path}: not a writable folder ({err.strerror or err})") from None

    def shard_files(self) -> dict[int, tuple[int, Path]]:
        """Shard files on disk: index -> (total in its name, path)."""
        found = {}
        if self.path.is_dir():
            for path in self.path.iterdir():
                match = _SHARD.match(path.name)
                if match:
                    found[int(match.group(1))] = (int(match.group(2)), path)
        return found

    def read_manifest(self) -> RolloutManifest | None:
        """The folder's manifest (`trialign.rollout.manifest`), or None; errors say how to get past them."""
        try:
            return read_manifest(self.path)
        except TriAlignError as err:
            raise TriAlignError(f"output {self.path}: {err}; pass --overwrite to replace it or choose another "
                                "output folder") from None

    def write_manifest(self, manifest: RolloutManifest) -> None:
        write_manifest(self.path, manifest)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's manifest lock (blocking) for a read-modify-write of the manifest."""
        with open(self.path / LOCK, "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def update_manifest(self, change: Callable[[RolloutManifest | None], RolloutManifest]) -> RolloutManifest:
        """Read the manifest, apply `change`, write it back, all under the lock; returns the new manifest."""
        with self.locked():
            manifest = change(self.read_manifest())
            self.write_manifest(manifest)
            return manifest

    def remove_dataset(self) -> None:
        """Delete the dataset's own files (shards, manifest, temporaries); other files in the folder are kept."""
        for path in list(self.path.iterdir()) if self.path.is_dir() else []:
            name = path.name
            if _SHARD.match(name) or name == MANIFEST or (name.startswith(".shard-") and ".tmp" in name):
                path.unlink(missing_ok=True)

    def write_shard(self, index: int, total: int, rows: Sequence[dict], features) -> Path:
        """Write `rows` as shard `index` of `total` through HF `datasets`, atomically; returns its path."""
        from datasets import Dataset

        final = self.path / shard_name(index, total)
        for stale in self.path.glob(f".{final.name}.tmp*"):  # left by a killed writer of this same shard
            stale.unlink(missing_ok=True)
        tmp = self.path / f".{final.name}.tmp{os.getpid()}"
        try:
            Dataset.from_list(list(rows), features=features).to_parquet(str(tmp))
            _fsync(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
