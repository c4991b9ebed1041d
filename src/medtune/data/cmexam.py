"""Read CMExam into validated ``ExamRecord`` objects, in the three shapes found in the wild.

Shapes, chosen by file extension:

* ``.csv`` — the official release: columns ``Question, Options, Answer, Explanation`` and, in the
  annotated test split, ``Disease Group, Clinical Department, Medical Discipline,
  Area of Competency, Difficulty level``. ``Options`` is one cell with one option per line
  (``A 原发病``).
* ``.jsonl`` / ``.json`` — JSON lines as on the Hugging Face mirror:
  ``{"Question": ..., "Options": [{"key": "A", "value": ...}], "Answer": ..., "Explanation": ...}``,
  optionally with an ``id``. A ``.json`` file holding one JSON array is accepted too.
* ``.xlsx`` — third-party copies with the CSV's columns, where the option separator inside the
  cell may be the two characters backslash + ``n`` instead of a real newline.

Row numbers, used in ids, error messages and rejects, are 1-based: for CSV and xlsx the data row
(the header is not counted, and for CSV a quoted cell spanning several lines is still one row);
for JSON lines the physical line number in the file (blank lines are skipped but counted); for a
``.json`` array the element's position.

Ids are the JSON ``id`` when the row has one, else ``f"{file_stem}-{row:05d}"`` — stable across
runs as long as the file is not reordered. A duplicate id makes the later row invalid.

Every input row ends up either as a record or as a reject; nothing is dropped silently.

Missing values: in every column of every shape, a cell or field that ``medtune.io.is_missing``
judges missing — empty or blank, JSON ``null``/``NaN``, or the text ``nan``/``None``/``null`` in
any case, as pandas and spreadsheet exports write for an empty cell — is read as absent: a
missing explanation is ``""`` (and counted in ``n_missing_explanation``), a missing annotation is
left out, a missing id is generated, and a missing question, options cell, option text or answer
rejects the row naming that field. Rows are checked in the order question, options, answer.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from medtune.io import (
    DataFileError,
    convert_file,
    default_rejects_path,
    is_missing,
    iter_jsonl,
    json_safe,
    missing_note,
    present_text,
    reading_workbook,
)
from medtune.records import LETTERS, ExamRecord, RecordError

__all__ = [
    "ANNOTATION_COLUMNS",
    "ConvertResult",
    "convert_cmexam",
    "default_rejects_path",
    "load_records",
    "read_cmexam",
]

#: Extra label columns of the official annotated test split, kept as ``ExamRecord.annotations``.
ANNOTATION_COLUMNS = (
    "Disease Group",
    "Clinical Department",
    "Medical Discipline",
    "Area of Competency",
    "Difficulty level",
)
_REQUIRED_COLUMNS = ("Question", "Options", "Answer")
_ON_INVALID = ("error", "skip")
_TABLE_SUFFIXES = (".csv", ".xlsx")
_JSON_SUFFIXES = (".jsonl", ".json")

# An option line: a letter, then a separator (whitespace and/or one of . ． 、 : ： ) ）) or the
# end of the line. A letter glued straight to text ("A原发病", "B超") is NOT accepted: that shape
# is indistinguishable from a wrapped text line starting with a Latin letter, and misreading it
# would silently corrupt the option list.
_OPTION_LINE = re.compile(r"^([A-Z])\s*(?:[.．、:：)）]\s*|\s+|$)(.*)$", re.DOTALL)
# Characters people put between answer letters ("A,C", "A、C", "A C", "A/C").
_ANSWER_SEPARATORS = re.compile(r"[\s,，、;；/|+&]+")


@dataclass
class ConvertResult:
    """Outcome of reading one CMExam file.

    Attributes:
        records: Valid records, in file order.
        rejects: One dict per invalid row: ``{"row", "field", "reason", "raw"}`` where ``raw``
            holds the row's original values (only filled with ``on_invalid="skip"``).
        n_rows: Data rows read from the file; always ``len(records) + len(rejects)``.
        n_missing_explanation: Records (not rejects) whose explanation is empty.
    """

    records: list[ExamRecord]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    n_rows: int = 0
    n_missing_explanation: int = 0


class _RowError(Exception):
    """A row-level problem found before ``ExamRecord.validate`` could run (e.g. option parsing)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass
class _RawRow:
    """One input row: its number, original values, and the fields mapped to record names."""

    row: int
    raw: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    error: _RowError | None = None  # set when the row could not even be decoded (bad JSON)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def read_cmexam(path: str | os.PathLike, on_invalid: str = "error") -> ConvertResult:
    """Read a CMExam file (CSV, JSON lines or xlsx) into validated records.

    Args:
        path: Input file; the extension (``.csv``, ``.jsonl``/``.json``, ``.xlsx``) picks the shape.
        on_invalid: ``"error"`` raises on the first invalid row; ``"skip"`` collects invalid rows
            in ``ConvertResult.rejects`` and carries on.

    Returns:
        The records, the rejects and counts.

    Raises:
        DataFileError: With ``on_invalid="error"``, for the first invalid row (the message names
            the file, the 1-based row and the field). In both modes, for file-level problems:
            unsupported extension, missing required column, undecodable file.
        ValueError: ``on_invalid`` is not ``"error"`` or ``"skip"``.
    """
    if on_invalid not in _ON_INVALID:
        raise ValueError(f"on_invalid must be one of {_ON_INVALID}, got {on_invalid!r}")
    path = Path(path)
    stem = path.stem

    records: list[ExamRecord] = []
    rejects: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    n_rows = 0
    for raw_row in _iter_rows(path):
        n_rows += 1
        try:
            if raw_row.error is not None:
                raise raw_row.error
            record = _to_record(stem, raw_row)
            if record.id in seen_ids:
                # Two records with one id would collide in every later join (predictions, scores).
                raise _RowError("id", f"duplicate id {record.id!r} (first used at row {seen_ids[record.id]})")
        except (_RowError, RecordError) as exc:
            if on_invalid == "error":
                raise DataFileError(path, raw_row.row, exc.field, exc.reason) from None
            raw = json_safe(raw_row.raw)  # a JSON NaN would make the rejects file invalid JSON
            rejects.append({"row": raw_row.row, "field": exc.field, "reason": exc.reason, "raw": raw})
            continue
        seen_ids[record.id] = raw_row.row
        records.append(record)

    # Not a bare ``assert``: this guard must survive ``python -O``.
    if n_rows != len(records) + len(rejects):
        raise AssertionError(f"row accounting broke: {n_rows} rows != {len(records)} + {len(rejects)}")
    return ConvertResult(
        records=records,
        rejects=rejects,
        n_rows=n_rows,
        n_missing_explanation=sum(1 for r in records if not r.explanation),
    )


def convert_cmexam(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    on_invalid: str = "error",
    rejects_path: str | os.PathLike | None = None,
) -> ConvertResult:
    """Convert a CMExam file into a records JSON-lines file (one ``ExamRecord.to_dict()`` a line).

    Both files are written atomically, so a crash never leaves half a file. With
    ``on_invalid="error"`` nothing is written when any row is invalid.

    Args:
        input_path: CMExam file in any shape ``read_cmexam`` accepts.
        out_path: Records output (JSON lines).
        on_invalid: ``"error"`` or ``"skip"``, as in ``read_cmexam``.
        rejects_path: Where rejects go when there are any; default
            ``default_rejects_path(out_path)``. When there are none, a rejects file left at this
            path by an earlier run is removed so it cannot be mistaken for this run's.

    Returns:
        The ``ConvertResult`` of reading ``input_path``.

    Raises:
        DataFileError: As ``read_cmexam``.
        ValueError: The output would overwrite the input, or records and rejects share a path.
    """
    return convert_file(input_path, out_path, rejects_path, lambda path: read_cmexam(path, on_invalid=on_invalid))


def load_records(path: str | os.PathLike, duplicates: str = "error") -> list[ExamRecord]:
    """Read a records JSON-lines file (as written by ``convert_cmexam``) back into records.

    Args:
        path: Records file, one ``ExamRecord`` dict per line.
        duplicates: ``"error"`` (default) refuses a repeated id; ``"keep"`` returns every line
            (``predict --dedupe`` then drops identical repeats itself).

    Returns:
        The validated records, in file order.

    Raises:
        DataFileError: On invalid JSON, an invalid record or a duplicate id; names the line.
    """
    records: list[ExamRecord] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        try:
            record = ExamRecord.from_dict(obj)
        except RecordError as exc:
            raise DataFileError(path, lineno, exc.field, exc.reason) from None
        except (TypeError, ValueError) as exc:
            # e.g. ``annotations`` that is not an object: from_dict's dict() call fails.
            raise DataFileError(path, lineno, None, f"invalid record: {exc}") from None
        if record.id in seen and duplicates != "keep":
            raise DataFileError(
                path, lineno, "id", f"duplicate id {record.id!r} (first at line {seen[record.id]})"
            )
        seen[record.id] = lineno
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Reading rows from each shape
# --------------------------------------------------------------------------------------------


def _iter_rows(path: Path) -> Iterator[_RawRow]:
    suffix = path.suffix.lower()
    if suffix in _TABLE_SUFFIXES:
        yield from _iter_table_rows(path, suffix)
    elif suffix in _JSON_SUFFIXES:
        yield from _iter_json_rows(path, suffix)
    else:
        raise DataFileError(
            path, None, None, f"unsupported extension {path.suffix!r}; expected .csv, .jsonl, .json or .xlsx"
        )


def _column_key(name: Any) -> str:
    # Third-party copies vary case and spacing in headers ("difficulty  level"); match loosely.
    return " ".join(str(name).split()).casefold()


_CANONICAL = {_column_key(c): c for c in (*_REQUIRED_COLUMNS, "Explanation", *ANNOTATION_COLUMNS)}


def _read_table(path: Path, suffix: str) -> pd.DataFrame:
    # pandas is imported here, not with the module: evaluate imports this module for its column
    # names only, and pandas took 0.4 s of its start.
    import pandas as pd

    # dtype=str + keep_default_na=False: pandas keeps every cell as its text, and which texts are
    # missing is decided in one place (medtune.io.is_missing), the same for every shape —
    # pandas' own list would make "NA" missing too, and "Na" is a real option text.
    try:
        if suffix == ".csv":
            # utf-8-sig strips the BOM Excel adds when saving CSV as UTF-8.
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        with reading_workbook(path):
            return pd.read_excel(path, dtype=str, keep_default_na=False, engine="openpyxl")
    except UnicodeDecodeError as exc:
        # Re-encoding guesses (GBK, GB18030) can decode garbage without complaint, so ask instead.
        raise DataFileError(
            path, None, None, f"not UTF-8 ({exc.reason}); re-save the file as UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataFileError(path, None, None, "empty file: no header row") from None
    except pd.errors.ParserError as exc:
        raise DataFileError(path, None, None, f"unreadable CSV: {exc}") from None


def _iter_table_rows(path: Path, suffix: str) -> Iterator[_RawRow]:
    frame = _read_table(path, suffix)
    columns = {}
    for col in frame.columns:
        canonical = _CANONICAL.get(_column_key(col))
        if canonical is not None and canonical not in columns:
            columns[canonical] = col
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataFileError(
            path, None, missing[0], f"missing column(s) {missing}; found {[str(c) for c in frame.columns]}"
        )

    for index, values in enumerate(frame.itertuples(index=False, name=None)):
        raw = {str(col): value for col, value in zip(frame.columns, values, strict=True)}
        by_col = dict(zip(frame.columns, values, strict=True))
        fields = {
            "question": by_col[columns["Question"]],
            "options": by_col[columns["Options"]],
            "answer": by_col[columns["Answer"]],
            "explanation": by_col[columns["Explanation"]] if "Explanation" in columns else "",
            "annotations": {name: by_col[columns[name]] for name in ANNOTATION_COLUMNS if name in columns},
        }
        yield _RawRow(row=index + 1, raw=raw, fields=fields)


def _iter_json_rows(path: Path, suffix: str) -> Iterator[_RawRow]:
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    if suffix == ".json" and text.lstrip().startswith("["):
        # Some copies are one JSON array rather than JSON lines; rows are then array positions.
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(path, exc.lineno, None, f"invalid JSON array: {exc.msg}") from None
        for position, item in enumerate(items, start=1):
            yield _json_row(position, item)
        return

    # split("\n"), not splitlines(): the latter also breaks at U+2028 etc., which JSON written
    # with ensure_ascii=False may legitimately carry inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            # A bad line is a bad row: with on_invalid="skip" it becomes a reject, not a crash.
            yield _RawRow(row=lineno, raw={"line": line}, error=_RowError(None, f"invalid JSON: {exc.msg}"))
            continue
        yield _json_row(lineno, obj)


def _json_row(row: int, obj: Any) -> _RawRow:
    if not isinstance(obj, dict):
        return _RawRow(row=row, raw={"line": obj}, error=_RowError(None, "expected a JSON object"))
    by_key = {_column_key(k): v for k, v in obj.items()}
    fields = {
        "question": by_key.get("question"),
        "options": by_key.get("options"),
        "answer": by_key.get("answer"),
        "explanation": by_key.get("explanation"),
        "annotations": {
            name: by_key[_column_key(name)] for name in ANNOTATION_COLUMNS if _column_key(name) in by_key
        },
    }
    if "id" in by_key and present_text(by_key["id"]):
        fields["id"] = present_text(by_key["id"])
    return _RawRow(row=row, raw=obj, fields=fields)


# --------------------------------------------------------------------------------------------
# Turning one row into a record
# --------------------------------------------------------------------------------------------


def _to_record(stem: str, raw_row: _RawRow) -> ExamRecord:
    fields = raw_row.fields
    # Checked in the order question, options, answer (ExamRecord.validate's order), so a row with
    # several problems always names the same field whatever shape it came in.
    question = present_text(fields["question"])
    if not question:
        raise _RowError("question", "empty question" + missing_note(fields["question"]))
    record = ExamRecord(
        id=fields.get("id") or f"{stem}-{raw_row.row:05d}",
        question=question,
        options=_parse_options(fields["options"]),
        answer=_normalise_answer(fields["answer"]),
        explanation=present_text(fields["explanation"]),
        annotations=_annotations(fields["annotations"]),
    )
    # validate() checks options/answer and puts the answer letters in option order
    # (records.normalise_letters) — after checking membership, so a stray letter is reported
    # rather than silently dropped.
    try:
        return record.validate()
    except RecordError as exc:
        if exc.field == "answer" and not record.answer:
            # "no answer" alone would hide that the cell said "nan": name what was found.
            raise _RowError("answer", exc.reason + missing_note(fields["answer"])) from None
        raise


def _parse_options(value: Any) -> dict[str, str]:
    """Options as ``{letter: text}`` from a cell string, a ``[{"key", "value"}]`` list or a dict.

    Raises ``_RowError`` (field ``options``) for a missing options cell and for an option whose
    text is missing, naming the option letter.
    """
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = []
        for position, item in enumerate(value, start=1):
            if not isinstance(item, dict) or "key" not in item:
                raise _RowError("options", f"option entry {position} is not an object with 'key' and 'value'")
            pairs.append((item["key"], item.get("value")))
    elif is_missing(value):
        raise _RowError("options", "no options" + missing_note(value))
    else:
        pairs = _split_option_cell(str(value))

    options: dict[str, str] = {}
    for key, raw_text in pairs:
        letter = unicodedata.normalize("NFKC", present_text(key)).upper()
        if letter in options:
            raise _RowError("options", f"duplicate option letter {letter}")
        text = present_text(raw_text)
        # A missing option text ("B nan", {"key": "B", "value": null}) rejects the row rather than
        # training on an option reading "nan"; records.validate would say the same for "", but
        # only here is the original value known. A key that is no letter A-J is left to validate.
        if not text and letter in LETTERS:
            raise _RowError("options", f"option {letter} has no text" + missing_note(raw_text))
        options[letter] = text
    return options


def _split_option_cell(cell: str) -> list[tuple[str, str]]:
    """``(letter, text as written)`` for each option line; texts are judged by ``_parse_options``."""
    # Line breaks arrive as \n, \r\n, \r, or — in some xlsx copies — the literal two characters
    # backslash + n. Option texts never contain a literal backslash-n, so unescaping is safe.
    cell = cell.replace("\\r\\n", "\n").replace("\\n", "\n").replace("\r\n", "\n").replace("\r", "\n")
    pairs = []
    for number, line in enumerate(cell.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        # NFKC only on the first character: it maps a full-width letter (Ａ) to ASCII while the
        # option text keeps its own full-width punctuation untouched.
        match = _OPTION_LINE.match(unicodedata.normalize("NFKC", line[0]) + line[1:])
        if match is None:
            raise _RowError("options", f"unparsable option line {number}: {line!r}")
        pairs.append((match.group(1), match.group(2)))
    return pairs


def _normalise_answer(value: Any) -> str:
    if isinstance(value, list):  # some JSON copies give multi-answers as ["A", "C"]
        value = "".join(present_text(v) for v in value)
    answer = unicodedata.normalize("NFKC", present_text(value)).upper()
    return _ANSWER_SEPARATORS.sub("", answer)


def _annotations(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        if is_missing(value):
            continue  # an unlabelled cell is "no annotation", not the label "nan"
        text = present_text(value)
        out[name] = _as_int(text) if name == "Difficulty level" else text
    return out


def _as_int(text: str) -> int | str:
    # Excel may hand back 3 as "3.0"; keep non-integers ("hard", "2.5") as the original text.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else text
