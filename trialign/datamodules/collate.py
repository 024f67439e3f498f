"""Tokenization and batching of rollout rows: one sequence per episode, one probe sequence per (item, group, option).

`TrajectoryCollator(rows)` turns B rollout rows (one per item, all groups nested, `trialign.rollout.schema`) into
tensors. Episodes are ordered item-major, then group (in `group_names` order), then sample, so with K samples per
group N = B·G·K and ``n = (b·G + g)·K + k``.

**Episode sequences.** An episode's T turns are one conversation, rendered with the tokenizer's chat template:
``[system if non-empty] + user_0, assistant_0, user_1, assistant_1, ...``; the state s_t (DESIGN.md) is the prefix
before assistant_t. The conversation is cut into pieces with the template itself: the render of the messages up to
user_t with the generation prompt must be a prefix of the render up to assistant_t, and the assistant segment in
between, up to and including its last special token (the end-of-turn token, ``<|im_end|>`` for SmolLM2), is the
action a_t. Template text after that token (a newline) belongs to the next state. Each piece is tokenized on its
own (``add_special_tokens=False``: the template writes its own special tokens), so the tokens of a_t are exactly
the tokens of the assistant text as the template renders it, followed by the end-of-turn token — the tokens a
policy would produce when generating a_t after the state's tokens. Templates that do not render a conversation as
a prefix of its continuation (some strip earlier reasoning) are refused with a `TriAlignError`.

**max_length.** Truncating the conversation from the left would cut the persona and the question out of the state.
Instead, whole turns are dropped from the *end*: an episode keeps the longest run of turns 0..t whose last action
token fits in `max_length`; dropped turns get ``turn_mask = False`` and zeros elsewhere. An episode whose first
action does not fit keeps its first `max_length` state tokens and no turn (``turn_mask`` all False). The number of
dropped turns is counted in ``batch["dropped_turns"]`` and in `TrajectoryCollator.dropped_turns`, with a warning.
Turns are never reordered, so returns R_t stored in the data stay those of the full episode.

**Probe sequences.** For the cross-group inconsistency penalty and validation metrics, each (item, group) gets the
answer-probe context of `trialign.probe.render_context` on ``[system] + user_0`` (persona + question; taken from
the group's first episode) with the assistant turn opened and `probe_answer_prefix`; each option is a continuation
``" " + option text``, tokenized as the probe does it (lm-eval's ``_encode_pair``: continuation tokens are those of
context + continuation after the context's own tokens). Free-form items have one "option": ``" " + gold_text``.
Probe sequences are not truncated.

**Probe-only rows.** Rows without episodes get only probe sequences: the rollout's cross-group states (``kind:
"state"``, the context from each group's ``state.user``) and the task items validation probes
(`GroupTrajectoryDataModule`'s ``val_task``: ``probe_only: True`` and, per group, the ``system`` and first ``user``
message as the rollout would have written them). A batch may mix them with episode rows: the episode tensors cover
the episode rows (``item_index`` still counts every row of the batch), and a batch without any episode row holds
only the probe keys, ``has_episodes``, ``item_ids`` and ``group_names``.

Output of ``collator(rows)`` (B items, G groups, N episodes, T = the batch's longest episode in turns, L the longest
episode sequence, O the most options of an item in the batch (at least 1), M probe rows, Lp the longest probe row):

=======================  ===========  =====================================================================
key                      shape/type   meaning
=======================  ===========  =====================================================================
input_ids                [N, L] long  episode tokens, right-padded with the pad token id
attention_mask           [N, L] long  1 on real tokens
action_turn              [N, L] long  t+1 on the tokens of action a_t (text + end-of-turn token), 0 elsewhere
state_end                [N, T] long  index of the last token of s_t (just before a_t begins); 0 where masked
turn_mask                [N, T] bool  the turn exists and fits in max_length
group_index              [N] long     g, index into `group_names`
item_index               [N] long     b, 0..B-1
sample_index             [N] long     the episode's ``sample`` field
rewards, returns         [N, T] f32   r_t and R_t from the data (0 where masked)
truth                    [N, T] long  truth_t from the data
pers                     [N, T] f32   pers_t from the data
behavior_logprob         [N, T] f32   log mu(a_t | s_t) from the data (rollout tokenizer)
num_tokens               [N, T] long  action tokens of a_t under *this* tokenizer (the data's count is not used)
probe_input_ids          [M, Lp] long context + continuation tokens, right-padded
probe_attention_mask     [M, Lp] long 1 on real tokens
probe_continuation_mask  [M, Lp] long 1 on continuation (option) tokens
probe_index              [M, 3] long  (item b, group g, option o) of each probe row
option_mask              [B, O] bool  option o exists (free-form items: slot 0, the gold text)
gold_index               [B] long     gold option index, -1 for free-form items
correct_options          [B, O] bool  correct options (all False for free-form items)
has_options              [B] bool     option item
has_episodes             [B] bool     the row has episodes (False for states and probe-only rows)
dropped_turns            [] long      turns dropped for max_length in this batch
item_ids                 list[str]    the B item ids
group_names              list[str]    the G group names
=======================  ===========  =====================================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from trialign.errors import TriAlignError
from trialign.probe import render_context
from trialign.tokens import action_text, encode_continuations, padding_id, right_pad, special_token_texts

log = logging.getLogger(__name__)

_PER_TURN_FLOATS = {"rewards": "reward", "returns": "ret", "pers": "pers", "behavior_logprob": "behavior_logprob"}


@dataclass
class _Episode:
    """Where an episode's pieces are before tokenization."""

    pieces: list[tuple[str, int]]
    """(text, turn number + 1 for an action piece or 0 for a state piece), in order."""
    turns: list[dict[str, Any]]
    """The episode's turns as stored."""
    item: int
    group: int
    sample: int
    where: str
    """Names the episode in error messages."""


class TrajectoryCollator:
    """Turns a list of rollout rows into the batch described in the module docstring."""

    def __init__(self, tokenizer, group_names: Sequence[str], max_length: int = 512,
                 probe_answer_prefix: str = "Final answer:"):
        if not getattr(tokenizer, "chat_template", None):
            raise TriAlignError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: has no chat template; "
                                "the data module renders episodes with it")
        if max_length < 2:
            raise TriAlignError(f"data.max_length: expected at least 2 tokens, got {max_length}")
        if not group_names:
            raise TriAlignError("group_names: expected at least one group")
        self.tokenizer = tokenizer
        self.group_names = list(group_names)
        self._group_position = {name: g for g, name in enumerate(self.group_names)}
        self.max_length = int(max_length)
        self.probe_answer_prefix = probe_answer_prefix
        self.pad_id = padding_id(tokenizer)
        self._special_tokens = special_token_texts(tokenizer)
        self.dropped_turns = 0
        """Turns dropped for `max_length` by this collator so far (in this process)."""

    # ------------------------------------------------------------------ rendering
    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def episode_pieces(self, system: str, turns: Sequence[dict[str, Any]], where: str = "") -> list[tuple[str, int]]:
        """The episode cut into state and action pieces (see the module docstring): ``[(text, 0 or t+1), ...]``.

        The concatenation of the texts is the chat-template render of the conversation, without the template text
        that follows the last action."""
        messages = [{"role": "system", "content": system}] if system else []
        pieces: list[tuple[str, int]] = []
        done = ""  # the render consumed so far (ends right after the previous action)
        for t, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn["user"]})
            prompt = self._render(messages, True)
            if not prompt.startswith(done):
                raise TriAlignError(
                    f"tokenizer {getattr(self.tokenizer, 'name_or_path', '')!r}: its chat template does not render "
                    f"the conversation{where} at turn {t} as a prefix of its continuation; episodes cannot be cut "
                    "into states and actions")
            action = action_text(self.tokenizer, messages, prompt, turn["assistant"], self._special_tokens,
                                 f"{where} at turn {t}")
            messages.append({"role": "assistant", "content": turn["assistant"]})
            pieces.append((prompt[len(done):], 0))
            pieces.append((action, t + 1))
            done = prompt + action
        return pieces

    def _tokenize(self, texts: Sequence[str]) -> dict[str, list[int]]:
        unique = list(dict.fromkeys(texts))
        if not unique:
            return {}
        encoded = self.tokenizer(unique, add_special_tokens=False)["input_ids"]
        return {text: list(ids) for text, ids in zip(unique, encoded)}

    # ------------------------------------------------------------------ batching
    def _ordered_groups(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        by_name = {group["group"]: group for group in row["groups"]}
        if set(by_name) != set(self.group_names) or len(by_name) != len(row["groups"]):
            raise TriAlignError(f"item {row.get('item_id')!r}: groups {sorted(by_name)} differ from the data "
                                f"module's groups {sorted(self.group_names)}")
        return [by_name[name] for name in self.group_names]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise TriAlignError("collator: got an empty batch")
        probe_only = [bool(row.get("probe_only")) or row.get("kind") == "state" for row in rows]
        episodes: list[_Episode] = []
        probe_contexts: list[tuple[int, int, str, list[str]]] = []
        for b, row in enumerate(rows):
            options = _options_of(row)
            for g, group in enumerate(self._ordered_groups(row)):
                if probe_only[b]:
                    first = group["user"] if row.get("probe_only") else group["state"]["user"]
                else:
                    for episode in group["episodes"]:
                        where = f" of item {row['item_id']!r}, group {group['group']!r}, sample {episode['sample']}"
                        pieces = self.episode_pieces(group["system"], episode["turns"], where)
                        episodes.append(_Episode(pieces, list(episode["turns"]), b, g, int(episode["sample"]), where))
                    first = group["episodes"][0]["turns"][0]["user"]
                messages = ([{"role": "system", "content": group["system"]}] if group["system"] else [])
                messages.append({"role": "user", "content": first})
                context = render_context(self.tokenizer, messages, None, self.probe_answer_prefix)
                probe_contexts.append((b, g, context, options))
        batch = self._episode_tensors(episodes) if episodes else {}
        batch["has_episodes"] = torch.tensor([not p for p in probe_only], dtype=torch.bool)
        batch.update(self._probe_tensors(rows, probe_contexts))
        batch["item_ids"] = [str(row["item_id"]) for row in rows]
        batch["group_names"] = list(self.group_names)
        return batch

    def _episode_tensors(self, episodes: list[_Episode]) -> dict[str, torch.Tensor]:
        ids_of = self._tokenize([text for episode in episodes for text, _ in episode.pieces])
        num = len(episodes)
        max_turns = max(len(episode.turns) for episode in episodes)
        sequences, action_turns = [], []
        state_end = torch.zeros((num, max_turns), dtype=torch.long)
        turn_mask = torch.zeros((num, max_turns), dtype=torch.bool)
        num_tokens = torch.zeros((num, max_turns), dtype=torch.long)
        dropped = 0
        for n, episode in enumerate(episodes):
            ids: list[int] = []
            turn_of: list[int] = []
            kept = 0
            for text, turn in episode.pieces:
                piece = ids_of[text]
                if turn and len(ids) + len(piece) > self.max_length:
                    break
                if turn:
                    if not piece:
                        raise TriAlignError(f"turn {turn - 1}{episode.where}: the assistant message has no tokens")
                    state_end[n, turn - 1] = len(ids) - 1
                    turn_mask[n, turn - 1] = True
                    num_tokens[n, turn - 1] = len(piece)
                    kept = turn
                ids.extend(piece)
                turn_of.extend([turn] * len(piece))
            if kept == 0:  # not even a_0 fits: keep the start of s_0 so the row is still a valid sequence
                ids, turn_of = ids[: self.max_length], turn_of[: self.max_length]
            else:
                last = max(i for i, turn in enumerate(turn_of) if turn == kept) + 1
                ids, turn_of = ids[:last], turn_of[:last]
            dropped += len(episode.turns) - kept
            sequences.append(ids)
            action_turns.append(turn_of)
        if dropped:
            self.dropped_turns += dropped
            log.warning("data: dropped %d turn(s) of %d episode(s) that do not fit max_length=%d (total so far: %d)",
                        dropped, num, self.max_length, self.dropped_turns)
        input_ids, attention_mask = right_pad(sequences, self.pad_id)
        action_turn, _ = right_pad(action_turns, 0)
        out = {
            "input_ids": input_ids, "attention_mask": attention_mask, "action_turn": action_turn,
            "state_end": state_end, "turn_mask": turn_mask,
            "group_index": torch.tensor([e.group for e in episodes], dtype=torch.long),
            "item_index": torch.tensor([e.item for e in episodes], dtype=torch.long),
            "sample_index": torch.tensor([e.sample for e in episodes], dtype=torch.long),
            "num_tokens": num_tokens, "dropped_turns": torch.tensor(dropped, dtype=torch.long),
        }
        for key, field in _PER_TURN_FLOATS.items():
            out[key] = _per_turn(episodes, field, torch.float32, max_turns) * turn_mask
        out["truth"] = _per_turn(episodes, "truth", torch.long, max_turns) * turn_mask
        return out

    def _probe_tensors(self, rows, probe_contexts) -> dict[str, torch.Tensor]:
        num_items = len(rows)
        width = max(len(_options_of(row)) for row in rows)
        option_mask = torch.zeros((num_items, width), dtype=torch.bool)
        correct = torch.zeros((num_items, width), dtype=torch.bool)
        gold_index = torch.full((num_items,), -1, dtype=torch.long)
        has_options = torch.zeros((num_items,), dtype=torch.bool)
        for b, row in enumerate(rows):
            option_mask[b, : len(_options_of(row))] = True
            if _is_option_item(row):
                has_options[b] = True
                gold_index[b] = int(row["gold_index"])
                for o in row["correct_options"] or [row["gold_index"]]:
                    correct[b, int(o)] = True
        context_ids, tails = encode_continuations(self.tokenizer, [context for _, _, context, _ in probe_contexts],
                                                  [options for _, _, _, options in probe_contexts])
        sequences, continuation, index = [], [], []
        for (b, g, context, options), prefix, option_tails in zip(probe_contexts, context_ids, tails):
            for o, tail in enumerate(option_tails):
                if not tail:
                    raise TriAlignError(f"item {rows[b]['item_id']!r}: option {o} adds no tokens to the probe context")
                sequences.append(prefix + tail)
                continuation.append([0] * len(prefix) + [1] * len(tail))
                index.append((b, g, o))
        probe_ids, probe_mask = right_pad(sequences, self.pad_id)
        continuation_mask, _ = right_pad(continuation, 0)
        return {
            "probe_input_ids": probe_ids, "probe_attention_mask": probe_mask,
            "probe_continuation_mask": continuation_mask,
            "probe_index": torch.tensor(index, dtype=torch.long).reshape(-1, 3),
            "option_mask": option_mask, "gold_index": gold_index, "correct_options": correct,
            "has_options": has_options,
        }


def _is_option_item(row: dict[str, Any]) -> bool:
    return row.get("answer_type") == "option" and bool(row.get("options"))


def _options_of(row: dict[str, Any]) -> list[str]:
    """The probe continuations of an item: its options, or its gold text for free-form items."""
    if _is_option_item(row):
        return [str(option) for option in row["options"]]
    return [str(row["gold_text"])]


def _per_turn(episodes: list[_Episode], field: str, dtype: torch.dtype, width: int) -> torch.Tensor:
    values = [[float(turn[field]) for turn in e.turns] + [0.0] * (width - len(e.turns)) for e in episodes]
    return torch.tensor(values, dtype=torch.float64).to(dtype)
