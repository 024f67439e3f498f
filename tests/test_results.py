"""metrics.json: one type, one writer, one reader (`trialign.results`)."""

from __future__ import annotations

import hashlib
import json

import pytest

from trialign.errors import TriAlignError
from trialign.results import EvaluationResult, read_result


def test_written_result_reads_back_equal_with_the_sha256_of_its_bytes(tmp_path):
    result = EvaluationResult(label="base", config={"task": "arc_easy"}, task="arc_easy", num_items=3,
                              groups=["neutral", "teen"], reference="neutral", mode="probe", seconds=1.5,
                              metrics={"consistency": {"value": 0.5, "ci_low": 0.2, "ci_high": 0.8}})
    path = result.write(tmp_path)
    assert path == tmp_path / "metrics.json" and json.loads(path.read_text())["groups"] == ["neutral", "teen"]
    again, digest = read_result(tmp_path)
    assert again == result and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    minimal = tmp_path / "minimal.json"
    minimal.write_text(json.dumps({"metrics": {"acc_mean": {"value": 0.1}}}))
    assert read_result(minimal)[0] == EvaluationResult(metrics={"acc_mean": {"value": 0.1}})  # fields default


@pytest.mark.parametrize("document, message", [
    ({"metrics": {}}, "expected a non-empty 'metrics' object"),
    ({"metrics": {"acc_mean": 0.5}}, "metric 'acc_mean' should be an object with 'value'"),
    ({"metrics": {"acc_mean": {"value": 0.5}}, "num_items": "3"}, "'num_items' should be of type integer, got '3'"),
    ({"metrics": {"acc_mean": {"value": 0.5}}, "groups": "neutral"}, "'groups' should be of type list"),
    ({"metrics": {"acc_mean": {"value": 0.5}}, "reference": 1}, "'reference' should be a group id or null"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_files_are_one_line_errors_naming_file_and_field(tmp_path, document, message):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(document))
    with pytest.raises(TriAlignError) as error:
        read_result(tmp_path)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
    path.write_text("{")
    with pytest.raises(TriAlignError, match="invalid JSON at line 1"):
        read_result(path)


def test_experiment_state_round_trips_and_refuses_bad_fields(tmp_path):
    from trialign.experiment_state import ExperimentState, read_state

    state = ExperimentState(name="demo", config={"seed": 0}, done={"rollout": {"seconds": 2.5}},
                            evaluations=[{"method": "base", "split": "main", "path": "eval/base/main"}])
    path = tmp_path / "experiment.json"
    state.write(path)
    assert read_state(path) == state and read_state(path).step_seconds() == 2.5
    path.write_text(json.dumps({"done": [], "format": "trialign-experiment"}))
    with pytest.raises(TriAlignError, match=r"experiment state .*experiment.json: 'done' should be of type JSON"):
        read_state(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(TriAlignError, match="format 'other', expected 'trialign-experiment'"):
        read_state(path)
