"""Checkpoint files that survive preemption and are read without unpickling code.

`SafeCheckpointIO` is the Lightning `CheckpointIO` of every ``python -m trialign fit|validate|test`` run (the CLI
installs it unless a config names another one):

* **Atomic writes.** A checkpoint is written to a hidden temporary file beside its final name (``.last.ckpt.<random>
  .partial``), flushed and fsync'ed, then renamed over the final name with `os.replace`, and the folder is fsync'ed.
  A process killed at any moment (SIGKILL, a preempted node) leaves either the previous complete file or the new
  complete one, never a truncated ``last.ckpt``. Lightning's own `TorchCheckpointIO` writes through an fsspec
  transaction whose temporary file lives in the system temp folder: when that is another file system (a tmpfs
  ``/tmp``, node-local scratch), the final step is a copy into place, which a kill can cut short. Temporary files
  left by a killed writer are removed by the next save of the same name; their names never match Lightning's
  ``ckpt_path="last"`` pattern (``last*.ckpt``), so a resume cannot pick one up.
* **Integrity.** A PyTorch checkpoint is a zip archive with a CRC-32 per entry, which `torch.load` does not check:
  a flipped byte in a tensor loads silently with a wrong value. `load_checkpoint` first reads the archive with
  `zipfile` and verifies every CRC, so a truncated, damaged or foreign file is a one-line `TriAlignError` naming it
  and saying what was expected.
* **No code from checkpoints.** Files are loaded with ``torch.load(weights_only=True)``: tensors and plain Python
  data only (TriAlign's checkpoints hold nothing else: hyper-parameters are the parsed config as dicts, the
  component states are buffers). A checkpoint that needs arbitrary unpickling is refused, whatever Lightning's
  ``weights_only`` argument says; we do not add globals to torch's allow-list.

Remote paths (``s3://...``) keep Lightning's fsspec transaction for writing and get the same ``weights_only`` load,
without the CRC check. Sharded FSDP checkpoints (``state_dict_type: sharded``) are folders written and read by the
strategy itself, not by a `CheckpointIO`.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from trialign.errors import TriAlignError

PARTIAL_SUFFIX = ".partial"


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str | os.PathLike) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform where folders cannot be opened
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """`torch.save(checkpoint)` to `path` atomically (see the module docstring); returns the path."""
    path = _local(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{_glob_escape(path.name)}.*{PARTIAL_SUFFIX}"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a checkpoint gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """Check that `path` is a complete PyTorch checkpoint archive whose every entry matches its CRC-32.

    Raises a one-line `TriAlignError` naming the file otherwise; returns the path."""
    path = _local(path)
    if not path.is_file():
        raise TriAlignError(f"checkpoint {path}: file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        size = path.stat().st_size
        raise TriAlignError(f"checkpoint {path}: truncated or not a PyTorch checkpoint ({size} bytes, expected a "
                            "complete torch.save zip archive); resume from another checkpoint or start over") from None
    except (OSError, EOFError, ValueError, RuntimeError) as err:  # zlib/CRC errors of damaged archives
        raise TriAlignError(f"checkpoint {path}: corrupt ({type(err).__name__}: {err}); resume from another "
                            "checkpoint or start over") from None
    if damaged is not None:
        raise TriAlignError(f"checkpoint {path}: corrupt (entry '{damaged}' does not match its CRC-32 checksum); "
                            "resume from another checkpoint or start over")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Verify (local files) and load a checkpoint with ``torch.load(weights_only=True)``; errors are one-line
    `TriAlignError`s naming the file. `mmap` maps the tensors instead of reading them (a cheap full check)."""
    if _is_local(path):
        path = verify_checkpoint(path)
        opened: Any = path
    else:
        from lightning.fabric.utilities.cloud_io import get_filesystem

        fs = get_filesystem(path)
        if not fs.exists(path):
            raise TriAlignError(f"checkpoint {path}: file not found")
        opened = fs.open(path, "rb")
    try:
        checkpoint = torch.load(opened, map_location=map_location, weights_only=True,
                                mmap=mmap and isinstance(opened, Path))
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:[Uu]nsupported global:?|unsupported) GLOBAL (\S+)", str(err))
        what = f" such as {found.group(1)}" if found else ""
        raise TriAlignError(f"checkpoint {path}: holds Python objects{what} besides tensors and plain data; trialign "
                            "loads checkpoints with torch.load(weights_only=True) and does not unpickle arbitrary "
                            "objects") from None
    except (RuntimeError, ValueError, EOFError, UnicodeDecodeError, KeyError) as err:
        raise TriAlignError(f"checkpoint {path}: corrupt or not a PyTorch checkpoint ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    finally:
        if not isinstance(opened, Path):
            opened.close()
    if not isinstance(checkpoint, dict):
        raise TriAlignError(f"checkpoint {path}: expected a checkpoint dictionary, got {type(checkpoint).__name__}")
    return checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, verified, ``weights_only`` checkpoint files (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # `weights_only` is ignored on purpose: checkpoints are never unpickled beyond tensors and plain data.
        return load_checkpoint(path, map_location)


def use_safe_checkpoint_io(trainer) -> None:
    """Give `trainer`'s strategy a `SafeCheckpointIO`, unless the user configured a checkpoint IO of their own."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()


def find_last_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest ``last*.ckpt`` in `folder` (what Lightning's ``ckpt_path="last"`` resumes: ``last.ckpt``,
    ``last-v1.ckpt``, ...), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.suffix == ".ckpt" and p.stem.startswith("last") and p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
