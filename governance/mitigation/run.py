"""The what-if: audit ranking + held-out questions -> ablated runs -> tables.

    audit = load_audit("runs:/<audit run id>")
    result = run_mitigation("models:/my-llm/2", audit, MitigationSpec(top_k=(1, 2, 4)))
    result.save("out/mitigation"); print(result.summary())

The prompts are built exactly as the audit built them (its instruction, answer prefix and
persona catalogue, recorded in audit.json). Each persona of each measured pair runs on every
held-out question once per condition: the unablated model, the flagged top k for each k, and
k random candidates for each k and random seed; all conditions of a prompt are rows of one
batched forward.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from governance import __version__
from governance.audit.result import AuditResult
from governance.errors import ConfigError
from governance.inputs.personas import PersonaCatalogue
from governance.inputs.questions import Question, load_questions
from governance.mitigation.result import MitigationResult
from governance.mitigation.selection import (
    components_of,
    heldout_split,
    random_orders,
    rank_components,
)
from governance.mitigation.spec import MitigationSpec
from governance.mitigation.tables import (
    Condition,
    MeasuredPair,
    curve_table,
    effects_table,
    selection_table,
)

log = logging.getLogger(__name__)


def measured_pairs(audit: AuditResult, spec: MitigationSpec) -> list[MeasuredPair]:
    """The audit's pairs to measure: all, or the spec's (the noise floor always kept)."""
    frame = audit.pairs
    pairs = [MeasuredPair(r.clean_persona, r.corrupt_persona, r.category, r.kind)
             for r in frame.itertuples()]
    if spec.pairs:
        known = {(p.clean_persona, p.corrupt_persona) for p in pairs}
        for pair in spec.pairs:
            if tuple(pair) not in known:
                raise ConfigError(f"pair {list(pair)} is not one of the audit's pairs: "
                                  f"{sorted(known)}")
        wanted = {tuple(p) for p in spec.pairs}
        pairs = [p for p in pairs if (p.clean_persona, p.corrupt_persona) in wanted
                 or p.kind == "noise_floor"]
    if not pairs:
        raise ConfigError("the audit has no persona pairs to measure (pairs.csv is empty)")
    return pairs


def question_pool(audit: AuditResult, questions: list[Question] | str | None) -> list[Question]:
    """The question set the held-out questions come from: given, or the audit's own."""
    if isinstance(questions, list):
        return questions
    source = questions or audit.spec.questions
    if not source:
        raise ConfigError("the audit records no question set: pass one (--questions)")
    from governance.inputs.assets import resolve

    return load_questions(resolve(source, "questions"), audit.spec.questions_layout)


def conditions_for(spec: MitigationSpec, ranking: pd.DataFrame) -> list[Condition]:
    """The unablated model, the flagged top k per k, then k random candidates per seed and k."""
    flagged = components_of(ranking)
    if max(spec.top_k) > len(flagged):
        raise ConfigError(f"top_k {max(spec.top_k)} is more than the {len(flagged)} components "
                          "the audit ranked: lower --top-k")
    out = [Condition("none", 0, ())]
    out += [Condition("flagged", k, tuple(flagged[:k])) for k in spec.top_k]
    for seed, order in random_orders(flagged, spec.random_seeds).items():
        out += [Condition("random", k, tuple(order[:k]), seed) for k in spec.top_k]
    return out


def run_mitigation(
    model: Any,
    audit: AuditResult,
    spec: MitigationSpec | None = None,
    *,
    questions: list[Question] | str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    chunk_rows: int = 32,
    progress: bool = True,
    audit_source: str | None = None,
) -> MitigationResult:
    """Switch off the audit's top-ranked components in `model` (a LoadedModel, a source
    `load_model` accepts, or a pinned model asset's name) and measure, on held-out questions
    of `questions` (default: the audit's question set), what it does to the persona pairs
    and to accuracy, beside the same number of random components. The model's weights are
    never changed."""
    import torch

    from governance.inputs.prompts import PromptBuilder, PromptFormat
    from governance.mitigation.ablation import (
        ablated_logits,
        check_components,
        pooled_mean,
        question_means,
        sites_of,
        zero_values,
    )
    from governance.models.loading import LoadedModel, load_model, resolve_model

    spec = spec or MitigationSpec()
    t0 = time.perf_counter()
    ranking = rank_components(audit.scores, audit.pairs, spec)
    conditions = conditions_for(spec, ranking)
    pairs = measured_pairs(audit, spec)
    personas = list(dict.fromkeys(p for m in pairs for p in (m.clean_persona, m.corrupt_persona)))
    split = heldout_split(question_pool(audit, questions), audit.meta.get("question_ids") or [],
                          spec.n_heldout, spec.seed)
    if spec.method != "zero" and not split.ranking:
        raise ConfigError("none of the audit's questions is in the question set, so there is no "
                          "no-persona run to take mean or resampled values from: pass the audit's "
                          "question set (--questions) or --method zero")
    loaded = (model if isinstance(model, LoadedModel)
              else load_model(resolve_model(str(model)), device=device, dtype=dtype))
    used = sorted({c for cond in conditions for c in cond.components})
    try:
        check_components(used, loaded.anatomy)
    except ValueError as exc:
        raise ConfigError(f"the audit does not fit this model: {exc}") from exc

    audit_spec = audit.spec
    catalogue = PersonaCatalogue.model_validate(audit.meta["catalogue"])
    builder = PromptBuilder(loaded.tokenizer, PromptFormat(
        catalogue.instruction(audit_spec.instruction), audit_spec.answer_prefix,
        audit_spec.alignment, audit_spec.alignment_filler))
    option_ids = list(builder.option_ids())
    sites = sites_of(used)
    per_question, lengths = [], []
    if spec.method != "zero":
        per_question, lengths = question_means(
            loaded.model, loaded.anatomy, [builder.encode(None, q).ids for q in split.ranking],
            sites)
    timings = {"ranking_means": time.perf_counter() - t0}

    rng = np.random.default_rng(spec.seed)
    resampled = (rng.integers(0, len(per_question), size=len(split.heldout)).tolist()
                 if spec.method == "resample" else [])
    fixed = (zero_values(loaded.anatomy, sites, loaded.device) if spec.method == "zero"
             else pooled_mean(per_question, lengths) if spec.method == "mean" else None)
    rows = [c.components for c in conditions]
    logits = np.empty((len(conditions), len(personas), len(split.heldout), len(option_ids)))
    from tqdm.auto import tqdm

    t1 = time.perf_counter()
    with tqdm(total=len(split.heldout) * len(personas), desc="ablating", unit="prompt",
              disable=not progress, leave=False) as bar:
        for qi, q in enumerate(split.heldout):
            values = fixed if fixed is not None else per_question[resampled[qi]]
            for pi, persona in enumerate(personas):
                out = ablated_logits(loaded.model, loaded.anatomy, builder.encode(persona, q).ids,
                                     rows, values, option_ids, chunk_rows)
                logits[:, pi, qi] = out.numpy()
                bar.update(1)
    timings["ablation"] = time.perf_counter() - t1
    answers = np.array([q.answer_index for q in split.heldout])
    effects = effects_table(conditions, personas, pairs, logits, answers, spec.bootstrap,
                            spec.seed)
    curve = curve_table(effects, conditions)
    timings["total"] = time.perf_counter() - t0
    meta = {
        "spec": spec.model_dump(mode="json"),
        "audit": {"source": audit_source, **audit.identity()},
        "model": loaded.identity,
        "split": {**split.record(), "question_set": (
            "a list given to run_mitigation" if isinstance(questions, list)
            else str(questions or audit_spec.questions))},
        "resampled_ranking_index": resampled,
        "personas": personas,
        "ablated_positions": "all",
        "rows_per_prompt": len(conditions),
        "versions": {"persona_governance": __version__, "torch": torch.__version__},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "completed_at": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    return MitigationResult(effects, curve, selection_table(conditions, ranking), meta)
