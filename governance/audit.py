"""The audit: question set and personas -> prompts -> model runs -> tidy score tables.

    spec = AuditSpec(questions="mmlu.jsonl", n_questions=100, categories=["race"])
    result = run_audit("path/to/model", spec)
    result.save("out/")

`AuditSpec` is frozen and serialisable: it is what MLflow records and what the spec hash
covers (together with the persona catalogue and the question file's content). How the audit
runs (device, dtype, batch rows) is not part of the spec.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from governance import __version__
from governance.errors import ConfigError, PromptError, format_validation_error
from governance.patching.scores import persona_shift, restoration
from governance.patching.sites import COMPONENTS, POSITIONS
from governance.personas import NO_PERSONA, PersonaCatalogue, PersonaPair, load_catalogue
from governance.questions import Layout, Question, file_sha256, load_questions, sample_questions
from governance.yaml_files import read_yaml_mapping

log = logging.getLogger(__name__)

# method.md's table of components and the positions each is patched at
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

SCORE_COLUMNS = [
    "component", "layer", "head", "positions", "category", "clean_persona", "corrupt_persona",
    "score", "ci_low", "ci_high", "n_questions",
]
BEHAVIOUR_COLUMNS = [
    "persona", "category", "accuracy", "ci_low", "ci_high", "delta", "delta_neutral",
    "flip_rate", "tv", "mcnemar_p", "n_questions",
]
SCREEN_COLUMNS = [
    "component", "layer", "head", "positions", "category", "clean_persona", "corrupt_persona",
    "estimate", "exact",
]
PAIR_COLUMNS = [
    "clean_persona", "corrupt_persona", "category", "kind", "n_questions", "shift_norm",
    "constant_share", "floor_ratio", "above_floor", "accuracy_delta", "flip_rate", "tv",
    "mcnemar_p", "padded", "n_filler",
]


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
        from governance.assets import ASSETS

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


@dataclass
class AuditResult:
    """The tidy tables of one audit and the metadata that makes it comparable."""

    scores: pd.DataFrame
    attention: pd.DataFrame
    behaviour: pd.DataFrame
    pairs: pd.DataFrame
    meta: dict[str, Any]
    prompts: list[dict[str, Any]] = field(default_factory=list, repr=False)
    screen: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SCREEN_COLUMNS))

    TABLES = ("scores", "attention", "behaviour", "pairs")

    def save(self, out_dir: str | Path) -> Path:
        """Write scores/attention/behaviour/pairs CSVs, audit.json and prompts.jsonl."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.TABLES:
            getattr(self, name).to_csv(out / f"{name}.csv", index=False)
        if not self.screen.empty:
            self.screen.to_csv(out / "screen.csv", index=False)
        (out / "audit.json").write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
        with (out / "prompts.jsonl").open("w") as fh:
            for record in self.prompts:
                fh.write(json.dumps(record) + "\n")
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> AuditResult:
        out = Path(out_dir)
        missing = [f for f in (*[f"{t}.csv" for t in cls.TABLES], "audit.json")
                   if not (out / f).exists()]
        if missing:
            raise ConfigError(f"{out} is not a complete audit directory: missing {missing}")
        tables = {t: pd.read_csv(out / f"{t}.csv") for t in cls.TABLES}
        if "head" in tables["scores"]:
            tables["scores"]["head"] = tables["scores"]["head"].astype("Int64")
        prompts_path = out / "prompts.jsonl"
        prompts = (
            [json.loads(line) for line in prompts_path.read_text().splitlines() if line]
            if prompts_path.exists()
            else []
        )
        screen = out / "screen.csv"
        if screen.exists():
            tables["screen"] = pd.read_csv(screen)
            tables["screen"]["head"] = tables["screen"]["head"].astype("Int64")
        return cls(**tables, meta=json.loads((out / "audit.json").read_text()), prompts=prompts)

    @property
    def spec(self) -> AuditSpec:
        return AuditSpec.model_validate(self.meta["spec"])

    def layer_curves(self) -> pd.DataFrame:
        """Per-layer scores averaged over a category's pairs: (component, positions, category,
        layer) -> score. Heads are averaged into their layer."""
        frame = self.scores[self.scores["component"] != "head"]
        return (
            frame.groupby(["component", "positions", "category", "layer"], as_index=False)["score"]
            .mean()
        )

    def top_heads(self, n: int = 10, positions: str = "all") -> pd.DataFrame:
        heads = self.scores[(self.scores["component"] == "head")
                            & (self.scores["positions"] == positions)]
        grouped = heads.groupby(["category", "layer", "head"], as_index=False)["score"].mean()
        return grouped.reindex(grouped["score"].abs().sort_values(ascending=False).index).head(n)


# -- hashing --------------------------------------------------------------------------------


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def spec_hash(spec: AuditSpec, catalogue: PersonaCatalogue, questions_sha: str | None) -> str:
    """Hash of everything that determines an audit's numbers except the model itself."""
    body = spec.model_dump(mode="json")
    body.pop("questions", None)  # the file's content counts, not where it lies
    body.pop("personas", None)
    return _sha256_json(
        {"spec": body, "catalogue": catalogue.to_dict(), "questions": questions_sha}
    )


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "persona_governance": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }


# -- running --------------------------------------------------------------------------------


def _resolve_pairs(spec: AuditSpec, catalogue: PersonaCatalogue) -> list[PersonaPair]:
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
    return _questions(spec, None)[0]


def _questions(spec: AuditSpec, given: list[Question] | None) -> tuple[list[Question], str | None]:
    if given is not None:
        return sample_questions(given, spec.n_questions, spec.seed), None
    if not spec.questions:
        raise ConfigError("no question set: set `questions` in the spec or pass --questions")
    from governance.assets import resolve

    path = resolve(spec.questions, "questions")
    loaded = load_questions(path, spec.questions_layout)
    return sample_questions(loaded, spec.n_questions, spec.seed), file_sha256(path)


T = TypeVar("T")
_END: Any = object()


def _one_ahead(items: Iterable[T]) -> Iterator[T]:
    """Yield each item once the next has been produced: the host queues question k+1 on a
    GPU before reading question k's results back (a device sync), so the GPU never idles."""
    it = iter(items)
    previous = next(it, _END)
    for item in it:
        yield previous
        previous = item
    if previous is not _END:
        yield previous


def run_audit(
    model: Any,
    spec: AuditSpec,
    *,
    questions: list[Question] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
) -> AuditResult:
    """Run the persona-patching audit of `spec` on `model` (a LoadedModel or a source that
    `governance.models.load_model` accepts) and return its tables."""
    from governance.models import LoadedModel, load_model
    from governance.patching.engine import PatchingEngine, sweep
    from governance.prompts import PromptBuilder, PromptFormat

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    catalogue = load_catalogue(spec.personas)
    pairs = _resolve_pairs(spec, catalogue)
    qs, questions_sha = _questions(spec, questions)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device,
                                                                      dtype=dtype)
    timings["load"] = time.perf_counter() - t0

    fmt = PromptFormat(
        catalogue.instruction(spec.instruction), spec.answer_prefix, spec.alignment,
        spec.alignment_filler,
    )
    builder = PromptBuilder(loaded.tokenizer, fmt)
    option_ids = builder.option_ids()
    try:
        patches = sweep(loaded.anatomy, spec.sweeps, spec.layers)
    except ValueError as exc:
        raise ConfigError(f"spec layers: {exc}") from exc
    answers = np.array([q.answer_index for q in qs])

    # prompts first: every error about personas or alignment surfaces before any compute
    aligned: dict[PersonaPair, list] = {}
    skipped: list[dict[str, str]] = []
    for pair in pairs:
        try:
            aligned[pair] = [builder.pair(pair.clean.phrase, pair.corrupt.phrase, q) for q in qs]
        except PromptError as exc:
            if spec.alignment == "refuse" and "differ in token length" in str(exc):
                skipped.append({"pair": pair.label, "reason": str(exc)})
                log.warning("skipping pair %s: %s", pair.label, exc)
                continue
            raise
    if not aligned:
        raise PromptError("no persona pair could be aligned; see the reasons above: "
                          + "; ".join(s["reason"] for s in skipped))

    engine = PatchingEngine(loaded.model, loaded.anatomy, chunk_rows=chunk_rows)
    bar = _progress(len(aligned) * len(qs), "patching", progress)
    runs: dict[PersonaPair, _PairScores] = {}
    screens: list[pd.DataFrame] = []
    t1 = time.perf_counter()
    for pair, prompts in aligned.items():
        chosen = patches
        estimate = None
        if spec.screen == "atp":
            estimate = _atp(loaded, prompts, patches, option_ids)
            chosen = _top_k(patches, estimate, spec.exact_top_k)
        clean, corrupt, patched = [], [], []
        queued = (engine.run(ap.clean_ids, ap.corrupt_ids, ap.identity, chosen, option_ids)
                  for ap in prompts)
        for run in _one_ahead(queued):
            clean.append(run.clean.cpu().numpy())
            corrupt.append(run.corrupt.cpu().numpy())
            patched.append(run.patched.cpu().numpy())
            bar.update(1)
        runs[pair] = _PairScores(chosen, np.stack(patched, axis=1), np.stack(clean),
                                 np.stack(corrupt))
        if estimate is not None:
            screens.append(_screen_rows(pair, patches, estimate))
    bar.close()
    timings["patching"] = time.perf_counter() - t1

    scores = _score_table(runs, spec)
    screen = _screen_table(screens, scores)

    t2 = time.perf_counter()
    persona_logits, masses = _persona_pass(loaded, builder, pairs, catalogue, qs, spec, progress)
    timings["behaviour_attention"] = time.perf_counter() - t2

    behaviour = _behaviour_table(persona_logits, answers, catalogue, pairs)
    pair_table = _pair_table(aligned, runs, persona_logits, answers)
    attention = _attention_table(masses, catalogue, pairs) if masses else _empty_attention()
    timings["total"] = time.perf_counter() - t0

    meta = {
        "spec": spec.model_dump(mode="json"),
        "spec_sha256": spec_hash(spec, catalogue, questions_sha),
        "catalogue": catalogue.to_dict(),
        "questions_sha256": questions_sha,
        "question_ids": [q.id for q in qs],
        "model": loaded.identity,
        "option_token_ids": list(option_ids),
        "option_tokens": [loaded.tokenizer.decode([i]) for i in option_ids],
        "uses_chat_template": builder.uses_chat_template,
        "n_patches_per_prompt": len(patches),
        "skipped_pairs": skipped,
        "versions": _versions(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "completed_at": pd.Timestamp.now(tz="UTC").isoformat(),
        "run": {"chunk_rows": chunk_rows, "fused_layers": engine.fused is not None,
                "compiled_kernels": engine.fused is not None and engine.fused.compiled},
    }
    meta["noise_floor"] = _floor_statement(pair_table)
    prompts = [
        {
            "question_id": ap.question_id,
            "clean_persona": pair.clean.phrase,
            "corrupt_persona": pair.corrupt.phrase,
            "category": pair.category,
            "clean_ids": list(ap.clean_ids),
            "corrupt_ids": list(ap.corrupt_ids),
            "identity_positions": list(ap.identity),
            "padded": ap.padded,
            "n_filler": ap.n_filler,
            "option_ids": list(option_ids),
            "answer_index": int(answers[i]),
        }
        for pair, aps in aligned.items()
        for i, ap in enumerate(aps)
    ]
    if not screen.empty:
        meta["screen_agreement"] = screen_agreement(screen)
    return AuditResult(scores, attention, behaviour, pair_table, meta, prompts, screen)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="prompt", leave=False)


@dataclass
class _PairScores:
    """Option logits of one pair over the questions: patched (patch, q, option)."""

    patches: list
    patched: np.ndarray
    clean: np.ndarray
    corrupt: np.ndarray


def _atp(loaded, prompts, patches, option_ids) -> np.ndarray:
    """AtP-estimated restoration score of every patch for one pair (never exact)."""
    from governance.patching.attribution import atp_screen, screen_scores

    nums, dens = atp_screen(loaded.model, loaded.anatomy,
                            [(ap.clean_ids, ap.corrupt_ids, ap.identity) for ap in prompts],
                            patches, option_ids)
    return screen_scores(nums, dens)


def _top_k(patches, estimate: np.ndarray, k: int | None) -> list:
    """Per (component, positions) sweep, the k patches with the largest |estimate|."""
    if k is None:
        return list(patches)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(patches):
        groups.setdefault((p.component, p.positions), []).append(i)
    keep: set[int] = set()
    for members in groups.values():
        ranked = sorted(members, key=lambda i: -abs(np.nan_to_num(estimate[i])))
        keep.update(ranked[:k])
    return [p for i, p in enumerate(patches) if i in keep]


def _screen_rows(pair: PersonaPair, patches, estimate: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({
        "component": [p.component for p in patches],
        "layer": [p.layer for p in patches],
        "head": pd.array([p.head for p in patches], dtype="Int64"),
        "positions": [p.positions for p in patches],
        "category": pair.category,
        "clean_persona": pair.clean.phrase,
        "corrupt_persona": pair.corrupt.phrase,
        "estimate": estimate,
    })


def _screen_table(screens: list[pd.DataFrame], scores: pd.DataFrame) -> pd.DataFrame:
    """AtP estimates beside the exact score where exact patching also ran."""
    if not screens:
        return pd.DataFrame(columns=SCREEN_COLUMNS)
    keys = ["component", "layer", "head", "positions", "clean_persona", "corrupt_persona"]
    frame = pd.concat(screens, ignore_index=True)
    exact = scores[keys + ["score"]].rename(columns={"score": "exact"})
    return frame.merge(exact, on=keys, how="left")[SCREEN_COLUMNS]


def screen_agreement(screen: pd.DataFrame, k: int = 20) -> dict[str, dict[str, float]]:
    """How well the AtP screen agreed with exact patching, per sweep, where both ran."""
    from governance.patching.attribution import agreement

    out: dict[str, dict[str, float]] = {}
    both = screen.dropna(subset=["exact"])
    for (component, positions), group in both.groupby(["component", "positions"]):
        out[f"{component}:{positions}"] = agreement(group["estimate"].to_numpy(),
                                                    group["exact"].to_numpy(), k)
    return out


def _score_table(runs: dict[PersonaPair, _PairScores], spec: AuditSpec) -> pd.DataFrame:
    rows = []
    for pair, run in runs.items():
        patched, clean, corrupt = run.patched, run.clean, run.corrupt
        res = restoration(patched, clean, corrupt, n_boot=spec.bootstrap, seed=spec.seed)
        for i, p in enumerate(run.patches):
            rows.append((
                p.component, p.layer, p.head, p.positions, pair.category, pair.clean.phrase,
                pair.corrupt.phrase, res.score[i], res.ci_low[i], res.ci_high[i], clean.shape[0],
            ))
    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    frame["head"] = frame["head"].astype("Int64")
    return frame


def _involved(pairs: list[PersonaPair], catalogue: PersonaCatalogue) -> dict[str, str]:
    """Every persona the behaviour pass runs, with its category, the neutral control included."""
    out: dict[str, str] = {}
    for pair in pairs:
        for p in (pair.clean, pair.corrupt):
            out.setdefault(p.phrase, p.category)
    out.setdefault(catalogue.neutral.phrase, catalogue.neutral.category)
    return out


def _persona_pass(loaded, builder, pairs, catalogue, qs, spec, progress):
    """Each persona's own prompt (and the no-persona prompt) on every question: option
    logits (question, option) and, if asked, mean identity mass (layer, head)."""
    import torch

    from governance.patching.attention import eager_attention, forward_with_attention
    from governance.patching.sites import last_logits

    personas = _involved(pairs, catalogue)
    option_ids = list(builder.option_ids())
    logits: dict[str, np.ndarray] = {}
    masses: dict[str, np.ndarray] = {}
    device = loaded.device
    bar = _progress((len(personas) + 1) * len(qs), "personas", progress)
    with eager_attention(loaded.model) if spec.attention else nullcontext():
        for persona in [NO_PERSONA, *personas]:
            rows, acc = [], None
            for q in qs:
                prompt = builder.encode(None if persona == NO_PERSONA else persona, q)
                if spec.attention and persona != NO_PERSONA:
                    out, mass = forward_with_attention(loaded.model, prompt.ids, prompt.identity)
                    acc = mass if acc is None else acc + mass
                else:
                    with torch.inference_mode():
                        ids = torch.tensor([list(prompt.ids)], device=device)
                        out = last_logits(loaded.model, ids)[0].float()
                rows.append(out[option_ids].cpu().numpy())
                bar.update(1)
            logits[persona] = np.stack(rows)
            if acc is not None:
                masses[persona] = acc / len(qs)
    bar.close()
    return logits, masses


def _behaviour_table(logits, answers, catalogue, pairs) -> pd.DataFrame:
    from governance.behaviour import accuracy, compare

    categories = {NO_PERSONA: "baseline", **_involved(pairs, catalogue)}
    base = logits[NO_PERSONA]
    neutral = logits.get(catalogue.neutral.phrase)
    base_acc = accuracy(base, answers)[0]
    neutral_acc = accuracy(neutral, answers)[0] if neutral is not None else float("nan")
    rows = []
    for persona, lg in logits.items():
        acc, low, high = accuracy(lg, answers)
        vs_base = compare(lg, base, answers)
        rows.append((
            persona, categories[persona], acc, low, high, acc - base_acc, acc - neutral_acc,
            vs_base.flip_rate, vs_base.tv, vs_base.mcnemar_p, len(answers),
        ))
    return pd.DataFrame(rows, columns=BEHAVIOUR_COLUMNS)


def _shift_boot(d_norm: np.ndarray, floor_norm: np.ndarray, n_boot: int = 1000, seed: int = 0):
    """95% bootstrap interval of mean(d_norm - floor_norm), paired by question."""
    diff = d_norm - floor_norm
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    return np.quantile(means, [0.025, 0.975])


def _pair_table(aligned, runs, persona_logits, answers) -> pd.DataFrame:
    from governance.behaviour import compare
    from governance.patching.scores import centre

    def norms(clean, corrupt):
        return np.linalg.norm(centre(clean) - centre(corrupt), axis=1)

    floor = next((p for p in runs if p.kind == "noise_floor"), None)
    floor_norms = norms(runs[floor].clean, runs[floor].corrupt) if floor is not None else None
    rows = []
    for pair, run in runs.items():
        clean, corrupt = run.clean, run.corrupt
        shift = persona_shift(clean, corrupt)
        cmp = compare(persona_logits[pair.clean.phrase], persona_logits[pair.corrupt.phrase],
                      answers)
        ratio, above = float("nan"), None
        if floor_norms is not None and pair is not floor:
            floor_mean = floor_norms.mean()
            ratio = shift.mean_norm / floor_mean if floor_mean > 0 else float("inf")
            low, _ = _shift_boot(norms(clean, corrupt), floor_norms)
            above = bool(low > 0)
        first = aligned[pair][0]
        rows.append((
            pair.clean.phrase, pair.corrupt.phrase, pair.category, pair.kind, shift.n_questions,
            shift.mean_norm, shift.constant_share, ratio, above, cmp.accuracy_delta,
            cmp.flip_rate, cmp.tv, cmp.mcnemar_p, first.padded, first.n_filler,
        ))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _floor_statement(pairs: pd.DataFrame) -> str:
    floor = pairs[pairs["kind"] == "noise_floor"]
    if floor.empty:
        return "no noise-floor pair was audited"
    others = pairs[pairs["kind"] != "noise_floor"]
    above = others[others["above_floor"] == True]  # noqa: E712  (column holds None too)
    f = floor.iloc[0]
    head = (f"noise floor ({f.clean_persona!r} vs {f.corrupt_persona!r}): mean shift "
            f"{f.shift_norm:.4f}, flip rate {f.flip_rate:.3f}. ")
    if above.empty:
        return head + ("No persona pair moves the answers more than this paraphrase does "
                       "(bootstrap 95%): there is no persona effect above the noise floor.")
    return head + (f"{len(above)} of {len(others)} persona pairs shift the answers more than the "
                   "paraphrase (bootstrap 95%): " + ", ".join(
                       f"{r.clean_persona} -> {r.corrupt_persona}" for r in above.itertuples()))


def _attention_table(masses, catalogue, pairs) -> pd.DataFrame:
    from governance.patching.attention import attention_table

    return attention_table(masses, _involved(pairs, catalogue), catalogue.neutral.phrase)


def _empty_attention() -> pd.DataFrame:
    return pd.DataFrame(
        columns=["layer", "head", "category", "persona", "identity_mass", "ratio", "zscore"]
    )
