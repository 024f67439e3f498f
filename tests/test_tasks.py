"""Benchmark tasks: record counts, gold answers after shuffling, answer checks, local files, errors, data integrity."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from trialign.errors import TriAlignError
from trialign.fileio import sha256_file
from trialign.tasks import TASK_NAMES, load_task
from trialign.tasks import aime, bbq, datafiles, gsm8k, truthfulqa
from trialign.tasks.datafiles import PINNED_SHA256, benchmark_file, data_dir

SHIPPED = Path(__file__).resolve().parent.parent / "trialign" / "data" / "benchmarks"
BBQ_COUNTS = {
    "bbq_age": 3680, "bbq_disability_status": 1556, "bbq_nationality": 3080, "bbq_physical_appearance": 1576,
    "bbq_religion": 1200, "bbq_sexual_orientation": 864,
}
COUNTS = {
    "truthfulqa_mc1": 817, "truthfulqa_mc2": 817, "truthfulqa_gen": 817, "gsm8k": 1319, "aime2024": 30,
    "aime2025": 30, "bbq": sum(BBQ_COUNTS.values()), **BBQ_COUNTS, "arc_easy": 570, "arc_challenge": 299,
}


def _mc_records() -> list[dict]:
    return json.loads((SHIPPED / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))


# --- counts and ids -----------------------------------------------------------------------------------------------

def test_task_names_cover_every_benchmark():
    assert set(TASK_NAMES) == set(COUNTS) | {"local"}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_record_counts_and_ids(name):
    items = load_task(name)
    assert len(items) == COUNTS[name]
    ids = [item.id for item in items]
    assert len(set(ids)) == len(ids)
    assert all(item.id.startswith(f"{name}/") and item.task == name for item in items)


def test_limit_is_a_prefix_in_file_order():
    full = load_task("gsm8k")
    assert load_task("gsm8k", limit=5) == full[:5]
    assert [item.id for item in load_task("gsm8k", limit=3)] == ["gsm8k/0000", "gsm8k/0001", "gsm8k/0002"]
    assert len(load_task("aime2025", limit=1000)) == 30


@pytest.mark.parametrize("bad", [0, -3])
def test_limit_must_be_positive(bad):
    with pytest.raises(TriAlignError, match=rf"^--limit: expected a positive integer, got {bad}$"):
        load_task("gsm8k", limit=bad)


# --- TruthfulQA MC ------------------------------------------------------------------------------------------------

def test_mc1_gold_is_the_answer_marked_correct_after_shuffling():
    items = load_task("truthfulqa_mc1")
    for item, record in zip(items, _mc_records()):
        targets = record["mc1_targets"]
        (correct_text,) = [text for text, label in targets.items() if label == 1]
        assert item.question == record["question"].strip()
        assert sorted(item.options) == sorted(targets)
        assert item.options[item.gold] == correct_text
        assert item.correct_options == (item.gold,)
        assert item.is_correct(item.gold)
        assert not any(item.is_correct(i) for i in range(len(item.options)) if i != item.gold)


def test_mc2_correct_options_are_all_answers_marked_correct():
    items = load_task("truthfulqa_mc2")
    for item, record in zip(items, _mc_records()):
        targets = record["mc2_targets"]
        assert sorted(item.options) == sorted(targets)
        assert {item.options[i] for i in item.correct_options} == {t for t, label in targets.items() if label == 1}
        # gold is the best answer (the MC1 correct answer, listed first in the source).
        assert item.options[item.gold] == next(iter(targets))
        assert item.gold in item.correct_options


def test_mc_shuffle_is_deterministic_and_depends_on_seed():
    first = load_task("truthfulqa_mc1", limit=100, seed=0)
    again = load_task("truthfulqa_mc1", limit=100, seed=0)
    other = load_task("truthfulqa_mc1", limit=100, seed=1)
    assert [i.options for i in first] == [i.options for i in again]
    assert [i.gold for i in first] == [i.gold for i in again]
    changed = sum(a.options != b.options for a, b in zip(first, other))
    assert changed > 80  # items with >= 4 options: a new seed keeps the same order with probability <= 1/24
    for a, b in zip(first, other):  # same gold text whatever the order
        assert a.options[a.gold] == b.options[b.gold]


def test_mc_golds_are_spread_over_positions():
    golds = Counter(item.gold for item in load_task("truthfulqa_mc1"))
    assert golds[0] < 0.4 * 817  # the source has every gold at index 0
    assert all(golds[position] > 50 for position in range(4))


@pytest.mark.slow
def test_mc_shuffle_does_not_depend_on_python_hash_seed():
    code = "from trialign.tasks import load_task; print([i.options for i in load_task('truthfulqa_mc2', limit=20)])"
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(result.stdout)
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([i.options for i in load_task("truthfulqa_mc2", limit=20)])


def test_seeded_permutation_is_a_permutation():
    for n in range(1, 13):
        assert sorted(truthfulqa.seeded_permutation(n, f"key{n}")) == list(range(n))


def test_seeded_permutation_is_keyed_and_uniform():
    assert truthfulqa.seeded_permutation(6, "item-7") == truthfulqa.seeded_permutation(6, "item-7")
    orders = [tuple(truthfulqa.seeded_permutation(4, f"item-{k}")) for k in range(400)]
    assert len(set(orders)) == 24  # every order of 4 options occurs
    # Each original option lands in each position about 400/4 = 100 times (binomial sd ~8.7; 60..140 is > 4 sd).
    for source in range(4):
        landed = Counter(order.index(source) for order in orders)
        assert all(60 <= landed[position] <= 140 for position in range(4)), (source, landed)


def test_mc_items_carry_csv_metadata():
    item = load_task("truthfulqa_mc1", limit=1)[0]
    assert item.meta["category"] == "Myths and Fairytales" and item.meta["type"] == "Adversarial"
    assert all("category" in i.meta for i in load_task("truthfulqa_mc2"))  # every question joins to the CSV


# --- TruthfulQA generation ----------------------------------------------------------------------------------------

def test_truthfulqa_gen_aliases():
    item = load_task("truthfulqa_gen", limit=1)[0]
    assert item.answer_type == "alias"
    assert item.gold == "The watermelon seeds pass through your digestive system"
    assert "Nothing happens" in item.aliases and "You grow watermelons in your stomach" in item.incorrect_aliases
    assert item.is_correct("The watermelon seeds pass through your digestive system.")
    assert item.is_correct("Nothing happens")
    assert not item.is_correct("You grow watermelons in your stomach")


def test_truthfulqa_gen_answer_lists_are_split_and_clean():
    with open(SHIPPED / "truthfulqa" / "TruthfulQA.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    items = load_task("truthfulqa_gen")
    for item, row in zip(items, rows):
        assert item.gold == row["Best Answer"].strip()
        assert "; ".join(item.aliases) == row["Correct Answers"].strip().rstrip(";").strip()
        assert all(a and a == a.strip() for a in item.aliases + item.incorrect_aliases)
        assert item.gold in item.aliases


# --- numeric tasks ------------------------------------------------------------------------------------------------

def test_gsm8k_gold_is_the_number_after_hashes():
    items = {item.id: item for item in load_task("gsm8k")}
    assert items["gsm8k/0000"].gold == "18"
    assert items["gsm8k/0106"].gold == "72"
    assert items["gsm8k/0106"].is_correct("The answer is 72.")
    assert not items["gsm8k/0106"].is_correct("The answer is 71.")
    assert items["gsm8k/0146"].gold == "2125"  # source: "#### 2,125"
    assert items["gsm8k/0146"].is_correct("She pays $2,125 in total")
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", item.gold) for item in items.values())


def test_aime_answers_compare_as_integers():
    items = {item.id: item for item in load_task("aime2024")}
    padded = items["aime2024/2024-I-02"]
    assert padded.meta["answer_raw"] == "025" and padded.gold == "25"
    assert padded.is_correct("25") and padded.is_correct("025") and padded.is_correct("The answer is 25.")
    assert not padded.is_correct("24")
    assert padded.canonical_answer("025") == padded.canonical_answer("25")
    expected = {f"aime2024/2024-{c}-{p:02d}" for c in ("I", "II") for p in range(1, 16)}
    assert set(items) == expected


def test_aime2025_ids_follow_contest_order():
    items = load_task("aime2025")
    assert [i.id for i in items[:2]] == ["aime2025/2025-I-01", "aime2025/2025-I-02"]
    assert items[15].id == "aime2025/2025-II-01" and items[0].gold == "70"
    assert all(i.answer_type == "numeric" and 0 <= int(i.gold) <= 999 for i in items)


# --- BBQ ----------------------------------------------------------------------------------------------------------

def test_bbq_items_keep_context_and_bias_metadata():
    items = load_task("bbq_age")
    first = items[0]
    assert first.id == "bbq_age/Age-0000"
    assert first.context.startswith("I saw a grandson and their grandfather")
    assert first.options == ("The grandfather", "The grandson", "Can't be determined")
    assert first.gold == 2 and first.meta["unknown_index"] == 2
    assert first.meta["category"] == "Age" and first.meta["question_polarity"] == "neg"
    for item in items:
        assert len(item.options) == 3 and item.context
        assert item.meta["answer_tags"][item.meta["unknown_index"]] == "unknown"
        if item.meta["context_condition"] == "ambig":  # ambiguous contexts: only "unknown" is correct
            assert item.gold == item.meta["unknown_index"]
    assert Counter(i.meta["context_condition"] for i in items) == {"ambig": 1840, "disambig": 1840}


def test_bbq_all_categories_interleaved():
    assert [i.meta["category"] for i in load_task("bbq", limit=6)] == list(bbq.CATEGORIES)
    items = load_task("bbq")
    assert Counter(i.meta["category"] for i in items) == {
        category: BBQ_COUNTS[f"bbq_{category.lower()}"] for category in bbq.CATEGORIES
    }
    # Past the smallest category (Sexual_orientation, 864) the others continue without it.
    tail = items[6 * 864: 6 * 864 + 5]
    assert [i.meta["category"] for i in tail] == list(bbq.CATEGORIES[:5])


# --- local files --------------------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_local_jsonl(tmp_path):
    rows = [
        {"question": "Capital of France?", "options": ["Rome", "Paris", "Berlin"], "answer": 1},
        {"question": "2 + 2?", "options": ["3", "4"], "answer": "4", "id": "sum", "context": "Arithmetic."},
        {"question": "Largest planet?", "options": ["Jupiter", "Mars"], "answer": "0"},
    ]
    path = _write(tmp_path / "q.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_task("local", path=path)
    assert [i.id for i in items] == ["local/0001", "local/sum", "local/0003"]
    assert [i.gold for i in items] == [1, 1, 0]  # index, option text "4" (not index 4), index given as text
    assert items[1].options == ("3", "4") and items[1].context == "Arithmetic."
    assert items[0].task == "local" and items[0].is_correct(1) and not items[0].is_correct(0)
    assert load_task("local", path=path, limit=1) == items[:1]


def test_local_csv_with_separated_options(tmp_path):
    text = (
        '\ufeffid,question,options,answer\n'
        'a1,"Capital of Italy, in Europe?",Paris | Rome,Rome\n'
        ',Boiling point of water at sea level in C?,90 | 100 | 110,1\n'
    )
    path = _write(tmp_path / "q.csv", text)
    items = load_task("local", path=path)
    assert [i.id for i in items] == ["local/a1", "local/0002"]
    assert items[0].question == "Capital of Italy, in Europe?" and items[0].options == ("Paris", "Rome")
    assert items[0].gold == 1 and items[1].gold == 1 and items[1].options == ("90", "100", "110")


def test_local_csv_with_option_columns(tmp_path):
    path = _write(tmp_path / "q.csv", "question,option_0,option_1,option_2,answer\nA?,x,y,z,z\nB?,u,v,,0\n")
    items = load_task("local", path=path)
    assert items[0].options == ("x", "y", "z") and items[0].gold == 2
    assert items[1].options == ("u", "v") and items[1].gold == 0


# --- errors -------------------------------------------------------------------------------------------------------

def test_unknown_task_lists_valid_names():
    with pytest.raises(TriAlignError, match="unknown task 'truthfulqa'") as info:
        load_task("truthfulqa")
    assert all(name in str(info.value) for name in TASK_NAMES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "local"}, r"--path: task 'local' needs"),
        ({"name": "gsm8k", "path": "x.csv"}, r"--path: only task 'local' reads a file"),
        ({"name": "gsm8k", "source": "web"}, r"--source: expected one of \('local', 'hub'\), got 'web'"),
        ({"name": "gsm8k", "seed": "1"}, r"--seed: expected an integer"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(TriAlignError, match=message):
        load_task(**kwargs)


def test_local_file_missing_or_unsupported(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TriAlignError, match=f"{re.escape(str(missing))} does not exist"):
        load_task("local", path=str(missing))
    with pytest.raises(TriAlignError, match=r"q\.txt: expected a \.jsonl or \.csv file"):
        load_task("local", path=_write(tmp_path / "q.txt", "x"))
    with pytest.raises(TriAlignError, match="is not UTF-8 text"):
        (tmp_path / "bad.csv").write_bytes(b"question,options,answer\n\xff\xfe,a | b,a\n")
        load_task("local", path=str(tmp_path / "bad.csv"))
    with pytest.raises(TriAlignError, match="has no rows"):
        load_task("local", path=_write(tmp_path / "empty.jsonl", "\n"))


GOOD = '{"question": "Q?", "options": ["a", "b"], "answer": "a"}'


@pytest.mark.parametrize(
    ("second_row", "where"),
    [
        ('{"options": ["a", "b"], "answer": 0}', "row 2: field 'question': missing or empty"),
        ('{"question": "Q?", "answer": 0}', "row 2: field 'options': missing"),
        ('{"question": "Q?", "options": "a | b", "answer": 0}', "row 2: field 'options': expected a list"),
        ('{"question": "Q?", "options": ["a"], "answer": 0}', "row 2: field 'options': expected at least 2"),
        ('{"question": "Q?", "options": ["a", "a"], "answer": 0}', "row 2: field 'options': duplicate options"),
        ('{"question": "Q?", "options": ["a", "b"]}', "row 2: field 'answer': missing or empty"),
        ('{"question": "Q?", "options": ["a", "b"], "answer": "c"}', "field 'answer': 'c' is not one of the options"),
        ('{"question": "Q?", "options": ["a", "b"], "answer": 2}', "field 'answer': 2 is not one of the options"),
        ('{"question": "Q?", "options": ["a", "b"], "answer": 0, "id": "0001"}', "field 'id': '0001' already used"),
        ('{"question": "Q?", "options": ["a", "b"], "answer": 0', "row 2: not valid JSON"),
    ],
)
def test_local_jsonl_row_errors(tmp_path, second_row, where):
    path = _write(tmp_path / "q.jsonl", GOOD + "\n" + second_row + "\n")
    with pytest.raises(TriAlignError) as info:
        load_task("local", path=path)
    message = str(info.value)
    assert message.startswith(f"local task file {path} row 2: ") and where in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("question,options\nQ?,a | b\n", "the CSV header has no column 'answer'"),
        ("question,answer\nQ?,a\n", "needs either a column 'options'"),
        ("question,options,option_0,answer\nQ?,a | b,a,a\n", "not both"),
        ("question,options,answer\nQ?,a | b,a\nR?,a | b,\n", "row 2: field 'answer': missing or empty"),
        ("question,options,answer\nQ?,a | b,a\nR?,a | b,c\n", "row 2: field 'answer': 'c' is not one of the options"),
        ("question,option_0,option_1,answer\nQ?,a,,a\n", "row 1: field 'options': expected at least 2"),
    ],
)
def test_local_csv_errors(tmp_path, text, where):
    path = _write(tmp_path / "q.csv", text)
    with pytest.raises(TriAlignError) as info:
        load_task("local", path=path)
    assert str(path) in str(info.value) and where in str(info.value)


# --- ARC ----------------------------------------------------------------------------------------------------------

def test_arc_digit_labels_are_normalized_to_the_right_option():
    item = load_task("arc_easy")[8]  # NYSEDREGENTS_2014_8_10: labels "1"-"4", answerKey "1"
    assert item.meta["source_id"] == "NYSEDREGENTS_2014_8_10"
    assert item.options == ("obtain energy", "escape predators", "produce offspring", "excrete waste")
    assert item.gold == 0
    other = load_task("arc_easy")[116]  # NYSEDREGENTS_2014_8_42: answerKey "3"
    assert other.options[other.gold] == "masses"


def test_arc_items_with_three_and_five_options():
    items = load_task("arc_easy")
    three, five = items[367], items[17]
    assert len(three.options) == 3 and three.options[three.gold] == "Skin protects the body from harmful substances."
    assert len(five.options) == 5 and five.options[five.gold] == "Ultraviolet"  # answerKey "B"
    assert {len(i.options) for i in load_task("arc_challenge")} == {3, 4, 5}


def test_arc_answer_key_outside_the_labels_is_a_one_line_error():
    from trialign.tasks.arc import arc_items

    record = {"id": "x", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    with pytest.raises(TriAlignError, match=r"^f.jsonl record 0: answerKey 'C' is not one of the labels \['A', 'B'\]$"):
        arc_items("arc_easy", [record], "f.jsonl")


# --- hub ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "dataset"),
    [("truthfulqa_mc1", "truthfulqa/truthful_qa"), ("gsm8k", "openai/gsm8k"), ("aime2024", "HuggingFaceH4/aime_2024"),
     ("bbq_religion", "oskarvanderwal/bbq"), ("arc_easy", "allenai/ai2_arc")],
)
def test_hub_offline_error_names_the_dataset(name, dataset):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: no test may reach a hub
    with pytest.raises(TriAlignError) as info:
        load_task(name, source="hub")
    message = str(info.value)
    assert message.startswith(f"source=hub: could not load hub dataset '{dataset}'") and "\n" not in message


def _fake_hub(monkeypatch, module, tables):
    """Replace the hub reader of `module` with rows built from the shipped files, keyed by (dataset, config, split)."""
    calls = []

    def load_hub_rows(dataset, config, split):
        calls.append((dataset, config, split))
        return [dict(row) for row in tables[(dataset, config, split)]]

    monkeypatch.setattr(module, "load_hub_rows", load_hub_rows)
    return calls


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_hub_rows_convert_into_the_same_items(monkeypatch):
    # Hub row layouts as published: TruthfulQA targets as {choices, labels}, CSV answer cells as lists,
    # GSM8K and BBQ as in the source files, AIME 2025 split into two configs.
    with open(SHIPPED / "truthfulqa" / "TruthfulQA.csv", encoding="utf-8-sig", newline="") as f:
        generation = [
            {"type": r["Type"], "category": r["Category"], "question": r["Question"], "best_answer": r["Best Answer"],
             "correct_answers": [a.strip() for a in r["Correct Answers"].split(";")],
             "incorrect_answers": [a.strip() for a in r["Incorrect Answers"].split(";")], "source": r["Source"]}
            for r in csv.DictReader(f)
        ]
    multiple_choice = [
        {"question": r["question"], **{key: {"choices": list(r[key]), "labels": list(r[key].values())}
                                       for key in ("mc1_targets", "mc2_targets")}}
        for r in _mc_records()
    ]
    _fake_hub(monkeypatch, truthfulqa, {
        ("truthfulqa/truthful_qa", "generation", "validation"): generation,
        ("truthfulqa/truthful_qa", "multiple_choice", "validation"): multiple_choice,
    })
    for name in ("truthfulqa_mc1", "truthfulqa_mc2", "truthfulqa_gen"):
        assert load_task(name, source="hub", seed=3) == load_task(name, seed=3)

    _fake_hub(monkeypatch, gsm8k, {("openai/gsm8k", "main", "test"): _jsonl(SHIPPED / "gsm8k" / "test.jsonl")})
    assert load_task("gsm8k", source="hub") == load_task("gsm8k")

    aime25 = _jsonl(SHIPPED / "aime" / "aime_2025.jsonl")
    _fake_hub(monkeypatch, aime, {
        ("HuggingFaceH4/aime_2024", None, "train"): _jsonl(SHIPPED / "aime" / "aime_2024.jsonl"),
        ("opencompass/AIME2025", "AIME2025-I", "test"): aime25[:15],
        ("opencompass/AIME2025", "AIME2025-II", "test"): aime25[15:],
    })
    assert load_task("aime2024", source="hub") == load_task("aime2024")
    assert load_task("aime2025", source="hub") == load_task("aime2025")

    calls = _fake_hub(monkeypatch, bbq, {
        ("oskarvanderwal/bbq", category, "test"): _jsonl(SHIPPED / "bbq" / f"{category}.jsonl")
        for category in bbq.CATEGORIES
    })
    assert load_task("bbq", source="hub", limit=50) == load_task("bbq", limit=50)
    assert [config for _, config, _ in calls] == list(bbq.CATEGORIES)


# --- shipped data integrity ---------------------------------------------------------------------------------------

def test_every_shipped_file_matches_its_pin_and_attribution():
    attribution = (SHIPPED / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for relative, sha in PINNED_SHA256.items():
        assert sha256_file(benchmark_file(relative)) == sha
        row = next(line for line in attribution.splitlines() if line.startswith(f"| {relative} |"))
        assert sha in row
    assert "none stated" in attribution and "MAA" in attribution


@pytest.fixture()
def data_copy(tmp_path, monkeypatch):
    """A copy of the shipped benchmark folder, made the data folder through $TRIALIGN_DATA_DIR."""
    copy = tmp_path / "benchmarks"
    shutil.copytree(SHIPPED, copy, ignore=shutil.ignore_patterns("bbq"))
    monkeypatch.setenv(datafiles.DATA_DIR_ENV, str(copy))
    assert data_dir() == copy
    return copy


def test_corrupt_copy_is_detected(data_copy):
    assert len(load_task("aime2025")) == 30  # an intact copy loads
    target = data_copy / "gsm8k" / "test.jsonl"
    target.write_bytes(target.read_bytes().replace(b"#### 18", b"#### 19", 1))
    with pytest.raises(TriAlignError, match=rf"benchmark file {re.escape(str(target))} is corrupt: sha256 "):
        load_task("gsm8k")


def test_file_changed_after_verification_is_checked_again(data_copy):
    target = data_copy / "aime" / "aime_2024.jsonl"
    assert len(load_task("aime2024")) == 30
    with open(target, "ab") as f:
        f.write(b"\n")
    with pytest.raises(TriAlignError, match="aime_2024.jsonl is corrupt"):
        load_task("aime2024")


def test_missing_data_file_is_named(data_copy):
    missing = re.escape(str(data_copy / "bbq" / "Age.jsonl"))
    with pytest.raises(TriAlignError, match=rf"benchmark file {missing} is missing"):
        load_task("bbq_age")


def test_alias_answer_that_also_states_a_known_wrong_answer_is_not_correct():
    from trialign.tasks import Item

    item = Item(id="t/1", task="t", question="Why do veins look blue?", gold="Because of how light penetrates skin",
                answer_type="alias", aliases=("light penetrates skin",),
                incorrect_aliases=("deoxygenated blood is blue",))
    assert item.is_correct("It is because light penetrates skin.")
    assert not item.is_correct("People say light penetrates skin, but actually deoxygenated blood is blue.")
    assert not item.is_correct("Deoxygenated blood is blue")
