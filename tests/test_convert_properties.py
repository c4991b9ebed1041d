"""Property tests for the CMExam converter: every generated table converts losslessly or is rejected.

A table of rows is generated (CJK/Latin/punctuation/whitespace texts, 2-10 options in any letter
order, answers as letter sets with multi-answers, separators, lower case and invalid letters,
explanations and annotations possibly missing) and written as CMExam CSV, JSON lines and xlsx.
For each row an independent oracle, written from the documented rules rather than from the
converter's code, says what must come out: a record with every field, or a reject naming the
row and the field. Always ``n_rows == len(records) + len(rejects)``.

Intentional normalisations (the record differs from the cell, by design):

* every text field (question, option text, explanation, annotation) is stripped of surrounding
  whitespace; inner whitespace is kept;
* a value that is blank or reads ``nan``/``None``/``null`` in any case is missing
  (``medtune.io.is_missing``): no explanation, no annotation, or a reject for a question, option
  or answer;
* answers are upper-cased, separators (``,``, ``、``, spaces, ``/`` …) dropped, duplicates merged
  and the letters put in option order (``"c, a"`` → ``"AC"`` when A comes before C);
* ``Difficulty level`` becomes an int.

What the generator leaves out, and why (limits of the formats, not of the converter):

* option texts have no line break and no backslash (the options cell is one option per line,
  and the two characters ``\\`` ``n`` are read as a line break), and do not start with one of
  ``. ． 、 : ： ) ）`` (after ``A `` that character reads as the label's separator);
* no ``\\r`` anywhere (XML, hence xlsx, turns ``\\r\\n`` into ``\\n``), no text starting with
  ``=`` (openpyxl writes it as a formula) and no ``_`` (openpyxl decodes ``_x0041_`` escapes);
* no control characters (xlsx cannot store them).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import openpyxl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medtune.data.cmexam import ANNOTATION_COLUMNS, read_cmexam
from medtune.io import DataFileError
from medtune.records import LETTERS, ExamRecord

# --------------------------------------------------------------------------------------------
# The oracle's own rules (deliberately not imported from the code under test)
# --------------------------------------------------------------------------------------------

MARKERS = ["nan", "NaN", "NAN", "None", "none", "null", "NULL", "", "  ", " nan "]
SEPARATORS = ["", ",", "，", "、", " ", "/", ";", ", "]
OPTION_LABEL_PUNCT = set(".．、:：)）")


def absent(value: Any) -> bool:
    """Missing by the documented rule: None, or blank, or nan/none/null in any case."""
    return value is None or str(value).strip().casefold() in ("", "nan", "none", "null")


# --------------------------------------------------------------------------------------------
# Generated rows
# --------------------------------------------------------------------------------------------

ALPHABET = (
    "甲乙丙丁患者男女岁发热咳嗽胸痛治疗方案原发病肺炎心肾肝药物剂量"
    "abcxyzABCXYZ0123456789"
    "，。；：？！（）《》“”、.,;:?!()-/%'\"+"
    " \u3000\t"
)
text = st.text(alphabet=ALPHABET, min_size=1, max_size=20)
multiline = st.lists(text, min_size=1, max_size=3).map("\n".join)  # questions and explanations
option_text = text.filter(lambda t: t.strip()[:1] not in OPTION_LABEL_PUNCT)


@dataclass
class Row:
    question: str | None
    letters: list[str]  # option letters in display order
    option_texts: list[str | None]
    answer: str | None  # as written in the file
    answer_letters: list[str]  # what was meant, upper case ([] when the answer is missing)
    explanation: str | None
    annotations: dict[str, Any] = field(default_factory=dict)


@st.composite
def rows(draw: st.DrawFn) -> Row:
    # Each row gets at most a chosen kind of fault, so that records and every kind of reject all
    # come up often (independent faults per cell would reject nearly every 10-option row).
    fault = draw(st.sampled_from(["none", "none", "none", "question", "option", "answer-missing",
                                  "answer-invalid", "several"]))
    several = fault == "several"
    n = draw(st.integers(2, 10))
    letters = list(LETTERS[:n])
    if draw(st.booleans()):
        letters = draw(st.permutations(letters))
    option_texts: list[str | None] = [draw(option_text) for _ in letters]
    if fault == "option" or (several and draw(st.booleans())):
        for index in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2)):
            option_texts[index] = draw(st.sampled_from([*MARKERS, None]))

    question = draw(multiline)
    if fault == "question" or (several and draw(st.booleans())):
        question = draw(st.sampled_from([*MARKERS, None]))

    answer_fault = fault if fault.startswith("answer") else "none"
    if several:
        answer_fault = draw(st.sampled_from(["none", "answer-missing", "answer-invalid"]))
    if answer_fault == "answer-missing":
        answer, answer_letters = draw(st.sampled_from([*MARKERS, None])), []
    else:
        # A single answer or a multi-answer, maybe repeated letters, in any order.
        chosen = draw(st.lists(st.sampled_from(letters), min_size=1, max_size=4))
        if answer_fault == "answer-invalid":
            # A letter A-J that is no option, or a letter beyond J.
            chosen.append(draw(st.sampled_from([c for c in LETTERS if c not in letters] + list("KXYZ"))))
            chosen = draw(st.permutations(chosen))
        written = [c.lower() if draw(st.booleans()) else c for c in chosen]
        answer = draw(st.sampled_from(SEPARATORS)).join(written)
        answer_letters = [c.upper() for c in chosen]

    # Explanations and annotations are optional: missing ones never reject a row.
    explanation = draw(st.one_of(multiline, st.sampled_from([*MARKERS, None])))
    annotations: dict[str, Any] = {}
    if draw(st.booleans()):
        for name in ANNOTATION_COLUMNS:
            if name == "Difficulty level":
                annotations[name] = draw(st.one_of(st.integers(1, 5), st.sampled_from(["nan", "None", None])))
            else:
                annotations[name] = draw(st.one_of(text, st.sampled_from(["nan", "NULL", "", None])))
    return Row(question, letters, option_texts, answer, answer_letters, explanation, annotations)


tables = st.lists(rows(), min_size=1, max_size=6)


# --------------------------------------------------------------------------------------------
# Expected outcome of one row
# --------------------------------------------------------------------------------------------


def expected(row: Row) -> tuple[str, Any]:
    """``("record", fields)`` or ``("reject", field)``, checking question, options, answer in order."""
    if absent(row.question):
        return "reject", "question"
    if any(absent(t) for t in row.option_texts):
        return "reject", "options"
    if absent(row.answer) or not row.answer_letters:
        return "reject", "answer"
    if any(c not in row.letters for c in row.answer_letters):
        return "reject", "answer"
    chosen = set(row.answer_letters)
    annotations = {name: (value if name == "Difficulty level" else str(value).strip())
                   for name, value in row.annotations.items() if not absent(value)}
    return "record", {
        "question": row.question.strip(),
        "options": {c: t.strip() for c, t in zip(row.letters, row.option_texts, strict=True)},
        "answer": "".join(c for c in row.letters if c in chosen),
        "explanation": "" if absent(row.explanation) else row.explanation.strip(),
        "annotations": annotations,
    }


# --------------------------------------------------------------------------------------------
# Writers, one per shape
# --------------------------------------------------------------------------------------------

HEADER = ["Question", "Options", "Answer", "Explanation", *ANNOTATION_COLUMNS]


def cells(row: Row) -> list[Any]:
    options = "\n".join(f"{c} {t if t is not None else ''}" for c, t in zip(row.letters, row.option_texts, strict=True))
    return [row.question, options, row.answer, row.explanation, *(row.annotations.get(n) for n in ANNOTATION_COLUMNS)]


def write_csv(path: Path, table: list[Row]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for row in table:
            writer.writerow(["" if v is None else v for v in cells(row)])


def write_xlsx(path: Path, table: list[Row]) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(HEADER)
    for row in table:
        sheet.append(cells(row))  # None is a real empty cell; "nan" a text cell
    book.save(path)


def write_jsonl(path: Path, table: list[Row]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in table:
            obj = {
                "Question": row.question,
                "Options": [{"key": c, "value": t} for c, t in zip(row.letters, row.option_texts, strict=True)],
                "Answer": row.answer,
                "Explanation": row.explanation,
                **{n: v for n, v in row.annotations.items()},
            }
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------


def check_table(table: list[Row], write: Any, suffix: str) -> None:
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / f"gen{suffix}"
        write(path, table)
        result = read_cmexam(path, on_invalid="skip")

        assert result.n_rows == len(table) == len(result.records) + len(result.rejects)
        want = [expected(row) for row in table]
        want_rejects = [(i, what) for i, (kind, what) in enumerate(want, start=1) if kind == "reject"]
        assert [(r["row"], r["field"]) for r in result.rejects] == want_rejects
        assert all(r["reason"] for r in result.rejects)

        want_records = [(i, what) for i, (kind, what) in enumerate(want, start=1) if kind == "record"]
        assert len(result.records) == len(want_records)
        for record, (row_number, fields) in zip(result.records, want_records, strict=True):
            assert record.id == f"gen-{row_number:05d}"
            assert record.question == fields["question"]
            assert list(record.options.items()) == list(fields["options"].items())  # order kept
            assert record.answer == fields["answer"]
            assert record.explanation == fields["explanation"]
            assert record.annotations == fields["annotations"]
            assert ExamRecord.from_dict(record.to_dict()) == record  # the records file round-trips
        assert result.n_missing_explanation == sum(1 for _, f in want_records if not f["explanation"])

        # Error mode stops at the first reject, naming the file, that row and that field.
        if want_rejects:
            row_number, field_name = want_rejects[0]
            try:
                read_cmexam(path)
            except DataFileError as exc:
                assert (exc.row, exc.field) == (row_number, field_name)
                assert str(exc).startswith(f"{path}, row {row_number}, field '{field_name}': ")
            else:
                raise AssertionError("error mode accepted a table with an invalid row")
        else:
            assert read_cmexam(path).records == result.records


# Modest example counts keep the three tests at a few seconds; database=None keeps hypothesis from
# writing a .hypothesis folder into the working tree.
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(tables)
def test_csv_tables_convert_losslessly_or_reject_row_and_field(table):
    check_table(table, write_csv, ".csv")


@FAST
@given(tables)
def test_jsonl_tables_convert_losslessly_or_reject_row_and_field(table):
    check_table(table, write_jsonl, ".jsonl")


@settings(FAST, max_examples=20)
@given(tables)
def test_xlsx_tables_convert_losslessly_or_reject_row_and_field(table):
    check_table(table, write_xlsx, ".xlsx")
