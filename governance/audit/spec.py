"""What an audit runs: the spec, the persona pairs and questions it resolves to, and its hash.

An `AuditSpec` is frozen and serialisable: it is what MLflow records as params, and its hash
(with the persona catalogue and the question file's content) identifies comparable audits.
Torch-free, so the judge and the application can read specs without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from governance.errors import ConfigError, format_validation_error
from governance.files import read_yaml_mapping
from governance.inputs.personas import PersonaCatalogue, PersonaPair, load_catalogue
from governance.inputs.questions import (
    Layout,
    Question,
    file_sha256,
    load_questions,
    sample_questions,
)
from governance.names import COMPONENTS, POSITIONS

# docs/method.md's table of components and the positions each is patched at
DEFAULT_COMPONENTS = (
    "resid_pre:identity",
    "mlp_out:identity",
    "mlp_out:all",
    "attn_out:identity",
    "attn_out:last",
    "attn_out:all",
    "head:all",
    "head:last",
)


class AuditSpec(BaseModel):
    """What to audit. Every field has a default except the question set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    questions: str | None = Field(None, description="question file or directory of MMLU CSVs")
    questions_layout: Layout = "auto"
    n_questions: int | None = Field(100, gt=0, description="stratified sample size; None = all")
    seed: int = 0
    personas: str | None = Field(None, description="persona catalogue YAML; None = default")
    categories: list[str] | None = Field(None, description="persona categories; None = all")
    pairs: list[tuple[str, str]] | None = Field(
        None, description="explicit (clean, corrupt) pairs; replaces the catalogue's pairs"
    )
    within_category: bool | None = None
    against_control: bool | None = None
    noise_floor: bool = True
    instruction: str | None = Field(None, description="instruction name; None = default")
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    layers: tuple[int, ...] | None = None
    alignment: Literal["pad", "refuse"] = "pad"
    alignment_filler: str = " "
    answer_prefix: str = "The answer is"
    bootstrap: int = Field(1000, ge=0)
    attention: bool = True
    behaviour: bool = True
    screen: Literal["off", "atp"] = Field(
        "off", description="atp: estimate every patch by attribution patching first"
    )
    exact_top_k: int | None = Field(
        None, gt=0, description="with screen atp: exact-patch only the top k of each sweep"
    )
    budget_minutes: float | None = Field(
        None, gt=0, description="with screen atp: choose k per sweep so that the audit "
        "(patching and the persona pass) fits this many minutes on the device it runs on, "
        "with at least each sweep's top 10 exact (governance/audit/plan.py)"
    )

    @model_validator(mode="after")
    def _screen_options(self) -> AuditSpec:
        if self.budget_minutes is not None and self.exact_top_k is not None:
            raise ValueError(
                f"budget_minutes ({self.budget_minutes}) and exact_top_k ({self.exact_top_k}) "
                "both choose how many patches to verify: give one of them"
            )
        for name in ("budget_minutes", "exact_top_k"):
            if getattr(self, name) is not None and self.screen != "atp":
                raise ValueError(
                    f"{name} needs `screen: atp` (the screen ranks the patches it picks "
                    f"from), but screen is {self.screen!r}"
                )
        return self

    @field_validator("components")
    @classmethod
    def _known_components(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            comp, _, pos = item.partition(":")
            if comp not in COMPONENTS or pos not in POSITIONS:
                raise ValueError(
                    f"component {item!r} must be '<component>:<positions>' with component in "
                    f"{COMPONENTS} and positions in {POSITIONS}"
                )
        return value

    @property
    def sweeps(self) -> list[tuple[str, str]]:
        return [tuple(c.split(":", 1)) for c in self.components]  # type: ignore[misc]

    @classmethod
    def from_yaml(cls, path: str | Path) -> AuditSpec:
        raw = read_yaml_mapping(path, "audit spec")
        base = Path(path).parent
        from governance.inputs.assets import ASSETS

        for key in ("questions", "personas"):  # paths in a spec are relative to the spec
            value = raw.get(key)
            if isinstance(value, str) and value not in ASSETS and not Path(value).is_absolute():
                raw[key] = str((base / raw[key]).resolve())
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(path))) from exc

    def with_overrides(self, **changes: Any) -> AuditSpec:
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        try:
            return AuditSpec.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "audit options")) from exc


# -- hashing --------------------------------------------------------------------------------


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def spec_hash(spec: AuditSpec, catalogue: PersonaCatalogue, questions_sha: str | None) -> str:
    """Hash of everything that determines an audit's numbers except the model itself."""
    body = spec.model_dump(mode="json")
    body.pop("questions", None)  # the file's content counts, not where it lies
    body.pop("personas", None)
    if body.get("budget_minutes") is None:  # unset: not hashed, so stored audits stay comparable
        body.pop("budget_minutes", None)
    return _sha256_json(
        {"spec": body, "catalogue": catalogue.to_dict(), "questions": questions_sha}
    )


# -- running --------------------------------------------------------------------------------


def resolve_pairs(spec: AuditSpec, catalogue: PersonaCatalogue) -> list[PersonaPair]:
    if spec.pairs:
        pairs = [catalogue.pair(a, b) for a, b in spec.pairs]
        if spec.noise_floor and catalogue.noise_floor:
            floor = catalogue.pair(*catalogue.noise_floor)
            if floor not in pairs:
                pairs.append(floor)
        return pairs
    return catalogue.pairs_for(
        spec.categories,
        within_category=spec.within_category,
        against_control=spec.against_control,
        noise_floor=spec.noise_floor,
    )


def sampled_questions(spec: AuditSpec) -> list[Question]:
    """The questions an audit of `spec` runs on (loaded, validated, sampled)."""
    return spec_questions(spec, None)[0]


def spec_questions(
    spec: AuditSpec, given: list[Question] | None
) -> tuple[list[Question], str | None]:
    if given is not None:
        return sample_questions(given, spec.n_questions, spec.seed), None
    if not spec.questions:
        raise ConfigError("no question set: set `questions` in the spec or pass --questions")
    from governance.inputs.assets import resolve

    path = resolve(spec.questions, "questions")
    loaded = load_questions(path, spec.questions_layout)
    return sample_questions(loaded, spec.n_questions, spec.seed), file_sha256(path)


def involved_personas(pairs: list[PersonaPair], catalogue: PersonaCatalogue) -> dict[str, str]:
    """Every persona the behaviour pass runs, with its category, the neutral control included."""
    out: dict[str, str] = {}
    for pair in pairs:
        for p in (pair.clean, pair.corrupt):
            out.setdefault(p.phrase, p.category)
    out.setdefault(catalogue.neutral.phrase, catalogue.neutral.category)
    return out


@dataclass(frozen=True)
class Inputs:
    """Everything a spec names, read and checked: built before any model is loaded, so a bad
    catalogue, pair, instruction or question file is reported in seconds."""

    catalogue: PersonaCatalogue
    pairs: list[PersonaPair]
    questions: list[Question]
    questions_sha256: str | None


def prepare(spec: AuditSpec, questions: list[Question] | None = None) -> Inputs:
    """Read and check the catalogue, pairs, instruction and questions `spec` names."""
    catalogue = load_catalogue(spec.personas)
    catalogue.instruction(spec.instruction)
    pairs = resolve_pairs(spec, catalogue)
    qs, questions_sha = spec_questions(spec, questions)
    return Inputs(catalogue, pairs, qs, questions_sha)
