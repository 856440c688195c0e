"""The persona catalogue: categories of persona phrases, instruction templates, and pairs.

The catalogue is data (YAML, `governance/inputs/data/personas.yaml` by default) so that users can
add their own personas, categories and instructions without touching code.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from governance.errors import ConfigError, format_validation_error
from governance.files import read_yaml_mapping

NO_PERSONA = "(no persona)"
NOISE_FLOOR_CATEGORY = "noise_floor"
CONTROL_CATEGORY = "control"
# personas given in an explicit pair that the catalogue does not list
AD_HOC_CATEGORY = "ad_hoc"

PairKind = Literal["within", "control", "noise_floor", "extra"]


@dataclass(frozen=True)
class Persona:
    phrase: str
    category: str


@dataclass(frozen=True)
class PersonaPair:
    """A patching pair: activations of the `clean` persona's run go into the `corrupt` run."""

    clean: Persona
    corrupt: Persona
    category: str
    kind: PairKind

    @property
    def label(self) -> str:
        return f"{self.clean.phrase} -> {self.corrupt.phrase}"


class _PairDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    within_category: bool = True
    against_control: bool = True
    extra: list[tuple[str, str]] = Field(default_factory=list)


class PersonaCatalogue(BaseModel):
    """Validated persona catalogue (see the default YAML for the meaning of each field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    instructions: dict[str, str]
    default_instruction: str
    categories: dict[str, list[str]]
    controls: list[str] = Field(min_length=1)
    noise_floor: tuple[str, str] | None = None
    pairs: _PairDefaults = Field(default_factory=_PairDefaults)

    @field_validator("instructions")
    @classmethod
    def _instructions_have_slot(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if text.count("{persona}") != 1:
                raise ValueError(
                    f"instruction {name!r} must contain the placeholder {{persona}} exactly "
                    f"once, got: {text!r}"
                )
        return value

    # Cross-field checks are field validators (not one model validator) so that each error
    # names its field (`categories: ...`, `default_instruction: ...`) instead of `<root>`.
    @field_validator("default_instruction")
    @classmethod
    def _default_is_known(cls, value: str, info: ValidationInfo) -> str:
        instructions = info.data.get("instructions")
        if instructions is not None and value not in instructions:
            raise ValueError(
                f"default_instruction {value!r} is not one of the instructions "
                f"{sorted(instructions)}"
            )
        return value

    @field_validator("categories")
    @classmethod
    def _categories_valid(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        reserved = {CONTROL_CATEGORY, NOISE_FLOOR_CATEGORY}
        seen: dict[str, str] = {}
        for category, phrases in value.items():
            if category in reserved:
                raise ValueError(f"category name {category!r} is reserved; choose another")
            if not phrases:
                raise ValueError(f"category {category!r} has no personas")
            for phrase in phrases:
                if not phrase.strip():
                    raise ValueError(f"category {category!r} has an empty persona phrase")
                if phrase in seen:
                    raise ValueError(
                        f"persona {phrase!r} appears in both {seen[phrase]!r} and {category!r}"
                    )
                seen[phrase] = category
        return value

    @field_validator("controls", "noise_floor")
    @classmethod
    def _not_in_categories(cls, value: Any, info: ValidationInfo) -> Any:
        categories = info.data.get("categories") or {}
        seen = {p: c for c, phrases in categories.items() for p in phrases}
        for phrase in value or ():
            if not phrase.strip():
                raise ValueError(f"{info.field_name} has an empty persona phrase")
            if phrase in seen:
                raise ValueError(
                    f"persona {phrase!r} is in {info.field_name} and in category "
                    f"{seen[phrase]!r}"
                )
        return value

    # -- lookups -----------------------------------------------------------------------

    def personas(self) -> list[Persona]:
        """Every persona phrase with its category, controls and the noise-floor pair last."""
        out = [Persona(p, c) for c, phrases in self.categories.items() for p in phrases]
        out += [Persona(p, CONTROL_CATEGORY) for p in self.controls]
        out += [Persona(p, NOISE_FLOOR_CATEGORY) for p in (self.noise_floor or ())]
        return out

    def find(self, phrase: str) -> Persona:
        for persona in self.personas():
            if persona.phrase == phrase:
                return persona
        raise ConfigError(
            f"persona {phrase!r} is not in the catalogue; known personas: "
            + ", ".join(repr(p.phrase) for p in self.personas())
        )

    @property
    def neutral(self) -> Persona:
        return Persona(self.controls[0], CONTROL_CATEGORY)

    def instruction(self, name: str | None = None) -> str:
        name = name or self.default_instruction
        if name not in self.instructions:
            raise ConfigError(f"instruction {name!r} is not one of {sorted(self.instructions)}")
        return self.instructions[name]

    def pairs_for(
        self,
        categories: list[str] | None = None,
        *,
        within_category: bool | None = None,
        against_control: bool | None = None,
        noise_floor: bool = True,
    ) -> list[PersonaPair]:
        """The default pairs: within each category, each persona against the first control,
        the catalogue's extra pairs, and the noise-floor paraphrase pair."""
        if categories is not None:
            unknown = sorted(set(categories) - set(self.categories))
            if unknown:
                raise ConfigError(
                    f"unknown persona categories {unknown}; the catalogue has "
                    f"{sorted(self.categories)}"
                )
        wanted = list(self.categories) if categories is None else categories
        within = self.pairs.within_category if within_category is None else within_category
        control = self.pairs.against_control if against_control is None else against_control
        out: list[PersonaPair] = []
        for category in wanted:
            members = [Persona(p, category) for p in self.categories[category]]
            if within:
                for a, b in itertools.combinations(members, 2):
                    out.append(PersonaPair(a, b, category, "within"))
            if control:
                out += [PersonaPair(m, self.neutral, category, "control") for m in members]
        for clean, corrupt in self.pairs.extra:
            a, b = self.find(clean), self.find(corrupt)
            if categories is None or a.category in wanted:
                out.append(PersonaPair(a, b, a.category, "extra"))
        if noise_floor and self.noise_floor:
            a, b = (Persona(p, NOISE_FLOOR_CATEGORY) for p in self.noise_floor)
            out.append(PersonaPair(a, b, NOISE_FLOOR_CATEGORY, "noise_floor"))
        return out

    def pair(self, clean: str, corrupt: str) -> PersonaPair:
        """An explicit pair. A phrase from the catalogue keeps its category; any other phrase
        is an ad-hoc persona (category `ad_hoc`), so a user can audit a pair the catalogue
        does not list. The pair takes the first real persona category of the two."""
        a, b = self.find_or_ad_hoc(clean), self.find_or_ad_hoc(corrupt)
        if a.category == NOISE_FLOOR_CATEGORY and b.category == NOISE_FLOOR_CATEGORY:
            return PersonaPair(a, b, NOISE_FLOOR_CATEGORY, "noise_floor")
        named = [p.category for p in (a, b) if p.category not in (CONTROL_CATEGORY,
                                                                   AD_HOC_CATEGORY)]
        category = named[0] if named else (
            AD_HOC_CATEGORY if AD_HOC_CATEGORY in (a.category, b.category) else a.category)
        return PersonaPair(a, b, category, "extra")

    def find_or_ad_hoc(self, phrase: str) -> Persona:
        """The catalogue's persona with this phrase, else an ad-hoc persona."""
        if not isinstance(phrase, str) or not phrase.strip():
            raise ConfigError(f"a persona phrase must be non-empty text, got {phrase!r}")
        for persona in self.personas():
            if persona.phrase == phrase:
                return persona
        return Persona(phrase, AD_HOC_CATEGORY)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


DEFAULT_CATALOGUE_NAME = "personas.yaml"


def load_catalogue(path: str | Path | None = None) -> PersonaCatalogue:
    """Load and validate a persona catalogue; `None` loads the packaged default."""
    if path is None:
        data = resources.files("governance.inputs.data")
        text = data.joinpath(DEFAULT_CATALOGUE_NAME).read_text()
        where = f"<package>/governance/inputs/data/{DEFAULT_CATALOGUE_NAME}"
    else:
        text, where = None, str(path)
    raw = read_yaml_mapping(where, "persona catalogue", text=text)
    try:
        return PersonaCatalogue.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from exc
