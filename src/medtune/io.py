"""Small file helpers: atomic writes, JSON lines reading with line numbers, appending.

Also the rules every converter shares: which cell or field values count as missing
(``is_missing``), how an unreadable workbook is reported (``reading_workbook``) and which output
paths a conversion may write (``check_convert_paths``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """Bad input data: names the file, the row (1-based line or row number) and the field."""

    def __init__(self, path: str | os.PathLike, row: int | None, field: str | None, message: str):
        where = f"{path}"
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.field, self.reason = str(path), row, field, message


#: Texts that stand for "no value" (compared after stripping, case-insensitively). They are what
#: pandas, Python and SQL exports write for an empty cell (``str(float("nan"))``, ``str(None)``,
#: ``NULL``); a third-party CMExam val.xlsx carries 1,039 explanations and one answer reading
#: ``nan``. "NA"/"N/A" are deliberately not markers: "Na" (sodium) is a real option text.
MISSING_MARKERS = frozenset({"nan", "none", "null"})


def is_missing(value: Any) -> bool:
    """Whether a cell or field value means "no value" — the one rule every converter applies.

    Missing are: ``None``; a float NaN (pandas' empty cell, JSON's ``NaN``); text that is empty
    after stripping whitespace; and text that, stripped, is ``nan``, ``none`` or ``null`` in any
    case (``MISSING_MARKERS``). Only the whole value is compared: ``"None of the above"`` and
    ``"A nan"`` are text. Other numbers, booleans, lists and objects are never missing.

    Args:
        value: A cell or field value as read from CSV, xlsx or JSON.

    Returns:
        True when the value is missing.
    """
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        text = value.strip()
        return not text or text.casefold() in MISSING_MARKERS
    return False


def present_text(value: Any) -> str:
    """``value`` as stripped text, or ``""`` when ``is_missing(value)``.

    Args:
        value: A cell or field value.

    Returns:
        The stripped text (``str(value)`` for numbers), ``""`` for a missing value.
    """
    return "" if is_missing(value) else str(value).strip()


def missing_note(value: Any) -> str:
    """What to add to a "missing" reason so a reader sees why a non-empty value was missing.

    Args:
        value: The value as read from the file.

    Returns:
        ``" ('nan' counts as missing)"`` for a marker text (as written in the file, stripped),
        ``" (NaN counts as missing)"`` for a float NaN; ``""`` for ``None`` or blank text (an
        empty cell needs no explanation) and for any value ``is_missing`` does not judge
        missing (e.g. an answer ``","`` that is empty only once separators are dropped).
    """
    if not is_missing(value):
        return ""
    if isinstance(value, float):
        return " (NaN counts as missing)"
    if isinstance(value, str) and value.strip():
        return f" ({value.strip()!r} counts as missing)"
    return ""


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (at any depth) replaced by ``None``.

    ``json.dumps`` writes such floats as the bare tokens ``NaN``/``Infinity``, which are not JSON:
    a rejects file holding a row's raw values must stay readable by any JSON reader.

    Args:
        value: A decoded row or cell value (dicts and lists are copied, not changed in place).

    Returns:
        The same structure, JSON-safe.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


@contextmanager
def reading_workbook(path: str | os.PathLike) -> Iterator[None]:
    """Turn any failure to parse an ``.xlsx`` file inside the block into one ``DataFileError``.

    A truncated or corrupt workbook fails deep inside zipfile, zlib or an XML parser with
    ``BadZipFile``, ``zlib.error``, ``KeyError`` (a missing part), ``XMLSyntaxError`` and more,
    depending on where the damage is; the user only needs to know the file is unreadable.
    ``OSError`` (missing file, permission, a directory) passes through: its own message names the
    path and the cause.

    Args:
        path: The workbook, named in the message.

    Raises:
        DataFileError: ``"PATH: not a readable .xlsx workbook (TYPE: detail); ..."``.
    """
    try:
        yield
    except (OSError, DataFileError):
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of a damaged file means the same
        detail = " ".join(str(exc).split()) or "no detail"
        raise DataFileError(
            path, None, None,
            f"not a readable .xlsx workbook ({type(exc).__name__}: {detail}); expected an Excel "
            "workbook: the file may be truncated or corrupt, re-save it from Excel",
        ) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as pretty UTF-8 JSON."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Atomically write rows as JSON lines; return the count."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line.

    Bad JSON, a line that is not an object, and bytes that are not UTF-8 (e.g. a GBK file) raise
    ``DataFileError`` naming the file and the line.
    """
    if Path(path).is_dir():
        raise DataFileError(path, None, None, "is a directory; expected a JSON-lines file")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:  # decoded line by line, so an encoding error names its line
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(path, lineno, None, f"not UTF-8 text (byte {exc.start} of the line: {exc.reason}); "
                                    "re-save the file as UTF-8 (GBK/GB18030 files must be converted)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(path, lineno, None, f"invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataFileError(path, lineno, None, "expected a JSON object per line")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read all JSON-lines objects."""
    return [obj for _, obj in iter_jsonl(path)]


def read_jsonl_tolerant(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read an append-only JSON-lines log, ignoring a torn last line left by a crash."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a crash mid-write leaves at most one partial final line
                break
            raise DataFileError(path, i + 1, None, "invalid JSON in the middle of the file") from None
    return rows


class JsonlAppender:
    """Append JSON lines and flush each one, so a crash loses at most the line being written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _truncate_torn_tail(self) -> None:
        # A partial last line (no trailing newline) from a killed run would corrupt the next
        # append; cut it off so the rerun redoes that item. ``read_jsonl_tolerant`` agrees: it
        # counts such a line as done only when it parses, and then it is kept here.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:  # a complete object that only lacks its newline (crash before "\n", editor) is kept
            complete = isinstance(json.loads(data[cut:]), dict)
        except ValueError:
            complete = False
        with open(self.path, "r+b") as fh:
            if complete:
                fh.seek(0, os.SEEK_END)
                fh.write(b"\n")
            else:
                fh.truncate(cut)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to disk."""
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_rejects_path(out_path: str | os.PathLike) -> Path:
    """Where converters write rejected rows by default: ``<out stem>.rejects.jsonl`` beside it."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.rejects.jsonl")


def check_convert_paths(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    rejects_path: str | os.PathLike | None,
    out_label: str = "output",
    rejects_label: str = "rejects output",
) -> None:
    """Refuse a conversion whose paths cannot work, before anything is read or written.

    Checked up front because a failure halfway would leave a records file without its rejects
    (or a bare ``IsADirectoryError`` naming a temp file).

    Args:
        input_path: The data file to convert.
        out_path: The records file to write.
        rejects_path: The rejects file (``None``: ``default_rejects_path(out_path)``).
        out_label: How messages name the records path (the CLI passes ``"--out"``).
        rejects_label: How messages name the rejects path (the CLI passes ``"--rejects"``).

    Raises:
        FileNotFoundError: The input does not exist.
        DataFileError: The input is a directory.
        ValueError: An output path is the input, a directory, or below a file; or the records
            and rejects paths are the same. The message names the setting and the path.
    """
    src, out = Path(input_path), Path(out_path)
    rej = Path(rejects_path) if rejects_path is not None else default_rejects_path(out)
    if not src.exists():  # here, not when pandas opens it: an error must not wait for that import
        raise FileNotFoundError(2, "No such file or directory", str(src))
    if src.is_dir():
        raise DataFileError(src, None, None, "the input is a directory; expected one data file")
    for label, target, example in ((out_label, out, "records.jsonl"), (rejects_label, rej, "rejects.jsonl")):
        if target.resolve() == src.resolve():
            raise ValueError(f"{label} {target} is the input file; refusing to overwrite it")
        if target.is_dir():
            raise ValueError(f"{label} {target} is a directory; expected a file path such as {target / example}")
        # The nearest existing ancestor must be a folder, or the write fails with ENOTDIR.
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{label} {target} is inside {parent}, which is a file, not a folder")
    if out.resolve() == rej.resolve():
        raise ValueError(f"records and rejects would both be written to {out} ({out_label} and {rejects_label})")


def convert_file(input_path: str | os.PathLike, out_path: str | os.PathLike,
                 rejects_path: str | os.PathLike | None, read: Any) -> Any:
    """Shared body of every ``convert_*``: ``read(input)`` → records file + rejects file.

    ``read`` returns a result with ``records`` (objects with ``to_dict()``) and ``rejects``
    (dicts). The paths are checked first (``check_convert_paths``: never overwrite the input,
    never write into a directory); with no rejects, a rejects file left by an earlier run is
    removed so it cannot be mistaken for this run's.
    """
    src, out = Path(input_path), Path(out_path)
    rej = Path(rejects_path) if rejects_path is not None else default_rejects_path(out)
    check_convert_paths(src, out, rej)
    result = read(src)
    write_jsonl(out, (record.to_dict() for record in result.records))
    if result.rejects:
        write_jsonl(rej, result.rejects)
    elif rej.exists():
        rej.unlink()
    return result
