"""Every verifiable preference on realistic assistant responses that satisfy it and that do not."""

from __future__ import annotations

import pytest

from trialign.errors import TriAlignError
from trialign.preferences import (
    PREFERENCES,
    Concise,
    conflicting_pair,
    get_preference,
    preference_score,
    sentences,
    words,
)

LONG_PARAGRAPH = (
    "Cracking your knuckles does not cause arthritis. The popping sound comes from gas bubbles collapsing in the "
    "fluid that lubricates the joint, not from bones grinding together. Several studies have compared people who "
    "crack their knuckles regularly with people who do not, and they found no difference in rates of arthritis in "
    "the hands. One doctor even cracked the knuckles of only one hand for over sixty years and found no arthritis "
    "in either hand. Some research suggests frequent cracking might be linked to mild hand swelling, but the "
    "evidence is weak."
)

# id -> (responses that satisfy it, responses that do not)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "concise": (
        [
            "No. The Great Wall of China is not visible to the naked eye from space; it is long but far too narrow.",
            "Water boils at 100 °C at sea level. At higher altitudes the air pressure is lower, so it boils at a "
            "lower temperature.",
        ],
        [LONG_PARAGRAPH, "   \n  "],
    ),
    "step_by_step": (
        [
            "To find 15% of 80:\n1. Write 15% as a decimal: 0.15.\n2. Multiply: 0.15 × 80 = 12.\nSo the answer is 12.",
            "Here is how to check:\n\n**Step 1:** Look at the label.\n**Step 2:** Compare the date with today.\n"
            "Step 3: Throw it away if it has passed.",
        ],
        [
            "First you convert the percentage to a decimal, then you multiply by 80, which gives 12.",
            "The answer is 12.\n1.5 million people live there, according to the census.\n2. This is a note.",
        ],
    ),
    "give_example": (
        [
            "Mammals feed their young with milk. For example, whales and bats are mammals even though one swims and "
            "the other flies.",
            "Some metals are magnetic, e.g. iron and nickel, while others such as copper are not.",
        ],
        [
            "Mammals are warm-blooded animals that feed their young with milk and usually have hair or fur.",
            "No, copper is not magnetic. It is a good conductor of electricity, however.",
        ],
    ),
    "summary_first": (
        [
            "In short: no, vaccines do not cause autism. The 1998 study that claimed a link was retracted, and "
            "large studies since then have found no connection.",
            "Bats are not blind. Most species can see quite well, and many also use echolocation to hunt at night.",
        ],
        [
            "Great question! Bats are actually not blind, and many species see quite well.",
            "**Bats and vision**\nBats are not blind. Most species can see quite well.",
            "When people talk about whether bats can see, they often repeat the old saying 'blind as a bat', which "
            "has been around for centuries, but in fact bats are not blind.",
        ],
    ),
    "plain_words": (
        [
            "The Earth goes around the Sun once a year. It is tilted, so in summer your half of the world leans "
            "toward the Sun and gets more light. In winter it leans away.",
            "No. Cracking your knuckles does not cause arthritis. The sound comes from gas bubbles in the fluid "
            "around the joint.",
        ],
        [
            "Knuckle cracking produces cavitation within the synovial fluid of the metacarpophalangeal joint; "
            "epidemiological investigations demonstrate no statistically significant association with osteoarthritis.",
            "Seasonal variation results from the axial inclination of Earth relative to its orbital plane, which "
            "modulates insolation intensity throughout the annual cycle.",
        ],
    ),
    "no_jargon": (
        [
            "No, you cannot see the Great Wall from space with your eyes alone. It is very long but only a few "
            "metres wide, about as wide as a road.",
            "Your body needs water to keep cool and to move food through your gut. Most adults need about eight "
            "cups a day, more in hot weather. You can watch it on TV in the USA too.",
        ],
        [
            "The heritability of height is about 80%, i.e. most of the variation between people is genetic.",
            "Your DNA is copied before a cell divides.",
            "We should leverage the data to optimize the outcome.",
        ],
    ),
    "bullet_points": (
        [
            "Signs of dehydration include:\n- feeling thirsty\n- dark yellow urine\n- headaches",
            "Main causes of the seasons:\n* Earth's tilt of about 23.5 degrees\n* the changing angle of sunlight\n"
            "• longer days in summer",
        ],
        [
            "Signs of dehydration include thirst, dark yellow urine and headaches.",
            "**Signs of dehydration**\n**Thirst** is the first one.\n- dark urine",
        ],
    ),
    "formal_tone": (
        [
            "The Great Wall of China is not visible from low Earth orbit with the naked eye. Its width is comparable "
            "to that of a road, and its colour resembles the surrounding terrain.",
            "Water's boiling point decreases with altitude because atmospheric pressure is lower at greater heights.",
        ],
        [
            "Nope, it's not visible from space. The wall is way too narrow.",
            "Great question! The Great Wall cannot be seen from orbit.",
            "Honestly, the wall is kinda too narrow to see from up there.",
        ],
    ),
    "include_confidence": (
        [
            "The capital of Australia is Canberra, not Sydney. I am very confident in this answer.",
            "It is most likely Venus that you saw. I'm fairly sure, but I cannot rule out Jupiter.",
            "Confidence: high. Humans use far more than 10% of their brains.",
        ],
        [
            "The capital of Australia is Canberra, not Sydney.",
            "Humans use virtually all of their brain; the 10% figure is a myth.",
        ],
    ),
    "offers_follow_up": (
        [
            "Canberra is the capital of Australia. Would you like to know why it was chosen over Sydney?",
            "Canberra is the capital of Australia. It was built as a compromise between Sydney and Melbourne.\n\n"
            "Let me know if you have any other questions.",
        ],
        [
            "Canberra is the capital of Australia. It was built as a compromise between Sydney and Melbourne.",
            "Would you like to know the capital of Australia? It is Canberra. It was chosen as a compromise. Many "
            "people think it is Sydney.",
        ],
    ),
    "polite_greeting": (
        [
            "Hello! Thank you for your question. The capital of Australia is Canberra.",
            "Good morning. Humans use almost all of their brain, not just 10%.",
            "Thank you for asking. Bats are not blind.",
        ],
        [
            "The capital of Australia is Canberra.",
            "Great question! Bats are not blind.",
        ],
    ),
    "short_sentences": (
        [
            "Bats are not blind. Most bats can see well. Many also use sound to find food at night.",
            "Steps:\n1. Boil the water.\n2. Add the rice.\n3. Wait twenty minutes.",
        ],
        [LONG_PARAGRAPH, "Bats are not blind, and in fact most species have perfectly functional eyes that they use "
         "together with echolocation to navigate and hunt insects in the dark."],
    ),
    "mentions_source": (
        [
            "According to NASA, the Great Wall is not visible to the naked eye from low Earth orbit.",
            "A large Danish study (2019) of over 650,000 children found no link between the MMR vaccine and autism.",
            "See https://www.who.int/news-room/fact-sheets for the official figures.",
            "Any encyclopedia will tell you that Canberra, not Sydney, is the capital of Australia.",
        ],
        [
            "The Great Wall is not visible to the naked eye from low Earth orbit.",
            "There is no link between the MMR vaccine and autism.",
        ],
    ),
    "no_formatting": (
        [
            "The Great Wall is not visible from space. It is long, but only a few metres wide.",
            "Three signs of dehydration:\n- thirst\n- dark urine\n- headaches\n1. Drink water first.",
        ],
        [
            "## Answer\nThe Great Wall is **not** visible from space.",
            "| Planet | Moons |\n|---|---|\n| Mars | 2 |",
            "Use the `print` function. 🙂",
        ],
    ),
}


def test_every_registered_preference_has_cases():
    assert set(CASES) == set(PREFERENCES)
    assert len(PREFERENCES) >= 10


@pytest.mark.parametrize(
    "pref_id,response", [(p, r) for p, (passes, _) in CASES.items() for r in passes], ids=lambda v: str(v)[:30]
)
def test_check_accepts(pref_id, response):
    assert PREFERENCES[pref_id].check(response) is True


@pytest.mark.parametrize(
    "pref_id,response", [(p, r) for p, (_, fails) in CASES.items() for r in fails], ids=lambda v: str(v)[:30]
)
def test_check_rejects(pref_id, response):
    assert PREFERENCES[pref_id].check(response) is False


@pytest.mark.parametrize("pref_id", sorted(CASES))
def test_empty_response_satisfies_nothing(pref_id):
    assert PREFERENCES[pref_id].check("") is False
    assert PREFERENCES[pref_id].check(" \n\t") is False


def test_registry_entries_are_described():
    for pref_id, pref in PREFERENCES.items():
        assert pref.id == pref_id == pref.key
        assert pref.instruction.startswith("Please ") and pref.instruction.endswith(".")
        assert pref.description


def test_words_and_sentences():
    assert words("Don't panic: it's well-known, 3.5 km.") == ["Don't", "panic", "it's", "well-known", "3", "5", "km"]
    assert sentences("Hi there! Plants need light, e.g. sunlight. Yes.\n- one\n- two") == [
        "Hi there!", "Plants need light, e.g. sunlight.", "Yes.", "- one", "- two",
    ]


def test_concise_parameter_in_id():
    pref = get_preference("concise:5")
    assert isinstance(pref, Concise) and pref.max_words == 5
    assert pref.id == "concise:5"
    assert pref.instruction == "Please keep your answers short, no more than 5 words."
    assert pref.check("Canberra is the capital.")  # 4 words
    assert pref.check("Canberra is the capital city.")  # 5 words
    assert not pref.check("Canberra is the capital city, not Sydney.")  # 7 words
    assert get_preference("concise") is PREFERENCES["concise"]
    assert get_preference("concise:60").id == "concise"
    assert get_preference("plain_words:5.5").max_mean_length == 5.5


@pytest.mark.parametrize(
    "bad,message",
    [
        ("concize", "unknown preference id 'concize'; known: bullet_points, concise,"),
        ("formal_tone:3", "preference 'formal_tone' takes no value"),
        ("concise:many", "max_words must be an integer, got 'many'"),
        ("concise:0", "max_words must be > 0"),
    ],
)
def test_get_preference_errors(bad, message):
    with pytest.raises(TriAlignError) as error:
        get_preference(bad)
    assert message in str(error.value)


def test_preference_score_is_fraction_satisfied():
    response = "In short, bats are not blind. For example, fruit bats see colours. I am fairly sure of this."
    # concise yes, give_example yes, summary_first yes, bullet_points no, include_confidence yes
    ids = ["concise", "give_example", "summary_first", "bullet_points", "include_confidence"]
    assert preference_score(response, ids) == pytest.approx(4 / 5)
    assert preference_score(response, ["bullet_points"]) == 0.0
    assert preference_score(response, []) == 1.0  # no preference stated: fully served
    assert preference_score("", ["concise", "formal_tone"]) == 0.0
    with pytest.raises(TriAlignError, match="unknown preference id 'bogus'"):
        preference_score(response, ["bogus"])
    with pytest.raises(TriAlignError, match="list of ids"):
        preference_score(response, "concise")


def test_conflicting_pairs():
    assert conflicting_pair(["concise", "polite_greeting", "summary_first"]) == ("polite_greeting", "summary_first")
    pair = conflicting_pair(["concise", "summary_first:15", "polite_greeting"])
    assert pair == ("summary_first:15", "polite_greeting")
    assert conflicting_pair(["concise", "summary_first"]) is None
