"""How a group's persona and an objective item become the first chat messages of an episode.

One renderer shared by the answer probe, evaluation and rollout, so that a state s_0 of DESIGN.md is built the same
way everywhere. The first user turn is, separated by blank lines:

1. the persona: the group's explicit self-description, or its implicit cue text (none for the reference group);
2. the group's preference instructions, one sentence each, on one line (if `show_preferences`; none for the
   reference group, which has no preferences);
3. the item (`format_item`): its context passage if any, the question, and for option items the options one per
   line as ``- option text``.

Options carry no letters on purpose: the answer probe scores the option *text* after "Final answer:", and letters
would let a model answer by a letter the probe never reads. Where the paper places implicit cues "in a prior
turn", we put them in the same user turn (see `trialign.groups`). An optional system message comes first; the
training-free "same answer for everyone" baseline uses `SAME_ANSWER_SYSTEM_PROMPT` there.
"""

from __future__ import annotations

from trialign.errors import TriAlignError
from trialign.groups import PERSONA_FIELDS, Group
from trialign.preferences import get_preference
from trialign.tasks.item import Item

EXPRESSIONS = PERSONA_FIELDS
"""Ways a persona can be expressed: ``"explicit"`` (self-description) or ``"implicit"`` (cues in the user's voice)."""

SAME_ANSWER_SYSTEM_PROMPT = (
    "You are a helpful assistant. Give every user the same factual answer to a factual question, regardless of who "
    "they are, where they come from, what they believe or what they say about themselves. Adapt only the style of "
    "your reply (wording, length, format, tone, examples) to the user; never change the facts or the answer itself."
)
"""System prompt of the training-free "same answer for everyone" baseline."""


PREF_ALIGNER_INSTRUCTION = (
    "Below is a question and a draft answer written for a general audience. Rewrite the draft for me, in the style "
    "I prefer. Keep every fact and the final answer exactly as they are in the draft; change only wording, length, "
    "format, tone and examples."
)
"""Second pass of the Pref-Aligner baseline (Okite et al. 2025): personalize a persona-free draft, keep its answer."""


def build_rewrite_messages(
    item: Item, group: Group, draft: str, *, expression: str = "explicit", system_prompt: str | None = None
) -> list[dict[str, str]]:
    """Pref-Aligner's rewrite request: the group's persona and preferences, the instruction, the item, the draft."""
    parts = []
    if not group.reference:
        parts.append(group.persona(expression).strip())
        if group.preferences:
            parts.append(preference_instructions(group))
    parts.append(PREF_ALIGNER_INSTRUCTION)
    parts.append("Question:\n" + format_item(item))
    parts.append("Draft answer:\n" + draft.strip())
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": "\n\n".join(parts)}]


def resolve_system_prompt(setting: str | None) -> str | None:
    """The system message a `system_prompt` setting stands for: None for ``"none"``/``""``, the "same answer"
    baseline's prompt for ``"same_answer"``, otherwise the text itself."""
    if not setting or setting == "none":
        return None
    return SAME_ANSWER_SYSTEM_PROMPT if setting == "same_answer" else setting


def format_item(item: Item) -> str:
    """The item as shown to the model without any persona: context, question, and ``- option`` lines."""
    parts = []
    if item.context.strip():
        parts.append(item.context.strip())
    question = item.question.strip()
    if item.has_options and item.options:
        question += "\n" + "\n".join(f"- {option.strip()}" for option in item.options)
    parts.append(question)
    return "\n\n".join(parts)


def preference_instructions(group: Group) -> str:
    """The group's preference instructions as one line ("" when it has none)."""
    return " ".join(get_preference(p).instruction for p in group.preferences)


def build_user_message(
    item: Item, group: Group, *, expression: str = "explicit", show_preferences: bool = True
) -> str:
    """The text of the first user turn for `group` asking `item` (see the module docstring for its layout)."""
    if expression not in EXPRESSIONS:
        raise TriAlignError(f"persona expression must be one of {', '.join(EXPRESSIONS)}; got '{expression}'")
    parts = []
    if not group.reference:
        parts.append(group.persona(expression).strip())
        if show_preferences and group.preferences:
            parts.append(preference_instructions(group))
    parts.append(format_item(item))
    return "\n\n".join(parts)


def build_messages(
    item: Item,
    group: Group,
    *,
    expression: str = "explicit",
    system_prompt: str | None = None,
    show_preferences: bool = True,
) -> list[dict[str, str]]:
    """OpenAI-style chat messages for the first turn: an optional system message, then the user turn.

    `system_prompt` None or "" adds no system message (the rollout schema stores "" for none).
    """
    user = build_user_message(item, group, expression=expression, show_preferences=show_preferences)
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user})
    return messages
