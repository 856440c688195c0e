"""Question sets (governance/questions.py): the three layouts, validation, sampling."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from governance.errors import QuestionSetError
from governance.inputs.questions import LETTERS, Question, load_questions, sample_questions

SUBJECT = "high_school_physics"

# (question, options, answer letter): one subject's content, written in every layout.
ROWS = [
    ("What is the SI unit of force?", ("newton", "joule", "watt", "pascal"), "A"),
    ("Which quantity is a vector?", ("mass", "speed", "velocity", "energy"), "C"),
    ("Light travels fastest in", ("glass", "water", "diamond", "vacuum"), "D"),
    ('Quote "x", comma, and 2+2 = ?', ("3", "4", "5", "22"), "B"),
]


def _hf_record(q, opts, ans, subject=SUBJECT):
    return {"question": q, "subject": subject, "choices": list(opts),
            "answer": LETTERS.index(ans)}


def _jsonl_record(q, opts, ans, subject=SUBJECT):
    return {"question": q, **{f"answer_{c}": o for c, o in zip("abcd", opts, strict=True)},
            "correct_answer": ans, "topic": subject}


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _write_csv(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _mmlu_rows(rows=ROWS) -> list[list]:
    return [[q, *opts, ans] for q, opts, ans in rows]


def write_hf_jsonl(tmp_path: Path, rows=ROWS) -> Path:
    return _write_jsonl(tmp_path / "mmlu.jsonl", [_hf_record(*r) for r in rows])


def write_hf_parquet(tmp_path: Path, rows=ROWS) -> Path:
    path = tmp_path / "mmlu.parquet"
    pd.DataFrame([_hf_record(*r) for r in rows]).to_parquet(path)
    return path


def write_hf_json(tmp_path: Path, rows=ROWS) -> Path:
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps([_hf_record(*r) for r in rows]))
    return path


def write_mmlu_csv(tmp_path: Path, rows=ROWS) -> Path:
    return _write_csv(tmp_path / f"{SUBJECT}_test.csv", _mmlu_rows(rows))


def write_mmlu_dir(tmp_path: Path, rows=ROWS) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    write_mmlu_csv(folder, rows)
    return folder


def write_answer_jsonl(tmp_path: Path, rows=ROWS) -> Path:
    return _write_jsonl(tmp_path / "questions.jsonl", [_jsonl_record(*r) for r in rows])


WRITERS = {
    "hf-jsonl": write_hf_jsonl,
    "hf-json": write_hf_json,
    "hf-parquet": write_hf_parquet,
    "mmlu-csv": write_mmlu_csv,
    "mmlu-csv-dir": write_mmlu_dir,
    "answer-jsonl": write_answer_jsonl,
}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_layout_loads_expected_questions(tmp_path, layout):
    questions = load_questions(WRITERS[layout](tmp_path))
    assert len(questions) == len(ROWS)
    for q, (text, opts, ans) in zip(questions, ROWS, strict=True):
        assert isinstance(q, Question)
        assert (q.subject, q.question, q.options, q.answer) == (SUBJECT, text, opts, ans)
        assert q.answer_index == LETTERS.index(ans)
        assert q.id.startswith(f"{SUBJECT}-")
    assert len({q.id for q in questions}) == len(ROWS)


@pytest.mark.parametrize("layout", [k for k in WRITERS if k != "hf-jsonl"])
def test_layouts_give_identical_questions(tmp_path, layout):
    (tmp_path / "ref").mkdir()
    reference = load_questions(write_hf_jsonl(tmp_path / "ref"))
    other = load_questions(WRITERS[layout](tmp_path))
    assert other == reference


def test_directory_of_csvs_takes_subject_from_each_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_csv(folder / "astronomy_test.csv", _mmlu_rows(ROWS[:2]))
    _write_csv(folder / "college_biology_dev.csv", _mmlu_rows(ROWS[2:]))
    (folder / "README.txt").write_text("not a csv")
    questions = load_questions(folder)
    assert [q.subject for q in questions] == ["astronomy"] * 2 + ["college_biology"] * 2
    assert [q.question for q in questions] == [r[0] for r in ROWS]


def test_same_question_in_two_subjects_gets_two_ids(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_csv(folder / "a_test.csv", _mmlu_rows(ROWS[:1]))
    _write_csv(folder / "b_test.csv", _mmlu_rows(ROWS[:1]))
    a, b = load_questions(folder)
    assert a.id != b.id


def test_ids_are_stable_and_content_based(tmp_path):
    first = load_questions(write_hf_jsonl(tmp_path))
    changed = [(ROWS[0][0], ("newton", "joule", "watt", "bar"), "A"), *ROWS[1:]]
    (tmp_path / "x").mkdir()
    second = load_questions(write_hf_jsonl(tmp_path / "x", changed))
    assert first[0].id != second[0].id
    assert [q.id for q in first[1:]] == [q.id for q in second[1:]]


def test_answer_letter_forms_accepted(tmp_path):
    records = [_hf_record(*ROWS[0]) | {"answer": "a"}, _hf_record(*ROWS[1]) | {"answer": "2"}]
    records.append(_jsonl_record(*ROWS[2]) | {"correct_answer": " d "})
    questions = load_questions(_write_jsonl(tmp_path / "mixed.jsonl", records))
    assert [q.answer for q in questions] == ["A", "C", "D"]


# -- stray header rows ---------------------------------------------------------------------


def test_stray_header_rows_skipped_hf_jsonl(tmp_path):
    header = {"question": "question", "subject": "subject", "choices": "choices",
              "answer": "answer"}
    records = [_hf_record(*ROWS[0]), header, *[_hf_record(*r) for r in ROWS[1:]], header]
    questions = load_questions(_write_jsonl(tmp_path / "mmlu.jsonl", records))
    assert [q.question for q in questions] == [r[0] for r in ROWS]


def test_stray_header_rows_skipped_answer_jsonl(tmp_path):
    header = {"question": "Question", "answer_a": "answer_a", "answer_b": "answer_b",
              "answer_c": "answer_c", "answer_d": "answer_d",
              "correct_answer": "correct_answer", "topic": "topic"}
    records = [header, *[_jsonl_record(*r) for r in ROWS]]
    questions = load_questions(_write_jsonl(tmp_path / "q.jsonl", records))
    assert len(questions) == len(ROWS)


def test_stray_header_rows_skipped_parquet(tmp_path):
    frame = pd.DataFrame(
        [_hf_record(*ROWS[0]),
         {"question": "question", "subject": "subject", "choices": ["a", "b", "c", "d"],
          "answer": 0},
         *[_hf_record(*r) for r in ROWS[1:]]]
    )
    frame.to_parquet(tmp_path / "m.parquet")
    assert len(load_questions(tmp_path / "m.parquet")) == len(ROWS)


@pytest.mark.parametrize("where", ["first", "middle"])
def test_stray_header_rows_skipped_mmlu_csv(tmp_path, where):
    header = ["question", "A", "B", "C", "D", "answer"]
    rows = _mmlu_rows()
    rows = [header, *rows] if where == "first" else [*rows[:2], header, *rows[2:]]
    path = _write_csv(tmp_path / f"{SUBJECT}_test.csv", rows)
    questions = load_questions(path)
    assert questions == load_questions(write_hf_jsonl(tmp_path))


def test_headed_hf_csv(tmp_path):
    path = tmp_path / "mmlu.csv"
    _write_csv(path, [["question", "subject", "choices", "answer"],
                      *[[q, SUBJECT, json.dumps(list(o)), LETTERS.index(a)] for q, o, a in ROWS]])
    assert load_questions(path) == load_questions(write_hf_jsonl(tmp_path))


# -- malformed rows ------------------------------------------------------------------------


def _bad_hf(row_no: int, **changes):
    """An HF JSONL file whose `row_no`-th line (1-based) is changed."""
    def write(tmp_path: Path) -> Path:
        records = [_hf_record(*r) for r in ROWS]
        records[row_no - 1] = {**records[row_no - 1], **changes}
        for key in [k for k, v in changes.items() if v is _DROP]:
            del records[row_no - 1][key]
        return _write_jsonl(tmp_path / "bad.jsonl", records)
    return write


def _bad_answer_jsonl(row_no: int, **changes):
    def write(tmp_path: Path) -> Path:
        records = [_jsonl_record(*r) for r in ROWS]
        records[row_no - 1].update(changes)
        return _write_jsonl(tmp_path / "bad.jsonl", records)
    return write


def _bad_csv(row_no: int, row: list):
    def write(tmp_path: Path) -> Path:
        rows = _mmlu_rows()
        rows[row_no - 1] = row
        return _write_csv(tmp_path / f"{SUBJECT}_test.csv", rows)
    return write


def _bad_parquet(row_no: int, **changes):
    def write(tmp_path: Path) -> Path:
        records = [_hf_record(*r) for r in ROWS]
        records[row_no - 1].update(changes)
        pd.DataFrame(records).to_parquet(tmp_path / "bad.parquet")
        return tmp_path / "bad.parquet"
    return write


def _raw_jsonl(lines: list[str]):
    def write(tmp_path: Path) -> Path:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return path
    return write


_DROP = object()
GOOD = json.dumps(_hf_record(*ROWS[0]))

MALFORMED = [
    pytest.param(_bad_hf(2, choices=["a", "", "c", "d"]), 2, "option B is empty",
                 id="empty-option"),
    pytest.param(_bad_hf(3, choices=["a", "  ", "c", "d"]), 3, "option B is empty",
                 id="blank-option"),
    pytest.param(_bad_hf(1, choices=["a", None, "c", "d"]), 1, "option B is missing",
                 id="null-option"),
    pytest.param(_bad_hf(2, choices=["a", "b", "c"]), 2, "expected 4 options, got 3",
                 id="three-options"),
    pytest.param(_bad_hf(2, choices=["a", "b", "c", "d", "e"]), 2, "got 5",
                 id="five-options"),
    pytest.param(_bad_hf(2, choices=7), 2, "choices is not a list", id="choices-not-list"),
    pytest.param(_bad_hf(2, answer="E"), 2, "'E' is not one of A, B, C, D", id="answer-E"),
    pytest.param(_bad_hf(4, answer=4), 4, "answer index 4 is not in 0-3", id="answer-4"),
    pytest.param(_bad_hf(4, answer=-1), 4, "answer", id="answer-negative"),
    pytest.param(_bad_hf(1, answer=True), 1, "not one of A, B, C, D", id="answer-bool"),
    pytest.param(_bad_hf(1, answer=_DROP), 1, "not one of A, B, C, D", id="answer-missing"),
    pytest.param(_bad_hf(3, subject=_DROP), 3, "subject is missing", id="missing-subject"),
    pytest.param(_bad_hf(3, subject="  "), 3, "subject is missing", id="blank-subject"),
    pytest.param(_bad_hf(2, question=""), 2, "question text is empty", id="empty-question"),
    pytest.param(_raw_jsonl([GOOD, GOOD, "{not json"]), 3, "not valid JSON", id="bad-json"),
    pytest.param(_raw_jsonl([GOOD, "[1, 2, 3]"]), 2, "expected an object", id="json-list"),
    pytest.param(_raw_jsonl([GOOD, json.dumps({"question": "q", "options": [1, 2, 3, 4]})]),
                 2, "unrecognised layout", id="unknown-layout"),
    pytest.param(_bad_answer_jsonl(2, answer_c=""), 2, "option C is empty",
                 id="answer-jsonl-empty-option"),
    pytest.param(_bad_answer_jsonl(2, correct_answer="E"), 2, "'E'", id="answer-jsonl-E"),
    pytest.param(_bad_answer_jsonl(4, topic=None), 4, "subject is missing",
                 id="answer-jsonl-missing-topic"),
    pytest.param(_bad_csv(2, ["q", "a", "b", "c", "d"]), 2, "expected 6 columns",
                 id="csv-five-columns"),
    pytest.param(_bad_csv(3, ["q", "a", "b", "c", "d", "A", "x"]), 3, "got 7",
                 id="csv-seven-columns"),
    pytest.param(_bad_csv(2, ["q", "a", "", "c", "d", "A"]), 2, "option B is empty",
                 id="csv-empty-option"),
    pytest.param(_bad_csv(4, ["q", "a", "b", "c", "d", "E"]), 4, "'E'", id="csv-answer-E"),
    pytest.param(_bad_parquet(2, answer=4), 2, "answer index 4", id="parquet-answer-4"),
    pytest.param(_bad_parquet(3, choices=["a", "b", "c"]), 3, "expected 4 options",
                 id="parquet-three-options"),
]


@pytest.mark.parametrize(("write", "row", "needle"), MALFORMED)
def test_malformed_row_names_file_and_row(tmp_path, write, row, needle):
    path = write(tmp_path)
    with pytest.raises(QuestionSetError) as info:
        load_questions(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{row}:"), message
    assert needle in message


def test_malformed_csv_in_directory_names_that_file(tmp_path):
    folder = write_mmlu_dir(tmp_path)
    bad = _write_csv(folder / "zoology_test.csv", [["q", "a", "b", "c", "d", "A"], ["q"]])
    with pytest.raises(QuestionSetError, match="expected 6 columns") as info:
        load_questions(folder)
    assert str(info.value).startswith(f"{bad}:2:")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p / "absent.jsonl", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no MMLU .csv files"),
        (lambda p: (p / "q.txt").write_text("x") and p / "q.txt", "unsupported file type"),
        (lambda p: (p / "q.jsonl").write_text("\n\n") and p / "q.jsonl", "no questions found"),
        (lambda p: (p / "q.json").write_text("{}") and p / "q.json", "expected a JSON list"),
        (lambda p: (p / "q.json").write_text("[") and p / "q.json", "not valid JSON"),
    ],
    ids=["missing", "empty-dir", "txt", "blank-jsonl", "json-object", "json-syntax"],
)
def test_bad_files(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(QuestionSetError, match=needle) as info:
        load_questions(path)
    assert str(path) in str(info.value)


# -- sampling ------------------------------------------------------------------------------


def _questions(sizes: dict[str, int]) -> list[Question]:
    out = []
    for subject, size in sizes.items():
        for i in range(size):
            out.append(Question(f"{subject}-{i:03d}", subject, f"{subject} q{i}",
                                ("a", "b", "c", "d"), "A"))
    return out


SIZES = {"algebra": 10, "biology": 10, "chemistry": 2}


def test_sample_is_deterministic_for_a_seed():
    qs = _questions(SIZES)
    first = sample_questions(qs, 9, seed=7)
    assert sample_questions(qs, 9, seed=7) == first
    assert sample_questions(list(reversed(qs)), 9, seed=7) == first  # input order is irrelevant


def test_sample_differs_across_seeds():
    qs = _questions({"algebra": 50, "biology": 50})
    samples = {tuple(q.id for q in sample_questions(qs, 10, seed=s)) for s in range(5)}
    assert len(samples) == 5


@pytest.mark.parametrize("seed", range(8))
def test_sample_is_stratified_and_redistributes(seed):
    qs = _questions(SIZES)
    sample = sample_questions(qs, 9, seed=seed)
    assert len(sample) == 9
    assert len({q.id for q in sample}) == 9
    assert set(sample) <= set(qs)
    counts = Counter(q.subject for q in sample)
    assert counts["chemistry"] == 2  # the small subject is exhausted
    assert sorted([counts["algebra"], counts["biology"]]) == [3, 4]
    assert sample == sorted(sample, key=lambda q: (q.subject, q.id))


def test_sample_lucky_subject_depends_on_seed():
    qs = _questions(SIZES)
    winners = {
        max(("algebra", "biology"),
            key=lambda s: Counter(q.subject for q in sample_questions(qs, 9, seed=seed))[s])
        for seed in range(20)
    }
    assert winners == {"algebra", "biology"}


@pytest.mark.parametrize(
    ("sizes", "n", "expected"),
    [
        ({"a": 10, "b": 10, "c": 10}, 9, {"a": 3, "b": 3, "c": 3}),
        ({"a": 1, "b": 1, "c": 20}, 10, {"a": 1, "b": 1, "c": 8}),
        ({"a": 5, "b": 3, "c": 1}, 8, {"a": 4, "b": 3, "c": 1}),
        ({"a": 100}, 7, {"a": 7}),
        ({"a": 5, "b": 5}, 1, None),  # one question from either subject
    ],
)
def test_sample_shares(sizes, n, expected):
    sample = sample_questions(_questions(sizes), n, seed=0)
    assert len(sample) == n
    assert len(set(sample)) == n
    if expected is not None:
        assert dict(Counter(q.subject for q in sample)) == expected


@pytest.mark.parametrize("n", [22, 23, 1000, None])
def test_sample_n_at_least_len_keeps_all(n):
    qs = _questions(SIZES)
    sample = sample_questions(list(reversed(qs)), n, seed=0)
    assert sample == sorted(qs, key=lambda q: (q.subject, q.id))


@pytest.mark.parametrize("n", [0, -1])
def test_sample_non_positive_n_errors(n):
    with pytest.raises(QuestionSetError, match="must be positive"):
        sample_questions(_questions(SIZES), n, seed=0)
