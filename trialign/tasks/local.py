"""Task ``local``: the user's own multiple-choice questions from a JSONL or CSV file (``path=``).

Fields of every row (UTF-8; a CSV may start with a byte-order mark):

* ``question`` — the question text (required, non-empty);
* ``options`` — the answer options, at least 2, no duplicates (required):
  JSONL: a list of strings, e.g. ``"options": ["Paris", "Rome", "Berlin"]``;
  CSV: either one column ``options`` holding the options separated by ``" | "`` (``Paris | Rome | Berlin``), or
  columns ``option_0``, ``option_1``, ... ``option_n`` (empty cells are skipped, so rows may have fewer options);
* ``answer`` — the correct option, either its text (exactly as in ``options``) or its 0-based index. A value equal
  to an option's text means that option; otherwise a whole number is read as an index (JSONL numbers always are);
* ``id`` — optional stable id, unique in the file; default: the row number (item ids are ``local/<id>``);
* ``context`` — optional passage shown before the question.

Row numbers in error messages: JSONL counts lines from 1 (so they match an editor's line numbers); CSV counts data
rows from 1, the header excluded. Options keep the file's order (they are not shuffled). This task is a
convenience the paper does not describe: it lets users measure truth consistency on their own objective questions.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

from trialign.errors import TriAlignError
from trialign.tasks.item import Item

TASK = "local"
CSV_OPTION_SEPARATOR = " | "
_OPTION_COLUMN = re.compile(r"option_(\d+)")


def _fail(path: Path, row: int, field: str, problem: str) -> TriAlignError:
    return TriAlignError(f"local task file {path} row {row}: field {field!r}: {problem}")


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TriAlignError(f"local task file {path} row {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            kind = type(row).__name__
            raise TriAlignError(f"local task file {path} row {number}: expected a JSON object, got {kind}")
        yield number, row


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [name.strip() for name in reader.fieldnames or []]
    option_columns = sorted((c for c in columns if _OPTION_COLUMN.fullmatch(c)), key=lambda c: int(c[7:]))
    for required in ("question", "answer"):
        if required not in columns:
            raise TriAlignError(f"local task file {path}: the CSV header has no column {required!r} (found: {columns})")
    if ("options" in columns) == bool(option_columns):
        raise TriAlignError(
            f"local task file {path}: the CSV header needs either a column 'options' (separated by "
            f"{CSV_OPTION_SEPARATOR!r}) or columns option_0..option_n, not {'both' if option_columns else 'neither'}"
        )
    try:
        for number, raw in enumerate(reader, start=1):
            row = {(key or "").strip(): value for key, value in raw.items()}
            if option_columns:
                row["options"] = [row[c] for c in option_columns if row.get(c) and row[c].strip()]
            elif row.get("options") is not None:
                row["options"] = row["options"].split(CSV_OPTION_SEPARATOR)
            yield number, row
    except csv.Error as exc:
        raise TriAlignError(f"local task file {path} row {reader.line_num}: unreadable CSV ({exc})") from None


def _text_field(path: Path, number: int, row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise _fail(path, number, field, "missing or empty")
    return str(value).strip()


def _options(path: Path, number: int, row: dict[str, Any]) -> tuple[str, ...]:
    value = row.get("options")
    if not isinstance(value, list):
        raise _fail(path, number, "options", "missing" if value is None else "expected a list of strings")
    options = tuple(str(option).strip() for option in value)
    if len(options) < 2 or not all(options):
        raise _fail(path, number, "options", f"expected at least 2 non-empty options, got {list(options)}")
    if len(set(options)) != len(options):
        raise _fail(path, number, "options", f"duplicate options in {list(options)}")
    return options


def _answer_index(path: Path, number: int, value: Any, options: tuple[str, ...]) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _fail(path, number, "answer", "missing or empty")
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        text = str(value).strip()
        if text in options:
            return options.index(text)
        index = int(text) if re.fullmatch(r"\d+", text) else -1
    if not 0 <= index < len(options):
        raise _fail(
            path, number, "answer",
            f"{value!r} is not one of the options {list(options)} nor an option index 0..{len(options) - 1}",
        )
    return index


def load_file(path: str | Path) -> list[Item]:
    """Items from the user's JSONL or CSV file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise TriAlignError(f"local task file {path}: expected a .jsonl or .csv file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TriAlignError(f"local task file {path} does not exist") from None
    except UnicodeDecodeError:
        raise TriAlignError(f"local task file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise TriAlignError(f"local task file {path} cannot be read: {exc.strerror}") from None
    rows = _jsonl_rows(path, text) if suffix == ".jsonl" else _csv_rows(path, text)
    items: list[Item] = []
    seen: dict[str, int] = {}
    for number, row in rows:
        question = _text_field(path, number, row, "question")
        options = _options(path, number, row)
        gold = _answer_index(path, number, row.get("answer"), options)
        given_id = row.get("id")
        stable_id = str(given_id).strip() if given_id is not None and str(given_id).strip() else f"{number:04d}"
        if stable_id in seen:
            raise _fail(path, number, "id", f"{stable_id!r} already used in row {seen[stable_id]}")
        seen[stable_id] = number
        context = row.get("context")
        items.append(Item(
            id=f"{TASK}/{stable_id}", task=TASK, question=question, gold=gold, answer_type="option", options=options,
            context=str(context).strip() if context else "", meta={"source_file": str(path), "row": number},
        ))
    if not items:
        raise TriAlignError(f"local task file {path} has no rows")
    return items
