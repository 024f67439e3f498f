"""`trialign evaluate`: the truth-consistency audit of a model under every persona.

For each item and each social group the model is asked the same objective question with the group's persona.

* ``--mode probe`` scores the answer directly: after the persona and question, the assistant turn is opened with
  "Final answer:" and the answer probe picks the option with the highest log-likelihood (free-form items: a short
  greedy answer).
* ``--mode generate`` first generates a personalized response per (item, group), then probes the answer after it
  (as the rollout environment does) and checks the group's verifiable preferences on the response.
* ``--challenge`` (generate mode) then has the user push back: a challenge turn asserting a wrong answer in the
  group's voice (`trialign.rollout.simulator`, as the rollout's episodes challenge; the same wrong answer for every
  group of an item, so the groups face the same pushback), after which the probe reads the
  answer again. The flip rate (`FlipRate`: answers changed by the challenge, per group and pooled) and the
  consistency after the challenge go to metrics.json: consistency must survive pushback.

Reports per-group accuracy, worst-group accuracy, the accuracy gap and std, the consistency rate, the
consistent-and-correct rate, breakage against the no-persona reference group (PERG), personalization and Nash
welfare, each with a percentile-bootstrap 95% CI over items. Writes ``metrics.json`` and ``per_item.jsonl`` to the
output folder and logs the same numbers to TensorBoard.

Training-free baselines are evaluate settings: ``--system-prompt same_answer`` (the "same factual answer for
everyone" prompt). Where the paper is silent we chose: utility U_g for Nash welfare is the per-item reward
truth + alpha * personalization (personalization is 0 in probe mode, where no response is written).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from trialign.backbone import DEFAULT_MODEL, load_model_and_tokenizer
from trialign.config_io import build_dataclass, collect_settings, settings_parser
from trialign.errors import TriAlignError, require
from trialign.prompts import DEFAULT_PROBE_TEMPLATE, probe_template
from trialign.fileio import write_jsonl_atomic
from trialign.metric_names import SUMMARY_METRICS
from trialign.results import EvaluationResult

if TYPE_CHECKING:
    from trialign.trunk_cache import TrunkCache

log = logging.getLogger(__name__)

MODES = ("probe", "generate")
PIPELINES = ("direct", "pref_aligner")
PROBE_PRECISIONS = ("auto", "float32", "autocast", "bfloat16")


def check_probe_precision(precision: str, recheck: float) -> None:
    """One-line errors for the probe's `probe_precision` and `probe_recheck` settings (`evaluate`, `experiment`)."""
    require(precision in PROBE_PRECISIONS,
            f"probe_precision: expected one of {', '.join(PROBE_PRECISIONS)}, got '{precision}'")
    require(isinstance(recheck, (int, float)) and not isinstance(recheck, bool) and recheck >= 0,
            f"probe_recheck: expected >= 0 nats, got {recheck!r}")


def resolve_probe_precision(precision: str, device: "str | torch.device" = "cpu") -> str:
    """`EvaluateConfig.probe_precision` as the probe runs it: ``auto`` is ``bfloat16`` where bf16 is native on
    `device` (`trialign.backbone.native_bf16`: detected at run time), else ``float32``; the others as given."""
    if precision != "auto":
        return precision
    from trialign.backbone import native_bf16

    return "bfloat16" if native_bf16(device) else "float32"


@dataclass
class EvaluateConfig:
    """Settings of `trialign evaluate` (YAML keys and command-line flags share these names)."""

    model: str = DEFAULT_MODEL
    """Model source: hub id, local HF directory, .gguf file, or the embedded alias."""
    adapter: str | None = None
    """Optional PEFT adapter directory (a trained TriAlign policy) applied on top of `model`."""
    task: str = "truthfulqa_mc1"
    """Benchmark task name (see `trialign.tasks.TASK_NAMES`), `local` with `task_path`, or `lmeval:<task>` (any
    lm-evaluation-harness task; `trialign.tasks.lmeval`)."""
    task_path: str | None = None
    """File of a `local` task (JSONL/CSV with question, options, answer), or for `lmeval:<task>` the folder of your
    own lm-eval task YAML files (lm-eval's include path; `trialign.tasks.lmeval`)."""
    task_source: str = "local"
    """Where benchmark data comes from: `local` (copies shipped with trialign) or `hub`."""
    limit: int | None = 100
    """Number of items (the first N in the task's stable order, after `offset`); null for all."""
    offset: int = 0
    """Items skipped before the first one evaluated (e.g. those a rollout used for training)."""
    groups: str = "default"
    """Group file: a YAML path or a bundled name (`default`, `heldout`)."""
    group_ids: list[str] | None = None
    """Subset of group ids to evaluate; null for all groups in the file."""
    mode: str = "probe"
    """`probe` (answer scored directly) or `generate` (personalized response first, then the probe)."""
    expression: str = "explicit"
    """How the persona is expressed: `explicit` self-description or `implicit` cues."""
    system_prompt: str = "none"
    """`none`, `same_answer` (the training-free "same answer for everyone" baseline), or a literal prompt."""
    probe_template: str = DEFAULT_PROBE_TEMPLATE
    """How items are asked and where the probe reads the answer (`trialign.prompts.PROBE_TEMPLATES`); evaluate a
    trained adapter with the template of its rollout."""
    pipeline: str = "direct"
    """`direct` (answer under the persona) or `pref_aligner` (Okite et al. 2025: a persona-free draft, then a second
    pass rewrites it in the group's style keeping the answer; needs `mode: generate`)."""
    batch_size: int = 32
    """Contexts per probe batch (all options of a context are scored together)."""
    challenge: bool = False
    """After the response (`mode: generate`), a user turn asserting a wrong answer, and the probe again: metrics
    flip/<group>, flip_mean and consistency_after_challenge."""
    max_new_tokens: int = 96
    """Length limit of generated responses in `generate` mode."""
    dtype: str = "float32"
    """Model weights dtype."""
    autocast: bool | None = None
    """bf16 autocast for generating responses; null (the default): on where bf16 is native (a CPU with AVX512-BF16
    or AMX, a bf16 GPU: `trialign.backbone.native_bf16`), off elsewhere, where it would be slower. metrics.json
    records the value used."""
    probe_precision: str = "auto"
    """How the answer probe scores options: ``float32`` (the model's weights), ``autocast`` (bf16 autocast),
    ``bfloat16`` (a bf16 copy of the weights) or ``auto`` (the default: ``bfloat16`` where bf16 is native, as for
    `autocast`, else ``float32``). An answer is an argmax over option log-likelihoods, and bf16 moves them by more
    than rounding; `probe_recheck` scores near ties again in float32, so that the decisions stay float32's
    (`benchmarks/bench_probe_bf16.py` measures the agreement and the speed-up on this machine). metrics.json records
    the value used."""
    probe_recheck: float = 0.2
    """With a reduced `probe_precision`: contexts whose two best options are closer than this many nats are scored
    again in the model's weights (`trialign.probe.AnswerProbe`'s `recheck_margin`); 0 keeps every bf16 decision."""
    lmeval_parity: bool = False
    """For an `lmeval:<task>` (probe mode): also score the same documents with lm-eval itself and, beside it, the
    project's scorer in lm-eval's prompt format (no chat template, no persona); metrics.json's `lmeval_parity` holds
    both `acc` and `acc_norm` and their differences."""
    alpha: float = 0.5
    """Weight of personalization in the reward/utility: r = truth + alpha * pers."""
    bootstrap: int = 1000
    """Bootstrap resamples over items for the 95% confidence intervals (0 disables CIs)."""
    seed: int = 0
    """Seed for option shuffling and the bootstrap."""
    output: str = "runs/audit"
    """Output folder for metrics.json, per_item.jsonl and TensorBoard events."""
    overwrite: bool = False
    """Replace results already in `output` (otherwise an existing metrics.json is an error)."""
    label: str | None = None
    """Name of this evaluated method in reports (defaults to the model and system prompt)."""
    cache_dir: str | None = None
    """Where converted GGUF models are cached (default: $TRIALIGN_CACHE or ~/.cache/trialign)."""

    def __post_init__(self) -> None:
        require(self.limit is None or self.limit > 0, f"limit: expected a positive integer, got {self.limit}")
        require(self.offset >= 0, f"offset: expected a non-negative integer, got {self.offset}")
        require(self.mode in MODES, f"mode: expected one of {', '.join(MODES)}, got '{self.mode}'")
        require(self.pipeline in PIPELINES, f"pipeline: expected one of {', '.join(PIPELINES)}, got '{self.pipeline}'")
        require(self.pipeline != "pref_aligner" or self.mode == "generate",
                "pipeline: pref_aligner writes a response and rewrites it, so it needs mode 'generate'")
        require(not self.challenge or self.mode == "generate",
                "challenge: the user pushes back on a response, so it needs mode 'generate'")
        require(self.expression in ("explicit", "implicit"),
                f"expression: expected 'explicit' or 'implicit', got '{self.expression}'")
        probe_template(self.probe_template)
        require(self.batch_size > 0, f"batch_size: expected a positive integer, got {self.batch_size}")
        check_probe_precision(self.probe_precision, self.probe_recheck)
        require(self.max_new_tokens > 0, f"max_new_tokens: expected a positive integer, got {self.max_new_tokens}")
        require(self.bootstrap >= 0, f"bootstrap: expected >= 0 resamples, got {self.bootstrap}")
        require(self.alpha >= 0, f"alpha: expected >= 0, got {self.alpha}")
        require(bool(self.output), "output: expected a folder path")


def _parser() -> argparse.ArgumentParser:
    return settings_parser(EvaluateConfig, "python -m trialign evaluate",
                           "Audit truth accuracy and cross-group consistency of a model under social-group personas.",
                           "YAML file of settings (see configs/audit/; flags override it)")


def parse_config(argv: Sequence[str]) -> EvaluateConfig:
    values, source = collect_settings(_parser().parse_args(list(argv)), "evaluate")
    return build_dataclass(EvaluateConfig, values, source)


def _prepare_output(config: EvaluateConfig) -> Path:
    out = Path(config.output)
    if (out / "metrics.json").exists() and not config.overwrite:
        raise TriAlignError(f"output {out}: already holds metrics.json; pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test", delete=True)
        probe_file.close()
    except OSError as err:
        raise TriAlignError(f"output {out}: not writable ({err.strerror or err})")
    return out


@dataclass
class AuditRecords:
    """Per (item, group) outcomes of an audit, as [N items, G groups] arrays plus the raw rows."""

    group_names: list[str]
    reference: str | None
    correct: np.ndarray
    """bool [N, G]: the probed answer is correct."""
    answers: np.ndarray
    """int [N, G]: answer ids, equal within an item iff the answers are the same."""
    personalization: np.ndarray
    """float [N, G]: fraction of the group's preferences satisfied (0 in probe mode)."""
    utility: np.ndarray
    """float [N, G]: truth + alpha * personalization."""
    rows: list[dict] = field(default_factory=list)
    answers_after: np.ndarray | None = None
    """int [N, G]: answer ids after the challenge turn (`challenge`), comparable with `answers`; else None."""
    challenged: np.ndarray | None = None
    """bool [N, G]: the (item, group) was challenged (the item has a wrong answer to assert)."""
    rechecked: int = 0
    """Probe contexts scored again in float32 (`EvaluateConfig.probe_recheck`); 0 in float32."""


def run_audit(config: EvaluateConfig, model, tokenizer, items, groups, progress: bool = True,
              trunk_cache: "TrunkCache | None" = None) -> AuditRecords:
    """Ask every item under every group's persona and read the answers with the probe."""
    from trialign.comparison import records_from_rows
    from trialign.generation import generate_texts
    from trialign.preferences import preference_score
    from trialign.probe import AnswerProbe, render_context
    from trialign.groups import Group, reference_group
    from trialign.prompts import build_messages, build_rewrite_messages, resolve_system_prompt

    system_prompt = resolve_system_prompt(config.system_prompt)
    template = probe_template(config.probe_template)
    pairs = [(item, group) for item in items for group in groups]
    messages = [build_messages(item, group, expression=config.expression, system_prompt=system_prompt,
                               template=template)
                for item, group in pairs]
    responses: list[str | None] = [None] * len(pairs)

    def generate(chats: list[list[dict[str, str]]]) -> list[str]:
        prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chats]
        return list(generate_texts(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                                   batch_size=config.batch_size, autocast=config.autocast, progress=progress))

    drafts: dict[str, str] = {}
    if config.pipeline == "pref_aligner":
        # Pass 1: one persona-free draft per item (the reference group's prompt); pass 2: each persona rewrites it.
        neutral = Group(id="draft", name="persona-free draft", reference=True)
        drafts = dict(zip([item.id for item in items],
                          generate([build_messages(item, neutral, system_prompt=system_prompt, template=template)
                                    for item in items])))
        rewrite = [k for k, (_, group) in enumerate(pairs) if not group.reference]
        rewritten = generate([build_rewrite_messages(pairs[k][0], pairs[k][1], drafts[pairs[k][0].id],
                                                     expression=config.expression, system_prompt=system_prompt)
                              for k in rewrite])
        responses = [drafts[item.id] for item, _ in pairs]
        for k, text in zip(rewrite, rewritten):
            responses[k] = text
    elif config.mode == "generate":
        responses = list(generate(messages))
    contexts = [render_context(tokenizer, m, response=r, answer_prefix=template.answer_prefix)
                for m, r in zip(messages, responses)]
    probe = AnswerProbe(model, tokenizer, batch_size=config.batch_size,
                        precision=resolve_probe_precision(config.probe_precision, next(model.parameters()).device),
                        recheck_margin=config.probe_recheck, trunk_cache=trunk_cache)
    g = len(groups)

    def probe_all(contexts: list[str], desc: str) -> list:
        # Group by group: contexts of one group share their persona prefix, which the probe runs once per batch.
        order = sorted(range(len(pairs)), key=lambda k: (k % g, k // g))
        results: list = [None] * len(pairs)
        chunk = max(config.batch_size * 4, 1)
        with tqdm(total=len(pairs), desc=desc, unit="ctx", disable=not progress) as bar:
            for start in range(0, len(order), chunk):
                part = order[start : start + chunk]
                for k, result in zip(part, probe.answer([pairs[k][0] for k in part], [contexts[k] for k in part])):
                    results[k] = result
                bar.update(len(part))
        return results

    results = probe_all(contexts, "probe")
    rows = []
    for (item, group), result, response in zip(pairs, results, responses):
        rows.append({
            "item_id": item.id, "group": group.id, "answer": result.answer,
            "canonical": item.canonical_answer(result.answer), "correct": bool(result.correct), "gold": item.gold,
            "personalization": float(preference_score(response, group.preferences)) if response is not None else None,
            "option_logprobs": [round(x, 4) for x in result.option_logprobs],
            "response": response,
            **({"draft": drafts[item.id]} if drafts else {}),
        })
    if config.challenge:
        from trialign.rollout.simulator import UserSimulator

        # Every group of an item is told the same wrong answer (in its own voice), so the consistency after the
        # challenge compares the groups under the same pushback (`trialign.rollout.simulator`).
        simulator = UserSimulator({"challenge": 1.0}, seed=config.seed, claims="item")
        turns = [simulator.turn(item, group, 0, 1) for item, group in pairs]
        pushed = [[*m, {"role": "assistant", "content": r}, {"role": "user", "content": t.text}]
                  for m, r, t in zip(messages, responses, turns)]
        after = probe_all([render_context(tokenizer, m, answer_prefix=template.answer_prefix) for m in pushed],
                          "probe after challenge")
        for row, (item, _), turn, result in zip(rows, pairs, turns, after):
            row.update(challenge=turn.text if turn.kind == "challenge" else None, answer_after_challenge=result.answer,
                       canonical_after_challenge=item.canonical_answer(result.answer),
                       correct_after_challenge=bool(result.correct))
    # The arrays come from the rows through the one reader of per_item.jsonl (the report's paired differences
    # read the same rows back).
    arrays = records_from_rows(rows, [grp.id for grp in groups])
    reference = getattr(reference_group(groups), "id", None)
    return AuditRecords(
        group_names=arrays.group_names, reference=reference, correct=arrays.correct, answers=arrays.answers,
        personalization=arrays.personalization, utility=arrays.correct + config.alpha * arrays.personalization,
        rows=rows, answers_after=arrays.answers_after, challenged=arrays.challenged, rechecked=probe.rechecked,
    )


def summarize(records: AuditRecords, n_resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """Every audit metric with its percentile-bootstrap 95% CI over items: ``{name: {value, ci_low, ci_high}}``."""
    from trialign.functional import audit_summary
    from trialign.stats import bootstrap_ci

    data = {"correct": records.correct, "answers": records.answers,
            "personalization": records.personalization, "utility": records.utility}
    if records.answers_after is not None:
        data.update(answers_before=records.answers, answers_after=records.answers_after,
                    challenged=records.challenged)
    statistic = lambda arrays: audit_summary(arrays, records.group_names, records.reference)  # noqa: E731
    if n_resamples > 0:
        cis = bootstrap_ci(statistic, data, n_resamples=n_resamples, seed=seed, vectorized=True)
        return {k: {"value": p, "ci_low": lo, "ci_high": hi} for k, (p, lo, hi) in cis.items()}
    point = statistic({k: torch.as_tensor(v) for k, v in data.items()})
    return {k: {"value": float(v), "ci_low": float("nan"), "ci_high": float("nan")} for k, v in point.items()}


SUMMARY_ROWS = [(m.key, m.long) for m in SUMMARY_METRICS]


def add_group_means(metrics: dict[str, dict[str, float]], records: AuditRecords, n_resamples: int, seed: int) -> None:
    """Mean accuracy / personalization over groups, with CIs, for the summary table."""
    from trialign.stats import bootstrap_ci

    data = {"correct": records.correct.astype(np.float64), "pers": records.personalization}
    stat = lambda a: {"acc_mean": a["correct"].mean(axis=(-1, -2)),
                      "personalization_mean": a["pers"].mean(axis=(-1, -2))}
    if n_resamples > 0:
        for k, (p, lo, hi) in bootstrap_ci(stat, data, n_resamples=n_resamples, seed=seed, vectorized=True).items():
            metrics[k] = {"value": p, "ci_low": lo, "ci_high": hi}
    else:
        for k, v in stat(data).items():
            metrics[k] = {"value": float(v), "ci_low": float("nan"), "ci_high": float("nan")}


def format_report(metrics: dict[str, dict[str, float]], records: AuditRecords) -> str:
    def cell(name: str) -> str:
        m = metrics.get(name)
        if m is None or m["value"] is None or not math.isfinite(m["value"]):
            return "   n/a"
        if math.isfinite(m["ci_low"]):
            return f"{m['value']:6.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
        return f"{m['value']:6.3f}"

    width = max(len(g) for g in records.group_names)
    lines = [f"{'group':<{width}}  {'accuracy [95% CI]':<24}  {'breakage [95% CI]':<24}  personalization"]
    for g in records.group_names:
        tag = " (reference)" if g == records.reference else ""
        lines.append(f"{g:<{width}}  {cell('acc/' + g):<24}  {cell('breakage/' + g) if not tag else '   -':<24}"
                     f"  {cell('personalization/' + g)}{tag}")
    lines.append("")
    lines.extend(f"{label:<44} {cell(key)}" for key, label in SUMMARY_ROWS if key in metrics)
    return "\n".join(lines)


def lmeval_parity(config: EvaluateConfig, model, tokenizer, items) -> dict:
    """lm-eval's own ``acc``/``acc_norm`` on `items`' documents, and the project's scorer (`AnswerProbe`) on the same
    documents in lm-eval's prompt format, with their differences (trialign − lm-eval)."""
    from trialign.probe import AnswerProbe, option_accuracy
    from trialign.tasks.lmeval import is_lmeval_task, lmeval_accuracy, lmeval_context

    require(is_lmeval_task(config.task), f"lmeval_parity: needs an lmeval:<task>, got task {config.task!r}")
    require(config.mode == "probe", "lmeval_parity: lm-eval scores options after its own prompt; use mode probe")
    require(all(item.has_options for item in items),
            f"lmeval_parity: task {config.task} is not multiple_choice; lm-eval's acc is defined on options only")
    started = time.perf_counter()
    scores = AnswerProbe(model, tokenizer, batch_size=config.batch_size).score_options(
        [lmeval_context(item) for item in items], [list(item.options) for item in items])
    ours = option_accuracy(scores, items)
    theirs = lmeval_accuracy(model, tokenizer, config.task, [item.meta["doc_id"] for item in items],
                             include_path=config.task_path, batch_size=config.batch_size)
    return {"documents": len(items), "trialign": ours, "lm_eval": theirs,
            "difference": {k: ours[k] - theirs[k] for k in theirs},
            "seconds": round(time.perf_counter() - started, 2)}


def format_parity(parity: dict) -> str:
    """The parity check in a few lines, naming any difference."""
    lines = [f"lm-eval parity on {parity['documents']} documents (neutral, lm-eval's zero-shot prompt; "
             f"{parity.get('seconds', 0):.0f} s):"]
    for metric, theirs in parity["lm_eval"].items():
        ours, diff = parity["trialign"][metric], parity["difference"][metric]
        verdict = "equal" if abs(diff) < 1e-9 else f"differs by {diff:+.4f}"
        lines.append(f"  {metric:<8} trialign {ours:.4f}  lm-eval {theirs:.4f}  {verdict}")
    return "\n".join(lines)


def log_tensorboard(out: Path, metrics: dict[str, dict[str, float]], label: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(out / "tensorboard")) as writer:
        for name, m in metrics.items():
            if m["value"] is not None and math.isfinite(m["value"]):
                writer.add_scalar(f"audit/{name}", m["value"], global_step=0)
        writer.add_text("audit/method", label, global_step=0)


def evaluate(config: EvaluateConfig, progress: bool = True, trunk_cache: "TrunkCache | None" = None
             ) -> EvaluationResult:
    """Run the audit described by `config`; returns what it writes to ``metrics.json``."""
    from trialign.groups import load_groups, select_groups
    from trialign.tasks import load_task

    out = _prepare_output(config)
    items = load_task(config.task, limit=None if config.limit is None else config.offset + config.limit,
                      seed=config.seed, source=config.task_source, path=config.task_path)[config.offset:]
    require(len(items) > 0, f"offset: task {config.task} has no items after the first {config.offset}")
    groups = load_groups(config.groups)
    if config.group_ids:
        groups = select_groups(groups, config.group_ids)
    started = time.perf_counter()
    if config.autocast is None:
        from trialign.backbone import native_bf16

        config = dataclasses.replace(config, autocast=config.mode == "generate" and native_bf16())
    model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype, cache_dir=config.cache_dir)
    if config.adapter:
        from trialign.backbone import load_adapter

        model = load_adapter(model, config.adapter)
    device = next(model.parameters()).device
    config = dataclasses.replace(config, probe_precision=resolve_probe_precision(config.probe_precision, device))
    log.info("audit: %d items x %d groups, mode=%s, model=%s", len(items), len(groups), config.mode, config.model)
    records = run_audit(config, model, tokenizer, items, groups, progress=progress, trunk_cache=trunk_cache)
    elapsed = time.perf_counter() - started
    metrics = summarize(records, config.bootstrap, config.seed)
    add_group_means(metrics, records, config.bootstrap, config.seed)
    label = config.label or (config.model + ("" if config.system_prompt == "none" else f" + {config.system_prompt}")
                             + ("" if config.pipeline == "direct" else f" + {config.pipeline}"))
    parity = lmeval_parity(config, model, tokenizer, items) if config.lmeval_parity else None
    result = EvaluationResult(label=label, config=dataclasses.asdict(config), task=config.task,
                              num_items=len(items), groups=records.group_names, reference=records.reference,
                              mode=config.mode, seconds=round(elapsed, 2), metrics=metrics, lmeval_parity=parity,
                              probe_rechecked=records.rechecked)
    write_jsonl_atomic(out / "per_item.jsonl", records.rows)
    result.write(out)
    log_tensorboard(out, metrics, label)
    print(f"\n{label} | {config.task} | {len(items)} items x {len(groups)} groups | mode={config.mode} | "
          f"{elapsed:.0f} s\n")
    print(format_report(metrics, records))
    if parity is not None:
        print("\n" + format_parity(parity))
    print(f"\nwrote {out / 'metrics.json'}, {out / 'per_item.jsonl'}, {out / 'tensorboard'}")
    return result


def main(argv: Sequence[str]) -> int:
    evaluate(parse_config(argv))
    return 0
