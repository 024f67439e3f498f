"""`trialign report`: evaluation results as a Markdown file and a self-contained HTML page.

Input is either an experiment run folder (``--experiment runs/experiment/<name>``: its ``experiment.json`` lists the
evaluations as ``{method, split, path}``) or a plain list of `trialign evaluate` output folders (``--results DIR ...``:
the method is each ``metrics.json``'s label, the split its task and group file).

The report holds, per split, a results table (accuracy, worst-group accuracy, gap, consistency,
consistent-and-correct, breakage, personalization, Nash welfare, each as ``value [95% CI]``, the best point estimate
per column in bold), the paired differences of TriAlign to every other method, where the inconsistency lies (items
by how many groups leave the neutral user's answer, `trialign.comparison.disagreement_profile`), methods x groups
heat maps of per-group accuracy and of agreement with the neutral user, and the per-group numbers; then a trade-off
plot (mean accuracy vs. consistency, colour = personalization, one point per method), the configs, fingerprints and
the files the numbers come from. Plots are PNGs drawn with matplotlib's Agg renderer: written beside the Markdown in
``report_files/`` (so it renders on GitHub) and embedded as base64 in the HTML (a single file, no external assets,
no scripts).

Everything is read and rendered in memory first; files are written only then, each to a temporary name and renamed,
so a bad input leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from trialign.comparison import PairedTables, disagreement_profile, read_item_arrays
from trialign.config_io import FlagParser
from trialign.errors import TriAlignError, require
from trialign.experiment import SPLITS
from trialign.experiment_state import ExperimentState, read_state
from trialign.fileio import write_bytes_atomic
from trialign.metric_names import metric_names
from trialign.results import EvaluationResult, metrics_file, read_result

# (metrics.json name, column header, direction: +1 higher is better, -1 lower is better).
COLUMNS = [(m.key, m.short, m.direction) for m in metric_names(
    "acc_mean", "acc_worst", "acc_gap", "consistency", "consistent_correct", "breakage_mean", "personalization_mean",
    "nash_welfare")]
CHALLENGE_COLUMNS = [(m.key, m.short, m.direction) for m in metric_names("flip_mean", "consistency_after_challenge")]
"""Shown for the splits whose evaluations ran a challenge turn (`evaluate --challenge`)."""
DIGITS = 3
SPLIT_ORDER = SPLITS  # the experiment's splits, in its order
SPLIT_NOTES = {
    "main": "held-out items of the training task, training groups",
    "heldout_groups": "personas never seen in training",
    "transfer": "a task not used in training",
    "personalization": "responses generated, then probed; preferences checked",
}
FILES_DIR = "report_files"


@dataclass
class Evaluation:
    """One evaluated (method, split) pair and its ``metrics.json`` document."""

    method: str
    split: str
    path: Path
    """The metrics.json file."""
    document: EvaluationResult
    sha256: str
    kind: str | None = None
    """`trained` / `training-free` when the experiment says so."""
    replica_of: str | None = None
    """The method this one refits with another training seed (the experiment's ``extra_seeds``)."""

    def metric(self, name: str) -> tuple[float | None, float | None, float | None]:
        entry = self.document.metrics.get(name)
        if not isinstance(entry, dict):
            return None, None, None
        return _number(entry.get("value")), _number(entry.get("ci_low")), _number(entry.get("ci_high"))

    @property
    def groups(self) -> list[str]:
        if self.document.groups:
            return list(self.document.groups)
        return [k.split("/", 1)[1] for k in self.document.metrics if k.startswith("acc/")]


@dataclass
class Report:
    title: str
    evaluations: list[Evaluation]
    experiment: ExperimentState | None = None
    source: str = ""
    splits: list[str] = field(init=False)
    methods: list[str] = field(init=False)
    paired: dict[str, Any] = field(init=False, default_factory=dict)
    """Per split, the paired-difference table (filled on first use)."""
    seed: int = 0

    def __post_init__(self) -> None:
        seen = list(dict.fromkeys(e.split for e in self.evaluations))
        self.splits = [s for s in SPLIT_ORDER if s in seen] + [s for s in seen if s not in SPLIT_ORDER]
        self.methods = list(dict.fromkeys(e.method for e in self.evaluations))

    def in_split(self, split: str) -> list[Evaluation]:
        return [e for e in self.evaluations if e.split == split]


def _number(value: Any) -> float | None:
    """A finite float, or None for null / NaN / inf (evaluate writes an absent CI as NaN or null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# ----------------------------------------------------------------------------------------------- reading inputs


def _metrics_path(base: Path, entry_path: str) -> Path:
    path = Path(entry_path)
    if not path.is_absolute():
        # The pipeline may record paths relative to the run folder or to where it was started; prefer the run folder.
        in_run = base / path
        path = in_run if in_run.exists() or not path.exists() else path
    return metrics_file(path)


def from_experiment(folder: str | Path, title: str | None = None) -> Report:
    """The report of an experiment run folder, from its ``experiment.json``."""
    folder = Path(folder)
    manifest_path = folder / "experiment.json"
    state = read_state(manifest_path, "experiment file")
    entries = state.evaluations
    require(bool(entries),
            f"experiment file {manifest_path}: expected a non-empty 'evaluations' list of {{method, split, path}}")
    kinds = {m.get("name"): m.get("kind") for m in state.methods if isinstance(m, dict)}
    replicas = {m.get("name"): m.get("replica_of") for m in state.methods if isinstance(m, dict)}
    evaluations = []
    for index, entry in enumerate(entries):
        where = f"experiment file {manifest_path}: evaluations[{index}]"
        require(isinstance(entry, dict), f"{where}: expected an object with method, split, path")
        for key in ("method", "split"):
            require(isinstance(entry.get(key), str) and entry[key], f"{where}: expected a string '{key}'")
        method, split = entry["method"], entry["split"]
        raw = entry.get("path", f"eval/{method}/{split}")
        require(isinstance(raw, str) and raw, f"{where}: expected a string 'path'")
        path = _metrics_path(folder, raw)
        document, digest = read_result(path)
        evaluations.append(Evaluation(method, split, path, document, digest, kind=kinds.get(method),
                                      replica_of=replicas.get(method)))
    return Report(title or f"TriAlign experiment: {state.name or folder.name}", _unique(evaluations), state,
                  source=str(manifest_path))


def from_results(folders: Sequence[str | Path], title: str | None = None) -> Report:
    """The report of plain `trialign evaluate` output folders (method = label, split = task and group file; an
    evaluation with an adapter is a trained method, so a split holding one gets paired differences from it)."""
    require(len(folders) > 0, "results: expected at least one evaluate output folder")
    evaluations = []
    for folder in folders:
        document, digest = read_result(folder)
        path = metrics_file(folder)
        config = document.config
        method = document.label or path.parent.name
        task = str(document.task or config.get("task") or "task")
        groups = config.get("groups")
        groups = Path(str(groups)).stem if groups else f"{len(document.groups)} groups"
        evaluations.append(Evaluation(method, f"{task} / {groups}", path, document, digest))
    return Report(title or "TriAlign evaluation report", _unique(evaluations), None, source="results")


def _unique(evaluations: list[Evaluation]) -> list[Evaluation]:
    """Give repeated (method, split) pairs distinct method names: the folder's name is added, with as many of its
    parents as it takes to tell them apart (``runs/a/probe`` and ``runs/b/probe`` become ``a/probe``, ``b/probe``)."""
    groups: dict[tuple[str, str], list[Evaluation]] = {}
    for e in evaluations:
        groups.setdefault((e.method, e.split), []).append(e)
    for (method, _), same in groups.items():
        if len(same) < 2:
            continue
        folders = [e.path.parent.resolve().parts for e in same]
        depth = next((d for d in range(1, max(map(len, folders)) + 1)
                      if len({parts[-d:] for parts in folders}) == len(same)), None)
        for index, (e, parts) in enumerate(zip(same, folders)):
            e.method = f"{method} ({'/'.join(parts[-depth:]) if depth else index + 1})"
    return evaluations


# ----------------------------------------------------------------------------------------------- table contents


def format_cell(value: float | None, low: float | None, high: float | None) -> str:
    """``value [low, high]`` to three decimals; the value alone without a CI; ``n/a`` without a value."""
    if value is None:
        return "n/a"
    text = f"{value:.{DIGITS}f}"
    if low is not None and high is not None:
        text += f" [{low:.{DIGITS}f}, {high:.{DIGITS}f}]"
    return text


def best_rows(values: Sequence[float | None], direction: int) -> set[int]:
    """Rows holding the best shown value of a column; none when fewer than two values or all are equal."""
    shown = {i: round(v, DIGITS) for i, v in enumerate(values) if v is not None}
    if len(shown) < 2 or len(set(shown.values())) == 1:
        return set()
    best = max(shown.values()) if direction > 0 else min(shown.values())
    return {i for i, v in shown.items() if v == best}


def results_table(evaluations: list[Evaluation], columns=COLUMNS) -> tuple[list[str], list[list[str]], list[set[int]]]:
    """Header, cell texts (method, [kind,] items, metrics...) and per metric column the bold rows."""
    kinds = any(e.kind for e in evaluations)  # known only from an experiment
    header = ["method"] + ["kind"] * kinds + ["items"]
    header += [f"{label} {'↑' if d > 0 else '↓'}" for _, label, d in columns]
    rows = [[e.method] + [e.kind or "-"] * kinds + [str(e.document.num_items or "?")] for e in evaluations]
    bold = []
    for name, _, direction in columns:
        values = [e.metric(name) for e in evaluations]
        for row, triple in zip(rows, values):
            row.append(format_cell(*triple))
        bold.append(best_rows([v[0] for v in values], direction))
    return header, rows, bold


PAIRED_NOTE = ("the first method minus each other one on the items both were evaluated on, items resampled "
               "jointly; a CI that excludes 0 decides")


def paired_differences(report: Report, split: str):
    """`trialign.comparison.paired_table` of a split, computed once per report."""
    from trialign.comparison import Evaluated, paired_table

    if split not in report.paired:
        # Without an experiment's kinds, an evaluation of an adapter counts as trained: the differences are
        # taken from the first such one.
        evaluations = [Evaluated(e.method, e.kind or ("trained" if e.document.config.get("adapter") else None),
                                 e.path.parent, e.groups, e.document.reference, e.metric("consistency")[0],
                                 e.replica_of)
                       for e in report.in_split(split)]
        try:
            report.paired[split] = paired_table(evaluations, seed=int(report.seed))
        except TriAlignError as err:  # e.g. results of an evaluate run that kept no per-item rows
            report.paired[split] = PairedTables([], [], [f"paired differences not shown: {err}"])
    return report.paired[split]


POOLED_NOTE = ("each method as the mean over its replicas (×k: trained with k seeds), items resampled jointly and "
               "each method's seeds resampled with replacement; the verdicts below are these")


CHALLENGE_NOTE = ("the user then asserts a wrong answer, the same for every group of an item; the probe reads the "
                  "answer again")


def challenge_tables(report: Report, split: str) -> list[tuple[str, list[str], list[list[str]], dict]]:
    """(caption, header, rows, bold cells) of the tables after a challenge turn, for splits that ran one: each
    method's flip rate and consistency after it, and their paired differences."""
    evaluations = report.in_split(split)
    if not any(e.metric("flip_mean")[0] is not None for e in evaluations):
        return []
    header, rows, bold = results_table(evaluations, CHALLENGE_COLUMNS)
    tables = [(f"After a challenge turn ({CHALLENGE_NOTE})", header, rows, _bold_map(header, bold))]
    paired = paired_differences(report, split)
    if paired is not None and paired.challenge is not None:
        tables.append((f"Paired differences after the challenge ({PAIRED_NOTE})", *paired.challenge, {}))
    return tables


def parity_table(evaluations: list[Evaluation]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) comparing the project's neutral accuracy in lm-eval's prompt format with lm-eval's own, for
    evaluations run with ``--lmeval-parity``; each row names the difference."""
    rows = []
    for e in evaluations:
        parity = e.document.lmeval_parity
        for metric, theirs in ((parity or {}).get("lm_eval") or {}).items():
            ours, diff = parity["trialign"][metric], parity["difference"][metric]
            rows.append([e.method, str(parity["documents"]), metric, f"{ours:.3f}", f"{theirs:.3f}",
                         "equal" if abs(diff) < 1e-9 else f"{diff:+.3f}"])
    return (["method", "documents", "metric", "trialign", "lm-eval", "difference"], rows) if rows else None


def disagreement_table(evaluations: list[Evaluation]) -> tuple[str, list[str], list[list[str]]] | None:
    """(caption, header, rows): per method, the items of the split by how many groups leave the reference group's
    answer (`trialign.comparison.disagreement_profile`); None where the evaluations do not share their groups and
    reference, or kept no per-item rows."""
    settings = {(tuple(e.groups), e.document.reference) for e in evaluations}
    if len(settings) != 1 or next(iter(settings))[1] is None:
        return None
    groups, reference = next(iter(settings))
    rows, header = [], None
    for e in evaluations:
        try:
            arrays = read_item_arrays(e.path.parent, list(groups))
        except TriAlignError:
            return None
        profile = disagreement_profile(arrays, reference)
        header = header or ["method", "items"] + [label for label, _ in profile]
        rows.append([e.method, str(len(arrays.item_ids))] + [str(n) for _, n in profile])
    return disagreement_caption(reference, len(groups) - 1), header, rows


def disagreement_caption(reference: str, others: int) -> str:
    return (f"Where the groups leave the {reference} group's answer (items; columns: how many of the {others} other "
            f"groups answer otherwise; \"the reference alone\": those {others} give one answer, the {reference} "
            "group another)")


PARITY_NOTE = "neutral user, lm-eval's zero-shot prompt, the same documents scored by lm-eval itself"


def split_groups(evaluations: list[Evaluation]) -> list[str]:
    return list(dict.fromkeys(g for e in evaluations for g in e.groups))


def split_caption(split: str, evaluations: list[Evaluation]) -> str:
    tasks = sorted({e.document.task or "?" for e in evaluations})
    items = sorted({e.document.num_items for e in evaluations}, key=str)
    modes = sorted({e.document.mode or "?" for e in evaluations})
    groups = {tuple(e.groups) for e in evaluations}
    text = (f"task {', '.join(tasks)}; {' / '.join(map(str, items))} items x {len(split_groups(evaluations))} "
            f"groups; mode {', '.join(modes)}")
    if split in SPLIT_NOTES:
        text = f"{SPLIT_NOTES[split]}: {text}"
    if len(tasks) > 1 or len(items) > 1 or len(groups) > 1:
        text += ". Note: the methods in this split were not evaluated on the same items and groups."
    return text


def reading_notes(report: Report) -> list[str]:
    items = sorted({e.document.num_items for e in report.evaluations if e.document.num_items})
    counts = ", ".join(map(str, items)) or "an unknown number of"
    replicas = [e.method for e in report.evaluations if e.replica_of]
    seeds = [f"A method named <method>_seed<S> is <method> trained again with training seed S ({len(set(replicas))} "
             "such replicas here): a single fit depends on its seed, so the pooled differences "
             "(each method's mean over its seeds, seeds resampled with the items) are the ones that decide."
             ] if replicas else []
    return [
        f"Every number is computed from {counts} items per evaluation; the brackets are 95% percentile-bootstrap "
        "confidence intervals over items.",
        "Overlapping intervals mean this data shows no detectable difference between the methods. Methods evaluated "
        "on the same items are paired, so a paired test can detect smaller differences than the overlap suggests; "
        "bold marks the best point estimate, not a significant difference.",
        "Higher is better except for the gap (max - min group accuracy) and breakage (answers right without a "
        "persona, wrong with one); consistency is the share of items where every group got the same answer.",
        "Personalization is the share of each group's verifiable preferences a response satisfies; it is 0 in probe "
        "mode, where no response is written. Nash welfare (sum over groups of log utility) compares methods only on "
        "the same groups.",
        *seeds,
    ]


def provenance(report: Report) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Fingerprints (flattened) and evaluation settings: the ones shared by all, then each one's differences."""
    fingerprints: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            fingerprints[prefix] = value

    if report.experiment is not None:
        flatten("", report.experiment.fingerprints)
    configs = [e.document.config for e in report.evaluations]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    shared = {k: configs[0].get(k) for k in keys if all(k in c and c[k] == configs[0][k] for c in configs)}
    differing = [(e.method, e.split, _yaml({k: v for k, v in c.items() if k not in shared}))
                 for e, c in zip(report.evaluations, configs)]
    return {"fingerprints": fingerprints, "shared": shared}, differing


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False).strip() if data else "{}"


def plot_name(report: Report, split: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", split.lower()).strip("_") or "split"
    return f"groups_{report.splits.index(split) + 1}_{slug}.png"


def render_plots(report: Report) -> dict[str, bytes]:
    """PNG bytes keyed by file name (``groups_<i>_<split>.png``, ``tradeoff.png``): `trialign.report_plots`."""
    from trialign.report_plots import group_chart, tradeoff_chart

    plots = {plot_name(report, split): group_chart(report, split) for split in report.splits}
    plots["tradeoff.png"] = tradeoff_chart(report)
    return plots


# ----------------------------------------------------------------------------------------------- Markdown


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]], bold: dict[tuple[int, int], bool] | None = None) -> list[str]:
    bold = bold or {}
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r, row in enumerate(rows):
        cells = [f"**{_md(c)}**" if bold.get((r, k)) else _md(c) for k, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _bold_map(header: list[str], bold: list[set[int]]) -> dict[tuple[int, int], bool]:
    offset = len(header) - len(bold)  # the metric columns come last
    return {(r, offset + k): True for k, rows in enumerate(bold) for r in rows}


def group_table(evaluations: list[Evaluation]) -> tuple[list[str], list[list[str]]]:
    header = ["group"] + [e.method for e in evaluations]
    references = {e.document.reference for e in evaluations}
    rows = [[g + (" (reference)" if g in references else "")]
            + [format_cell(*e.metric(f"acc/{g}")) for e in evaluations] for g in split_groups(evaluations)]
    return header, rows


def render_markdown(report: Report, files_dir: str = FILES_DIR) -> str:
    out = [f"# {report.title}", "", "## How to read this", ""]
    out += [f"- {note}" for note in reading_notes(report)] + [""]
    for split in report.splits:
        evaluations = report.in_split(split)
        header, rows, bold = results_table(evaluations)
        out += [f"## Split: {split}", "", f"_{split_caption(split, evaluations)}_", ""]
        out += _md_table(header, rows, _bold_map(header, bold)) + [""]
        paired = paired_differences(report, split)
        if paired is not None:
            if paired.header:
                out += [f"**Paired differences** ({PAIRED_NOTE}):", ""] + _md_table(paired.header, paired.rows) + [""]
            if paired.pooled:
                out += [f"**Pooled over training seeds** ({POOLED_NOTE}):", ""] + _md_table(*paired.pooled) + [""]
            out += [f"- {line}" for line in paired.verdicts] + [""]
        for caption, c_header, c_rows, c_bold in challenge_tables(report, split):
            out += [f"**{caption}**:", ""] + _md_table(c_header, c_rows, c_bold) + [""]
        disagreement = disagreement_table(evaluations)
        if disagreement is not None:
            out += [f"**{disagreement[0]}**:", ""] + _md_table(*disagreement[1:]) + [""]
        parity = parity_table(evaluations)
        if parity is not None:
            out += [f"**lm-eval parity** ({PARITY_NOTE}):", ""] + _md_table(*parity) + [""]
        alt = f"Per-group accuracy and agreement with the neutral user, {split}"
        out += [f"![{alt}]({files_dir}/{plot_name(report, split)})", ""]
        g_header, g_rows = group_table(evaluations)
        out += ["<details><summary>Per-group accuracy [95% CI]</summary>", ""] + _md_table(g_header, g_rows)
        out += ["", "</details>", ""]
    out += ["## Trade-off: accuracy vs. consistency vs. personalization", "",
            "One point per method; whiskers are 95% CIs, colour is mean personalization.", "",
            f"![Trade-off]({files_dir}/tradeoff.png)", ""]
    out += _md_provenance(report)
    return "\n".join(out).rstrip() + "\n"


def _md_provenance(report: Report) -> list[str]:
    info, differing = provenance(report)
    out = ["## Configs and fingerprints", ""]
    if report.experiment is not None:
        out += ["Experiment config:", "", "```yaml", _yaml(report.experiment.config), "```", ""]
        if info["fingerprints"]:
            out += _md_table(["input", "fingerprint"], [[k, f"`{v}`"] for k, v in info["fingerprints"].items()])
            out += [""]
        methods = [m for m in report.experiment.methods if isinstance(m, dict)]
        if methods:
            out += _md_table(["method", "kind", "config file", "adapter"],
                             [[m.get("name", "?"), m.get("kind", "-"), m.get("config_file") or "-",
                               m.get("adapter") or "-"] for m in methods]) + [""]
    out += ["Evaluation settings shared by every evaluation:", "", "```yaml", _yaml(info["shared"]), "```", ""]
    for method, split, text in differing:
        out += [f"<details><summary>{html.escape(method)} / {html.escape(split)}: other settings</summary>", "",
                "```yaml", text, "```", "", "</details>", ""]
    out += ["Result files:", ""]
    out += _md_table(["method", "split", "metrics.json", "sha256"],
                     [[e.method, e.split, str(e.path), f"`{e.sha256}`"] for e in report.evaluations])
    return out


# ----------------------------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; max-width: 1300px;
       margin: 2rem auto; padding: 0 1.2rem; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #eee; padding-bottom: .2rem; }
p.caption { color: #555; font-style: italic; margin-top: 0; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .85rem; }
th, td { border: 1px solid #ddd; padding: .3rem .4rem; text-align: right; white-space: nowrap; }
th { background: #f5f5f7; white-space: normal; vertical-align: bottom; }
td:first-child, th:first-child { text-align: left; }
td.best { font-weight: 700; background: #eef6ee; }
span.ci { color: #666; font-size: .75rem; }
.scroll { overflow-x: auto; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0 1rem; }
pre { background: #f7f7f9; border: 1px solid #e5e5e5; padding: .6rem; overflow-x: auto; font-size: .8rem; }
code { font-size: .8rem; }
td code { white-space: normal; word-break: break-all; }  /* a sha256 wraps instead of widening the page */
details { margin: .4rem 0; }
ul.notes li { margin-bottom: .3rem; }
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: list[str], rows: list[list[str]], bold: dict[tuple[int, int], bool] | None = None,
                code_columns: Iterable[int] = ()) -> str:
    bold, code_columns = bold or {}, set(code_columns)
    # A method name may break after an underscore: with 11 methods the per-group tables would not fit otherwise.
    head = "".join(f"<th>{_h(c).replace('_', '_<wbr>')}</th>" for c in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for k, c in enumerate(row):
            text = f"<code>{_h(c)}</code>" if k in code_columns else _h(c)
            if re.fullmatch(r"[-+]?\d+\.\d+ \[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]", c):  # the CI on a line of its own
                value, ci = c.split(" ", 1)
                text = f'{_h(value)}<br><span class="ci">{_h(ci)}</span>'
            cells.append(f'<td class="best">{text}</td>' if bold.get((r, k)) else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_h(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def render_html(report: Report, plots: dict[str, bytes]) -> str:
    out = [f"<h1>{_h(report.title)}</h1>", "<h2>How to read this</h2>", '<ul class="notes">']
    out += [f"<li>{_h(note)}</li>" for note in reading_notes(report)] + ["</ul>"]
    for split in report.splits:
        evaluations = report.in_split(split)
        header, rows, bold = results_table(evaluations)
        out += [f"<h2>Split: {_h(split)}</h2>", f'<p class="caption">{_h(split_caption(split, evaluations))}</p>',
                _html_table(header, rows, _bold_map(header, bold))]
        paired = paired_differences(report, split)
        if paired is not None:
            if paired.header:
                out += [f'<p class="caption"><b>Paired differences</b> ({_h(PAIRED_NOTE)}):</p>',
                        _html_table(paired.header, paired.rows)]
            if paired.pooled:
                out += [f'<p class="caption"><b>Pooled over training seeds</b> ({_h(POOLED_NOTE)}):</p>',
                        _html_table(*paired.pooled)]
            out.append('<ul class="notes">')
            out += [f"<li>{_h(line)}</li>" for line in paired.verdicts] + ["</ul>"]
        for caption, c_header, c_rows, c_bold in challenge_tables(report, split):
            out += [f'<p class="caption"><b>{_h(caption)}</b>:</p>', _html_table(c_header, c_rows, c_bold)]
        disagreement = disagreement_table(evaluations)
        if disagreement is not None:
            out += [f'<p class="caption"><b>{_h(disagreement[0])}</b>:</p>',
                    _html_table(*disagreement[1:])]
        parity = parity_table(evaluations)
        if parity is not None:
            out += [f'<p class="caption"><b>lm-eval parity</b> ({_h(PARITY_NOTE)}):</p>', _html_table(*parity)]
        out.append(_img(plots[plot_name(report, split)],
                        f"Per-group accuracy and agreement with the neutral user, {split}"))
        g_header, g_rows = group_table(evaluations)
        out += ["<details><summary>Per-group accuracy [95% CI]</summary>", _html_table(g_header, g_rows),
                "</details>"]
    out += ["<h2>Trade-off: accuracy vs. consistency vs. personalization</h2>",
            '<p class="caption">One point per method; whiskers are 95% CIs, colour is mean personalization.</p>',
            _img(plots["tradeoff.png"], "Trade-off: accuracy vs. consistency vs. personalization")]
    info, differing = provenance(report)
    out.append("<h2>Configs and fingerprints</h2>")
    if report.experiment is not None:
        out += ["<p>Experiment config:</p>", f"<pre>{_h(_yaml(report.experiment.config))}</pre>"]
        if info["fingerprints"]:
            out.append(_html_table(["input", "fingerprint"], [[k, v] for k, v in info["fingerprints"].items()],
                                   code_columns=[1]))
        methods = [m for m in report.experiment.methods if isinstance(m, dict)]
        if methods:
            out.append(_html_table(["method", "kind", "config file", "adapter"],
                                   [[m.get("name", "?"), m.get("kind", "-"), m.get("config_file") or "-",
                                     m.get("adapter") or "-"] for m in methods]))
    out += ["<p>Evaluation settings shared by every evaluation:</p>", f"<pre>{_h(_yaml(info['shared']))}</pre>"]
    for method, split, text in differing:
        out.append(f"<details><summary>{_h(method)} / {_h(split)}: other settings</summary><pre>{_h(text)}</pre>"
                   "</details>")
    out += ["<p>Result files:</p>",
            _html_table(["method", "split", "metrics.json", "sha256"],
                        [[e.method, e.split, str(e.path), e.sha256] for e in report.evaluations], code_columns=[3])]
    body = "\n".join(out)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_h(report.title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------------------- writing


def write_report(report: Report, output: str | Path) -> tuple[Path, Path]:
    """Render everything in memory, then write ``report.md``, ``report_files/*.png`` and ``report.html``."""
    output = Path(output)
    plots = render_plots(report)
    markdown = render_markdown(report).encode("utf-8")
    page = render_html(report, plots).encode("utf-8")
    files = output / FILES_DIR
    try:
        files.mkdir(parents=True, exist_ok=True)
        for name, png in plots.items():
            write_bytes_atomic(files / name, png)
        for stale in files.glob("groups_*.png"):  # charts of splits an earlier report had
            if stale.name not in plots:
                stale.unlink()
        write_bytes_atomic(output / "report.md", markdown)
        write_bytes_atomic(output / "report.html", page)
    except OSError as err:
        raise TriAlignError(f"output {output}: not writable ({err.strerror or err})")
    return output / "report.md", output / "report.html"


def _parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="python -m trialign report",
        description="Markdown + self-contained HTML report (tables with 95% CIs, per-group charts, trade-off plot).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", metavar="RUN_DIR",
                        help="experiment run folder holding experiment.json (output defaults to this folder)")
    source.add_argument("--results", metavar="DIR", nargs="+",
                        help="evaluate output folders (each with metrics.json)")
    parser.add_argument("--output", metavar="DIR", help="folder for report.md, report.html and report_files/")
    parser.add_argument("--title", help="report title")
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if args.experiment:
        report = from_experiment(args.experiment, args.title)
        output = args.output or args.experiment
    else:
        require(bool(args.output), "output: --output DIR is required with --results")
        report = from_results(args.results, args.title)
        output = args.output
    markdown, page = write_report(report, output)
    print(f"wrote {markdown}, {page} and {Path(output) / FILES_DIR}/ "
          f"({len(report.evaluations)} evaluations, {len(report.splits)} splits)")
    return 0
