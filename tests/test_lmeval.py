"""The lm-evaluation-harness bridge (`trialign.tasks.lmeval`): an lm-eval task YAML over local files built from the
shipped ARC-Easy split becomes items, is audited under every persona, matches lm-eval's own acc, feeds a rollout
with cross-group states that trains, and every bad input is a one-line error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trialign.errors import TriAlignError
from trialign.tasks import lmeval, load_task

pytest.importorskip("lm_eval", reason="the lmeval extra (make setup installs it)")

SHIPPED = Path(__file__).resolve().parent.parent / "trialign" / "data" / "benchmarks" / "arc"
TASK = "arc_easy_trialign_test"
DOCS = 40


def task_yaml(name: str, data: Path, **overrides: str) -> str:
    fields = {
        "task": name, "dataset_path": "json", "output_type": "multiple_choice", "validation_split": "validation",
        "doc_to_text": '"Question: {{question}}\\nAnswer:"', "doc_to_target": '"{{choices.label.index(answerKey)}}"',
        "doc_to_choice": '"{{choices.text}}"', **overrides,
    }
    lines = [f"{key}: {value}" for key, value in fields.items()]
    lines += ["dataset_kwargs:", "  data_files:", f"    validation: {data}",
              "metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder of task YAMLs over the first 40 shipped ARC-Easy validation records (JSON lines)."""
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    records = (SHIPPED / "ARC-Easy-validation.jsonl").read_text(encoding="utf-8").splitlines()[:DOCS]
    data = folder / "arc_easy_head.jsonl"
    data.write_text("\n".join(records) + "\n", encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(task_yaml(TASK, data), encoding="utf-8")
    (folder / "loglik_task.yaml").write_text(task_yaml("loglik_task", data, output_type="loglikelihood",
                                                       doc_to_target='"{{choices.text[0]}}"'), encoding="utf-8")
    (folder / "one_choice.yaml").write_text(task_yaml("one_choice", data, doc_to_choice='"{{[choices.text[0]]}}"'),
                                            encoding="utf-8")
    return folder


def test_documents_become_the_items_of_the_shipped_loader(task_dir):
    items = load_task(f"lmeval:{TASK}", path=str(task_dir))
    arc = load_task("arc_easy", limit=DOCS)
    assert len(items) == DOCS
    assert [i.id for i in items[:2]] == [f"lmeval:{TASK}/00000", f"lmeval:{TASK}/00001"]
    assert [(i.question, i.options, i.gold) for i in items] == [(a.question, a.options, a.gold) for a in arc]
    assert items[3].meta["lmeval_text"] == f"Question: {arc[3].question}\nAnswer:"
    assert load_task(f"lmeval:{TASK}", path=str(task_dir / f"{TASK}.yaml"), limit=3) == items[:3]


def test_a_generate_until_task_with_numeric_targets_reads_as_the_shipped_gsm8k(tmp_path):
    """GSM8K's lm-eval format (generate_until, the worked solution as target): numeric items, the number after
    '####' the gold answer, as the project's own gsm8k loader reads the same file."""
    data = Path(__file__).resolve().parent.parent / "trialign" / "data" / "benchmarks" / "gsm8k" / "test.jsonl"
    (tmp_path / "gsm8k_local.yaml").write_text("\n".join([
        "task: gsm8k_local", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
        "output_type: generate_until", "test_split: test", 'doc_to_text: "Question: {{question}}\\nAnswer:"',
        'doc_to_target: "{{answer}}"', "generation_kwargs:", "  until: ['Question:']", "metric_list:",
        "  - metric: exact_match"]) + "\n")
    items = load_task("lmeval:gsm8k_local", path=str(tmp_path), limit=4)
    shipped = load_task("gsm8k", limit=4)
    assert [(i.question, i.gold, i.answer_type) for i in items] == [(g.question, g.gold, "numeric") for g in shipped]
    assert items[0].is_correct("She makes $18 a day.") and not items[0].is_correct("17")


def test_framing_is_left_to_the_probe_template():
    assert lmeval._question_and_context("Question: Why?\nAnswer:") == ("Why?", "")
    assert lmeval._question_and_context("Passage text.\nQuestion: Why?\nAnswer:") == ("Why?", "Passage text.")
    assert lmeval._question_and_context("Is 2 prime? Answer:") == ("Is 2 prime?", "")
    assert lmeval._question_and_context("Complete: the sky is") == ("Complete: the sky is", "")


def test_numeric_targets_of_generate_until_tasks():
    assert lmeval._numeric_gold("She pays 3 * 4 = 12.\n#### 1,200", "doc") == "1200"
    assert lmeval._numeric_gold(["42"], "doc") == "42"
    with pytest.raises(TriAlignError, match=r"doc: target 'Paris' is not a number"):
        lmeval._numeric_gold("Paris", "doc")
    with pytest.raises(TriAlignError, match="is not a number"):
        lmeval._numeric_gold("between 3 and 4", "doc")


def test_gold_option_from_index_text_or_list():
    choices = ["red", "green", "blue"]
    assert lmeval._gold_option(2, choices, "doc") == (2, (2,))
    assert lmeval._gold_option("green", choices, "doc") == (1, (1,))
    assert lmeval._gold_option("0", choices, "doc") == (0, (0,))
    assert lmeval._gold_option([2, 0], choices, "doc") == (2, (2, 0))
    with pytest.raises(TriAlignError, match=r"doc: doc_to_target 3 is neither an option index in \[0, 3\)"):
        lmeval._gold_option(3, choices, "doc")


def test_audit_under_personas_and_parity_with_lm_eval(task_dir, tiny_model_dir, tmp_path):
    from trialign.evaluate import main
    from trialign.results import read_result

    out = tmp_path / "audit"
    assert main(["--model", tiny_model_dir, "--task", f"lmeval:{TASK}", "--task-path", str(task_dir), "--limit", "24",
                 "--offset", "8", "--groups", "default", "--lmeval-parity", "--bootstrap", "0", "--output",
                 str(out)]) == 0
    result, _ = read_result(out)
    assert result.num_items == 24 and len(result.groups) == 9 and result.task == f"lmeval:{TASK}"
    rows = [json.loads(line) for line in (out / "per_item.jsonl").read_text().splitlines()]
    assert len(rows) == 24 * 9 and rows[0]["item_id"] == f"lmeval:{TASK}/00008"
    parity = result.lmeval_parity
    assert parity["documents"] == 24 and set(parity["lm_eval"]) == {"acc", "acc_norm"} and parity["seconds"] > 0
    for metric in ("acc", "acc_norm"):  # the same decisions: equal counts of correct documents
        assert round(parity["trialign"][metric] * 24) == round(parity["lm_eval"][metric] * 24), parity


@pytest.mark.slow
def test_parity_with_lm_eval_on_the_embedded_model(task_dir, embedded_model, embedded_tokenizer, tmp_path):
    """Within 1 point of lm-eval's acc on 100 ARC-Easy documents of the real model (the shipped file in full)."""
    from trialign.evaluate import EvaluateConfig, lmeval_parity

    (tmp_path / "arc_full.yaml").write_text(task_yaml("arc_easy_full", SHIPPED / "ARC-Easy-validation.jsonl"))
    config = EvaluateConfig(task="lmeval:arc_easy_full", task_path=str(tmp_path), limit=100, batch_size=16)
    items = load_task(config.task, path=config.task_path, limit=100)
    parity = lmeval_parity(config, embedded_model, embedded_tokenizer, items)
    assert parity["documents"] == 100
    assert abs(parity["difference"]["acc"]) <= 0.01, parity
    assert 0.35 < parity["lm_eval"]["acc"] < 0.75, parity  # the model knows something: lm-eval quotes 54.1


def test_rollout_with_states_from_an_lmeval_task_trains(task_dir, tiny_model_dir, tmp_path):
    from data_factory import NO_TASK_VALIDATION
    from trialign.cli import main as cli
    from trialign.rollout.command import main as rollout

    data = tmp_path / "rollout"
    assert rollout(["--model", tiny_model_dir, "--task", f"lmeval:{TASK}", "--task-path", str(task_dir), "--limit",
                    "1", "--states-limit", "4", "--group-ids", "neutral", "teenager", "--samples", "1", "--turns",
                    "1", "--max-new-tokens", "4", "--no-progress", "--output", str(data)]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["task"] == f"lmeval:{TASK}"
    root = tmp_path / "fit"
    assert cli(["fit", "--config", "configs/trialign.yaml", *NO_TASK_VALIDATION, "--model.model", tiny_model_dir,
                "--model.lora.target_modules", "all-linear", "--data.data_dir", str(data), "--trainer.max_steps", "2",
                "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "false", "--validate_before_fit", "false", "--validate_after_fit", "false"]) == 0
    assert (root / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name, path, message", [
    ("lmeval:arc_eazy", None, r"task lmeval:arc_eazy: unknown lm-eval task; did you mean arc_easy"),
    ("lmeval:ai2_arc", None, r"task lmeval:ai2_arc: is a group of lm-eval tasks; name one of its tasks"),
    ("lmeval:loglik_task", "dir", r"task lmeval:loglik_task: output type 'loglikelihood' is not supported"),
    ("lmeval:one_choice", "dir", r"task lmeval:one_choice document 0: doc_to_choice gave \['cellular telephone'\]; "
                                 r"a multiple_choice document needs at least 2 choices"),
    ("lmeval:arc_easy", None, r"task lmeval:arc_easy: its dataset is on the Hugging Face hub and could not be "
                              r"reached .*; run with network access"),
    (f"lmeval:{TASK}", "missing", r"task_path: lm-eval include path \S+ does not exist"),
])
def test_bad_lmeval_tasks_are_one_line_errors(task_dir, name, path, message):
    where = {None: None, "dir": str(task_dir), "missing": str(task_dir / "nowhere")}[path]
    with pytest.raises(TriAlignError, match=message) as error:
        load_task(name, path=where)
    assert "\n" not in str(error.value)


def test_without_lm_eval_installed_the_error_says_how_to_install(monkeypatch):
    lmeval.task_manager.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    try:
        with pytest.raises(TriAlignError, match=r"lm-eval is not installed; install it with `pip install "
                                                r"'trialign\[lmeval\]'`"):
            load_task("lmeval:arc_easy")
    finally:
        lmeval.task_manager.cache_clear()


def test_the_shipped_lmeval_task_yamls_read_the_shipped_files(monkeypatch):
    """configs/lmeval: ARC-Easy as lm-eval's arc_easy asks it, and BBQ Age with its context passage."""
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # their data_files are relative to the repository root
    arc = load_task("lmeval:arc_easy_local", path="configs/lmeval", limit=5)
    assert [(i.question, i.options, i.gold) for i in arc] == [(a.question, a.options, a.gold)
                                                              for a in load_task("arc_easy", limit=5)]
    bbq = load_task("lmeval:bbq_age_local", path="configs/lmeval", limit=5)
    shipped = load_task("bbq_age", limit=5)
    assert [(i.context, i.question, i.gold) for i in bbq] == [(b.context, b.question, b.gold) for b in shipped]
    assert len(load_task("lmeval:arc_easy_local", path="configs/lmeval")) == 570
