"""What a mitigation what-if runs: which components to switch off, how, and on which
questions. Torch-free.

A `MitigationSpec` is frozen and serialisable (it is recorded with the result and as MLflow
params). `Component` names one ablatable unit: a head, or a layer's MLP or attention output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from governance.errors import ConfigError, format_validation_error

# mean: the component's mean output over the no-persona run of the audit's (ranking)
# questions; zero: nothing; resample: another ranking question's mean output, drawn per
# held-out question
METHODS = ("mean", "zero", "resample")
ABLATABLE = ("head", "mlp_out", "attn_out")


@dataclass(frozen=True, order=True)
class Component:
    """One unit that can be switched off: `head` (layer, head), `mlp_out` or `attn_out`."""

    component: str
    layer: int
    head: int | None = None

    def __post_init__(self) -> None:
        if self.component not in ABLATABLE:
            raise ValueError(f"component {self.component!r} is not one of {ABLATABLE}")
        if (self.head is None) == (self.component == "head"):
            raise ValueError(f"{self.component!r} {'needs a' if self.head is None else 'takes no'}"
                             " head")

    @property
    def label(self) -> str:
        if self.component == "head":
            return f"L{self.layer}.H{self.head}"
        return f"{self.component}@L{self.layer}"


class MitigationSpec(BaseModel):
    """What to ablate and where to measure it. Every field has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: tuple[int, ...] = Field((1, 2, 4, 8, 16), description="how many components to ablate")
    method: Literal["mean", "zero", "resample"] = "mean"
    components: tuple[Literal["head", "mlp_out", "attn_out"], ...] = Field(
        ("head",), description="which kinds of component the ranking may pick")
    rank_positions: Literal["all", "last"] | None = Field(
        None, description="rank by the audit's scores at these positions; None: all if the "
                          "audit has them, else last")
    pairs: list[tuple[str, str]] | None = Field(
        None, description="measure only these audit pairs (the noise floor is always kept)")
    n_heldout: int = Field(40, gt=0, description="held-out questions to measure on")
    seed: int = Field(0, description="seed of the held-out sample and the bootstrap")
    random_seeds: tuple[int, ...] = Field((0, 1, 2), description="seeds of the random control")
    bootstrap: int = Field(1000, ge=0)

    @field_validator("top_k")
    @classmethod
    def _positive_sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 1 for k in value):
            raise ValueError(f"top_k must be one or more positive integers, got {list(value)}")
        return tuple(sorted(set(value)))

    @field_validator("components")
    @classmethod
    def _some(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"components must name at least one of {ABLATABLE}")
        return tuple(dict.fromkeys(value))

    @classmethod
    def make(cls, **fields) -> MitigationSpec:
        """A spec from keyword arguments (None = default), with a readable ConfigError."""
        try:
            return cls.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "mitigation options")) from exc
