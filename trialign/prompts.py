"""How a group's persona and an objective item become the first chat messages of an episode.

One renderer shared by the answer probe, evaluation and rollout, so that a state s_0 of DESIGN.md is built the same
way everywhere. The first user turn is, separated by blank lines:

1. the persona: the group's explicit self-description, or its implicit cue text (none for the reference group);
2. the group's preference instructions, one sentence each, on one line (if `show_preferences`; none for the
   reference group, which has no preferences);
3. the item (`format_item`): its context passage if any, the question, and for option items the options one per
   line as ``- option text``.

How the question is framed is a `ProbeTemplate` (named in `PROBE_TEMPLATES`, chosen by the ``probe_template``
setting of rollout, evaluate and experiment, and recorded in the rollout manifest so that training and validation
ask alike): whether the options are listed in the user turn, the question's framing (``"Question: {question}"``),
where the persona goes (the user turn or the system message) and the answer prefix that opens the assistant turn
(the answer slot, after which the probe scores each option). Options carry no letters on purpose: the probe scores
the option *text*, and letters would let a model answer by a letter the probe never reads. The default,
``question_answer``, keeps most of the model's knowledge (measured by ``benchmarks/bench_templates.py`` against
lm-evaluation-harness's zero-shot format on the same items; numbers in the README); ``final_answer`` is the
template of datasets written before templates existed. Where the paper places implicit cues "in a prior
turn", we put them in the same user turn (see `trialign.groups`). An optional system message comes first; the
training-free "same answer for everyone" baseline uses `SAME_ANSWER_SYSTEM_PROMPT` there.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ProbeTemplate:
    """How an item is asked and where the answer probe reads the answer (see the module docstring)."""

    name: str
    list_options: bool
    """Show the options as ``- option`` lines under the question."""
    question_format: str = "{question}"
    """The question's framing; must hold ``{question}``."""
    answer_prefix: str = "Answer:"
    """Opens the assistant turn (or follows a response on a new line); the options are scored after it."""
    persona_in: str = "user"
    """``"user"``: persona and preference lines open the user turn; ``"system"``: they go in the system message."""

    def __post_init__(self) -> None:
        where = f"probe_template {self.name!r}"
        if "{question}" not in self.question_format:
            raise TriAlignError(f"{where}: question_format {self.question_format!r} has no {{question}} slot")
        if not self.answer_prefix.strip():
            raise TriAlignError(f"{where}: answer_prefix is empty: the probe needs an answer slot to score options "
                                "after")
        if self.persona_in not in ("user", "system"):
            raise TriAlignError(f"{where}: persona_in must be 'user' or 'system', got {self.persona_in!r}")


PROBE_TEMPLATES: dict[str, ProbeTemplate] = {t.name: t for t in (
    ProbeTemplate("question_answer", list_options=False, question_format="Question: {question}"),
    ProbeTemplate("system_persona", list_options=False, question_format="Question: {question}", persona_in="system"),
    ProbeTemplate("options_answer", list_options=True, question_format="Question: {question}"),
    ProbeTemplate("final_answer", list_options=True, answer_prefix="Final answer:"),
)}
DEFAULT_PROBE_TEMPLATE = "question_answer"
LEGACY_PROBE_TEMPLATE = "final_answer"
"""The template of rollouts whose manifest names none (written before templates were a setting)."""


def probe_template(name: str | ProbeTemplate) -> ProbeTemplate:
    """The template called `name` (a template passes through); a one-line error naming the known ones."""
    if isinstance(name, ProbeTemplate):
        return name
    if name not in PROBE_TEMPLATES:
        raise TriAlignError(f"probe_template: unknown template {name!r}; expected one of {', '.join(PROBE_TEMPLATES)}")
    return PROBE_TEMPLATES[name]


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
    parts.append("Question:\n" + format_item(item, LEGACY_PROBE_TEMPLATE))  # with its options, whatever the template
    parts.append("Draft answer:\n" + draft.strip())
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": "\n\n".join(parts)}]


def resolve_system_prompt(setting: str | None) -> str | None:
    """The system message a `system_prompt` setting stands for: None for ``"none"``/``""``, the "same answer"
    baseline's prompt for ``"same_answer"``, otherwise the text itself."""
    if not setting or setting == "none":
        return None
    return SAME_ANSWER_SYSTEM_PROMPT if setting == "same_answer" else setting


def format_item(item: Item, template: str | ProbeTemplate = DEFAULT_PROBE_TEMPLATE) -> str:
    """The item as shown to the model without any persona: context, the framed question, and (if the template
    lists them) ``- option`` lines."""
    template = probe_template(template)
    parts = []
    if item.context.strip():
        parts.append(item.context.strip())
    question = template.question_format.format(question=item.question.strip())
    if template.list_options and item.has_options and item.options:
        question += "\n" + "\n".join(f"- {option.strip()}" for option in item.options)
    parts.append(question)
    return "\n\n".join(parts)


def preference_instructions(group: Group) -> str:
    """The group's preference instructions as one line ("" when it has none)."""
    return " ".join(get_preference(p).instruction for p in group.preferences)


def persona_text(group: Group, *, expression: str = "explicit", show_preferences: bool = True) -> str:
    """The group's persona and (if `show_preferences`) preference line, blank-line separated; "" for the reference
    group."""
    if expression not in EXPRESSIONS:
        raise TriAlignError(f"persona expression must be one of {', '.join(EXPRESSIONS)}; got '{expression}'")
    parts = []
    if not group.reference:
        parts.append(group.persona(expression).strip())
        if show_preferences and group.preferences:
            parts.append(preference_instructions(group))
    return "\n\n".join(parts)


def build_user_message(
    item: Item, group: Group, *, expression: str = "explicit", show_preferences: bool = True,
    template: str | ProbeTemplate = DEFAULT_PROBE_TEMPLATE,
) -> str:
    """The text of the first user turn for `group` asking `item` (see the module docstring for its layout)."""
    template = probe_template(template)
    persona = persona_text(group, expression=expression, show_preferences=show_preferences)
    if template.persona_in == "system":
        persona = ""
    return "\n\n".join(part for part in (persona, format_item(item, template)) if part)


def build_messages(
    item: Item,
    group: Group,
    *,
    expression: str = "explicit",
    system_prompt: str | None = None,
    show_preferences: bool = True,
    template: str | ProbeTemplate = DEFAULT_PROBE_TEMPLATE,
) -> list[dict[str, str]]:
    """OpenAI-style chat messages for the first turn: an optional system message, then the user turn.

    `system_prompt` None or "" adds no system message (the rollout schema stores "" for none). With a template
    whose persona goes in the system message, the system message is the system prompt, then the persona.
    """
    template = probe_template(template)
    user = build_user_message(item, group, expression=expression, show_preferences=show_preferences,
                              template=template)
    system = system_prompt or ""
    if template.persona_in == "system":
        persona = persona_text(group, expression=expression, show_preferences=show_preferences)
        system = "\n\n".join(part for part in (system, persona) if part)
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    return messages
