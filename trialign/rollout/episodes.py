"""The rollout environment: K episodes of T turns for every (item, group) of a chunk of items, as dataset rows.

One turn of every episode of the chunk advances together: the states of all items x groups x samples are sampled
in one batched call, then scored in one probe call. The KV cache of that call serves the probe
(`trialign.rollout.cached_probe`) and is continued by the next turn's call, so each token of a conversation runs
through the model about once. Per assistant turn (DESIGN.md, "Environment and
trajectories"):

* ``truth_t``: the answer probe's reading of the message (the conversation so far, the message, the probe
  template's answer prefix) is correct;
* ``pers_t``: the fraction of the group's verifiable preferences the message satisfies (1 for a group without
  preferences, see `trialign.preferences.preference_score`);
* ``r_t = truth_t + alpha * pers_t`` and the discounted return ``R_t = sum_{k>=t} gamma^(k-t) r_k`` (episodes end
  after turn T-1: no bootstrap);
* ``log mu(a_t | s_t)`` at temperature 1 and the action's token count (`trialign.rollout.sampler`).

Every row also holds each group's first state s_0 with the behavior policy's probe there, before any response
(``state``): one probe forward per (item, group). `state_chunk` writes rows of that alone (kind ``"state"``, no
episodes): the cross-group states of DESIGN.md, which cost no generation, so a rollout holds many more of them
than items with episodes.

Row layout: `trialign.rollout.schema`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from trialign.groups import Group
from trialign.preferences import preference_score
from trialign.probe import AnswerProbe, render_context
from trialign.prompts import DEFAULT_PROBE_TEMPLATE, PROBE_TEMPLATES, ProbeTemplate, build_messages
from trialign.rollout.cached_probe import probe_answers
from trialign.rollout.sampler import (
    Generation,
    GenerationCache,
    score_actions,
    score_actions_on_cache,
)
from trialign.rollout.schema import answer_columns
from trialign.rollout.simulator import UserSimulator
from trialign.tasks.item import Item
from trialign.tokens import action_text, end_of_turn_id, padding_id, special_token_texts


class Sampler(Protocol):
    def sample(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
               seed: int, cache: GenerationCache | None = None) -> Generation: ...


@dataclass
class Action:
    """One assistant message a_t as stored."""

    text: str
    """The message text, decoded without special tokens."""
    piece: str
    """Its template text up to and including the end-of-turn token (`trialign.tokens.action_text`)."""
    token_ids: list[int]
    """Tokens of `piece`: what training scores as a_t."""
    logprob: float
    """log mu(a_t | s_t) at temperature 1, summed over `token_ids`."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, stable across processes and Python versions."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """R_t = sum_{k>=t} gamma^(k-t) r_k, computed backwards."""
    returns, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


@dataclass
class EpisodeSettings:
    """What shapes the episodes (a subset of `RolloutConfig`)."""

    samples: int
    """K episodes per (item, group)."""
    turns: int
    """T assistant turns per episode."""
    temperature: float
    """Sampling temperature of the behavior policy."""
    max_new_tokens: int
    """Length limit of one assistant message."""
    alpha: float
    """Personalization weight of the reward."""
    gamma: float
    """Discount of the returns."""
    expression: str = "explicit"
    """Persona expression of the first user turn."""
    system_prompt: str | None = None
    """System message of every episode (None for none)."""
    show_preferences: bool = True
    """State the group's preferences in the first user turn."""
    template: ProbeTemplate = PROBE_TEMPLATES[DEFAULT_PROBE_TEMPLATE]
    """How the item is asked and where the probe reads the answer."""


@dataclass
class _Episode:
    item: Item
    group: Group
    sample: int
    messages: list[dict[str, str]]
    turns: list[dict] = field(default_factory=list)
    rendered: str = ""
    """Chat-template text of the conversation so far, up to the end of the last action."""
    token_ids: list[int] = field(default_factory=list)
    """Its tokens, piece by piece (states and actions tokenized separately)."""

    def state(self, tokenizer) -> list[int]:
        """Tokens of s_t: the conversation so far, then the new user turn and the generation prompt.

        Like the training data module (`trialign.datamodules.collate`), the template text after the last action is
        tokenized on its own and appended to the tokens so far, so s_t is tokenized the same way for mu and pi."""
        prompt = tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        if self.rendered and prompt.startswith(self.rendered):
            new = tokenizer(prompt[len(self.rendered):], add_special_tokens=False)["input_ids"]
            self.token_ids = self.token_ids + list(new)
        else:  # first turn, or a template that re-renders earlier turns differently
            self.token_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        self.rendered = prompt
        return self.token_ids

    def act(self, action: Action) -> None:
        """Append the action a_t to the conversation."""
        self.messages.append({"role": "assistant", "content": action.text})
        self.rendered += action.piece
        self.token_ids = self.token_ids + action.token_ids


def to_actions(tokenizer, episodes: Sequence[_Episode], prompts: Sequence[list[int]], generation: Generation,
               *, end_id: int, model, batch_size: int) -> list[Action]:
    """The samples as actions in the template's tokens; log mu from the sampler where its tokens are the action's,
    else from a forward pass (continuing the sampler's cache when there is one)."""
    samples = generation.samples
    specials = special_token_texts(tokenizer)
    actions: list[Action] = []
    rescore: list[int] = []
    for index, (episode, sample) in enumerate(zip(episodes, samples)):
        text = tokenizer.decode(sample.tokens, skip_special_tokens=True)
        piece = action_text(tokenizer, episode.messages, episode.rendered, text, specials)
        ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        sampled = sample.tokens + [end_id if sample.stop is None else sample.stop]
        if sample.logprob is None or ids != sampled:
            rescore.append(index)
        actions.append(Action(text, piece, ids, sample.logprob if sample.logprob is not None else float("nan")))
    if rescore and generation.cache is not None:
        scores = score_actions_on_cache(model, generation.cache, rescore, [prompts[i] for i in rescore],
                                        [actions[i].token_ids for i in rescore], pad_id=padding_id(tokenizer),
                                        batch_size=batch_size)
    elif rescore:
        scores = score_actions(model, tokenizer, [prompts[i] for i in rescore],
                               [actions[i].token_ids for i in rescore], batch_size=batch_size)
    if rescore:
        for index, score in zip(rescore, scores):
            actions[index].logprob = score
    return actions


@dataclass
class ChunkStats:
    """Work done for one chunk (for throughput reports)."""

    sampled_tokens: int = 0
    """Tokens produced by the sampler over all turns."""
    episodes: int = 0
    """Episodes generated."""


def run_chunk(
    items: Sequence[Item],
    groups: Sequence[Group],
    settings: EpisodeSettings,
    *,
    model,
    tokenizer,
    sampler: Sampler,
    probe: AnswerProbe,
    simulator: UserSimulator,
    seed: int,
    score_batch_size: int = 16,
) -> tuple[list[dict], ChunkStats]:
    """Dataset rows (one per item, groups in the given order) for `items`; `seed` drives this chunk's sampling."""
    episodes = [_Episode(item, group, k, first_messages(item, group, settings))
                for item in items for group in groups for k in range(settings.samples)]
    states = state_readings(items, groups, settings, tokenizer=tokenizer, probe=probe)
    stats = ChunkStats(episodes=len(episodes))
    end_id = end_of_turn_id(tokenizer)
    cache: GenerationCache | None = None
    for t in range(settings.turns):
        kinds = ["question"] * len(episodes)
        if t > 0:
            for index, episode in enumerate(episodes):
                user = simulator.turn(episode.item, episode.group, episode.sample, t)
                episode.messages.append({"role": "user", "content": user.text})
                kinds[index] = user.kind
        prompts = [e.state(tokenizer) for e in episodes]
        generation = sampler.sample(prompts, max_new_tokens=settings.max_new_tokens,
                                    temperature=settings.temperature, seed=derive_seed(seed, "turn", t), cache=cache)
        stats.sampled_tokens += sum(s.num_sampled for s in generation.samples)
        actions = to_actions(tokenizer, episodes, prompts, generation, end_id=end_id, model=model,
                             batch_size=score_batch_size)
        prefix = settings.template.answer_prefix
        contexts = [render_context(tokenizer, e.messages, response=a.text, answer_prefix=prefix)
                    for e, a in zip(episodes, actions)]
        readings = probe_answers(probe, [e.item for e in episodes], contexts, generation.cache)
        cache = generation.cache  # the next turn continues these conversations
        for episode, action, reading, kind in zip(episodes, actions, readings, kinds):
            truth = int(bool(reading.correct))
            pers = float(preference_score(action.text, episode.group.preferences))
            episode.turns.append({
                "user": episode.messages[-1]["content"],
                "user_kind": kind,
                "assistant": action.text,
                "answer": reading.answer,
                "option_logprobs": [float(x) for x in reading.option_logprobs],
                "gold_logprob": float(reading.gold_logprob),
                "truth": truth,
                "pers": pers,
                "reward": truth + settings.alpha * pers,
                "behavior_logprob": float(action.logprob),
                "num_tokens": len(action.token_ids),
            })
            episode.act(action)
    for episode in episodes:
        for turn, ret in zip(episode.turns, discounted_returns([x["reward"] for x in episode.turns], settings.gamma)):
            turn["ret"] = ret
    return _rows(items, groups, episodes, settings, states), stats


def first_messages(item: Item, group: Group, settings: EpisodeSettings) -> list[dict[str, str]]:
    """The messages of s_0 for (item, group): the one rule for episodes and states alike."""
    return build_messages(item, group, expression=settings.expression, system_prompt=settings.system_prompt,
                          show_preferences=settings.show_preferences, template=settings.template)


def state_readings(items: Sequence[Item], groups: Sequence[Group], settings: EpisodeSettings, *, tokenizer,
                   probe: AnswerProbe) -> list[list[dict]]:
    """Per item, per group: the ``state`` field (s_0's messages and μ's probe reading there, no response)."""
    pairs = [(item, group) for item in items for group in groups]
    messages = [first_messages(item, group, settings) for item, group in pairs]
    contexts = [render_context(tokenizer, m, answer_prefix=settings.template.answer_prefix) for m in messages]
    readings = probe.answer([item for item, _ in pairs], contexts)
    states = [{
        "system": m[0]["content"] if m[0]["role"] == "system" else "",
        "user": m[-1]["content"],
        "answer": reading.answer,
        "option_logprobs": [float(x) for x in reading.option_logprobs],
        "gold_logprob": float(reading.gold_logprob),
        "truth": int(bool(reading.correct)),
    } for m, reading in zip(messages, readings)]
    return [states[i * len(groups):(i + 1) * len(groups)] for i in range(len(items))]


def state_chunk(items: Sequence[Item], groups: Sequence[Group], settings: EpisodeSettings, *, tokenizer,
                probe: AnswerProbe) -> list[dict]:
    """Rows of kind "state" for `items`: every group's s_0 and μ's probe reading there; no generation."""
    return _rows(items, groups, None, settings, state_readings(items, groups, settings, tokenizer=tokenizer,
                                                               probe=probe))


def _rows(items: Sequence[Item], groups: Sequence[Group], episodes: list[_Episode] | None,
          settings: EpisodeSettings, states: list[list[dict]]) -> list[dict]:
    rows, position = [], 0
    for item, item_states in zip(items, states):
        row_groups = []
        for group, state in zip(groups, item_states):
            mine = [] if episodes is None else episodes[position:position + settings.samples]
            position += len(mine)
            row_groups.append({
                "group": group.id,
                "system": state["system"],  # as built: it may hold the persona (see ProbeTemplate)
                "expression": settings.expression,
                "preferences": list(group.preferences),
                "state": {k: v for k, v in state.items() if k != "system"},
                "episodes": [{"sample": e.sample, "turns": e.turns} for e in mine],
            })
        rows.append({
            "item_id": item.id,
            "task": item.task,
            "question": item.question,
            "context": item.context,
            **answer_columns(item),
            "kind": "state" if episodes is None else "episodes",
            "groups": row_groups,
        })
    return rows
