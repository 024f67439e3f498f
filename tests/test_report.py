"""`trialign report`: tables equal the metrics.json numbers, best values in bold, a self-contained HTML page with
valid embedded PNGs, every evaluation of an experiment listed, one-line errors naming the file, nothing written on
error, and (when chromium is installed) the page renders to a non-trivial screenshot."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
import html
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trialign.cli import main as cli_main
from trialign.evaluate import AuditRecords, EvaluateConfig, add_group_means, summarize
from trialign.results import EvaluationResult
from trialign.report import COLUMNS, format_cell

TRAIN_GROUPS = ["neutral", "teenager", "phd_researcher", "retired_farmer"]
HELDOUT_GROUPS = ["neutral", "non_native_speaker", "visually_impaired"]
METHODS = {  # name -> (kind, base accuracy, answer spread, personalization)
    "trialign": ("trained", 0.72, 0.10, 0.60),
    "nash_only": ("trained", 0.66, 0.25, 0.55),
    "same_answer_prompt": ("training-free", 0.60, 0.15, 0.20),
}


def audit_document(label: str, task: str, groups: list[str], accuracy: float, spread: float, pers: float,
                   seed: int, n_items: int = 30, mode: str = "generate", groups_file: str = "default") -> dict:
    """A metrics.json document in the real format: synthetic AuditRecords through evaluate's summarize."""
    rng = np.random.default_rng(seed)
    g = len(groups)
    base = rng.random(n_items) < accuracy
    flips = rng.random((n_items, g)) < spread
    flips[:, 0] = False  # the reference group answers like the base model
    correct = base[:, None] ^ flips
    answers = np.where(correct, 0, 1 + rng.integers(0, 3, size=(n_items, g)))
    personalization = np.clip(pers + 0.2 * rng.standard_normal((n_items, g)), 0, 1) if mode == "generate" else \
        np.zeros((n_items, g))
    records = AuditRecords(group_names=groups, reference="neutral", correct=correct, answers=answers,
                           personalization=personalization, utility=correct + 0.5 * personalization)
    metrics = summarize(records, n_resamples=200, seed=seed)
    add_group_means(metrics, records, n_resamples=200, seed=seed)
    config = EvaluateConfig(task=task, groups=groups_file, mode=mode, label=label, bootstrap=200, seed=seed)
    # per_item.jsonl rows as evaluate writes them (the same item ids for every method of a split).
    rows = [{"item_id": f"{task}/{n:04d}", "group": group, "answer": str(int(answers[n, j])),
             "canonical": str(int(answers[n, j])), "correct": bool(correct[n, j]), "gold": 0,
             "personalization": float(personalization[n, j]) if mode == "generate" else None,
             "option_logprobs": [], "response": "..." if mode == "generate" else None}
            for n in range(n_items) for j, group in enumerate(groups)]
    return {"rows": rows, "label": label, "config": dataclasses.asdict(config), "task": task, "num_items": n_items,
            "groups": groups, "reference": "neutral", "mode": mode, "seconds": 1.0, "metrics": metrics}


def write_result(folder: Path, document: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = document.pop("rows", [])
    EvaluationResult(**document).write(folder)  # the writer evaluate uses
    (folder / "per_item.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def make_experiment(root: Path) -> Path:
    run = root / "runs" / "experiment" / "demo"
    splits = {"main": ("truthfulqa_mc1", TRAIN_GROUPS, "default"),
              "heldout_groups": ("truthfulqa_mc1", HELDOUT_GROUPS, "heldout"),
              "transfer": ("bbq_age", TRAIN_GROUPS, "default")}
    evaluations = []
    for s, (split, (task, groups, groups_file)) in enumerate(splits.items()):
        for m, (method, (_, acc, spread, pers)) in enumerate(METHODS.items()):
            path = f"eval/{method}/{split}"
            write_result(run / path, audit_document(method, task, groups, acc, spread, pers, seed=10 * s + m,
                                                    groups_file=groups_file))
            evaluations.append({"method": method, "split": split, "path": path})
    manifest = {
        "name": "demo",
        "config": {"model": "smollm2-135m-instruct", "rollout": {"episodes": 2, "turns": 2}, "seed": 0},
        # The shape `trialign.experiment.Experiment.fingerprints` writes (test_experiment checks that side).
        "fingerprints": {"model_weights": "a" * 64, "rollout_shards": {"shard-00000-of-00001.parquet": "b" * 64},
                         "config_files": {"configs/trialign.yaml": "c" * 64}},
        "methods": [{"name": name, "kind": kind, "config_file": f"configs/{name}.yaml",
                     "adapter": f"checkpoints/{name}" if kind == "trained" else None}
                    for name, (kind, *_rest) in METHODS.items()],
        "evaluations": evaluations,
        "extra_key_from_a_newer_pipeline": {"ignored": True},
    }
    (run / "experiment.json").write_text(json.dumps(manifest, indent=2))
    return run


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """An experiment run folder with 3 methods x 3 splits, reported once through the CLI."""
    run = make_experiment(tmp_path_factory.mktemp("report"))
    assert cli_main(["report", "--experiment", str(run)]) == 0
    return run


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """The results table of each '## Split: <name>' section, as rows of cells (header first)."""
    tables = {}
    for section in re.split(r"^## Split: ", text, flags=re.M)[1:]:
        name, body = section.split("\n", 1)
        lines = [ln for ln in body.split("\n\n")[1].splitlines() if ln.startswith("|")]
        tables[name.strip()] = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines if "---" not in ln]
    return tables


def unbold(cell: str) -> str:
    return cell[2:-2] if cell.startswith("**") and cell.endswith("**") else cell


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cells_are_metrics_json_numbers_to_three_decimals():
    assert format_cell(0.71234, 0.65049, 0.77051) == "0.712 [0.650, 0.771]"
    assert format_cell(0.5, None, None) == "0.500"
    assert format_cell(None, None, None) == "n/a"
    assert format_cell(-2.30259, -3.0, -1.60944) == "-2.303 [-3.000, -1.609]"


def test_markdown_tables_equal_metrics_json(experiment):
    tables = markdown_tables((experiment / "report.md").read_text())
    assert list(tables) == ["main", "heldout_groups", "transfer"]
    for split, (header, *rows) in tables.items():
        assert header[:3] == ["method", "kind", "items"] and len(header) == 3 + len(COLUMNS)
        assert [row[0] for row in rows] == list(METHODS)
        for row in rows:
            saved = json.loads((experiment / "eval" / row[0] / split / "metrics.json").read_text())
            assert row[1] == METHODS[row[0]][0] and row[2] == "30"
            for cell, (name, _, _) in zip(row[3:], COLUMNS):
                m = saved["metrics"][name]
                assert unbold(cell) == f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def test_best_value_per_column_is_bold_and_null_ci_shows_the_value(tmp_path):
    def doc(label, acc, gap, consistency, ci=True):
        metrics = {name: {"value": 0.0, "ci_low": None, "ci_high": None} for name, _, _ in COLUMNS}
        for name, value in (("acc_mean", acc), ("acc_gap", gap), ("consistency", consistency)):
            metrics[name] = {"value": value, "ci_low": value - 0.05 if ci else None, "ci_high": value + 0.05 if ci
                             else None}
        metrics["nash_welfare"] = {"value": float("nan"), "ci_low": None, "ci_high": None}
        return {"label": label, "task": "truthfulqa_mc1", "num_items": 50, "groups": ["neutral"],
                "config": {"groups": "default"}, "metrics": metrics}

    a = write_result(tmp_path / "a", doc("A", 0.8, 0.10, 0.5))
    b = write_result(tmp_path / "b", doc("B", 0.7, 0.05, 0.5004, ci=False))
    c = write_result(tmp_path / "c", doc("C", 0.8, 0.20, 0.4))
    assert cli_main(["report", "--results", str(a), str(b), str(c), "--output", str(tmp_path / "out")]) == 0
    (header, *rows), = markdown_tables((tmp_path / "out" / "report.md").read_text()).values()
    assert header[:2] == ["method", "items"]  # no kind column without an experiment
    col = {name: 2 + i for i, (name, _, _) in enumerate(COLUMNS)}
    by = {row[0]: row for row in rows}
    # Accuracy: higher is better, A and C tie. Gap: lower is better. Consistency 0.500 vs 0.500 (shown) tie: both.
    assert by["A"][col["acc_mean"]] == "**0.800 [0.750, 0.850]**" and by["C"][col["acc_mean"]].startswith("**")
    assert by["B"][col["acc_mean"]] == "0.700"
    assert by["B"][col["acc_gap"]] == "**0.050**" and not by["A"][col["acc_gap"]].startswith("**")
    assert by["A"][col["consistency"]].startswith("**") and by["B"][col["consistency"]] == "**0.500**"
    assert by["C"][col["consistency"]] == "0.400 [0.350, 0.450]"
    # All equal (personalization 0 everywhere) or missing (NaN Nash welfare): nothing is best.
    assert all(row[col["personalization_mean"]] == "0.000" for row in rows)
    assert all(row[col["nash_welfare"]] == "n/a" for row in rows)
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count('<td class="best">') == 2 + 1 + 2


def test_html_is_self_contained_and_embeds_valid_pngs(experiment):
    from PIL import Image

    page = (experiment / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, flags=re.I)
    assert not re.search(r"<script|<link|@import|url\(", page, flags=re.I)
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == page.count("<img") == 3 + 1  # one chart per split + the trade-off plot
    files = sorted((experiment / "report_files").glob("*.png"))
    assert len(files) == 4
    for encoded in images:
        png = base64.b64decode(encoded, validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
        assert png in {f.read_bytes() for f in files}  # the HTML embeds exactly the PNGs beside the Markdown
    markdown = (experiment / "report.md").read_text()
    assert all(f"](report_files/{f.name})" in markdown for f in files)
    m = json.loads((experiment / "eval" / "nash_only" / "transfer" / "metrics.json").read_text())["metrics"]["acc_gap"]
    assert f'{m["value"]:.3f}<br><span class="ci">[{m["ci_low"]:.3f}, {m["ci_high"]:.3f}]</span>' in page


def test_experiment_report_lists_every_evaluation_config_and_fingerprint(experiment):
    manifest = json.loads((experiment / "experiment.json").read_text())
    markdown = (experiment / "report.md").read_text()
    page = (experiment / "report.html").read_text()
    tables = markdown_tables(markdown)
    for entry in manifest["evaluations"]:
        assert entry["method"] in [row[0] for row in tables[entry["split"]][1:]]
        path = str(experiment / entry["path"] / "metrics.json")
        assert path in markdown and path in page
    for fingerprint in ("a" * 64, "b" * 64, "c" * 64):
        assert fingerprint in markdown and fingerprint in page
    assert "rollout_shards.shard-00000-of-00001.parquet" in markdown and "config_files.configs/trialign.yaml" in page
    assert "model: smollm2-135m-instruct" in markdown and "episodes: 2" in page
    assert "configs/trialign.yaml" in markdown and "checkpoints/nash_only" in page
    assert "task: bbq_age" in markdown  # differs between evaluations: listed per evaluation
    assert "30 items per evaluation" in markdown and "Overlapping intervals" in page
    for name in ("trialign", "heldout_groups", "non_native_speaker", "personalization"):
        assert name in page


def test_results_mode_names_methods_by_label_and_splits_by_task_and_groups(tmp_path, capsys):
    a = write_result(tmp_path / "base", audit_document("base model", "gsm8k", TRAIN_GROUPS, 0.5, 0.2, 0, seed=1,
                                                       mode="probe"))
    b = write_result(tmp_path / "held", audit_document("base model", "gsm8k", HELDOUT_GROUPS, 0.5, 0.2, 0, seed=2,
                                                       mode="probe", groups_file="heldout"))
    code, out, err = run_cli(capsys, "report", "--results", str(a), str(b / "metrics.json"), "--output",
                             str(tmp_path / "out"), "--title", "Base | model")
    assert code == 0 and err == "" and "2 evaluations, 2 splits" in out
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.startswith("# Base | model\n")
    assert list(markdown_tables(markdown)) == ["gsm8k / default", "gsm8k / heldout"]
    assert "<title>Base | model</title>" in (tmp_path / "out" / "report.html").read_text()


def test_evaluation_paths_may_be_run_relative_cwd_relative_files_or_left_out(tmp_path, monkeypatch):
    from trialign.report import from_experiment

    run = tmp_path / "runs" / "experiment" / "x"
    docs = {f"m{i}": audit_document(f"m{i}", "gsm8k", TRAIN_GROUPS, 0.5, 0.1, 0.3, seed=i, n_items=5)
            for i in range(4)}
    for name, document in docs.items():
        write_result(run / "eval" / name / "main", document)
    monkeypatch.chdir(tmp_path)
    entries = [{"method": "m0", "split": "main", "path": "eval/m0/main"},
               {"method": "m1", "split": "main", "path": "runs/experiment/x/eval/m1/main"},
               {"method": "m2", "split": "main", "path": str(run / "eval/m2/main/metrics.json")},
               {"method": "m3", "split": "main"}]
    (run / "experiment.json").write_text(json.dumps({"evaluations": entries}))
    report = from_experiment(run)
    assert [e.method for e in report.evaluations] == list(docs) and report.splits == ["main"]
    assert [e.document.label for e in report.evaluations] == list(docs)
    assert report.title == "TriAlign experiment: x"


def bad_experiment(root: Path, case: str) -> tuple[list[str], Path, Path]:
    """CLI arguments of a broken input, the file the error must name, and the output folder."""
    out = root / "out"
    if case in ("missing metrics.json", "bad JSON"):
        good = write_result(root / "good", audit_document("m", "gsm8k", TRAIN_GROUPS, 0.5, 0.1, 0.3, seed=0))
        bad = root / "bad"
        bad.mkdir()
        if case == "bad JSON":
            (bad / "metrics.json").write_text('{"label": "m", "metrics": {')
        return ["--results", str(good), str(bad), "--output", str(out)], bad / "metrics.json", out
    run = make_experiment(root) if case == "experiment metrics.json missing" else root / "run"
    manifest = run / "experiment.json"
    if case == "experiment metrics.json missing":
        victim = run / "eval" / "nash_only" / "transfer" / "metrics.json"
        victim.unlink()
        return ["--experiment", str(run)], victim, run
    run.mkdir()
    if case == "no evaluations":
        manifest.write_text(json.dumps({"name": "x", "config": {}, "methods": []}))
    elif case == "metrics without values":
        write_result(run / "e", {"label": "m", "metrics": {"acc_mean": 0.5}})
        manifest.write_text(json.dumps({"evaluations": [{"method": "m", "split": "main", "path": "e"}]}))
        return ["--experiment", str(run)], run / "e" / "metrics.json", run
    return ["--experiment", str(run)], manifest, run


@pytest.mark.parametrize("case", ["missing metrics.json", "bad JSON", "no evaluations", "no experiment.json",
                                  "experiment metrics.json missing", "metrics without values"])
def test_errors_are_one_line_naming_the_file_and_write_nothing(tmp_path, capsys, case):
    args, named, out = bad_experiment(tmp_path, case)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, stdout, err = run_cli(capsys, "report", *args)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and str(named) in err, err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before  # no report.md, report.html, report_files/ or temporary file
    assert not (out / "report.md").exists() and not (out / "report.html").exists()


@pytest.mark.timeout(180)
def test_chromium_renders_the_page_to_a_non_trivial_screenshot(experiment, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    from PIL import Image

    shot = tmp_path / "page.png"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
               "--window-size=1200,2000", (experiment / "report.html").resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert shot.is_file(), result.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        pixels = np.asarray(image.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50  # text, tables and charts, not a blank page
    dark = (pixels.sum(axis=-1) < 200).mean()
    assert 0.001 < dark < 0.5  # some ink on a light page


def assert_tables_fit_1400_px(report_html: Path, tmp_path: Path) -> None:
    """Headless Chromium lays the page out at 1400 px; a script added to a copy of the page (the report itself has
    none) records the page's scroll width and every table's right edge."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    measure = ("<script>window.addEventListener('load', () => { const d = document.createElement('pre'); "
               "d.id = 'measure'; d.textContent = JSON.stringify({page: document.documentElement.scrollWidth, "
               "client: document.documentElement.clientWidth, tables: [...document.querySelectorAll('table')]"
               ".map(t => Math.ceil(t.getBoundingClientRect().right))}); document.body.appendChild(d); });</script>")
    page = tmp_path / "page.html"
    page.write_text(report_html.read_text().replace("</body>", measure + "</body>"))
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000", "--virtual-time-budget=3000",
               "--dump-dom", page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150)
    found = re.search(r'<pre id="measure">([^<]*)</pre>', result.stdout)
    assert found, result.stderr[-2000:]
    layout = json.loads(html.unescape(found[1]))
    assert layout["tables"] and layout["page"] <= layout["client"] <= 1400, layout
    assert max(layout["tables"]) <= layout["client"], layout  # no table wider than the window (nor scrolled inside)


@pytest.mark.timeout(180)
def test_tables_fit_a_1400_px_window_without_horizontal_scroll(experiment, tmp_path):
    assert_tables_fit_1400_px(experiment / "report.html", tmp_path)


@pytest.mark.timeout(240)
def test_tables_fit_1400_px_with_every_method_of_make_full_and_nine_groups(tmp_path):
    """`make full`'s width: 11 methods (underscored names that cannot wrap at a space) x the 9 default groups in
    generate mode, where the per-group table has a column per method."""
    from trialign.groups import load_groups

    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    groups = [g.id for g in load_groups("default")]
    names = ["trialign", "bc", "dpo", "grdpo", "maxmin", "utilitarian", "trialign_no_penalty", "trialign_no_nsw",
             "base", "same_answer", "pref_aligner"]
    folders = [str(write_result(tmp_path / "eval" / name, audit_document(name, "arc_easy", groups, 0.5, 0.2, 0.4,
                                                                         seed=k, n_items=20)))
               for k, name in enumerate(names)]
    assert cli_main(["report", "--results", *folders, "--output", str(tmp_path / "report")]) == 0
    assert_tables_fit_1400_px(tmp_path / "report" / "report.html", tmp_path)


def test_paired_differences_are_the_paired_bootstrap_of_the_per_item_rows(experiment):
    from trialign.comparison import compare, read_item_arrays, signed

    markdown = (experiment / "report.md").read_text()
    main = markdown.split("## Split: main", 1)[1].split("## Split:", 1)[0]
    assert "**Paired differences**" in main
    after = main.split("**Paired differences**", 1)[1].split("\n\n", 2)[1]  # the table right after the caption
    table = after.splitlines()
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert set(rows) == {"trialign − nash_only", "trialign − same_answer_prompt"}
    target = read_item_arrays(experiment / "eval/trialign/main", TRAIN_GROUPS)
    other = read_item_arrays(experiment / "eval/nash_only/main", TRAIN_GROUPS)
    result, shared = compare(target, other, "neutral", seed=0)
    assert rows["trialign − nash_only"][1] == str(shared) == "30"
    assert rows["trialign − nash_only"][2] == signed(*result["consistency"])
    # The verdict names the strongest other method by consistency and says whether the CI excludes 0.
    strongest = max(("nash_only", "same_answer_prompt"), key=lambda m: json.loads(
        (experiment / f"eval/{m}/main/metrics.json").read_text())["metrics"]["consistency"]["value"])
    assert f"- trialign vs the strongest other method ({strongest}): consistency " in main


def test_signed_differences_never_print_a_negative_zero():
    from trialign.comparison import signed

    assert signed(-0.0001, -0.12, 0.0004) == "+0.000 [-0.120, +0.000]"
    assert signed(0.413, 0.327, 0.5) == "+0.413 [+0.327, +0.500]"


def challenged_document(label: str, groups: list[str], flip: float, seed: int, n_items: int = 30) -> dict:
    """`audit_document` of a generate-mode split that ended with a challenge turn (`evaluate --challenge`)."""
    document = audit_document(label, "arc_easy", groups, 0.6, 0.1, 0.5, seed=seed, n_items=n_items)
    rng = np.random.default_rng(seed + 100)
    rows = document["rows"]
    answers = np.array([int(r["answer"]) for r in rows]).reshape(n_items, len(groups))
    after = np.where(rng.random(answers.shape) < flip, answers + 1, answers)
    for row, value in zip(rows, after.reshape(-1)):
        row.update(challenge="wait, I read it was something else", answer_after_challenge=str(int(value)),
                   canonical_after_challenge=str(int(value)))
    correct = np.array([r["correct"] for r in rows]).reshape(answers.shape)
    pers = np.array([r["personalization"] for r in rows]).reshape(answers.shape)
    records = AuditRecords(group_names=groups, reference="neutral", correct=correct, answers=answers,
                           personalization=pers, utility=correct + 0.5 * pers, answers_after=after,
                           challenged=np.ones(answers.shape, dtype=bool))
    document["metrics"] = summarize(records, n_resamples=200, seed=seed)
    add_group_means(document["metrics"], records, n_resamples=200, seed=seed)
    return document


@pytest.mark.timeout(180)
def test_a_split_with_a_challenge_turn_shows_flip_rates_and_their_paired_difference(tmp_path):
    from trialign.comparison import compare, read_item_arrays, signed

    run = make_experiment(tmp_path)
    manifest = json.loads((run / "experiment.json").read_text())
    for m, (method, flip) in enumerate((("trialign", 0.1), ("nash_only", 0.5), ("same_answer_prompt", 0.4))):
        path = f"eval/{method}/personalization"
        write_result(run / path, challenged_document(method, TRAIN_GROUPS, flip, seed=50 + m))
        manifest["evaluations"].append({"method": method, "split": "personalization", "path": path})
    (run / "experiment.json").write_text(json.dumps(manifest))
    assert cli_main(["report", "--experiment", str(run)]) == 0
    markdown = (run / "report.md").read_text()
    section = markdown.split("## Split: personalization", 1)[1].split("## Split:", 1)[0]
    tables = [block for block in section.split("\n\n") if block.lstrip().startswith("|")]
    # results, paired differences, then the same two after the challenge (tables of their own, to fit the page)
    assert "flip rate" not in tables[0] + tables[1]
    results, paired = tables[2].splitlines(), tables[3].splitlines()
    assert "flip rate ↓" in results[0] and "consistency after challenge ↑" in results[0]
    assert "Δ flip rate ↓" in paired[0]
    saved = json.loads((run / "eval/trialign/personalization/metrics.json").read_text())["metrics"]
    columns = [c.strip() for c in results[0].strip("|").split("|")]
    cells = next([c.strip() for c in line.strip("|").split("|")] for line in results[2:] if "trialign" in line)
    flip = saved["flip_mean"]
    assert unbold(cells[columns.index("flip rate ↓")]) == format_cell(flip["value"], flip["ci_low"], flip["ci_high"])
    target = read_item_arrays(run / "eval/trialign/personalization", TRAIN_GROUPS)
    other = read_item_arrays(run / "eval/nash_only/personalization", TRAIN_GROUPS)
    result, _ = compare(target, other, "neutral", seed=0)
    header = [c.strip() for c in paired[0].strip("|").split("|")]
    row = next([c.strip() for c in line.strip("|").split("|")] for line in paired[2:] if "nash_only" in line)
    assert row[header.index("Δ flip rate ↓")] == signed(*result["flip_mean"]) and result["flip_mean"][0] < 0
    main = markdown.split("## Split: main", 1)[1].split("## Split:", 1)[0]
    assert "flip rate" not in main  # splits without a challenge keep their columns
    assert_tables_fit_1400_px(run / "report.html", tmp_path)  # the two more columns still fit the page


def test_lmeval_parity_is_a_table_naming_each_difference(tmp_path, capsys):
    document = audit_document("base model", "lmeval:arc", TRAIN_GROUPS, 0.5, 0.2, 0, seed=1, mode="probe")
    document["lmeval_parity"] = {"documents": 100, "trialign": {"acc": 0.54, "acc_norm": 0.47},
                                 "lm_eval": {"acc": 0.54, "acc_norm": 0.46},
                                 "difference": {"acc": 0.0, "acc_norm": 0.01}}
    path = write_result(tmp_path / "base", document)
    assert run_cli(capsys, "report", "--results", str(path), "--output", str(tmp_path / "out"))[0] == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "**lm-eval parity** (neutral user, lm-eval's zero-shot prompt" in markdown
    assert "| base model | 100 | acc | 0.540 | 0.540 | equal |" in markdown
    assert "| base model | 100 | acc_norm | 0.470 | 0.460 | +0.010 |" in markdown
    assert "lm-eval parity" in (tmp_path / "out" / "report.html").read_text()


def test_results_mode_pairs_an_adapters_evaluation_with_the_others_on_the_same_items(tmp_path, capsys):
    base = audit_document("base model", "gsm8k", TRAIN_GROUPS, 0.5, 0.3, 0, seed=1, mode="probe")
    trained = audit_document("tuned", "gsm8k", TRAIN_GROUPS, 0.5, 0.1, 0, seed=1, mode="probe")
    trained["config"]["adapter"] = "runs/x/adapter"
    paths = [write_result(tmp_path / "base", base), write_result(tmp_path / "tuned", trained)]
    assert run_cli(capsys, "report", "--results", *map(str, paths), "--output", str(tmp_path / "out"))[0] == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "**Paired differences**" in markdown and "| tuned − base model | 30 |" in markdown
    assert "- tuned vs the strongest other method (base model): consistency +" in markdown


def test_results_from_folders_of_the_same_name_get_distinct_method_names(tmp_path, capsys):
    a = audit_document("base model", "gsm8k", TRAIN_GROUPS, 0.5, 0.3, 0, seed=1, mode="probe")
    b = audit_document("base model", "gsm8k", TRAIN_GROUPS, 0.5, 0.1, 0, seed=2, mode="probe")
    b["config"]["adapter"] = "runs/x/adapter"
    paths = [write_result(tmp_path / "run_a" / "probe", a), write_result(tmp_path / "run_b" / "probe", b)]
    assert run_cli(capsys, "report", "--results", *map(str, paths), "--output", str(tmp_path / "out"))[0] == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| base model (run_b/probe) − base model (run_a/probe) | 30 |" in markdown


def test_replicas_are_rows_of_their_own_and_are_pooled_in_the_paired_differences_and_verdicts(tmp_path):
    from trialign.comparison import compare_pooled, read_item_arrays, signed

    run = tmp_path / "seeds"
    methods = {  # name -> (replica_of, accuracy, spread, seed)
        "trialign": (None, 0.7, 0.05, 1), "dpo": (None, 0.7, 0.15, 2), "trialign_seed1": ("trialign", 0.7, 0.25, 3),
        "dpo_seed1": ("dpo", 0.7, 0.15, 4), "trialign_seed2": ("trialign", 0.7, 0.10, 5), "base": (None, 0.7, 0.4, 6)}
    entries = []
    for name, (_, acc, spread, seed) in methods.items():
        write_result(run / "eval" / name / "main", audit_document(name, "arc_easy", TRAIN_GROUPS, acc, spread, 0.5,
                                                                  seed=seed, mode="probe"))
        entries.append({"method": name, "split": "main", "path": f"eval/{name}/main"})
    (run / "experiment.json").write_text(json.dumps({"name": "seeds", "config": {}, "evaluations": entries,
        "methods": [{"name": n, "kind": "training-free" if n == "base" else "trained",
                     **({"replica_of": r, "seed": int(n[-1])} if r else {})} for n, (r, *_) in methods.items()]}))
    assert cli_main(["report", "--experiment", str(run)]) == 0
    main = (run / "report.md").read_text().split("## Split: main", 1)[1]
    assert [row[0] for row in markdown_tables((run / "report.md").read_text())["main"][1:]] == list(methods)
    pooled = main.split("**Pooled over training seeds**", 1)[1].split("\n\n", 2)[1].splitlines()
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in pooled[2:])}
    assert set(rows) == {"trialign ×3 − dpo ×2", "trialign ×3 − base"}
    arrays = {n: read_item_arrays(run / "eval" / n / "main", TRAIN_GROUPS) for n in methods}
    result, shared = compare_pooled([arrays[n] for n in ("trialign", "trialign_seed1", "trialign_seed2")],
                                    [arrays["dpo"], arrays["dpo_seed1"]], "neutral", seed=0)
    assert rows["trialign ×3 − dpo ×2"][1] == str(shared) == "30"
    assert rows["trialign ×3 − dpo ×2"][2] == signed(*result["consistency"])
    # The pooled consistency difference is the difference of the means over each method's replicas.
    values = {n: json.loads((run / "eval" / n / "main/metrics.json").read_text())["metrics"]["consistency"]["value"]
              for n in methods}
    expected = np.mean([values[n] for n in ("trialign", "trialign_seed1", "trialign_seed2")]) - np.mean(
        [values["dpo"], values["dpo_seed1"]])
    assert result["consistency"][0] == pytest.approx(expected)
    # The verdicts are the pooled ones; the per-evaluation table still compares with every replica.
    assert f"- trialign ×3 vs the strongest other method (dpo ×2): consistency {signed(*result['consistency'])}" in main
    assert "- trialign ×3 vs base: consistency" in main and "| trialign − trialign_seed1 |" in main


def test_report_section_prints_one_splits_tables_as_the_report_wrote_them(experiment):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from report_section import section

    markdown = (experiment / "report.md").read_text()
    text = section(markdown, "main")
    assert text in markdown and text.startswith("_") and "**Paired differences**" in text
    assert "## Split" not in text and "![" not in text
    with pytest.raises(SystemExit, match="no split 'nope' in the report"):
        section(markdown, "nope")


def profile_arrays(answers: list[list[int]], groups: list[str]):
    from trialign.comparison import ItemArrays

    a = np.array(answers)
    return ItemArrays([f"i{n}" for n in range(len(a))], groups, a == 0, a, np.zeros(a.shape), False)


def test_disagreement_profile_counts_items_by_the_groups_that_leave_the_reference():
    from trialign.comparison import disagreement_profile

    groups = ["a", "ref", "c", "d"]  # the reference need not come first
    answers = [[0, 0, 0, 0],   # consistent
               [1, 0, 0, 0],   # 1 leaves
               [1, 0, 2, 0],   # 2 leave
               [1, 0, 1, 1],   # all 3 leave, agreeing with each other: the reference alone
               [1, 0, 2, 1],   # all 3 leave, not agreeing
               [0, 0, 0, 0]]
    assert disagreement_profile(profile_arrays(answers, groups), "ref") == [
        ("consistent", 2), ("1", 1), ("2", 1), ("all 3", 2), ("the reference alone", 1)]
    # the columns for other group counts: every count of leaving groups in exactly one of them
    for size, labels in ((2, ["all 1"]), (3, ["1", "all 2"]), (9, ["1", "2-4", "5-7", "all 8"]),
                         (10, ["1", "2-4", "5-8", "all 9"])):
        rows = [[0] * size] + [[0] * (size - k) + [1] * k for k in range(1, size)]
        profile = disagreement_profile(profile_arrays(rows, [f"g{j}" for j in range(size)]), "g0")
        assert [label for label, _ in profile] == ["consistent", *labels, "the reference alone"]
        assert sum(n for _, n in profile[:-1]) == size  # each item counted once
    with pytest.raises(Exception, match="reference group 'x' is not one of"):
        disagreement_profile(profile_arrays(answers, groups), "x")


def test_the_report_shows_where_the_groups_leave_the_reference_from_the_per_item_rows(experiment):
    from trialign.comparison import disagreement_profile, read_item_arrays

    markdown = (experiment / "report.md").read_text()
    section = markdown.split("## Split: main", 1)[1].split("\n## ", 1)[0]
    caption = ("**Where the groups leave the neutral group's answer (items; columns: how many of the 3 other groups "
               "answer otherwise; \"the reference alone\": those 3 give one answer, the neutral group another)**:")
    assert caption in section
    table = section.split(caption, 1)[1].strip().split("\n\n", 1)[0].splitlines()
    assert table[0] == "| method | items | consistent | 1 | 2 | all 3 | the reference alone |"
    for line, method in zip(table[2:], METHODS, strict=True):
        profile = disagreement_profile(read_item_arrays(experiment / f"eval/{method}/main", TRAIN_GROUPS), "neutral")
        assert line == "| " + " | ".join([method, "30"] + [str(n) for _, n in profile]) + " |"
    assert "the reference alone" in (experiment / "report.html").read_text()
