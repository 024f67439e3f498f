"""The shipped benchmark files: where they live, their pinned sha256, and a check on first use.

The benchmark copies under ``trialign/data/benchmarks/`` are package data (see ``ATTRIBUTION.md`` there), so a
fresh install works offline. Each file's sha256 is pinned here; the first time a process opens a file, its hash is
compared with the pin and a corrupt or edited copy raises `TriAlignError` naming the file. The check is remembered
per (path, size, modification time), so a file changed later in the same process is checked again.

The folder can be replaced with ``$TRIALIGN_DATA_DIR`` (same layout; the files must still match the pins).
"""

from __future__ import annotations

import os
from pathlib import Path

from trialign.errors import TriAlignError
from trialign.fileio import sha256_file

DATA_DIR_ENV = "TRIALIGN_DATA_DIR"

# Pins from the shared data MANIFEST (the upstream commits are listed in ATTRIBUTION.md).
PINNED_SHA256: dict[str, str] = {
    "truthfulqa/TruthfulQA.csv": "f9bd9e859cc102cb1f647f1064da7e009be752c416845cf9fa56e6eaae403a7d",
    "truthfulqa/mc_task.json": "b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a",
    "truthfulqa/LICENSE": "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "gsm8k/LICENSE": "86bbb73e855821d7c401912fd4bf82e34313e6e3b6fd6f909f2b6cc9e209a53b",
    "aime/aime_2024.jsonl": "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac",
    "aime/aime_2025.jsonl": "6caa6dcafd9a6ba06babe30e43e9a76a8272c12d2a84e479601754c1c701742c",
    "bbq/Age.jsonl": "46e805b3fc2d8cbd26eeb8e8430d98cf7b2dc9c83574ff3674e8ce4f0fca2a60",
    "bbq/Disability_status.jsonl": "375d40d9b71f056150264445ec189b13934998f3f49a1e311aa7578eb3b45e5f",
    "bbq/Nationality.jsonl": "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090",
    "bbq/Physical_appearance.jsonl": "e48d7e13508565f4801574e611043470c25c95a0a62af3699cb5ee7cb02608fb",
    "bbq/Religion.jsonl": "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616",
    "bbq/Sexual_orientation.jsonl": "2c71036b9e7584fe589c42aef32c1a42bc01b9a5e9b1b8704342630cdb08cefd",
    "bbq/LICENSE": "95df2e9564862e51d69683a899b6dcc8218d577057bdf67322880769ff85f29e",
    "arc/ARC-Easy-validation.jsonl": "e45dbcd2d8e8235af16302f4be0dd00c5d173878c583f4dfe55b70f9df07b2f8",
    "arc/ARC-Challenge-validation.jsonl": "c63650471eaf4c5076d9c913b77e42e10878739ec4e9e69d3a5f31210f5775a5",
    "arc/LICENSE": "8d25df15c166f69f475e6af1e73375c3db8f8520f0da6f74b20e61f0068fb72c",
}

# Files whose hash matched, keyed by absolute path, with the (size, mtime_ns) they had when checked.
_verified: dict[str, tuple[int, int]] = {}


def data_dir() -> Path:
    """The benchmark folder: ``$TRIALIGN_DATA_DIR`` if set, else the copy shipped inside the package."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "data" / "benchmarks"


def benchmark_file(relative: str) -> Path:
    """Path of a shipped benchmark file, verified against its pinned sha256 the first time it is used."""
    if relative not in PINNED_SHA256:
        raise TriAlignError(f"benchmark file {relative!r} is not one of the shipped files: {sorted(PINNED_SHA256)}")
    path = data_dir() / relative
    try:
        stat = path.stat()
    except OSError as exc:
        raise TriAlignError(
            f"benchmark file {path} is missing ({exc.strerror}); reinstall trialign or unset ${DATA_DIR_ENV}"
        ) from None
    key = str(path.resolve())
    if _verified.get(key) == (stat.st_size, stat.st_mtime_ns):
        return path
    actual = sha256_file(path)
    expected = PINNED_SHA256[relative]
    if actual != expected:
        raise TriAlignError(
            f"benchmark file {path} is corrupt: sha256 {actual} does not match the pinned {expected}; "
            "restore it from the trialign package"
        )
    _verified[key] = (stat.st_size, stat.st_mtime_ns)
    return path


def benchmark_jsonl(relative: str) -> tuple[list[dict], str]:
    """The records of a shipped JSON-lines benchmark file (verified as `benchmark_file` does) and its path."""
    import json

    path = benchmark_file(relative)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()], str(path)
