"""Groups: the bundled files, YAML validation errors that name the file and field, and selection."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from trialign.errors import TriAlignError
from trialign.groups import (
    DEFAULT_GROUPS,
    Group,
    bundled_group_files,
    load_groups,
    reference_group,
    select_groups,
)
from trialign.preferences import PREFERENCES, conflicting_pair

ATTRIBUTE_KEYS = {"age_band", "education", "english_proficiency", "nationality", "religion", "disability"}


def write(tmp_path: Path, text: str, name: str = "groups.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_bundled_files_are_listed():
    assert {"default", "heldout"} <= set(bundled_group_files())
    assert DEFAULT_GROUPS == "default"


def test_default_groups():
    groups = load_groups(DEFAULT_GROUPS)
    ids = [g.id for g in groups]
    assert ids[0] == "neutral" and len(ids) >= 9
    neutral = reference_group(groups)
    assert neutral is not None and neutral.id == "neutral"
    assert (neutral.explicit, neutral.implicit, neutral.preferences) == ("", "", ())
    personas = [g for g in groups if not g.reference]
    for group in personas:
        assert set(group.attributes) == ATTRIBUTE_KEYS, group.id
        assert group.explicit and group.implicit and group.challenge_style, group.id
        assert 2 <= len(group.preferences) <= 3, group.id
        assert all(p in PREFERENCES for p in group.preferences)
        assert conflicting_pair(group.preferences) is None
        assert group.explicit != group.implicit
        # Implicit cues show the group through voice and context, not by repeating the self-description.
        assert group.explicit.split(".")[0] not in group.implicit
    # The personas span every attribute axis: at least two distinct values on each.
    for key in ATTRIBUTE_KEYS:
        assert len({g.attributes[key] for g in personas}) >= 2, key


def test_heldout_groups_are_new():
    default = load_groups("default")
    heldout = load_groups("heldout")
    assert len(heldout) == 3 and reference_group(heldout) is None
    assert not {g.id for g in heldout} & {g.id for g in default}
    seen = {(k, v) for g in default for k, v in g.attributes.items()}
    for group in heldout:
        # Each held-out group has at least one attribute value no training group has.
        assert any((k, v) not in seen for k, v in group.attributes.items()), group.id


def test_load_from_path_and_top_level_list(tmp_path):
    path = write(tmp_path, """\
        - id: ref
          name: Reference
          reference: true
        - id: learner
          name: Learner
          attributes: {age_band: 18-24, year: 2}
          explicit: |
            I am learning English.
          implicit: I learn English, it is hard.
          preferences: [short_sentences, "concise:40"]
        """)
    ref, learner = load_groups(path)
    assert ref.reference and not learner.reference
    assert learner.explicit == "I am learning English."  # block scalar newline stripped
    assert learner.attributes == {"age_band": "18-24", "year": "2"}
    assert learner.preferences == ("short_sentences", "concise:40")
    assert learner.persona("implicit") == "I learn English, it is hard."
    assert load_groups(str(path)) == [ref, learner]


GOOD = """\
groups:
  - id: a
    name: A
    explicit: I am A.
    implicit: a here
    preferences: [concise]
"""


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "the file is empty"),
        ("groups: []\n", "the group list is empty"),
        ("just a string\n", "expected a list of groups, got str"),
        ("teams: []\n", "expected a list of groups or a mapping with a 'groups' list"),
        ("groups: []\nversion: 2\n", "unknown top-level key(s) version"),
        ("- 3\n", "groups[0]: expected a mapping"),
        ("- id: a\n  explicit: I am A.\n  implicit: hi\n", "groups[0] ('a'): missing required field 'name'"),
        ("- id: a\n  name: A\n  implicit: hi\n", "groups[0] ('a'): missing required field 'explicit'"),
        ("- id: a\n  name: A\n  explicit: x\n  implicit: y\n  prefs: [concise]\n", "unknown field(s) prefs"),
        (
            "- id: a\n  name: A\n  explicit: x\n  implicit: y\n  preferences: [concise, briefly]\n",
            "groups[0] ('a'): unknown preference id 'briefly'; known:",
        ),
        ("- id: a\n  name: A\n  explicit: x\n  implicit: y\n  preferences: concise\n", "must be a list of preference"),
        (
            "- id: a\n  name: A\n  explicit: x\n  implicit: y\n  preferences: [summary_first, polite_greeting]\n",
            "preferences 'summary_first' and 'polite_greeting' cannot both be satisfied",
        ),
        ("- id: a\n  name: A\n  explicit: x\n  implicit: y\n  attributes: [old]\n", "'attributes' must be a mapping"),
        ("- id: a\n  name: A\n  explicit: x\n  implicit: y\n  attributes: {age: [1, 2]}\n", "attributes.age must be"),
        ("- id: a b\n  name: A\n  explicit: x\n  implicit: y\n", "group id 'a b' must be"),
        (
            GOOD + "  - id: a\n    name: Again\n    explicit: x\n    implicit: y\n",
            "duplicate group id 'a'",
        ),
        (
            "- {id: r1, name: R1, reference: true}\n- {id: r2, name: R2, reference: true}\n",
            "more than one reference group: r1, r2",
        ),
        ("- {id: r, name: R, reference: true, explicit: I am R.}\n", "the reference group has no persona"),
        ("- {id: r, name: R, reference: yes please}\n", "'reference' must be true or false"),
    ],
)
def test_validation_errors_name_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(TriAlignError) as error:
        load_groups(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, GOOD + "  - id: b\n    name: [unclosed\n")
    with pytest.raises(TriAlignError) as error:
        load_groups(path)
    assert str(path) in str(error.value)
    assert "YAML syntax error at line 9" in str(error.value)


def test_missing_file_and_unknown_bundled_name(tmp_path):
    with pytest.raises(TriAlignError, match="group file not found: .*nope.yaml"):
        load_groups(tmp_path / "nope.yaml")
    with pytest.raises(TriAlignError, match="unknown group set 'defualt'.*default, heldout"):
        load_groups("defualt")


def test_group_constructor_validates():
    with pytest.raises(TriAlignError, match="group 'x': missing required field 'implicit'"):
        Group(id="x", name="X", explicit="I am X.")
    with pytest.raises(TriAlignError, match="group 'x': unknown preference id 'shorter'"):
        Group(id="x", name="X", explicit="I am X.", implicit="x", preferences=("shorter",))
    with pytest.raises(TriAlignError, match="lists an id twice"):
        Group(id="x", name="X", explicit="I am X.", implicit="x", preferences=("concise", "concise"))
    group = Group(id="x", name="X", explicit="I am X.", implicit="x", preferences=["concise"])  # type: ignore[arg-type]
    assert group.preferences == ("concise",)
    with pytest.raises(TriAlignError, match="expression must be 'explicit' or 'implicit', got 'both'"):
        group.persona("both")


def test_select_groups():
    groups = load_groups("default")
    picked = select_groups(groups, ["teenager", "neutral"])
    assert [g.id for g in picked] == ["teenager", "neutral"]
    assert [g.id for g in select_groups(groups, "teenager")] == ["teenager"]
    with pytest.raises(TriAlignError, match="unknown group id 'teen'; known: neutral, retired_farmer"):
        select_groups(groups, ["teen"])
    with pytest.raises(TriAlignError, match="'teenager' is selected twice"):
        select_groups(groups, ["teenager", "teenager"])
