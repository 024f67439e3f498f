"""Atomic file writes: a temporary file in the target's folder, flushed and fsynced, then renamed over the target.

A crash, a SIGKILL or a full disk leaves either the old file or the new one, never half of one. Files get the usual
permissions (0666 minus the umask), not mkstemp's 0600: results are meant to be shared.

JSON is strict (RFC 8259): NaN and ±inf are written as ``null``, so `jq`, browsers and other languages read every
file TriAlign writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (the folder must exist)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_ready(value: Any) -> Any:
    """`value` with NumPy scalars/arrays as Python numbers and non-finite floats as None (recursively)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def dumps_json(data: Any, indent: int | None = 2) -> str:
    return json.dumps(json_ready(data), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Strict JSON (NaN -> null), pretty-printed, written atomically."""
    write_text_atomic(path, dumps_json(data) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> None:
    """One strict JSON document per line, written atomically."""
    write_text_atomic(path, "".join(dumps_json(row, indent=None) + "\n" for row in rows))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json_bytes(path: Path, what: str) -> tuple[Any, bytes]:
    """A JSON file's document and its bytes; one-line `TriAlignError`s naming `what` and the file (not found,
    unreadable, invalid JSON with line and column)."""
    from trialign.errors import TriAlignError

    try:
        raw = path.read_bytes()
        return json.loads(raw.decode("utf-8")), raw
    except FileNotFoundError:
        raise TriAlignError(f"{what} {path}: not found") from None
    except json.JSONDecodeError as err:
        raise TriAlignError(f"{what} {path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})")
    except (UnicodeDecodeError, OSError) as err:
        raise TriAlignError(f"{what} {path}: unreadable ({err})")


_JSON_TYPE_NAMES = {str: "string", dict: "JSON object", int: "integer", list: "list", (int, float): "number"}


def typed_fields(document: dict[str, Any], fields: dict[str, Any], where: str) -> dict[str, Any]:
    """The entries of `document` named in `fields` (name -> type, or a tuple of types) that are present and not
    null, each checked against its type (a bool is no number); a one-line `TriAlignError` starting with `where`
    names the first field of another type."""
    from trialign.errors import require

    for key, kind in fields.items():
        value = document.get(key)
        require(value is None or (isinstance(value, kind) and not isinstance(value, bool)),
                f"{where}: '{key}' should be of type {_JSON_TYPE_NAMES[kind]}, got {value!r}")
    return {key: document[key] for key in fields if document.get(key) is not None}
