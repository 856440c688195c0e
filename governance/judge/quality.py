"""Data-quality gates with Great Expectations 1.x: question sets in, audit tables out.

    from governance.judge.quality import validate_audit, validate_questions
    q = validate_questions(questions)          # list[Question] or a DataFrame
    a = validate_audit(result)                 # an AuditResult
    if not a.success: print(a.failures)        # which expectation failed on which rows

Every check is a real GX expectation run on a pandas batch; each carries a short `name`
(e.g. `answer_in_A_to_D`) that the failures table, the JSON and the tests use. A failed
validation must block publishing a verdict (the caller decides; `QualityResult.success`).

The question suite: four options, each present and non-blank; answer in A-D; question and
subject present and non-blank; no duplicate question (same text and options, compared
case- and whitespace-insensitively).

The audit suite, against what the spec (`meta["spec"]`, `meta["catalogue"]`) and the model
(`meta["model"]["n_layers"/"n_heads"]`) say: scores finite (NaN is accepted only for a pair
whose persona shift is exactly zero, where S is undefined by construction); every expected
(component, positions, layer, head, pair) cell present in `scores`; the layer, head and
category sets of `scores` and `attention` as expected; every persona in `behaviour` and
every pair in `pairs`; `n_questions` as the spec says everywhere; identity-attention masses
and accuracies in [0, 1].

GX start-up: the first call builds one ephemeral context per process (~3 s to import GX,
then ~0.05 s per validation); later calls reuse it. GX 1.24 reads
~/.great_expectations/great_expectations.conf if it exists; in our measurement the
ephemeral context wrote nothing there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from governance.inputs.questions import LETTERS, Question
from governance.judge.expectations import (
    FLOAT_MAX,
    MASS_TOLERANCE,
    Check,
    QualityResult,
    meta_failure,
    quality_result,
    validate_table,
)

if TYPE_CHECKING:
    from governance.audit.result import AuditResult



# -- question sets ---------------------------------------------------------------------------

_OPTION_COLUMNS = [f"option_{letter.lower()}" for letter in LETTERS]


def questions_frame(questions: list[Question] | pd.DataFrame) -> pd.DataFrame:
    """The question set as one row per question: id, subject, question, option_a..option_d,
    answer, n_options. A DataFrame may give options as option_a..option_d or as one
    `options`/`choices` list column."""
    if isinstance(questions, pd.DataFrame):
        frame = questions.copy().reset_index(drop=True)
        list_col = next((c for c in ("options", "choices") if c in frame.columns), None)
        if list_col is not None and not set(_OPTION_COLUMNS) <= set(frame.columns):
            opts = frame[list_col].map(lambda v: list(v) if isinstance(v, (list, tuple,
                                                                           np.ndarray)) else [])
            frame["n_options"] = opts.map(len)
            for i, col in enumerate(_OPTION_COLUMNS):
                frame[col] = opts.map(lambda v, i=i: v[i] if len(v) > i else None)
        elif "n_options" not in frame.columns:
            present = [c for c in _OPTION_COLUMNS if c in frame.columns]
            frame["n_options"] = frame[present].notna().sum(axis=1) if present else 0
        if "id" not in frame.columns:
            frame["id"] = [f"row{i}" for i in range(len(frame))]
        return frame
    rows = []
    for q in questions:
        opts = list(q.options)
        rows.append({
            "id": q.id, "subject": q.subject, "question": q.question,
            **{col: (opts[i] if i < len(opts) else None) for i, col in enumerate(_OPTION_COLUMNS)},
            "answer": q.answer, "n_options": len(opts),
        })
    return pd.DataFrame(rows, columns=["id", "subject", "question", *_OPTION_COLUMNS, "answer",
                                       "n_options"])


def _dup_key(frame: pd.DataFrame) -> pd.Series:
    cols = [c for c in ["question", *_OPTION_COLUMNS] if c in frame.columns]

    def norm(v: Any) -> str:
        return re.sub(r"\s+", " ", str(v)).strip().casefold() if v is not None else ""

    return frame[cols].apply(lambda r: "\x1f".join(norm(v) for v in r), axis=1)


def validate_questions(questions: list[Question] | pd.DataFrame) -> QualityResult:
    """Validate a question set (see the module docstring for the expectations)."""
    frame = questions_frame(questions)
    if len(frame):
        frame["dup_key"] = _dup_key(frame)
    required = ["id", "subject", "question", *_OPTION_COLUMNS, "answer", "n_options"]
    checks = [Check(f"has_column_{c}", "ExpectColumnToExist", {"column": c}) for c in required]
    checks += [
        Check("question_set_not_empty", "ExpectTableRowCountToBeBetween", {"min_value": 1}),
        Check("four_options", "ExpectColumnValuesToBeInSet",
              {"column": "n_options", "value_set": [4]}),
        Check("answer_present", "ExpectColumnValuesToNotBeNull", {"column": "answer"}),
        Check("answer_in_A_to_D", "ExpectColumnValuesToBeInSet",
              {"column": "answer", "value_set": list(LETTERS)}),
        Check("no_duplicate_questions", "ExpectColumnValuesToBeUnique", {"column": "dup_key"}),
    ]
    for col in ["question", "subject", *_OPTION_COLUMNS]:
        checks += [
            Check(f"{col}_present", "ExpectColumnValuesToNotBeNull", {"column": col}),
            Check(f"{col}_non_blank", "ExpectColumnValuesToMatchRegex",
                  {"column": col, "regex": r"\S"}),
        ]
    present = set(frame.columns)
    runnable = [c for c in checks if c.column is None or c.column in present
                or c.kind == "ExpectColumnToExist"]
    skipped = [c.name for c in checks if c not in runnable]
    notes = [f"not run (column missing): {', '.join(skipped)}"] if skipped else []
    records = validate_table("questions", frame, runnable, ["id"])
    return quality_result("questions", records, notes)


# -- audit outputs ---------------------------------------------------------------------------


@dataclass
class _Expected:
    layers: list[int]
    heads: list[int] | None
    attention_layers: list[int] | None
    pairs: list[tuple[str, str, str]]  # (clean, corrupt, category) in scores/pairs
    personas: dict[str, str]  # persona -> category in behaviour/attention (no-persona excluded)
    n_questions: int | None
    sweeps: list[tuple[str, str]]
    notes: list[str]
    problems: list[dict[str, Any]]


def _expected(result: AuditResult) -> _Expected:
    """What the tables must contain, from the recorded spec, catalogue and model identity."""
    from governance.audit.spec import involved_personas, resolve_pairs
    from governance.inputs.personas import PersonaCatalogue

    meta = result.meta
    spec = result.spec
    notes: list[str] = []
    problems: list[dict[str, Any]] = []
    model = meta.get("model") or {}
    n_layers, n_heads = model.get("n_layers"), model.get("n_heads")
    att = result.attention
    if n_layers is None and att is not None and not att.empty:
        n_layers = int(att["layer"].max()) + 1
        notes.append("meta.model has no n_layers; took the layer count from the attention "
                     "table")
    if n_heads is None and att is not None and not att.empty:
        n_heads = int(att["head"].max()) + 1
        notes.append("meta.model has no n_heads; took the head count from the attention table")
    if n_layers is None:
        problems.append(meta_failure("model_layer_count_known", "scores",
                                      "meta.model has no n_layers: layer coverage unchecked"))
    uses_heads = any(c == "head" for c, _ in spec.sweeps)
    if uses_heads and n_heads is None:
        problems.append(meta_failure("model_head_count_known", "scores",
                                      "meta.model has no n_heads: head coverage unchecked"))
    layers = list(spec.layers) if spec.layers is not None else (
        list(range(n_layers)) if n_layers is not None else [])
    pairs: list[tuple[str, str, str]] = []
    personas: dict[str, str] = {}
    if "catalogue" in meta:
        catalogue = PersonaCatalogue.model_validate(meta["catalogue"])
        resolved = resolve_pairs(spec, catalogue)
        skipped = {s["pair"] for s in meta.get("skipped_pairs", [])}
        pairs = [(p.clean.phrase, p.corrupt.phrase, p.category) for p in resolved
                 if p.label not in skipped]
        personas = involved_personas(resolved, catalogue)
    else:
        problems.append(meta_failure("catalogue_recorded", "scores",
                                      "meta has no catalogue: pair and persona coverage "
                                      "unchecked"))
    n_q = spec.n_questions
    if n_q is None:
        ids = meta.get("question_ids")
        n_q = len(ids) if ids is not None else None
        if n_q is None:
            problems.append(meta_failure("question_count_known", "scores",
                                          "spec.n_questions is None and meta has no "
                                          "question_ids: n_questions unchecked"))
    return _Expected(layers, list(range(n_heads)) if n_heads is not None else None,
                     list(range(n_layers)) if n_layers is not None else None, pairs, personas,
                     n_q, list(spec.sweeps), notes, problems)


def _score_grid(exp: _Expected, scores: pd.DataFrame) -> pd.DataFrame:
    """Every expected (component, positions, layer, head, pair) cell, with `present`."""
    rows = []
    for component, positions in exp.sweeps:
        heads = (exp.heads or []) if component == "head" else [None]
        for layer in exp.layers:
            for head in heads:
                for clean, corrupt, category in exp.pairs:
                    rows.append((component, positions, layer, head, clean, corrupt, category))
    keys = ["component", "positions", "layer", "head", "clean_persona", "corrupt_persona"]
    grid = pd.DataFrame(rows, columns=[*keys, "category"])
    have = scores[keys].copy()
    for frame in (grid, have):
        frame["head"] = _head_labels(frame["head"])
        frame["layer"] = frame["layer"].astype(int)
    have = have.drop_duplicates().assign(present=True)
    grid = grid.merge(have, on=keys, how="left")
    grid["present"] = grid["present"].fillna(False).astype(bool)
    grid["cell"] = (grid["component"] + ":" + grid["positions"] + " L" + grid["layer"].astype(str)
                    + grid["head"].map(lambda h: f" H{h}" if h else "") + " "
                    + grid["clean_persona"] + " -> " + grid["corrupt_persona"])
    return grid


def _head_labels(heads: pd.Series) -> pd.Series:
    """Head numbers as strings, '' where the row is not a head (so sets compare cleanly)."""
    return heads.astype("Int64").map(lambda h: "" if pd.isna(h) else str(int(h)))


def validate_audit(result: AuditResult) -> QualityResult:
    """Validate an audit's tables against its spec and model (module docstring)."""
    exp = _expected(result)
    records: list[dict[str, Any]] = list(exp.problems)
    n_q = [exp.n_questions] if exp.n_questions is not None else None

    scores = result.scores.copy()
    scores["row"] = range(len(scores))
    shifts = result.pairs.set_index(["clean_persona", "corrupt_persona"])["shift_norm"]
    scores["pair_shift"] = [shifts.get((a, b), np.nan) for a, b in
                            zip(scores["clean_persona"], scores["corrupt_persona"], strict=True)]
    scores["head_label"] = _head_labels(scores["head"])
    checks = [
        Check("scores_not_empty", "ExpectTableRowCountToBeBetween", {"min_value": 1}),
        Check("score_not_nan", "ExpectColumnValuesToNotBeNull",
              {"column": "score", "row_condition": "not (pair_shift == 0)",
               "condition_parser": "pandas"}),
        Check("score_not_infinite", "ExpectColumnValuesToBeBetween",
              {"column": "score", "min_value": -FLOAT_MAX, "max_value": FLOAT_MAX}),
        Check("score_layers_as_spec", "ExpectColumnDistinctValuesToEqualSet",
              {"column": "layer", "value_set": exp.layers}),
    ]
    if exp.pairs:
        checks.append(Check("score_categories_as_spec", "ExpectColumnDistinctValuesToEqualSet",
                            {"column": "category",
                             "value_set": sorted({c for _, _, c in exp.pairs})}))
    if n_q:
        checks.append(Check("score_n_questions_as_spec", "ExpectColumnValuesToBeInSet",
                            {"column": "n_questions", "value_set": n_q}))
    if exp.heads is not None and any(c == "head" for c, _ in exp.sweeps):
        checks.append(Check("score_heads_as_model", "ExpectColumnDistinctValuesToEqualSet",
                            {"column": "head_label", "value_set": [str(h) for h in exp.heads],
                             "row_condition": 'component == "head"',
                             "condition_parser": "pandas"}))
    index = ["row", "component", "positions", "layer", "head_label", "clean_persona",
             "corrupt_persona"]
    records += validate_table("scores", scores, checks, index)

    if exp.pairs and exp.layers:
        grid = _score_grid(exp, result.scores)
        records += validate_table("score_grid", grid, [
            Check("score_grid_complete", "ExpectColumnValuesToBeInSet",
                  {"column": "present", "value_set": [True]}),
        ], ["cell"])

    records += _validate_attention(result, exp)
    records += _validate_behaviour(result, exp, n_q)
    return quality_result("audit", records, exp.notes)


def _validate_attention(result: AuditResult, exp: _Expected) -> list[dict[str, Any]]:
    att = result.attention
    if not result.spec.attention:
        return validate_table("attention", att, [
            Check("attention_empty_when_off", "ExpectTableRowCountToEqual", {"value": 0})], [])
    att = att.copy()
    att["row"] = range(len(att))
    checks = [
        Check("attention_not_empty", "ExpectTableRowCountToBeBetween", {"min_value": 1}),
        Check("identity_mass_present", "ExpectColumnValuesToNotBeNull",
              {"column": "identity_mass"}),
        Check("identity_mass_in_0_1", "ExpectColumnValuesToBeBetween",
              {"column": "identity_mass", "min_value": 0.0, "max_value": 1.0 + MASS_TOLERANCE}),
    ]
    if exp.attention_layers is not None:
        checks.append(Check("attention_layers_as_model", "ExpectColumnDistinctValuesToEqualSet",
                            {"column": "layer", "value_set": exp.attention_layers}))
    if exp.heads is not None:
        checks.append(Check("attention_heads_as_model", "ExpectColumnDistinctValuesToEqualSet",
                            {"column": "head", "value_set": exp.heads}))
    if exp.personas:
        checks += [
            Check("attention_personas_as_spec", "ExpectColumnDistinctValuesToEqualSet",
                  {"column": "persona", "value_set": sorted(exp.personas)}),
            Check("attention_categories_as_spec", "ExpectColumnDistinctValuesToEqualSet",
                  {"column": "category", "value_set": sorted(set(exp.personas.values()))}),
        ]
    return validate_table("attention", att, checks, ["row", "layer", "head", "persona"])


def _validate_behaviour(result: AuditResult, exp: _Expected,
                        n_q: list[int] | None) -> list[dict[str, Any]]:
    from governance.inputs.personas import NO_PERSONA

    records: list[dict[str, Any]] = []
    if result.spec.behaviour:
        checks = [
            Check("accuracy_in_0_1", "ExpectColumnValuesToBeBetween",
                  {"column": "accuracy", "min_value": 0.0, "max_value": 1.0}),
            Check("accuracy_present", "ExpectColumnValuesToNotBeNull", {"column": "accuracy"}),
        ]
        if exp.personas:
            checks.append(Check("behaviour_personas_as_spec",
                                "ExpectColumnDistinctValuesToEqualSet",
                                {"column": "persona",
                                 "value_set": sorted({NO_PERSONA, *exp.personas})}))
        if n_q:
            checks.append(Check("behaviour_n_questions_as_spec", "ExpectColumnValuesToBeInSet",
                                {"column": "n_questions", "value_set": n_q}))
        records += validate_table("behaviour", result.behaviour, checks, ["persona"])
    pairs = result.pairs.copy()
    pairs["pair"] = pairs["clean_persona"] + " -> " + pairs["corrupt_persona"]
    checks = []
    if exp.pairs:
        checks.append(Check("pairs_as_spec", "ExpectColumnDistinctValuesToEqualSet",
                            {"column": "pair",
                             "value_set": sorted(f"{a} -> {b}" for a, b, _ in exp.pairs)}))
    if n_q:
        checks.append(Check("pairs_n_questions_as_spec", "ExpectColumnValuesToBeInSet",
                            {"column": "n_questions", "value_set": n_q}))
    if checks:
        records += validate_table("pairs", pairs, checks, ["pair"])
    return records
