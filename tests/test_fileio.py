"""Atomic writes: strict JSON, shareable permissions, the old file kept when writing fails."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from trialign.fileio import write_json_atomic, write_jsonl_atomic


def test_json_is_strict_nan_and_inf_become_null_and_numpy_becomes_python(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": float("nan"), "b": [np.float32(1.5), np.int64(3), -math.inf], "c": np.array([2.0])})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == {
        "a": None, "b": [1.5, 3, None], "c": [2.0]}


def test_written_files_are_readable_by_others_and_leave_no_temporaries(tmp_path):
    old = os.umask(0o022)
    try:
        write_jsonl_atomic(tmp_path / "rows.jsonl", [{"x": 1}, {"x": float("nan")}])
    finally:
        os.umask(old)
    assert (tmp_path / "rows.jsonl").read_text() == '{"x": 1}\n{"x": null}\n'
    assert stat.S_IMODE((tmp_path / "rows.jsonl").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"kept": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"kept": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
