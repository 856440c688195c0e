"""Great Expectations suites: clean question sets and audits pass; each crafted bad row fails
exactly the named expectation, and the failure names the row."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from governance.inputs.questions import Question
from governance.judge.quality import validate_audit, validate_questions
from governance.models.tiny import tiny_questions

from support.audits import copy_audit

_questions = tiny_questions


def _with(i: int, **changes) -> list[Question]:
    qs = _questions()
    q = qs[i]
    fields = {"id": q.id, "subject": q.subject, "question": q.question, "options": q.options,
              "answer": q.answer, **changes}
    qs[i] = Question(**fields)
    return qs


def _failed(result) -> set[str]:
    return set(result.failed_names())


def test_clean_question_set_passes():
    result = validate_questions(_questions())
    assert result.success, result.summary()
    assert len(result.checks) >= 20 and result.failures.empty


def _dup():
    qs = _questions()
    qs[4] = Question("q4", qs[1].subject, "  which NUMBER is prime,  case 1? ", qs[1].options, "A")
    return qs


def _opts(i, index, value):
    opts = list(_questions()[i].options)
    opts[index] = value
    return _with(i, options=tuple(opts))


@pytest.mark.parametrize(("questions", "expected", "bad_id"), [
    (_opts(2, 1, ""), {"option_b_non_blank"}, "q2"),
    (_opts(3, 2, "   "), {"option_c_non_blank"}, "q3"),
    (_opts(1, 0, None), {"option_a_present"}, "q1"),
    (_with(1, options=("1", "2", "3")), {"four_options", "option_d_present"}, "q1"),
    (_with(5, answer="E"), {"answer_in_A_to_D"}, "q5"),
    (_with(0, answer=None), {"answer_present"}, "q0"),
    (_with(2, subject=""), {"subject_non_blank"}, "q2"),
    (_with(2, subject=None), {"subject_present"}, "q2"),
    (_with(3, question="\t"), {"question_non_blank"}, "q3"),
    (_dup(), {"no_duplicate_questions"}, "q4"),
], ids=["empty-option", "blank-option", "missing-option", "three-options", "answer-E",
        "no-answer", "empty-subject", "no-subject", "blank-question", "duplicate"])
def test_bad_question_rows_fail_the_named_expectation(questions, expected, bad_id):
    result = validate_questions(questions)
    assert not result.success
    assert _failed(result) == expected, result.summary()
    for _, row in result.failures.iterrows():
        assert bad_id in [r["id"] for r in row["failed_rows"]]


def test_dataframe_layouts_and_missing_columns():
    frame = pd.DataFrame({
        "question": ["What is 2+2?", "What is 3+3?"],
        "subject": ["math", "math"],
        "choices": [["4", "5", "6", "7"], ["6", "7", ""]],
        "answer": ["A", "Z"],
    })
    result = validate_questions(frame)
    assert _failed(result) == {"four_options", "option_c_non_blank", "option_d_present",
                               "answer_in_A_to_D"}
    bad = result.failures.set_index("name")
    assert bad.loc["answer_in_A_to_D", "failed_values"] == ["Z"]
    assert bad.loc["answer_in_A_to_D", "failed_rows"] == [{"id": "row1"}]

    no_answer = validate_questions(frame.drop(columns="answer"))
    assert "has_column_answer" in _failed(no_answer)
    assert any("answer_in_A_to_D" in n for n in no_answer.notes)


# -- audits: `tiny_audit` (tests/conftest.py) is support.audits.TINY_SPEC on a tiny llama ------


def test_real_audit_passes(tiny_audit):
    result = validate_audit(tiny_audit)
    assert result.success, result.summary()
    names = set(result.checks["name"])
    assert {"score_grid_complete", "identity_mass_in_0_1", "score_heads_as_model",
            "attention_layers_as_model", "pairs_as_spec"} <= names


def _head_row(s):
    return (s["component"] == "head") & (s["layer"] == 1) & (s["head"] == 2) & (
        s["clean_persona"] == "a man")


def _edit_scores(mask, column, value):
    def edit(r):
        r.scores.loc[mask(r.scores), column] = value
    return edit


def _drop_scores(mask):
    def edit(r):
        r.scores = r.scores[~mask(r.scores)].reset_index(drop=True)
    return edit


def _edit(table, row, column, value):
    def edit(r):
        getattr(r, table).loc[row, column] = value
    return edit


def _drop(table, mask):
    def edit(r):
        frame = getattr(r, table)
        setattr(r, table, frame[~mask(frame)].reset_index(drop=True))
    return edit


def _first_mlp(s):
    return (s["component"] == "mlp_out") & (s["layer"] == 0) & (s["clean_persona"] == "a man")


@pytest.mark.parametrize(("edit", "expected"), [
    (_edit_scores(_first_mlp, "score", np.inf), {"score_not_infinite"}),
    (_edit_scores(_first_mlp, "score", np.nan), {"score_not_nan"}),
    (_drop_scores(_head_row), {"score_grid_complete"}),
    (_drop_scores(lambda s: s["layer"] == 2), {"score_grid_complete", "score_layers_as_spec"}),
    (_drop_scores(lambda s: s["head"] == 3), {"score_grid_complete", "score_heads_as_model"}),
    (_edit_scores(lambda s: s["category"] == "race", "category", "colour"),
     {"score_categories_as_spec"}),
    (_edit_scores(_first_mlp, "n_questions", 5), {"score_n_questions_as_spec"}),
    (_edit("attention", 7, "identity_mass", 1.5), {"identity_mass_in_0_1"}),
    (_edit("attention", 3, "identity_mass", -0.1), {"identity_mass_in_0_1"}),
    (_drop("attention", lambda a: a["head"] == 3), {"attention_heads_as_model"}),
    (_drop("attention", lambda a: a["layer"] == 0), {"attention_layers_as_model"}),
    (_drop("attention", lambda a: a["persona"] == "a woman"), {"attention_personas_as_spec"}),
    (_edit("behaviour", 2, "n_questions", 5), {"behaviour_n_questions_as_spec"}),
    (_edit("behaviour", 1, "accuracy", 1.2), {"accuracy_in_0_1"}),
    (_drop("behaviour", lambda b: b["persona"] == "(no persona)"),
     {"behaviour_personas_as_spec"}),
    (_drop("pairs", lambda p: p["clean_persona"] == "a man"), {"pairs_as_spec"}),
    (_edit("pairs", 0, "n_questions", 7), {"pairs_n_questions_as_spec"}),
], ids=["inf-score", "nan-score", "missing-head-cell", "missing-layer", "missing-head",
        "unknown-category", "score-n-questions", "mass-above-1", "mass-below-0",
        "attention-head-missing", "attention-layer-missing", "attention-persona-missing",
        "behaviour-n-questions", "accuracy-above-1", "no-persona-row-missing", "pair-missing",
        "pair-n-questions"])
def test_bad_audit_rows_fail_the_named_expectation(tiny_audit, edit, expected):
    bad = copy_audit(tiny_audit)
    edit(bad)
    result = validate_audit(bad)
    assert not result.success
    assert _failed(result) == expected, result.summary()


def test_failures_name_the_rows(tiny_audit, tmp_path):
    bad = copy_audit(tiny_audit)
    bad.scores = bad.scores[~_head_row(bad.scores)].reset_index(drop=True)
    bad.attention.loc[7, "identity_mass"] = 1.5
    result = validate_audit(bad)
    rows = result.failures.set_index("name")["failed_rows"]
    assert rows["score_grid_complete"] == [{"cell": "head:all L1 H2 a man -> a woman"}]
    (att,) = rows["identity_mass_in_0_1"]
    assert att["row"] == 7 and att["layer"] == bad.attention.loc[7, "layer"]
    assert "score_grid_complete" in result.summary()

    path = result.save(tmp_path)
    saved = json.loads(path.read_text())
    assert saved["success"] is False and saved["n_failed"] == 2
    csv = pd.read_csv(tmp_path / "quality_audit_failures.csv")
    assert set(csv["name"]) == {"score_grid_complete", "identity_mass_in_0_1"}
    assert json.loads(csv.set_index("name").loc["identity_mass_in_0_1", "failed_values"]) == [1.5]


def test_nan_score_is_accepted_only_where_the_pair_shifts_nothing(tiny_audit):
    bad = copy_audit(tiny_audit)
    bad.scores.loc[bad.scores["clean_persona"] == "a man", "score"] = np.nan
    assert _failed(validate_audit(bad)) == {"score_not_nan"}
    bad.pairs.loc[bad.pairs["clean_persona"] == "a man", "shift_norm"] = 0.0
    assert validate_audit(bad).success


def test_model_shape_from_attention_when_identity_lacks_it(tiny_audit):
    bare = copy_audit(tiny_audit)
    bare.meta["model"] = {"source": "tiny"}
    result = validate_audit(bare)
    assert result.success, result.summary()
    assert any("n_layers" in n for n in result.notes)
    bare.attention = bare.attention.iloc[0:0]
    bare.meta["spec"]["attention"] = False
    result = validate_audit(bare)
    assert {"model_layer_count_known", "model_head_count_known"} <= _failed(result)
