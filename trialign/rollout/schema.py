"""Schema of the offline trajectory dataset: one row per item, all groups' episodes nested.

A row is *joint* over agents: for one item it holds, for every group g, K sampled episodes of T assistant turns.
Keeping an item's groups in one row is what lets a batch compute cross-group terms (the inconsistency penalty,
group utilities) and lets the data module shard by item across ranks.

Row layout (Arrow / HF `datasets` features, see `FEATURES`)::

    item_id        str      unique per dataset
    task           str
    question       str      without persona
    context        str      passage the question refers to ("" if none)
    options        [str]    answer options as shown ([] for free-form items)
    gold_index     int      index of the correct option (-1 for free-form items)
    correct_options[int]    all correct option indices ([] for free-form items)
    gold_text      str      gold answer text (the option text for option items)
    answer_type    str      "option" | "numeric" | "alias"
    kind           str      "episodes" (K episodes per group) | "state" (the cross-group state s_0 only)
    groups         [struct] one entry per group, in the dataset's group order:
      group          str      group id
      system         str      system message of the episode ("" for none; it holds the persona when the probe
                              template puts the persona there)
      expression     str      "explicit" | "implicit" persona expression
      preferences    [str]    the group's preference ids
      state          struct   the first state s_0 and the behavior policy's probe there (no response):
        user             str    the first user message (persona + question, as the probe template frames it)
        answer           str    answer read by the probe at s_0
        option_logprobs  [f32]  probe log-likelihood of each option at s_0 ([] for free-form)
        gold_logprob     f32    probe log-likelihood of the gold answer per token
        truth            int    1 if `answer` is correct
      episodes       [struct] K samples ([] in "state" rows):
        sample         int      sample index k
        turns          [struct] T assistant turns, in order:
          user             str    user message before this assistant turn (turn 0: persona + question)
          user_kind        str    "question" | "challenge" | "reexplain" | "reminder"
          assistant        str    the action a_t
          answer           str    answer read by the probe (option index as text, or the short answer)
          option_logprobs  [f32]  probe log-likelihood of each option after a_t ([] for free-form)
          gold_logprob     f32    probe log-likelihood of the gold answer per token (length-normalized)
          truth            int    1 if `answer` is correct, else 0
          pers             f32    fraction of the group's preferences a_t satisfies, in [0, 1]
          reward           f32    truth + alpha * pers
          ret              f32    discounted return R_t = sum_k gamma^(k-t) r_k
          behavior_logprob f32    log mu(a_t | s_t), summed over the action's tokens
          num_tokens       int    number of action tokens

The state s_t is `system` + the user/assistant messages of turns < t + `user` of turn t, rendered with the
model's chat template.

Cross-group states (DESIGN.md): a "state" row holds, for one item, every group's s_0 with μ's probe distribution
and truth, and no episodes. They cost one probe forward per group (no generation), so a rollout holds many more of
them (``states_limit``) than items with episodes (``limit``); the inconsistency penalty and the truth term train
on both kinds, the policy, value and NSW terms on the episodes. Version 2 added `kind` and `state`; version-1
datasets are refused in one line (re-run the rollout).
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 2
ROW_KINDS = ("episodes", "state")
STATE_FIELDS = {
    "user": "string",
    "answer": "string",
    "option_logprobs": ["float32"],
    "gold_logprob": "float32",
    "truth": "int8",
}

TURN_FIELDS = {
    "user": "string",
    "user_kind": "string",
    "assistant": "string",
    "answer": "string",
    "option_logprobs": ["float32"],
    "gold_logprob": "float32",
    "truth": "int8",
    "pers": "float32",
    "reward": "float32",
    "ret": "float32",
    "behavior_logprob": "float32",
    "num_tokens": "int32",
}
USER_KINDS = ("question", "challenge", "reexplain", "reminder")


def answer_columns(item) -> dict[str, Any]:
    """The answer columns of an item's row (`trialign.tasks.item.Item`): options, gold index, correct options,
    gold text and answer type; the gold index is -1 and the option lists empty for free-form items."""
    return {
        "options": list(item.options or ()),
        "gold_index": int(item.gold) if item.has_options else -1,
        "correct_options": list(item.correct_options) if item.has_options else [],
        "gold_text": item.options[int(item.gold)] if item.has_options and item.options else str(item.gold),
        "answer_type": item.answer_type,
    }


def features():
    """The HF `datasets.Features` of a rollout row."""
    from datasets import Features, Sequence, Value

    def to_feature(spec: Any):
        if isinstance(spec, list):
            return Sequence(to_feature(spec[0]))
        if isinstance(spec, dict):
            return {k: to_feature(v) for k, v in spec.items()}
        return Value(spec)

    turn = to_feature(TURN_FIELDS)
    episode = {"sample": Value("int32"), "turns": [turn]}
    group = {
        "group": Value("string"),
        "system": Value("string"),
        "expression": Value("string"),
        "preferences": Sequence(Value("string")),
        "state": to_feature(STATE_FIELDS),
        "episodes": [episode],
    }
    return Features(
        {
            "item_id": Value("string"),
            "task": Value("string"),
            "question": Value("string"),
            "context": Value("string"),
            "options": Sequence(Value("string")),
            "gold_index": Value("int32"),
            "correct_options": Sequence(Value("int32")),
            "gold_text": Value("string"),
            "answer_type": Value("string"),
            "kind": Value("string"),
            "groups": [group],
        }
    )


REQUIRED_COLUMNS = tuple(
    ["item_id", "task", "question", "context", "options", "gold_index", "correct_options", "gold_text",
     "answer_type", "kind", "groups"]
)
