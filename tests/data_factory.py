"""Small synthetic rollout datasets in the exact schema of `trialign.rollout.schema`, for tests.

`write_synthetic_rollout(path, ...)` writes what `python -m trialign rollout` writes: Parquet shards ``*.parquet``
(through HF `datasets`, with the schema's features) plus ``manifest.json`` (through `trialign.rollout.manifest`,
as the rollout writes it).
`synthetic_rows` and `write_rollout_rows` are the two halves, so a test can damage rows before writing them.

Texts are varied on purpose (leading spaces, newlines, digits, punctuation, an accented letter) so tokenization
round trips are tested on more than plain ASCII words. Numbers are consistent: ``reward = truth + alpha * pers`` and
``ret`` is the discounted return of the episode's rewards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trialign.rollout.manifest import RolloutManifest, ShardEntry, write_manifest
from trialign.rollout.schema import features

USER_KINDS_AFTER_FIRST = ("challenge", "reexplain", "reminder")
_WORDS = ("the", "answer", "is", "clearly", "because", "we", "know", "that", "facts", "café", "2", "+", "3", "=",
          "5.", "Step", "1:", "first,", "note", "evidence", "shows", "so", "overall", "(see", "below)")


def _group_names(groups: int | Sequence[str]) -> list[str]:
    if isinstance(groups, int):
        return ["reference"] + [f"group{g}" for g in range(1, groups)]
    return list(groups)


def _assistant_text(rng: np.random.Generator, answer: str, words_range: tuple[int, int] = (3, 14)) -> str:
    words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(*words_range)))]
    cut = int(rng.integers(1, len(words)))
    body = " ".join(words[:cut]) + ("\n" if rng.random() < 0.5 else " ") + " ".join(words[cut:])
    prefix = " " if rng.random() < 0.2 else ""
    return f"{prefix}{body} So: {answer}."


def _returns(rewards: list[float], gamma: float) -> list[float]:
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def synthetic_rows(
    items: int = 4,
    groups: int | Sequence[str] = 3,
    samples: int = 2,
    turns: int = 2,
    seed: int = 0,
    with_options: bool = True,
    free_form: int = 0,
    alpha: float = 0.5,
    gamma: float = 0.9,
    states: int = 0,
    assistant_words: tuple[int, int] = (3, 14),
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (one per item) and the group ids. With `with_options`, the last `free_form` items are free-form
    (numeric); without it, every item is free-form. The last `states` items are cross-group state rows (kind
    "state": each group's s_0 and a probe reading there, no episodes); their values come from a generator of their
    own, so adding states leaves the other rows unchanged. An assistant message has `assistant_words` [low, high) words
    and its answer."""
    rng = np.random.default_rng(seed)
    names = _group_names(groups)
    rows = []
    for i in range(items):
        is_option = with_options and i < items - free_form
        if is_option:
            options = [f"City {chr(65 + o)}{i}" for o in range(int(rng.integers(2, 5)))]
            gold_index = int(rng.integers(0, len(options)))
            gold_text, answer_type, correct = options[gold_index], "option", [gold_index]
            question = f"Which city is the capital of country {i}?"
            shown = question + "\n" + "\n".join(f"- {o}" for o in options)
        else:
            options, gold_index, correct = [], -1, []
            gold_text, answer_type = str(int(rng.integers(2, 99))), "numeric"
            question = f"What is {gold_text} times 1?"
            shown = question
        group_rows = []
        is_state = i >= items - states
        state_rng = np.random.default_rng([seed, i, 7])
        for g, name in enumerate(names):
            episodes = []
            first_user = shown if name == "reference" else f"I am a member of {name}.\n\n{shown}"
            logliks = [float(-state_rng.uniform(1, 20)) for _ in options]
            picked = int(np.argmax(logliks)) if options else None
            state = {"user": first_user, "answer": str(picked) if options else gold_text,
                     "option_logprobs": logliks, "gold_logprob": float(-state_rng.uniform(0.1, 5)),
                     "truth": int(picked == gold_index) if options else 1}
            for k in range(0 if is_state else samples):
                rewards, turn_rows = [], []
                for t in range(turns):
                    if t == 0:
                        user = shown if name == "reference" else f"I am a member of {name}.\n\n{shown}"
                        kind = "question"
                    else:
                        kind = USER_KINDS_AFTER_FIRST[(t - 1) % len(USER_KINDS_AFTER_FIRST)]
                        user = f"({kind}) Are you sure? I read it is {options[0] if options else '7'}."
                    chosen = int(rng.integers(0, len(options))) if options else None
                    answer = str(chosen) if options else str(int(rng.integers(2, 99)))
                    truth = int(chosen == gold_index) if options else int(answer == gold_text)
                    pers = float(np.float32(rng.random()))
                    reward = float(np.float32(truth + alpha * pers))
                    rewards.append(reward)
                    text = _assistant_text(rng, options[chosen] if options else answer, assistant_words)
                    turn_rows.append({
                        "user": user, "user_kind": kind, "assistant": text, "answer": answer,
                        "option_logprobs": [float(-rng.uniform(1, 20)) for _ in options],
                        "gold_logprob": float(-rng.uniform(0.1, 5)), "truth": truth, "pers": pers,
                        "reward": reward, "ret": 0.0, "behavior_logprob": float(-rng.uniform(5, 60)),
                        "num_tokens": len(text.split()),
                    })
                for turn, ret in zip(turn_rows, _returns(rewards, gamma)):
                    turn["ret"] = ret
                episodes.append({"sample": k, "turns": turn_rows})
            group_rows.append({
                "group": name,
                "system": "" if g % 2 == 0 else "You are a helpful assistant. Adapt your style to the user.",
                "expression": "explicit" if g % 3 else "implicit",
                "preferences": [] if name == "reference" else ["concise"],
                "state": state,
                "episodes": episodes,
            })
        rows.append({
            "item_id": f"synthetic/{i:04d}", "task": "synthetic", "question": question, "context": "",
            "options": options, "gold_index": gold_index, "correct_options": correct, "gold_text": gold_text,
            "answer_type": answer_type, "kind": "state" if is_state else "episodes", "groups": group_rows,
        })
    return rows, names


def write_rollout_rows(
    path: str | Path,
    rows: list[dict[str, Any]],
    group_ids: Sequence[str] | None,
    shards: int = 2,
    manifest: dict[str, Any] | None = None,
    typed: bool = True,
) -> Path:
    """Write `rows` as `shards` Parquet files (contiguous slices) and a manifest (skipped when `group_ids` is None)
    through `trialign.rollout.manifest`, as the rollout does; `manifest` overrides fields of `RolloutManifest`.

    `typed=True` writes through HF `datasets` with the schema's features, as the rollout does; `typed=False` lets
    pyarrow infer types (so a test can write a wrong type or leave a column out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), max(1, shards) + 1).astype(int)
    names = []
    for s in range(max(1, shards)):
        part = rows[bounds[s]: bounds[s + 1]]
        name = f"shard-{s:05d}.parquet"
        if typed and not part:  # datasets cannot build an empty Dataset from a list
            pq.write_table(features().arrow_schema.empty_table(), out / name)
        elif typed:
            Dataset.from_list(part, features=features()).to_parquet(str(out / name))
        else:
            pq.write_table(pa.Table.from_pylist(part), out / name)
        names.append(name)
    if group_ids is not None:
        ids = [[row["item_id"] for row in rows[bounds[s]: bounds[s + 1]]] for s in range(len(names))]
        fields = {"config": {}, "model_source": "synthetic", "group_ids": list(group_ids), "num_files": len(names),
                  "counts": {"items": sum(r.get("kind") != "state" for r in rows),
                             "states": sum(r.get("kind") == "state" for r in rows), "groups": len(group_ids)},
                  "complete": True,
                  "shards": [ShardEntry(s, name, len(i), i) for s, (name, i) in enumerate(zip(names, ids))]}
        write_manifest(out, RolloutManifest(**{**fields, **(manifest or {})}))
    return out


NO_TASK_VALIDATION = ("--data.val_task", "null")
"""Arguments that turn off the shipped configs' validation on TruthfulQA items: a synthetic rollout's groups are not
personas that `trialign.groups` can render (tests of `val_task` use real persona ids)."""


def write_synthetic_rollout(
    path: str | Path,
    items: int = 4,
    groups: int | Sequence[str] = 3,
    samples: int = 2,
    turns: int = 2,
    seed: int = 0,
    with_options: bool = True,
    free_form: int = 0,
    shards: int = 2,
    config: dict[str, Any] | None = None,
    states: int = 0,
    assistant_words: tuple[int, int] = (3, 14),
) -> Path:
    """A complete synthetic rollout folder at `path` (see `synthetic_rows` for the arguments); returns the folder.
    `config` adds rollout settings to the manifest's ``config`` (e.g. how personas were rendered)."""
    rows, names = synthetic_rows(items=items, groups=groups, samples=samples, turns=turns, seed=seed,
                                 with_options=with_options, free_form=free_form, states=states,
                                 assistant_words=assistant_words)
    return write_rollout_rows(path, rows, names, shards=shards,
                              manifest={"seed": seed, "config": {"samples": samples, "turns": turns, **(config or {})}})
