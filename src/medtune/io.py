"""Small file helpers: atomic writes, JSON lines reading with line numbers, appending."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
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
    """Yield ``(line_number, object)`` for each non-blank line; bad JSON raises ``DataFileError``."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
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


def convert_file(input_path: str | os.PathLike, out_path: str | os.PathLike,
                 rejects_path: str | os.PathLike | None, read: Any) -> Any:
    """Shared body of every ``convert_*``: ``read(input)`` → records file + rejects file.

    ``read`` returns a result with ``records`` (objects with ``to_dict()``) and ``rejects``
    (dicts). Refuses to overwrite the input; with no rejects, a rejects file left by an earlier
    run is removed so it cannot be mistaken for this run's.
    """
    src, out = Path(input_path), Path(out_path)
    rej = Path(rejects_path) if rejects_path is not None else default_rejects_path(out)
    if src.resolve() in (out.resolve(), rej.resolve()):
        raise ValueError(f"refusing to overwrite the input file {src}")
    if out.resolve() == rej.resolve():
        raise ValueError(f"records and rejects would both be written to {out}")
    result = read(src)
    write_jsonl(out, (record.to_dict() for record in result.records))
    if result.rejects:
        write_jsonl(rej, result.rejects)
    elif rej.exists():
        rej.unlink()
    return result
