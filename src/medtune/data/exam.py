"""Public loaders for training and prediction data, each placed by ``medtune.data.detect.detect``.

* ``load_exam_file``: exam records (``medtune convert`` output) or a raw CMExam file;
* ``load_conversations``: conversation records, or a raw PromptCBLUE / instruction / dialogue file;
* ``load_preferences``: preference pairs, raw or converted.

Each takes an optional ``shape`` (what ``detect`` said) so a caller that already placed the file
does not place it again, and refuses a file of another kind with ``detect``'s one-line error.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from medtune.data.detect import DataShape, detect
from medtune.records import ExamRecord


def load_exam_file(path: str | os.PathLike, on_invalid: str = "error", duplicates: str = "error",
                   shape: DataShape | None = None) -> tuple[list[ExamRecord], list[dict]]:
    """Records and rejects from an exam records file or a raw CMExam file.

    Args:
        path: Exam records as JSON lines (read strictly, ``on_invalid`` does not apply), or a
            CMExam CSV / xlsx / JSON file (read by ``medtune.data.cmexam.read_cmexam``).
        on_invalid: ``"error"`` or ``"skip"`` for the CMExam reader.
        duplicates: ``"keep"`` lets a records file repeat ids (see ``load_records``).
        shape: ``detect(path)``'s answer when the caller already has it.

    Returns:
        ``(records, rejects)``.

    Raises:
        DataFileError: The file is not exam data (``detect``), or a row is invalid.
    """
    from medtune.data.cmexam import load_records, read_cmexam

    shape = _shape(path, shape, "exam")
    # A records array (rare) goes to the CMExam reader, which reads arrays and lowercase keys;
    # the strict records reader reads JSON lines only.
    if shape.format == "records" and shape.layout == "lines":
        return load_records(path, duplicates=duplicates), []
    result = read_cmexam(path, on_invalid=on_invalid)
    return result.records, result.rejects

def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic ``(train, held_out)`` split; ``fraction`` of records (at least 1) held out."""
    if fraction <= 0:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_out = max(1, round(len(records) * fraction))
    held = set(order[:n_out])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def detect_kind(path: str | os.PathLike) -> str:
    """``"exam"`` or ``"conversation"``: ``detect(path, kinds=("exam", "conversation")).kind``.

    Kept for callers written before ``medtune.data.detect``; it no longer answers
    ``"conversation"`` for a file of no known shape, it raises ``detect``'s error instead.
    """
    return detect(path, kinds=("exam", "conversation")).kind


def load_conversations(path: str | os.PathLike, on_invalid: str = "error", require_reply: bool = True,
                       duplicates: str = "error", shape: DataShape | None = None) -> tuple[list, list[dict]]:
    """Conversation records from a records file, or from a raw instruction/PromptCBLUE file.

    Raw shapes are converted on the fly: PromptCBLUE (``input``/``target``), alpaca
    (``instruction``/``output``), ShareGPT (``conversations``), ``messages`` without ids,
    question/answer pairs and dialogue summaries. JSON lines whose first row has ``id`` and
    ``messages`` are medtune's own records, read with ``Conversation.from_dict`` so that
    ``require_reply=False`` can accept prompts without a reply (for ``predict``).

    Args:
        path: The data file.
        on_invalid: ``"error"`` or ``"skip"``.
        require_reply: Refuse conversations that do not end with the assistant's reply (records
            and PromptCBLUE; the instruction shapes always need one).
        duplicates: ``"keep"`` lets a records file repeat ids; otherwise a repeat is an error.
        shape: ``detect(path)``'s answer when the caller already has it.

    Returns:
        ``(records, rejects)``; a reject is ``{"row", "field", "reason", "raw"}``.

    Raises:
        DataFileError: The file is not conversation data, or (``on_invalid="error"``) a row is
            invalid; a repeated id in a records file always.
    """
    from medtune.data.detect import iter_json_rows
    from medtune.io import DataFileError
    from medtune.records import Conversation, RecordError

    shape = _shape(path, shape, "conversation")
    if shape.format == "promptcblue":
        from medtune.data.promptcblue import read_promptcblue

        res = read_promptcblue(path, on_invalid=on_invalid, require_target=require_reply)
        return res.records, res.rejects
    if not (shape.layout == "lines" and {"id", "messages"} <= set(shape.keys)):
        from medtune.data.instructions import read_instructions

        res = read_instructions(path, fmt=shape.format, on_invalid=on_invalid)
        return res.records, res.rejects
    records: list[Any] = []
    rejects: list[dict] = []
    seen: dict[str, int] = {}
    for row in iter_json_rows(path):
        try:
            if row.error is not None:
                raise RecordError("row", row.error)
            record = Conversation.from_dict(row.obj, require_reply=require_reply)
        except RecordError as exc:
            fld = None if exc.field == "row" else exc.field  # a row that is not an object has no field
            if on_invalid == "error":
                raise DataFileError(path, row.row, fld, exc.reason) from None
            raw = row.obj if row.error is None else {"line": row.text}
            rejects.append({"row": row.row, "field": fld, "reason": exc.reason, "raw": raw})
            continue
        if record.id in seen and duplicates != "keep":
            raise DataFileError(path, row.row, "id", f"duplicate id {record.id!r} (first at line {seen[record.id]})")
        seen.setdefault(record.id, row.row)
        records.append(record)
    return records, rejects


def load_preferences(path: str | os.PathLike, on_invalid: str = "error", shape: DataShape | None = None) -> Any:
    """Preference pairs from a raw or converted preference file (``read_preferences``'s result).

    Args:
        path: The data file.
        on_invalid: ``"error"`` or ``"skip"``.
        shape: ``detect(path)``'s answer when the caller already has it.

    Returns:
        The ``medtune.data.instructions.ReadResult``: ``records`` (``PreferencePair``), ``rows``,
        ``rejects``, ``n_rows``.

    Raises:
        DataFileError: The file is not preference data, or (``on_invalid="error"``) a row is invalid.
    """
    from medtune.data.instructions import read_preferences

    shape = _shape(path, shape, "preference")
    return read_preferences(path, fmt=shape.format, on_invalid=on_invalid)


def _shape(path: str | os.PathLike, shape: DataShape | None, kind: str) -> DataShape:
    """``shape``, or ``detect``'s answer for a file that must be of ``kind``."""
    if shape is None:
        return detect(path, kinds=(kind,))
    if shape.kind != kind:
        raise ValueError(f"{Path(path)}: a {shape.kind} shape ({shape.format}) was given to the {kind} loader")
    return shape
