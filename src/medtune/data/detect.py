"""Decide what a data file is: the one place where medtune tells data shapes apart.

Every command that reads data (``predict``, the training stages, ``data inspect`` and ``data
check``) asks ``detect`` what a file holds before reading it, so a file is placed the same way
everywhere and a file nobody can place is refused with the same one-line error. (Prediction files
are not data and ``evaluate`` recognises them itself.)

The answer is a ``DataShape``: the *kind* of record the file becomes, and the *format* (the
source shape) it is read from:

==============  ============  ==============================================================
format          kind          recognised by
==============  ============  ==============================================================
records         exam          ``id``, ``question``, ``options``, ``answer`` (``medtune convert``)
cmexam-csv      exam          the ``.csv`` extension (CMExam's release)
cmexam-xlsx     exam          the ``.xlsx`` extension (third-party CMExam copies)
cmexam-jsonl    exam          ``Question``, ``Options`` in any case (the Hugging Face mirror)
promptcblue     conversation  ``input``, ``target``
preference      preference    ``chosen``, ``rejected`` (or ``response_chosen``, ``response_rejected``)
alpaca          conversation  ``instruction``, ``output``
sharegpt        conversation  ``conversations``
messages        conversation  ``messages`` (medtune's own conversation records too)
qa              conversation  ``question``, ``answer``
summary         conversation  ``dialogue``, ``summary``
pt-text         text          a ``.txt`` file (one document a line), or rows with ``text``
==============  ============  ==============================================================

Rules, in order:

* ``.csv`` and ``.xlsx`` files are CMExam tables, by extension alone: the CMExam reader checks the
  columns itself and names the missing ones, and reading a large workbook twice would only cost.
* Other files are JSON — lines, or for ``.json`` one array — and the *first row that decodes to a
  JSON object* decides (a broken first line does not hide a good file). Its keys are tested in the
  order of the table above, first fit wins: exam shapes come first, so an exam row (which has an
  ``answer`` too) is never read as question/answer text; preference before the instruction shapes,
  since ShareGPT-style pairs also carry ``conversations``. A row with ``options`` but no question
  is exam data of no known shape and is not guessed at, and ``text`` decides only when nothing
  else fits.
* A ``.txt`` file whose first non-blank line is not a JSON object is pre-training text.

``detect_row`` applies the key rules to one decoded row; ``instruction_format`` is the subset
``medtune.data.instructions.detect_format`` answers (the shapes that file's converters read), and
keeps that function's precedence and messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.io import DataFileError

__all__ = [
    "FORMATS",
    "INSTRUCTION_FORMATS",
    "KINDS",
    "SHAPES",
    "DataShape",
    "JsonRow",
    "KnownShape",
    "detect",
    "detect_row",
    "instruction_format",
    "iter_json_rows",
]

#: Kinds of record a data file becomes.
KINDS = ("exam", "conversation", "preference", "text")


@dataclass(frozen=True)
class KnownShape:
    """One source shape ``detect`` can place.

    Attributes:
        format: The shape's name (``DataShape.format``).
        kind: The kind of record it becomes (one of ``KINDS``).
        hint: What identifies it, for error messages and documentation.
    """

    format: str
    kind: str
    hint: str


#: Every shape ``detect`` knows, in the order the key rules test them.
SHAPES: tuple[KnownShape, ...] = (
    KnownShape("records", "exam", "id, question, options, answer"),
    KnownShape("cmexam-csv", "exam", ".csv"),
    KnownShape("cmexam-xlsx", "exam", ".xlsx"),
    KnownShape("cmexam-jsonl", "exam", "Question, Options"),
    KnownShape("promptcblue", "conversation", "input, target"),
    KnownShape("preference", "preference", "chosen, rejected"),
    KnownShape("alpaca", "conversation", "instruction, output"),
    KnownShape("sharegpt", "conversation", "conversations"),
    KnownShape("messages", "conversation", "messages"),
    KnownShape("qa", "conversation", "question, answer"),
    KnownShape("summary", "conversation", "dialogue, summary"),
    KnownShape("pt-text", "text", ".txt or text"),
)
#: Every format name ``detect`` can return.
FORMATS = tuple(s.format for s in SHAPES)
#: The shapes ``medtune.data.instructions`` converts (its ``FORMATS``), as ``instruction_format`` names them.
INSTRUCTION_FORMATS = ("alpaca", "sharegpt", "messages", "qa", "summary", "preference")

_KIND_OF = {s.format: s.kind for s in SHAPES}
_TABLES = {".csv": "cmexam-csv", ".xlsx": "cmexam-xlsx"}
_JSON_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class DataShape:
    """What a data file is, as ``detect`` places it.

    Attributes:
        kind: ``"exam"``, ``"conversation"``, ``"preference"`` or ``"text"``: the records it becomes.
        format: The source shape (one of ``FORMATS``); the readers take it as their format.
        layout: How rows are stored: ``"lines"`` (JSON lines), ``"array"`` (one JSON array),
            ``"table"`` (CSV / xlsx) or ``"text"`` (plain text, one document a line).
        keys: The keys of the row the decision was made on, sorted (empty for tables and text).
        row: That row's number (1-based line, or array position); ``None`` for tables and text.
    """

    kind: str
    format: str
    layout: str
    keys: tuple[str, ...] = ()
    row: int | None = None


@dataclass(frozen=True)
class JsonRow:
    """One row of a JSON-lines file or JSON array, decoded or not.

    Attributes:
        row: 1-based physical line (JSON lines) or array position (a ``.json`` array).
        obj: The decoded object; ``None`` when ``error`` is set.
        text: The row as written in the file.
        error: Why the row is not a JSON object (bad JSON, a list, ...), else ``None``.
    """

    row: int
    obj: dict[str, Any] | None = None
    text: str = ""
    error: str | None = None


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def instruction_format(row: Mapping[str, Any]) -> str:
    """Name the instruction / dialogue / preference shape of one row (``instructions.detect_format``).

    Preference data is checked first because its ShareGPT-style rows also carry ``conversations``.

    Args:
        row: A decoded row.

    Returns:
        One of ``INSTRUCTION_FORMATS``.

    Raises:
        ValueError: The row is not an object, is an exam question (``options``), or matches none
            of the shapes (the message lists the keys found).
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    fmt = _instruction_shape(keys)
    if fmt == _EXAM_LIKE:
        raise ValueError("this looks like exam data (it has 'options'): read it with medtune.data.cmexam")
    if fmt is None:
        raise ValueError(f"unknown data shape: keys {sorted(map(str, keys))} match none of {INSTRUCTION_FORMATS}")
    return fmt


_EXAM_LIKE = "exam-like"  # has ``options`` but no question: exam data of no shape medtune reads


def _instruction_shape(keys: set[Any]) -> str | None:
    if {"chosen", "rejected"} <= keys or {"response_chosen", "response_rejected"} <= keys:
        return "preference"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    # An exam row is never taken for question/answer text: its answer is a letter, not a reply.
    if "options" in {str(k).casefold() for k in keys}:
        return _EXAM_LIKE
    if "question" in keys and "answer" in keys:
        return "qa"
    if "dialogue" in keys and "summary" in keys:
        return "summary"
    return None


def _row_format(keys: set[Any]) -> str | None:
    """The format of a JSON row with these keys, or ``None`` when no shape fits."""
    folded = {str(k).casefold() for k in keys}
    if {"question", "options", "answer"} <= keys:
        return "records"
    if {"question", "options"} <= folded:
        return "cmexam-jsonl"
    # Before the instruction shapes: a PromptCBLUE row has no key they test, but an alpaca row
    # also has ``input``, so only ``target`` tells the two apart and it must be looked at first.
    if {"input", "target"} <= keys:
        return "promptcblue"
    fmt = _instruction_shape(keys)
    if fmt == _EXAM_LIKE:
        return None
    if fmt is None and "text" in keys:
        return "pt-text"
    return fmt


def detect_row(row: Mapping[str, Any], kinds: Iterable[str] | None = None) -> DataShape:
    """Place one decoded row by its keys (the rule ``detect`` applies to a file's first row).

    Args:
        row: A decoded JSON row.
        kinds: Kinds the caller reads (default: all of ``KINDS``); other shapes count as unknown.

    Returns:
        The shape, with ``layout="lines"`` and no row number.

    Raises:
        ValueError: The row is not an object, or no shape of ``kinds`` fits (one line naming the
            keys found and the shapes known).
    """
    wanted = _kinds(kinds)
    if not isinstance(row, Mapping):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    fmt = _row_format(keys)
    found = f"keys {sorted(map(str, keys))}"
    if fmt is None or _KIND_OF[fmt] not in wanted:
        raise ValueError(_unknown(found, wanted, fmt))
    return DataShape(_KIND_OF[fmt], fmt, "lines", tuple(sorted(map(str, keys))))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def detect(path: str | os.PathLike, kinds: Iterable[str] | None = None) -> DataShape:
    """Place a data file: what records it becomes and which shape it is read from.

    Reads only as far as the first JSON object (a ``.json`` array is decoded up to its first
    element); tables are placed by extension (see the module docstring for all rules).

    Args:
        path: The data file.
        kinds: Kinds the caller can read, e.g. ``("exam", "conversation")`` for ``predict``;
            default all of ``KINDS``. A file of another kind is refused like an unknown one, and
            the message says what it is instead.

    Returns:
        The file's ``DataShape``.

    Raises:
        DataFileError: One line naming the file: it is empty, not UTF-8, has no JSON object, or
            matches no shape of ``kinds`` (the message lists the keys found and the shapes known).
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``kinds`` names an unknown kind.
    """
    wanted = _kinds(kinds)
    path = Path(path)
    if path.is_dir():
        raise DataFileError(path, None, None, "is a directory; expected a data file")
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    suffix = path.suffix.lower()

    if suffix in _TABLES:
        return _placed(path, DataShape("exam", _TABLES[suffix], "table"), f"a {suffix} table", wanted)

    if suffix == ".json" and _starts_with(path, "["):
        row, obj = _first_array_object(path)
        layout = "array"
    else:
        first = _first_line_object(path, only_first_line=suffix == ".txt")
        if first is None:
            # Only a .txt gets here (other files raise above): its first line is prose, not JSON.
            return _placed(path, DataShape("text", "pt-text", "text"), "a plain-text file", wanted)
        row, obj = first
        layout = "lines"

    keys = tuple(sorted(map(str, obj)))
    fmt = _row_format(set(obj))
    if fmt is None:
        raise DataFileError(path, row, None, _unknown(f"keys {list(keys)}", wanted, None))
    return _placed(path, DataShape(_KIND_OF[fmt], fmt, layout, keys, row), f"keys {list(keys)}", wanted)


def iter_json_rows(path: str | os.PathLike) -> Iterator[JsonRow]:
    """Every row of a JSON-lines file (or of a ``.json`` file holding one array), decoded or not.

    Blank lines are skipped (but counted in line numbers). Lines are split at line feeds only, not
    at U+2028 and the like, which JSON written with ``ensure_ascii=False`` may carry in strings.
    A byte-order mark is tolerated.

    Args:
        path: The file.

    Yields:
        One ``JsonRow`` per non-blank line (or array element), in file order.

    Raises:
        DataFileError: The file is not UTF-8, or a ``.json`` array is not valid JSON.
    """
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(path, exc.lineno, None, f"invalid JSON array: {exc.msg}") from None
        for position, item in enumerate(items, start=1):
            yield _json_row(position, item, json.dumps(item, ensure_ascii=False))
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield JsonRow(lineno, text=line, error=f"invalid JSON: {exc.msg}")
            continue
        yield _json_row(lineno, obj, line)


def _json_row(row: int, obj: Any, text: str) -> JsonRow:
    if not isinstance(obj, dict):
        return JsonRow(row, text=text, error=f"expected a JSON object, got {type(obj).__name__}")
    return JsonRow(row, obj=obj, text=text)


def _kinds(kinds: Iterable[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    wanted = tuple(kinds)
    unknown = [k for k in wanted if k not in KINDS]
    if unknown or not wanted:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, got {wanted}")
    return wanted


def _placed(path: Path, shape: DataShape, found: str, wanted: tuple[str, ...]) -> DataShape:
    if shape.kind not in wanted:
        raise DataFileError(path, shape.row, None, _unknown(found, wanted, shape.format))
    return shape


def _unknown(found: str, wanted: tuple[str, ...], other: str | None) -> str:
    """The one-line refusal: what was found, the shapes known for ``wanted``, what it is instead."""
    groups = "; ".join(
        f"{kind}: " + ", ".join(s.format for s in SHAPES if s.kind == kind) for kind in wanted
    )
    scope = "" if wanted == KINDS else " for " + _either(wanted) + " data"
    message = f"unknown data shape{scope}: {found}; the shapes known are {groups}"
    if other is not None:
        message += f" (this is {other} data, kind {_KIND_OF[other]}, which is not read here)"
    return message


def _either(kinds: tuple[str, ...]) -> str:
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: tolerate the BOM Windows editors add
            return fh.read()
    except UnicodeDecodeError as exc:
        raise DataFileError(path, None, None, f"not UTF-8 ({exc.reason}); re-save the file as UTF-8") from None


def _starts_with(path: Path, char: str) -> bool:
    """Whether the first non-blank character of the file is ``char`` (reads a few KB at most)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            if stripped:
                return stripped[:1] == char.encode()
    return False


def _first_line_object(path: Path, only_first_line: bool) -> tuple[int, dict[str, Any]] | None:
    """``(line, object)`` of the first JSON-object line, streamed so large files cost one line.

    With ``only_first_line`` (a ``.txt``), ``None`` when the first non-blank line is not a JSON
    object; otherwise a file without any JSON object raises.
    """
    first_error: tuple[int, str] | None = None
    with open(path, "rb") as fh:
        # Split at b"\n" like the readers, so line numbers agree with their messages.
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(path, lineno, None, f"not UTF-8 ({exc.reason}); re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                error = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
            except json.JSONDecodeError as exc:
                obj, error = None, f"invalid JSON: {exc.msg}"
            if error is None:
                return lineno, obj
            if only_first_line:
                return None
            first_error = first_error or (lineno, error)
    if first_error is None:
        if only_first_line:
            raise DataFileError(path, None, None, "empty file: no text")
        raise DataFileError(path, None, None, "empty file: no JSON rows")
    raise DataFileError(path, first_error[0], None, f"no row is a JSON object ({first_error[1]})")


def _first_array_object(path: Path) -> tuple[int, dict[str, Any]]:
    """``(position, object)`` of the first object in a ``.json`` array, decoding only that element."""
    text = _read_text(path)
    start = text.index("[") + 1
    decoder = json.JSONDecoder()
    position = _skip_space(text, start)
    if position < len(text) and text[position] == "]":
        raise DataFileError(path, None, None, "empty file: the JSON array has no rows")
    try:
        first, _ = decoder.raw_decode(text, position)
        if isinstance(first, dict):
            return 1, first
    except json.JSONDecodeError:
        pass  # the whole-array decode below reports where the JSON breaks
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(path, exc.lineno, None, f"invalid JSON array: {exc.msg}") from None
    for index, item in enumerate(items, start=1):
        if isinstance(item, dict):
            return index, item
    raise DataFileError(path, 1, None, f"no row is a JSON object (expected a JSON object, got {type(items[0]).__name__})")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
