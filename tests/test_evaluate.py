"""`trialign evaluate`: the audit end to end on a tiny model, its outputs, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from trialign.cli import main
from trialign.comparison import records_from_rows, same_decisions
from trialign.evaluate import EvaluateConfig, evaluate, parse_config


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_answer_ids_are_equal_exactly_for_equal_answers():
    rows = [{"item_id": item, "group": group, "answer": answer, "canonical": canonical, "correct": False}
            for item, answers in (("a", ["1", "1", "0"]), ("b", ["Paris", "Lyon", "paris."]))
            for group, (answer, canonical) in zip("xyz", [(x, x.lower().rstrip(".")) for x in answers])]
    arrays = records_from_rows(rows, ["x", "y", "z"])
    np.testing.assert_array_equal(arrays.answers, [[0, 0, 1], [0, 1, 0]])  # compared by their canonical form


def test_two_runs_decisions_compare_by_answer_not_by_answer_id():
    from trialign.errors import TriAlignError

    row = lambda group, answer: {"item_id": "q", "group": group, "answer": answer, "correct": False}  # noqa: E731
    one, other = [row("x", "A"), row("y", "B")], [row("x", "B"), row("y", "A")]
    # Both runs number their answers [0, 1]: the ids match where every decision differs.
    ids = [records_from_rows(r, ["x", "y"]).answers for r in (one, other)]
    np.testing.assert_array_equal(ids[0], ids[1])
    np.testing.assert_array_equal(same_decisions(one, other), [False, False])
    np.testing.assert_array_equal(same_decisions(one, [row("x", "A"), row("y", "A")]), [True, False])
    with pytest.raises(TriAlignError, match="row 1 is item 'q', group 'y' in one run but item 'q', group 'x'"):
        same_decisions(one, [row("x", "A"), row("x", "B")])


def test_probe_audit_on_tiny_model_writes_consistent_metrics(tmp_path, tiny_model_dir):
    out = tmp_path / "audit"
    config = EvaluateConfig(model=tiny_model_dir, task="truthfulqa_mc1", limit=6,
                            group_ids=["neutral", "teenager", "phd_researcher"],
                            bootstrap=50, output=str(out))
    document = evaluate(config, progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(document.metrics))
    rows = [json.loads(line) for line in (out / "per_item.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 3
    # Recompute consistency and per-group accuracy from the per-item rows by hand.
    by_item: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_item.setdefault(row["item_id"], {})[row["group"]] = row
    consistent = np.mean([len({r["answer"] for r in groups.values()}) == 1 for groups in by_item.values()])
    assert saved["metrics"]["consistency"]["value"] == pytest.approx(consistent)
    for group in ("neutral", "teenager", "phd_researcher"):
        acc = np.mean([groups[group]["correct"] for groups in by_item.values()])
        assert saved["metrics"][f"acc/{group}"]["value"] == pytest.approx(acc)
    # Each chosen answer is the argmax of the stored option log-likelihoods.
    assert all(int(r["answer"]) == int(np.argmax(r["option_logprobs"])) for r in rows)
    m = saved["metrics"]["consistency"]
    assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert saved["reference"] == "neutral"
    assert any((out / "tensorboard").iterdir())


def test_generate_mode_scores_preferences_on_the_response(tmp_path, tiny_model_dir):
    out = tmp_path / "gen"
    config = EvaluateConfig(model=tiny_model_dir, task="gsm8k", limit=2, group_ids=["neutral", "retired_farmer"],
                            mode="generate", max_new_tokens=8, bootstrap=0, output=str(out))
    evaluate(config, progress=False)
    rows = [json.loads(line) for line in (out / "per_item.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["response"], str) for r in rows)
    assert all(0.0 <= r["personalization"] <= 1.0 for r in rows)
    # autocast left at null is resolved from this CPU's bf16 support, and the value used is recorded.
    from trialign.backbone import native_bf16

    recorded = json.loads((out / "metrics.json").read_text())["config"]["autocast"]
    assert recorded is native_bf16()


def test_probe_precision_auto_is_resolved_from_this_cpu_and_recorded(tmp_path, tiny_model_dir):
    from trialign.backbone import native_bf16

    out = tmp_path / "auto"
    evaluate(EvaluateConfig(model=tiny_model_dir, task="truthfulqa_mc1", limit=2, group_ids=["neutral", "teenager"],
                            probe_precision="auto", bootstrap=0, output=str(out)), progress=False)
    document = json.loads((out / "metrics.json").read_text())
    assert document["config"]["probe_precision"] == ("bfloat16" if native_bf16() else "float32")
    assert document["config"]["probe_recheck"] == 0.2
    assert isinstance(document["probe_rechecked"], int) and 0 <= document["probe_rechecked"] <= 2 * 2


def test_pref_aligner_rewrites_one_persona_free_draft_per_item(tmp_path, tiny_model_dir, monkeypatch):
    # Record every generation request: pass 1 must be persona-free (one per item), pass 2 one rewrite per persona.
    import trialign.generation as generation

    calls: list[list[str]] = []
    real = generation.generate_texts

    def recording(model, tokenizer, prompts, **kwargs):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_texts", recording)
    out = tmp_path / "pa"
    config = EvaluateConfig(model=tiny_model_dir, task="truthfulqa_mc1", limit=2, offset=3,
                            group_ids=["neutral", "teenager", "elderly_widow"], mode="generate",
                            pipeline="pref_aligner", max_new_tokens=6, bootstrap=0, output=str(out))
    document = evaluate(config, progress=False)
    drafts, rewrites = calls
    assert len(drafts) == 2 and len(rewrites) == 2 * 2  # the reference group keeps the draft
    assert not any("I am" in p or "I'm" in p for p in drafts)  # no persona in pass 1
    assert all("Draft answer:" in p and "Keep every fact and the final answer" in p for p in rewrites)
    rows = [json.loads(line) for line in (out / "per_item.jsonl").read_text().splitlines()]
    neutral = [r for r in rows if r["group"] == "neutral"]
    assert all(r["response"] == r["draft"] for r in neutral)
    assert {r["draft"] for r in rows} == set(drafts_text := {r["draft"] for r in neutral}) and len(drafts_text) <= 2
    # offset=3: items 4 and 5 of the task's stable order.
    from trialign.tasks import load_task
    assert [r["item_id"] for r in neutral] == [item.id for item in load_task("truthfulqa_mc1", limit=5)[3:]]
    assert document.label.endswith("pref_aligner")


def test_a_challenge_turn_probes_again_and_counts_the_flips(tmp_path, tiny_model_dir):
    out = tmp_path / "challenge"
    groups = ["neutral", "retired_farmer", "teenager"]
    config = EvaluateConfig(model=tiny_model_dir, task="arc_easy", limit=4, group_ids=groups, mode="generate",
                            challenge=True, max_new_tokens=6, bootstrap=0, output=str(out))
    metrics = evaluate(config, progress=False).metrics
    rows = [json.loads(line) for line in (out / "per_item.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["challenge"] and r["answer_after_challenge"] is not None for r in rows)
    # Every option item has a wrong option to assert; the challenge names it in the group's words.
    from trialign.tasks import load_task

    items = {item.id: item for item in load_task("arc_easy", limit=4)}
    assert all(any(option in r["challenge"] for option in items[r["item_id"]].options
                   if option != items[r["item_id"]].gold) for r in rows)
    # ... and every group of an item is told the same wrong option, in its own words.
    for item in items.values():
        claimed = [{o for o in item.options if f'"{o.strip().rstrip(".")}"' in r["challenge"]}
                   for r in rows if r["item_id"] == item.id]
        assert len(claimed) == 3 and all(c == claimed[0] and len(c) == 1 for c in claimed)
        assert len({r["challenge"] for r in rows if r["item_id"] == item.id}) > 1
    # The flip rate and the consistency after the challenge, recomputed from the rows by hand.
    for group in groups:
        mine = [r for r in rows if r["group"] == group]
        flips = np.mean([r["answer"] != r["answer_after_challenge"] for r in mine])
        assert metrics[f"flip/{group}"]["value"] == pytest.approx(flips)
    assert metrics["flip_mean"]["value"] == pytest.approx(np.mean([r["answer"] != r["answer_after_challenge"]
                                                                   for r in rows]))
    after = [len({r["answer_after_challenge"] for r in rows if r["item_id"] == item}) == 1 for item in items]
    assert metrics["consistency_after_challenge"]["value"] == pytest.approx(np.mean(after))
    # The per-item rows read back give the same arrays (the report's paired differences read them).
    arrays = records_from_rows(rows, groups)
    assert arrays.challenged.all() and arrays.answers_after.shape == (4, 3)
    assert ((arrays.answers != arrays.answers_after) == np.array(
        [[r["answer"] != r["answer_after_challenge"] for r in rows if r["item_id"] == item] for item in items])).all()


def test_a_challenge_needs_generate_mode():
    with pytest.raises(Exception, match="challenge: the user pushes back on a response, so it needs mode 'generate'"):
        EvaluateConfig(challenge=True, mode="probe")


def test_pref_aligner_needs_generate_mode():
    with pytest.raises(Exception, match="pref_aligner writes a response"):
        EvaluateConfig(pipeline="pref_aligner", mode="probe")


def test_existing_results_are_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "audit"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    code, _, err = run_cli(capsys, "evaluate", "--output", str(out), "--limit", "1")
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "metrics.json").read_text() == '{"keep": true}'


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task", "no_such_task"], "no_such_task"),
        (["--limit", "0"], "limit: expected a positive integer, got 0"),
        (["--mode", "dream"], "mode: expected one of probe, generate"),
        (["--model", "./no/such/model"], "model source './no/such/model' not found"),
        (["--task", "local", "--task-path", "missing.jsonl"], "missing.jsonl"),
        (["--set", "unknown_key=1"], "unknown setting(s) unknown_key"),
    ],
)
def test_bad_input_is_one_line_error_without_traceback(tmp_path, capsys, args, expected):
    code, _, err = run_cli(capsys, "evaluate", "--output", str(tmp_path / "out"), *args)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_malformed_group_file_is_named(tmp_path, capsys):
    groups = tmp_path / "groups.yaml"
    groups.write_text("groups:\n  - id: a\n    name: A\n    preferences: [concise, not_a_preference]\n")
    code, _, err = run_cli(capsys, "evaluate", "--groups", str(groups), "--output", str(tmp_path / "out"))
    assert code == 2 and str(groups) in err and len(err.strip().splitlines()) == 1


def test_config_file_values_are_type_checked(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("limit: many\n")
    with pytest.raises(Exception, match="limit: expected an integer"):
        parse_config(["--config", str(config)])


def test_cli_process_exits_nonzero_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trialign", "evaluate", "--limit", "0", "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("trialign evaluate: error: limit")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_command_and_help(capsys):
    code, _, err = run_cli(capsys, "nonsense")
    assert code == 2 and "unknown command 'nonsense'" in err
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "evaluate" in out and "rollout" in out
