"""Social groups (the agents of TriAlign): who the user is, how they say it, and what they prefer.

Each group is one agent of the multi-agent formulation in DESIGN.md. A group has social attributes (age band,
education, English proficiency, nationality, religion, disability, ...), two ways of expressing its persona, and
a few verifiable preference ids from `trialign.preferences`:

* *explicit*: a first-person self-description ("I am a retired farmer ..."), as in persona-prompting studies;
* *implicit*: a short message in the group's own voice and writing style whose context reveals the group without
  listing the attributes. The paper describes implicit cues "such as writing style and context in a prior turn";
  we put the cue text in the same user turn as the question (see `trialign.prompts`), which keeps every episode's
  first state a single user message.

One group may be the *reference* group: the neutral user with no persona and no preferences, against which
breakage (correct without a persona, wrong with one) is measured.

Groups live in YAML files: either a list of group mappings, or a mapping with a ``groups:`` list (and an optional
``description:``). Bundled files: ``default`` (training groups) and ``heldout`` (groups never used in training, for
generalization tests), under ``trialign/resources/groups/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from trialign.errors import TriAlignError
from trialign.preferences import conflicting_pair, get_preference

DEFAULT_GROUPS = "default"
"""Name of the bundled group file used when a config names none."""

REQUIRED_FIELDS = ("id", "name")
PERSONA_FIELDS = ("explicit", "implicit")
OPTIONAL_FIELDS = ("attributes", "explicit", "implicit", "preferences", "reference", "challenge_style")


GROUP_ID_RULE = "non-empty letters, digits, '_' or '-'"


def is_valid_group_id(text: Any) -> bool:
    """Whether `text` is a valid group id (`GROUP_ID_RULE`). Group ids name folders (per-group adapters) and metric
    keys, so one can hold no path separator, '.' or space, whichever file it was read from."""
    return isinstance(text, str) and text.replace("_", "").replace("-", "").isalnum()


def check_group_ids(ids: Sequence[Any], where: str) -> None:
    """Refuse group ids that break `GROUP_ID_RULE` (they name folders later, so a path in data or config cannot
    leave the run folder): a one-line error naming `where` and the first bad id."""
    bad = [g for g in ids if not is_valid_group_id(g)]
    if bad:
        raise TriAlignError(f"{where}: group id {bad[0]!r} must be {GROUP_ID_RULE} (group ids name folders, so "
                            "they cannot hold a path)")


@dataclass(frozen=True)
class Group:
    """A social group: one agent, with its persona texts and verifiable preferences."""

    id: str
    """Short unique key (letters, digits, ``_``, ``-``); used to key per-group heads, metrics and dataset rows."""
    name: str
    """Human-readable name for reports ("Retired farmer, little schooling")."""
    attributes: dict[str, str] = field(default_factory=dict, hash=False)
    """Social attributes, e.g. ``{"age_band": "65+", "education": "primary"}``; used for reporting and slicing,
    never shown to the model directly."""
    explicit: str = ""
    """First-person self-description shown in the explicit expression ("I am a ...")."""
    implicit: str = ""
    """A short message in the group's own voice and writing style with contextual cues, not naming the
    attributes; shown in the implicit expression."""
    preferences: tuple[str, ...] = ()
    """Ids of the group's verifiable preferences (`trialign.preferences.PREFERENCES`, or ``"key:value"``)."""
    reference: bool = False
    """True for the neutral reference group: no persona, no preferences; the prompt is the bare item."""
    challenge_style: str = ""
    """How this group phrases disagreement in its own voice; a hint for the user simulator's challenge turns."""

    def __post_init__(self) -> None:
        for name in ("id", "name", "explicit", "implicit", "challenge_style"):
            if not isinstance(getattr(self, name), str):
                raise TriAlignError(f"group '{self.id}': field '{name}' must be text, got {getattr(self, name)!r}")
        if not is_valid_group_id(self.id):
            raise TriAlignError(f"group id '{self.id}' must be {GROUP_ID_RULE}")
        if not isinstance(self.reference, bool):
            raise TriAlignError(f"group '{self.id}': field 'reference' must be true or false, got {self.reference!r}")
        object.__setattr__(self, "preferences", tuple(self.preferences))
        for pref in self.preferences:
            try:
                get_preference(pref)
            except TriAlignError as error:
                raise TriAlignError(f"group '{self.id}': {error}") from None
        if len(set(self.preferences)) != len(self.preferences):
            raise TriAlignError(f"group '{self.id}': field 'preferences' lists an id twice: {list(self.preferences)}")
        pair = conflicting_pair(self.preferences)
        if pair:
            raise TriAlignError(
                f"group '{self.id}': preferences '{pair[0]}' and '{pair[1]}' cannot both be satisfied; keep one"
            )
        if not isinstance(self.attributes, dict) or not all(isinstance(k, str) for k in self.attributes):
            raise TriAlignError(f"group '{self.id}': field 'attributes' must be a mapping of names to values")
        if self.reference:
            extra = [n for n in ("explicit", "implicit", "preferences") if getattr(self, n)]
            if extra:
                raise TriAlignError(
                    f"group '{self.id}': the reference group has no persona; remove field(s) {', '.join(extra)}"
                )
        else:
            for name in PERSONA_FIELDS:
                if not getattr(self, name).strip():
                    raise TriAlignError(f"group '{self.id}': missing required field '{name}' (non-empty text)")

    def persona(self, expression: str) -> str:
        """The persona text for `expression` ("explicit" or "implicit"); "" for the reference group."""
        if expression not in PERSONA_FIELDS:
            raise TriAlignError(f"persona expression must be 'explicit' or 'implicit', got '{expression}'")
        return getattr(self, expression)


def _bundled_folder():
    # One joinpath argument at a time: Traversable.joinpath takes several only from Python 3.11.
    return resources.files("trialign").joinpath("resources").joinpath("groups")


def bundled_group_files() -> list[str]:
    """Names of the group files shipped with the package (``load_groups`` accepts these)."""
    folder = _bundled_folder()
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _resolve(spec: str | Path) -> tuple[str, str]:
    """(display name, YAML text) for a path or a bundled name."""
    text_spec = str(spec)
    looks_like_path = isinstance(spec, Path) or text_spec.endswith((".yaml", ".yml")) or "/" in text_spec \
        or "\\" in text_spec
    if looks_like_path:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TriAlignError(f"group file not found: {path}")
        return str(path), path.read_text(encoding="utf-8")
    resource = _bundled_folder().joinpath(f"{text_spec}.yaml")
    if not resource.is_file():
        raise TriAlignError(
            f"unknown group set '{text_spec}': give a YAML path or one of: {', '.join(bundled_group_files())}"
        )
    return f"{text_spec} ({resource})", resource.read_text(encoding="utf-8")


def _group_from_mapping(raw: Any, where: str) -> Group:
    if not isinstance(raw, dict):
        raise TriAlignError(f"{where}: expected a mapping with fields id, name, ..., got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise TriAlignError(
            f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
            f"allowed: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
        )
    for name in REQUIRED_FIELDS:
        if raw.get(name) in (None, ""):
            raise TriAlignError(f"{where}: missing required field '{name}'")
    attributes = raw.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise TriAlignError(f"{where}: field 'attributes' must be a mapping, got {type(attributes).__name__}")
    for key, value in attributes.items():
        if isinstance(value, (dict, list)) or value is None:
            raise TriAlignError(f"{where}: attributes.{key} must be a single value, got {value!r}")
    preferences = raw.get("preferences") or []
    if not isinstance(preferences, list):
        raise TriAlignError(f"{where}: field 'preferences' must be a list of preference ids, got {preferences!r}")
    return Group(
        id=str(raw["id"]),
        name=str(raw["name"]),
        attributes={str(k): str(v) for k, v in attributes.items()},
        explicit=_text(raw.get("explicit")),
        implicit=_text(raw.get("implicit")),
        preferences=tuple(preferences),
        reference=raw.get("reference", False),
        challenge_style=_text(raw.get("challenge_style")),
    )


def _text(value: Any) -> Any:
    # YAML block scalars end with a newline; None means the field was left empty.
    return "" if value is None else value.strip() if isinstance(value, str) else value


def load_groups(spec: str | Path) -> list[Group]:
    """Load and validate groups from a YAML path or a bundled name (``"default"``, ``"heldout"``).

    Raises `TriAlignError` naming the file (and the group's position and field) for: a YAML syntax error (with its
    line), an empty file, a top level that is not a list or a ``groups:`` mapping, a missing or unknown field, an
    unknown preference id, duplicate group ids, or more than one reference group.
    """
    where, text = _resolve(spec)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise TriAlignError(f"{where}: YAML syntax error{line}: {problem}") from None
    if data is None:
        raise TriAlignError(f"{where}: the file is empty; expected a list of groups")
    if isinstance(data, dict):
        if "groups" not in data:
            raise TriAlignError(f"{where}: expected a list of groups or a mapping with a 'groups' list")
        extra = sorted(set(data) - {"groups", "description"})
        if extra:
            raise TriAlignError(f"{where}: unknown top-level key(s) {', '.join(map(str, extra))}")
        data = data["groups"]
    if not isinstance(data, list):
        raise TriAlignError(f"{where}: expected a list of groups, got {type(data).__name__}")
    if not data:
        raise TriAlignError(f"{where}: the group list is empty")
    groups: list[Group] = []
    for index, raw in enumerate(data):
        label = f"{where}: groups[{index}]"
        if isinstance(raw, dict) and raw.get("id") not in (None, ""):
            label += f" ('{raw['id']}')"
        try:
            groups.append(_group_from_mapping(raw, label))
        except TriAlignError as error:
            message = str(error)
            if isinstance(raw, dict):  # drop Group's own "group 'x': " prefix; the label already names the group
                message = message.removeprefix(f"group '{raw.get('id')}': ")
            raise TriAlignError(message if message.startswith(label) else f"{label}: {message}") from None
    seen: set[str] = set()
    for group in groups:
        if group.id in seen:
            raise TriAlignError(f"{where}: duplicate group id '{group.id}'")
        seen.add(group.id)
    references = [g.id for g in groups if g.reference]
    if len(references) > 1:
        raise TriAlignError(f"{where}: more than one reference group: {', '.join(references)}; keep one")
    return groups


def select_groups(groups: Iterable[Group], ids: Sequence[str]) -> list[Group]:
    """The groups with the given ids, in the order of `ids`."""
    if isinstance(ids, str):
        ids = [ids]
    by_id = {g.id: g for g in groups}
    selected: list[Group] = []
    for group_id in ids:
        if group_id not in by_id:
            raise TriAlignError(f"unknown group id '{group_id}'; known: {', '.join(by_id)}")
        if any(g.id == group_id for g in selected):
            raise TriAlignError(f"group id '{group_id}' is selected twice")
        selected.append(by_id[group_id])
    return selected


def reference_group(groups: Iterable[Group]) -> Group | None:
    """The reference (no-persona) group among `groups`, or None."""
    return next((g for g in groups if g.reference), None)
