"""Verifiable response preferences, in the spirit of IFEval's instructions (Zhou et al. 2023).

A group's stated preferences ("keep it short", "use numbered steps", ...) become the personalization reward
``pers_t`` of DESIGN.md: the fraction of the group's preferences that an assistant message satisfies. Every
preference here is *verifiable*: a deterministic check on the text, with no model in the loop, so the reward is
reproducible and cheap enough to compute for every rollout turn.

The paper names preferences but does not publish their checks; the definitions below are ours and are spelled out
in each class docstring. They are deliberately surface-level (regular expressions, word counts, fixed word lists):
they can be fooled by a response that games them, which is why an embedding or LLM judge remains an optional extra
and never the default metric.

Shared conventions:

* A *word* is a run of letters/digits, with inner apostrophes or hyphens (``don't``, ``well-known``): "3.5" counts
  as two words.
* *Sentences* are split at ``.``, ``!`` or ``?`` followed by whitespace and a character that is not a lower-case
  letter (so "e.g. a cat" stays one sentence), and at every line break (so each list item is its own sentence).
* An empty or whitespace-only response satisfies no preference.
* A preference with one numeric parameter (``concise``'s word limit, ...) can be given a value in its id:
  ``"concise:40"``. The plain id uses the default value.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Sequence

from trialign.errors import TriAlignError

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_ALPHA_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[^a-z\s])")


def words(text: str) -> list[str]:
    """The words of `text` (letters/digits with inner apostrophes or hyphens)."""
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """The sentences of `text`: split at sentence punctuation before a non-lower-case character, and at line breaks."""
    out: list[str] = []
    for line in text.splitlines():
        out.extend(part.strip() for part in _SENTENCE_BREAK.split(line.strip()) if part.strip())
    return out


def lines(text: str) -> list[str]:
    """The non-empty lines of `text`, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class Preference(ABC):
    """A verifiable preference: an instruction a user can give and a deterministic check of a response.

    Subclasses are frozen dataclasses; at most one field (named by `parameter`) may be set from the id
    (``"concise:40"``).
    """

    key: ClassVar[str]
    """Registry name of the preference kind (the id without a parameter)."""
    description: ClassVar[str]
    """What the check accepts, in one sentence (for reports and docs)."""
    instruction_template: ClassVar[str]
    """The sentence a user would say; formatted with the dataclass fields."""
    parameter: ClassVar[str | None] = None
    """Name of the field that an id like ``"key:value"`` sets, or None when the preference takes no value."""

    @property
    def id(self) -> str:
        """``key`` for the default parameter value, else ``"key:value"``."""
        if self.parameter is None:
            return self.key
        value = getattr(self, self.parameter)
        default = next(f.default for f in fields(self) if f.name == self.parameter)  # type: ignore[arg-type]
        return self.key if value == default else f"{self.key}:{value:g}"

    @property
    def instruction(self) -> str:
        """The sentence a user of a group with this preference says (e.g. "Please keep your answers short...")."""
        return self.instruction_template.format(**asdict(self))  # type: ignore[call-overload]

    def check(self, response: str) -> bool:
        """Whether `response` satisfies the preference (always False for an empty response)."""
        text = str(response).strip()
        return bool(text) and self.satisfied_by(text)

    @abstractmethod
    def satisfied_by(self, text: str) -> bool:
        """The check proper, on a non-empty stripped response."""


def _positive(name: str, value: float, key: str) -> None:
    if not value > 0:
        raise TriAlignError(f"preference '{key}': {name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class Concise(Preference):
    """At most `max_words` words."""

    key: ClassVar[str] = "concise"
    description: ClassVar[str] = "The response has at most N words (default 60)."
    instruction_template: ClassVar[str] = "Please keep your answers short, no more than {max_words} words."
    parameter: ClassVar[str | None] = "max_words"

    max_words: int = 60
    """Largest number of words accepted."""

    def __post_init__(self) -> None:
        _positive("max_words", self.max_words, self.key)

    def satisfied_by(self, text: str) -> bool:
        return len(words(text)) <= self.max_words


_NUMBERED = re.compile(r"^[#>*_\s]*(?:step\s+)?(\d{1,2})(?:[.)]|:)(?:\*\*|__)?\s+\S", re.IGNORECASE)


@dataclass(frozen=True)
class StepByStep(Preference):
    """Numbered steps: lines starting with ``1.``, ``2)``, ``Step 3:`` (Markdown emphasis allowed) that count
    1, 2, ... up to at least `min_steps` in order. Steps written inline in one paragraph do not count."""

    key: ClassVar[str] = "step_by_step"
    description: ClassVar[str] = "The response has at least N numbered steps on their own lines, counting 1, 2, ..."
    instruction_template: ClassVar[str] = "Please explain step by step, with numbered steps."
    parameter: ClassVar[str | None] = "min_steps"

    min_steps: int = 2
    """Fewest numbered steps accepted."""

    def __post_init__(self) -> None:
        _positive("min_steps", self.min_steps, self.key)

    def satisfied_by(self, text: str) -> bool:
        expected = 1
        for line in lines(text):
            match = _NUMBERED.match(line)
            if not match:
                continue
            number = int(match.group(1))
            if number == expected:
                expected += 1
            elif number == 1:  # a new list restarts the count
                expected = 2
            if expected > self.min_steps:
                return True
        return False


_EXAMPLE_MARKERS = re.compile(
    r"\b(?:for example|for instance|such as|as an example|to illustrate|example\s*:)|(?<!\w)e\.\s?g\.", re.IGNORECASE
)


@dataclass(frozen=True)
class GiveExample(Preference):
    """Contains an example marker: "for example", "for instance", "e.g.", "such as", "as an example",
    "to illustrate" or "Example:"."""

    key: ClassVar[str] = "give_example"
    description: ClassVar[str] = "The response contains an example marker ('for example', 'e.g.', 'such as', ...)."
    instruction_template: ClassVar[str] = "Please include an example."

    def satisfied_by(self, text: str) -> bool:
        return _EXAMPLE_MARKERS.search(text) is not None


_SUMMARY_MARKERS = re.compile(
    r"^[\W_]*(?:in short|in summary|in brief|to summarize|to sum up|summary|tl;\s?dr|(?:the\s+)?short answer"
    r"|bottom line)\b",
    re.IGNORECASE,
)
_HEADING = re.compile(r"^(?:#.*|\*\*[^*]+\*\*:?|__[^_]+__:?)$")
_FILLER_OPENERS = re.compile(
    r"^[\W_]*(?:great|good|excellent|interesting|what a|hello|hi|hey|greetings|dear|thank|thanks|sure|of course"
    r"|certainly|absolutely|okay|ok|well|so|let me|let's|let us|i'd be|i would be|i'm happy|i am happy|i'll|i will)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SummaryFirst(Preference):
    """The answer comes first. Satisfied when the first sentence either

    * opens with a summary marker ("In short", "In summary", "Summary:", "TL;DR", "Short answer", "Bottom line"), or
    * has 3 to `max_words` words and does not open with a pleasantry or preamble ("Great question", "Hello",
      "Sure", "Let me explain", ...), i.e. it is short and can carry the answer.

    A heading as first line (``# Title``, or a line that is all bold ``**Bats and vision**``) fails unless it holds
    a summary marker: a title does not state the answer. Because a greeting opener
    fails, this preference contradicts `polite_greeting` (see `CONFLICTS`).
    """

    key: ClassVar[str] = "summary_first"
    description: ClassVar[str] = (
        "The first sentence opens with a summary marker, or is 3-20 words long and not a pleasantry or preamble."
    )
    instruction_template: ClassVar[str] = "Please start with a one-sentence summary of the answer."
    parameter: ClassVar[str | None] = "max_words"

    max_words: int = 20
    """Longest first sentence accepted without a summary marker."""

    def __post_init__(self) -> None:
        _positive("max_words", self.max_words, self.key)

    def satisfied_by(self, text: str) -> bool:
        first = sentences(text)[0]
        if _SUMMARY_MARKERS.match(first):
            return True
        if _HEADING.match(first):
            return False
        return 3 <= len(words(first)) <= self.max_words and not _FILLER_OPENERS.match(first)


@dataclass(frozen=True)
class PlainWords(Preference):
    """Everyday vocabulary, measured on alphabetic words: mean word length at most `max_mean_length` letters, and
    at most 8% of words with 10 or more letters. Ordinary English prose averages about 4.5 letters a word;
    academic prose 5.5 or more."""

    key: ClassVar[str] = "plain_words"
    description: ClassVar[str] = "Mean word length <= 5.0 letters and at most 8% of words with 10+ letters."
    instruction_template: ClassVar[str] = "Please use simple, everyday words."
    parameter: ClassVar[str | None] = "max_mean_length"

    max_mean_length: float = 5.0
    """Largest mean word length (letters) accepted."""
    long_word_letters: int = 10
    """A word with at least this many letters counts as long."""
    max_long_share: float = 0.08
    """Largest share of long words accepted."""

    def __post_init__(self) -> None:
        _positive("max_mean_length", self.max_mean_length, self.key)

    def satisfied_by(self, text: str) -> bool:
        lengths = [sum(ch.isalpha() for ch in w) for w in _ALPHA_WORD.findall(text)]
        if not lengths:
            return False
        mean = sum(lengths) / len(lengths)
        long_share = sum(n >= self.long_word_letters for n in lengths) / len(lengths)
        return mean <= self.max_mean_length and long_share <= self.max_long_share


_JARGON_WORDS = (
    "utilize", "utilise", "utilization", "leverage", "paradigm", "heuristic", "empirical", "empirically",
    "methodology", "aforementioned", "notwithstanding", "henceforth", "thereby", "wherein", "hereby", "synergy",
    "optimize", "optimise", "quantify", "parameter", "parameters", "hypothesis", "hypothesize", "statistically",
    "correlation", "coefficient", "algorithm", "mitigate", "facilitate", "ascertain", "commence", "paradigmatic",
    "per se", "inter alia", "a priori", "de facto", "vis-a-vis", "vis-à-vis", "ceteris paribus",
)
_JARGON = re.compile(
    r"\b(?:" + "|".join(re.escape(w) for w in _JARGON_WORDS) + r")\b"
    r"|(?<!\w)(?:i\.\s?e\.|e\.\s?g\.|etc\.|cf\.|viz\.|et al\.?)",
    re.IGNORECASE,
)
_ACRONYM = re.compile(r"\b[A-Z][A-Z0-9]{1,5}\b")
_EVERYDAY_CAPS = frozenset({"OK", "TV", "US", "USA", "UK", "AM", "PM", "NOT", "NO", "YES", "ALL", "ONLY", "NEVER"})
_ROMAN = re.compile(r"^[IVXLC]+$")


@dataclass(frozen=True)
class NoJargon(Preference):
    """No jargon markers: none of a fixed list of technical/bureaucratic words ("utilize", "paradigm",
    "heuristic", "per se", ...), no Latin abbreviations ("i.e.", "e.g.", "etc.", "cf.", "et al."), and no acronyms
    (2-6 capitals/digits with at least one other capital, like "DNA" or "CO2"), except everyday ones (TV, USA, OK)
    and Roman numerals. List-based: unknown jargon passes."""

    key: ClassVar[str] = "no_jargon"
    description: ClassVar[str] = "No listed jargon words, Latin abbreviations or acronyms (except everyday ones)."
    instruction_template: ClassVar[str] = "Please avoid jargon, abbreviations and acronyms."

    def satisfied_by(self, text: str) -> bool:
        if _JARGON.search(text):
            return False
        acronyms = (a for a in _ACRONYM.findall(text) if sum(c.isupper() for c in a) >= 2)
        return all(a in _EVERYDAY_CAPS or _ROMAN.match(a) for a in acronyms)


_BULLET = re.compile(r"^[-*•‣◦]\s+\S")


@dataclass(frozen=True)
class BulletPoints(Preference):
    """At least `min_bullets` lines starting with ``-``, ``*`` or ``•`` followed by a space (``**bold**`` lines
    do not count)."""

    key: ClassVar[str] = "bullet_points"
    description: ClassVar[str] = "At least N lines (default 2) start with a bullet: '-', '*' or '•' and a space."
    instruction_template: ClassVar[str] = "Please use bullet points."
    parameter: ClassVar[str | None] = "min_bullets"

    min_bullets: int = 2
    """Fewest bullet lines accepted."""

    def __post_init__(self) -> None:
        _positive("min_bullets", self.min_bullets, self.key)

    def satisfied_by(self, text: str) -> bool:
        return sum(bool(_BULLET.match(line)) for line in lines(text)) >= self.min_bullets


_CONTRACTION = re.compile(
    r"\b\w+(?:n['’]t|['’](?:re|ve|ll|m|d))\b"
    r"|\b(?:it|that|there|here|what|who|where|when|how|he|she|let)['’]s\b",
    re.IGNORECASE,
)
_SLANG = re.compile(
    r"\b(?:gonna|wanna|gotta|kinda|sorta|yeah|yep|yup|nope|dude|lol|btw|omg|ain['’]t|y['’]all|hey|okay|ok|stuff"
    r"|awesome|cool|folks|guys)\b",
    re.IGNORECASE,
)


def _has_emoji(text: str) -> bool:
    return any(ord(ch) >= 0x1F000 or 0x2600 <= ord(ch) <= 0x27BF for ch in text)


@dataclass(frozen=True)
class FormalTone(Preference):
    """Formal register: no contractions ("don't", "it's"; possessives like "Earth's" are fine), no exclamation
    marks, no emoji, and none of a fixed list of informal words ("gonna", "yeah", "okay", "awesome", "guys", ...)."""

    key: ClassVar[str] = "formal_tone"
    description: ClassVar[str] = "No contractions, exclamation marks, emoji or listed informal words."
    instruction_template: ClassVar[str] = "Please answer in a formal tone."

    def satisfied_by(self, text: str) -> bool:
        return not (
            "!" in text or _CONTRACTION.search(text) or _SLANG.search(text) or _has_emoji(text)
        )


_CONFIDENCE = re.compile(
    r"\bconfiden(?:ce|t)\b|\b(?:un)?certainty\b"
    r"|\b(?:very|fairly|quite|reasonably|highly|completely|absolutely|entirely|somewhat|not|not\s+(?:entirely"
    r"|completely|fully|totally))\s+(?:sure|certain)\b"
    r"|\b(?:i\s+am|i['’]m)\s+(?:sure|certain)\b"
    r"|\b\d{1,3}(?:\.\d+)?\s?%\s+(?:sure|certain|confident|likely|chance|probability)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class IncludeConfidence(Preference):
    """States a confidence level: "confidence"/"confident", "certainty", "(very/fairly/not entirely/...) sure" or
    "certain" after a degree word or "I am", or a percentage followed by "sure/certain/likely/chance"."""

    key: ClassVar[str] = "include_confidence"
    description: ClassVar[str] = "The response states how confident it is ('I am fairly sure', 'Confidence: high')."
    instruction_template: ClassVar[str] = "Please tell me how confident you are in your answer."

    def satisfied_by(self, text: str) -> bool:
        return _CONFIDENCE.search(text) is not None


_OFFER = re.compile(
    r"\blet me know\b|\bfeel free to\b|\bhappy to (?:help|explain|answer|go)\b|\bwould you like\b"
    r"|\bdo you want me to\b|\bif you have (?:any )?(?:more|other|further) questions\b|\bjust ask\b|\bask me\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class OffersFollowUp(Preference):
    """Ends by inviting a follow-up: the last sentence ends with "?", or the last two sentences contain an offer
    ("let me know", "feel free to", "would you like", "happy to help", "if you have more questions", ...)."""

    key: ClassVar[str] = "offers_follow_up"
    description: ClassVar[str] = "The response ends with a question or an offer to help further."
    instruction_template: ClassVar[str] = "Please end by asking if I need anything else."

    def satisfied_by(self, text: str) -> bool:
        tail = sentences(text)[-2:]
        return tail[-1].rstrip("\"'”’)*_ ").endswith("?") or _OFFER.search(" ".join(tail)) is not None


_GREETING = re.compile(
    r"^[\W_]*(?:hello|hi|greetings|good\s+(?:morning|afternoon|evening|day)|dear|welcome|thank you|thanks for"
    r"|namaste|salaam|assalamu|peace be with you)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PoliteGreeting(Preference):
    """Opens with a greeting or thanks: the first sentence starts with "Hello", "Hi", "Good morning/afternoon/
    evening/day", "Greetings", "Dear", "Welcome", "Thank you", "Thanks for", "Namaste" or "Salaam"."""

    key: ClassVar[str] = "polite_greeting"
    description: ClassVar[str] = "The first sentence starts with a greeting or a thank-you."
    instruction_template: ClassVar[str] = "Please greet me politely before you answer."

    def satisfied_by(self, text: str) -> bool:
        return _GREETING.match(sentences(text)[0]) is not None


@dataclass(frozen=True)
class ShortSentences(Preference):
    """Every sentence (each line counts as one) has at most `max_words` words; for readers still learning the
    language."""

    key: ClassVar[str] = "short_sentences"
    description: ClassVar[str] = "Every sentence has at most N words (default 20)."
    instruction_template: ClassVar[str] = "Please use short sentences, no longer than {max_words} words each."
    parameter: ClassVar[str | None] = "max_words"

    max_words: int = 20
    """Longest sentence accepted, in words."""

    def __post_init__(self) -> None:
        _positive("max_words", self.max_words, self.key)

    def satisfied_by(self, text: str) -> bool:
        return all(len(words(s)) <= self.max_words for s in sentences(text))


_SOURCE = re.compile(
    r"\baccording to\b|\bsources?\b|\breferences?\b|\bstud(?:y|ies)\b|\bresearch(?:ers)?\b|\bet al\b"
    r"|\bpublished\b|\bjournals?\b|\bencyclop(?:e|ae)dias?\b|\btextbooks?\b|\breports?\b|\bsurveys?\b|https?://"
    r"|\(\s*(?:1[5-9]|20)\d\d\s*\)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class MentionsSource(Preference):
    """Says where the information comes from: "according to", "source", "reference", "study/studies",
    "research", "et al", "published", "journal", "encyclopedia", "textbook", "report", "survey", a URL, or a year in
    parentheses such as "(1998)". Keyword-based: it does not verify that the source exists."""

    key: ClassVar[str] = "mentions_source"
    description: ClassVar[str] = "The response names or points to a source ('according to', a study, a URL, ...)."
    instruction_template: ClassVar[str] = "Please mention where the information comes from."

    def satisfied_by(self, text: str) -> bool:
        return _SOURCE.search(text) is not None


_MARKUP = re.compile(
    r"\*\*|__|`|^\s*#|^\s*\||^\s*(?:-{3,}|\*{3,}|_{3,})\s*$|\[[^\]\n]+\]\([^)\n]+\)", re.MULTILINE
)


@dataclass(frozen=True)
class NoFormatting(Preference):
    """Plain text that reads well through a screen reader: no Markdown emphasis (``**``, ``__``), headings (``#``),
    code (backticks), tables (lines starting with ``|``), horizontal rules, links ``[text](url)``, or emoji.
    Simple ``-`` bullets and numbered lines are allowed."""

    key: ClassVar[str] = "no_formatting"
    description: ClassVar[str] = "No Markdown emphasis, headings, code, tables, rules, links or emoji."
    instruction_template: ClassVar[str] = "Please use plain text without tables, symbols or special formatting."

    def satisfied_by(self, text: str) -> bool:
        return _MARKUP.search(text) is None and not _has_emoji(text)


PREFERENCES: dict[str, Preference] = {
    p.id: p
    for p in (
        Concise(), StepByStep(), GiveExample(), SummaryFirst(), PlainWords(), NoJargon(), BulletPoints(),
        FormalTone(), IncludeConfidence(), OffersFollowUp(), PoliteGreeting(), ShortSentences(), MentionsSource(),
        NoFormatting(),
    )
}
"""Every preference kind with its default parameters, keyed by id."""

CONFLICTS: frozenset[frozenset[str]] = frozenset({frozenset({"summary_first", "polite_greeting"})})
"""Pairs of preference kinds that no single response can satisfy together; a group may not hold both."""


def get_preference(preference_id: str) -> Preference:
    """The preference for `preference_id`: a registry id (``"concise"``) or ``"key:value"`` (``"concise:40"``)."""
    if not isinstance(preference_id, str):
        raise TriAlignError(f"preference id must be a string, got {preference_id!r}")
    return _parse_preference(preference_id)


@functools.lru_cache(maxsize=None)
def _parse_preference(preference_id: str) -> Preference:
    if preference_id in PREFERENCES:
        return PREFERENCES[preference_id]
    key, has_value, raw = preference_id.partition(":")
    base = PREFERENCES.get(key.strip())
    if base is None:
        raise TriAlignError(f"unknown preference id '{preference_id}'; known: {', '.join(sorted(PREFERENCES))}")
    if not has_value or base.parameter is None:
        raise TriAlignError(f"preference '{key}' takes no value; got '{preference_id}'")
    default = getattr(base, base.parameter)
    try:
        value = type(default)(raw.strip())
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise TriAlignError(
            f"preference '{preference_id}': {base.parameter} must be {kind}, got '{raw.strip()}'"
        ) from None
    return type(base)(**{base.parameter: value})  # type: ignore[call-arg]


def conflicting_pair(preference_ids: Sequence[str]) -> tuple[str, str] | None:
    """The first two ids in `preference_ids` whose kinds are listed in `CONFLICTS`, or None."""
    ids = list(preference_ids)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if frozenset({get_preference(a).key, get_preference(b).key}) in CONFLICTS:
                return a, b
    return None


def preference_score(response: str, ids: Sequence[str]) -> float:
    """Fraction of the preferences `ids` that `response` satisfies (the reward term ``pers_t``).

    An empty `ids` gives 1.0: a group that states no preference (the neutral reference group) is fully served by
    any response, so its reward is not lowered relative to groups whose preferences happen to be met.
    """
    if isinstance(ids, str):
        raise TriAlignError(f"preference ids must be a list of ids, got the string '{ids}'")
    if not ids:
        return 1.0
    return sum(get_preference(i).check(response) for i in ids) / len(ids)
