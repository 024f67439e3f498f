"""One item type for every benchmark: an objective question with a gold answer and a task-specific answer check."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

AnswerType = Literal["option", "numeric", "alias"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def normalize_text(text: str) -> str:
    """Lower-case, strip accents, punctuation, articles and extra whitespace (SQuAD-style answer normalization)."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def parse_number(text: str) -> float | None:
    """The last number in `text` (commas, `$`, `%`, fractions like 3/4 handled), or None if there is none."""
    matches = _NUMBER.findall(str(text).replace("$", ""))
    if not matches:
        return None
    token = matches[-1].replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(token)
    except ValueError:
        return None


@dataclass(frozen=True)
class Item:
    """An objective question ("universal truth") with its gold answer.

    Option items (`answer_type="option"`) are answered by choosing an index into `options`; free-form items are
    answered with text checked numerically (`"numeric"`) or against accepted aliases (`"alias"`).
    """

    id: str
    """Unique within a task, stable across runs (e.g. ``"truthfulqa_mc1/0042"``)."""
    task: str
    """Name of the task the item comes from."""
    question: str
    """The question as shown to the model (without persona)."""
    gold: int | str
    """Option index of the (first) correct option for option items; the canonical answer text otherwise."""
    answer_type: AnswerType = "option"
    """How an answer is checked: option index, number, or alias match."""
    options: tuple[str, ...] | None = None
    """Answer options in the order shown to the model (already shuffled where the source lists gold first)."""
    correct_options: tuple[int, ...] = ()
    """All correct option indices (MC2 has several); defaults to ``(gold,)`` for option items."""
    aliases: tuple[str, ...] = ()
    """Accepted answer texts for alias items (the gold text is always accepted)."""
    incorrect_aliases: tuple[str, ...] = ()
    """Known wrong answers (TruthfulQA generation targets); used by user-simulator challenges."""
    context: str = ""
    """Passage the question refers to (BBQ context); shown before the question."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Source-specific metadata (category, source URL, ...)."""

    def __post_init__(self) -> None:
        if self.answer_type == "option":
            if not self.options or len(self.options) < 2:
                raise ValueError(f"item {self.id}: option items need at least 2 options")
            if not isinstance(self.gold, int) or not 0 <= self.gold < len(self.options):
                raise ValueError(f"item {self.id}: gold must be an option index in [0, {len(self.options)})")
            if not self.correct_options:
                object.__setattr__(self, "correct_options", (self.gold,))
        elif self.answer_type not in ("numeric", "alias"):
            raise ValueError(f"item {self.id}: answer_type must be 'option', 'numeric' or 'alias'")

    @property
    def has_options(self) -> bool:
        return self.answer_type == "option"

    def is_correct(self, answer: int | str | None) -> bool:
        """Whether `answer` (an option index, or a free-form answer text) is correct for this item."""
        if answer is None:
            return False
        if self.answer_type == "option":
            return int(answer) in self.correct_options
        if self.answer_type == "numeric":
            got, want = parse_number(str(answer)), parse_number(str(self.gold))
            return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
        norm = normalize_text(str(answer))
        if not norm:
            return False
        accepted = {normalize_text(a) for a in (str(self.gold), *self.aliases)} - {""}
        rejected = {normalize_text(a) for a in self.incorrect_aliases} - {""} - accepted
        if norm in accepted:
            return True
        if norm in rejected:
            return False
        # An alias matches when it appears in the answer as whole words, unless a known wrong answer appears too:
        # "people think X, but it is actually Y" must not count as X.
        mentions = lambda aliases: any(re.search(rf"\b{re.escape(a)}\b", norm) for a in aliases)
        return mentions(accepted) and not mentions(rejected)

    def canonical_answer(self, answer: int | str | None) -> str:
        """A string that is equal for two answers iff they count as the same answer (for consistency metrics)."""
        if answer is None:
            return ""
        if self.answer_type == "option":
            return str(int(answer))
        if self.answer_type == "numeric":
            value = parse_number(str(answer))
            return "" if value is None else f"{value:.6g}"
        return normalize_text(str(answer))
