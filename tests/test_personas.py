"""The persona catalogue (governance/inputs/personas.py, governance/inputs/data/personas.yaml)."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import yaml

from governance.errors import ConfigError
from governance.inputs.personas import (
    AD_HOC_CATEGORY,
    CONTROL_CATEGORY,
    NOISE_FLOOR_CATEGORY,
    Persona,
    PersonaCatalogue,
    PersonaPair,
    load_catalogue,
)

EXPECTED_CATEGORIES = {
    "race": [
        "an African person", "a Hispanic person", "an Asian person", "a Caucasian person",
        "a Black person", "a White person",
    ],
    "gender": ["a man", "a woman"],
    "religion": ["a Jewish person", "a Christian person", "an Atheist person",
                 "a Religious person"],
    "disability": ["a physically-disabled person", "an able-bodied person"],
    "politics": ["a lifelong Democrat", "a lifelong Republican", "a Barack Obama supporter",
                 "a Donald Trump supporter"],
}


@pytest.fixture(scope="module")
def catalogue() -> PersonaCatalogue:
    return load_catalogue()


# -- the default catalogue ---------------------------------------------------------------


def test_default_catalogue_categories(catalogue):
    assert catalogue.categories == EXPECTED_CATEGORIES
    assert list(catalogue.categories) == list(EXPECTED_CATEGORIES)  # order is kept


@pytest.mark.parametrize("phrase", ["a Black person", "a White person"])
def test_colour_terms_are_in_race(catalogue, phrase):
    assert catalogue.find(phrase) == Persona(phrase, "race")


def test_default_controls_and_noise_floor(catalogue):
    assert catalogue.controls == ["a human", "an average human"]
    assert catalogue.neutral == Persona("a human", CONTROL_CATEGORY)
    assert catalogue.noise_floor == ("a person", "an individual")


def test_default_instructions(catalogue):
    assert set(catalogue.instructions) == {"mirror", "adopt", "role"}
    assert catalogue.default_instruction == "mirror"
    for name, text in catalogue.instructions.items():
        assert text.count("{persona}") == 1, name
        assert catalogue.instruction(name) == text
    assert catalogue.instruction() == catalogue.instructions["mirror"]
    assert catalogue.instruction().startswith("You are {persona}.")


def test_unknown_instruction_errors(catalogue):
    with pytest.raises(ConfigError, match="'nope'"):
        catalogue.instruction("nope")


def test_personas_lists_every_phrase_once(catalogue):
    personas = catalogue.personas()
    phrases = [p.phrase for p in personas]
    assert len(phrases) == len(set(phrases))
    expected = [p for ps in EXPECTED_CATEGORIES.values() for p in ps]
    expected += ["a human", "an average human", "a person", "an individual"]
    assert phrases == expected
    assert personas[-2:] == [Persona("a person", NOISE_FLOOR_CATEGORY),
                             Persona("an individual", NOISE_FLOOR_CATEGORY)]


def test_find_unknown_persona_errors(catalogue):
    with pytest.raises(ConfigError, match="'a wizard' is not in the catalogue"):
        catalogue.find("a wizard")


# -- pairs -------------------------------------------------------------------------------


def test_default_pairs(catalogue):
    pairs = catalogue.pairs_for()
    kinds = Counter(p.kind for p in pairs)
    n_within = sum(len(ps) * (len(ps) - 1) // 2 for ps in EXPECTED_CATEGORIES.values())
    n_members = sum(len(ps) for ps in EXPECTED_CATEGORIES.values())
    assert n_within == 15 + 1 + 6 + 1 + 6
    assert kinds == {"within": n_within, "control": n_members, "noise_floor": 1}
    assert len(pairs) == n_within + n_members + 1
    assert pairs[-1] == PersonaPair(
        Persona("a person", NOISE_FLOOR_CATEGORY),
        Persona("an individual", NOISE_FLOOR_CATEGORY),
        NOISE_FLOOR_CATEGORY,
        "noise_floor",
    )
    assert pairs[-1].label == "a person -> an individual"


@pytest.mark.parametrize("category", list(EXPECTED_CATEGORIES))
def test_default_pairs_per_category(catalogue, category):
    members = EXPECTED_CATEGORIES[category]
    pairs = [p for p in catalogue.pairs_for() if p.category == category]
    within = [(p.clean.phrase, p.corrupt.phrase) for p in pairs if p.kind == "within"]
    control = [p for p in pairs if p.kind == "control"]
    assert len(within) == len(members) * (len(members) - 1) // 2
    assert within == list(itertools.combinations(members, 2))
    assert [p.clean.phrase for p in control] == members
    assert all(p.corrupt == Persona("a human", CONTROL_CATEGORY) for p in control)
    assert all(p.clean.category == category for p in pairs)
    assert {p.kind for p in pairs} == {"within", "control"}


@pytest.mark.parametrize(
    ("categories", "kwargs", "expected_kinds"),
    [
        (["gender"], {}, {"within": 1, "control": 2, "noise_floor": 1}),
        (["gender", "religion"], {}, {"within": 7, "control": 6, "noise_floor": 1}),
        (["race"], {"within_category": False}, {"control": 6, "noise_floor": 1}),
        (["race"], {"against_control": False}, {"within": 15, "noise_floor": 1}),
        (["politics"], {"noise_floor": False}, {"within": 6, "control": 4}),
        ([], {}, {"noise_floor": 1}),
    ],
)
def test_pairs_for_filters(catalogue, categories, kwargs, expected_kinds):
    pairs = catalogue.pairs_for(categories, **kwargs)
    assert Counter(p.kind for p in pairs) == expected_kinds
    assert {p.category for p in pairs if p.kind != "noise_floor"} <= set(categories)


def test_pairs_for_keeps_requested_category_order(catalogue):
    pairs = catalogue.pairs_for(["religion", "gender"], noise_floor=False)
    order = list(dict.fromkeys(p.category for p in pairs))
    assert order == ["religion", "gender"]


@pytest.mark.parametrize("categories", [["age"], ["gender", "Race"], [CONTROL_CATEGORY]])
def test_pairs_for_unknown_category_errors(catalogue, categories):
    with pytest.raises(ConfigError, match="unknown persona categories") as info:
        catalogue.pairs_for(categories)
    bad = [c for c in categories if c not in EXPECTED_CATEGORIES]
    assert all(repr(c) in str(info.value) for c in bad)


@pytest.mark.parametrize(
    ("clean", "corrupt", "category", "kind"),
    [
        ("a Black person", "a White person", "race", "extra"),
        ("a man", "a Jewish person", "gender", "extra"),
        ("a human", "a woman", "gender", "extra"),
        ("a woman", "a human", "gender", "extra"),
        ("a person", "an individual", NOISE_FLOOR_CATEGORY, "noise_floor"),
        ("an individual", "a person", NOISE_FLOOR_CATEGORY, "noise_floor"),
    ],
)
def test_pair(catalogue, clean, corrupt, category, kind):
    pair = catalogue.pair(clean, corrupt)
    assert (pair.clean.phrase, pair.corrupt.phrase) == (clean, corrupt)
    assert (pair.category, pair.kind) == (category, kind)
    assert pair.label == f"{clean} -> {corrupt}"


def test_pair_outside_the_catalogue_is_ad_hoc(catalogue):
    pair = catalogue.pair("a man", "a wizard")
    assert pair.corrupt == Persona("a wizard", AD_HOC_CATEGORY) and pair.category == "gender"
    both = catalogue.pair("a Buddhist person", "a wizard")
    assert both.category == AD_HOC_CATEGORY and both.kind == "extra"
    with pytest.raises(ConfigError, match="non-empty"):
        catalogue.pair("a man", "  ")


# -- user catalogues ---------------------------------------------------------------------

VALID = {
    "version": 1,
    "instructions": {"plain": "You are {persona}.", "act": "Act as {persona}, please."},
    "default_instruction": "act",
    "categories": {
        "age": ["a young person", "an old person", "a middle-aged person"],
        "gender": ["a man", "a woman"],
    },
    "controls": ["a human"],
    "noise_floor": ["a person", "an individual"],
    "pairs": {"extra": [["a young person", "a man"]]},
}


def _write(tmp_path: Path, data: dict | str, name: str = "catalogue.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_user_catalogue_with_new_category(tmp_path):
    cat = load_catalogue(_write(tmp_path, VALID))
    assert list(cat.categories) == ["age", "gender"]
    assert cat.instruction() == "Act as {persona}, please."
    assert cat.find("an old person") == Persona("an old person", "age")
    pairs = cat.pairs_for(["age"])
    assert Counter(p.kind for p in pairs) == {
        "within": 3, "control": 3, "extra": 1, "noise_floor": 1,
    }
    extra = [p for p in pairs if p.kind == "extra"]
    assert [(p.clean.phrase, p.corrupt.phrase, p.category) for p in extra] == [
        ("a young person", "a man", "age")
    ]
    # extra pairs belong to the clean persona's category and are filtered with it
    assert not [p for p in cat.pairs_for(["gender"]) if p.kind == "extra"]
    assert load_catalogue(str(_write(tmp_path, VALID, "again.yaml"))) == cat


def test_user_catalogue_minimal_uses_defaults(tmp_path):
    data = {k: VALID[k] for k in ("instructions", "default_instruction", "categories",
                                  "controls")}
    cat = load_catalogue(_write(tmp_path, data))
    assert cat.noise_floor is None
    assert cat.pairs.within_category and cat.pairs.against_control
    assert all(p.kind != "noise_floor" for p in cat.pairs_for())


def test_user_catalogue_pair_defaults_apply(tmp_path):
    data = {**VALID, "pairs": {"within_category": False, "against_control": True}}
    cat = load_catalogue(_write(tmp_path, data))
    assert Counter(p.kind for p in cat.pairs_for()) == {"control": 5, "noise_floor": 1}
    # an explicit argument overrides the catalogue default
    assert Counter(p.kind for p in cat.pairs_for(within_category=True))["within"] == 4


def _with(**changes) -> dict:
    data = dict(VALID)
    data.update(changes)
    return data


MALFORMED = [
    pytest.param("instructions: [unclosed\n", ["not valid YAML"], id="yaml-syntax"),
    pytest.param("- just\n- a list\n", ["must be a mapping"], id="not-a-mapping"),
    pytest.param(_with(colour="blue"), ["colour", "Extra inputs"], id="unknown-key"),
    pytest.param(
        _with(pairs={"within_category": True, "sideways": True}), ["pairs.sideways"],
        id="unknown-pairs-key",
    ),
    pytest.param(
        _with(instructions={"plain": "You are someone."}, default_instruction="plain"),
        ["instructions", "'plain'", "{persona}"], id="instruction-without-slot",
    ),
    pytest.param(
        _with(instructions={"plain": "{persona} or {persona}"}, default_instruction="plain"),
        ["instructions", "exactly once"], id="instruction-with-two-slots",
    ),
    pytest.param(
        _with(categories={"age": ["a man", "an old person"], "gender": ["a man"]}),
        ["categories", "'a man'", "'age'", "'gender'"], id="duplicate-persona",
    ),
    pytest.param(
        _with(controls=["a man"]), ["controls", "'a man'", "'gender'"],
        id="control-in-category",
    ),
    pytest.param(
        _with(noise_floor=["a woman", "a person"]), ["noise_floor", "'a woman'"],
        id="noise-floor-in-category",
    ),
    pytest.param(
        _with(default_instruction="missing"), ["default_instruction", "'missing'"],
        id="default-instruction-unknown",
    ),
    pytest.param(
        _with(categories={"age": [], "gender": ["a man"]}), ["categories", "'age'"],
        id="empty-category",
    ),
    pytest.param(
        _with(categories={"age": None}), ["categories.age"], id="null-category",
    ),
    pytest.param(
        _with(categories={"age": ["  "]}), ["categories", "empty persona"], id="blank-phrase",
    ),
    pytest.param(
        _with(categories={"control": ["a man"]}), ["categories", "reserved"],
        id="reserved-category",
    ),
    pytest.param(_with(controls=[]), ["controls"], id="no-controls"),
    pytest.param(_with(version=2), ["version"], id="bad-version"),
    pytest.param(
        {k: v for k, v in VALID.items() if k != "categories"}, ["categories", "required"],
        id="missing-categories",
    ),
]


@pytest.mark.parametrize(("content", "needles"), MALFORMED)
def test_malformed_user_catalogue(tmp_path, content, needles):
    path = _write(tmp_path, content, "broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    assert "<root>" not in message  # every error names its field


def test_missing_catalogue_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read persona catalogue") as info:
        load_catalogue(path)
    assert str(path) in str(info.value)


def test_to_dict_round_trips(tmp_path, catalogue):
    path = _write(tmp_path, catalogue.to_dict())
    assert load_catalogue(path) == catalogue
