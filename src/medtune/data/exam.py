"""Load exam records from either a records file (``medtune convert`` output) or a raw CMExam file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from medtune.records import ExamRecord


def load_exam_file(path: str | Path, on_invalid: str = "error",
                   duplicates: str = "error") -> tuple[list[ExamRecord], list[dict]]:
    """Records and rejects from ``path``.

    A ``.jsonl`` whose first object has a lowercase ``question`` key is a records file; anything
    else (CSV, xlsx, CMExam-shaped JSON lines) goes through the CMExam converter.
    ``duplicates="keep"`` lets a records file repeat ids (see ``load_records``).
    """
    from medtune.data.cmexam import load_records, read_cmexam

    path = Path(path)
    if path.suffix in (".jsonl", ".json") and _first_keys(path) >= {"question", "options", "answer"}:
        return load_records(path, duplicates=duplicates), []
    result = read_cmexam(path, on_invalid=on_invalid)
    return result.records, result.rejects


def _first_keys(path: Path) -> set[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return set()
                return set(obj) if isinstance(obj, dict) else set()
    return set()


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic ``(train, held_out)`` split; ``fraction`` of records (at least 1) held out."""
    if fraction <= 0:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_out = max(1, round(len(records) * fraction))
    held = set(order[:n_out])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def detect_kind(path: str | Path) -> str:
    """``exam`` (exam records or a raw CMExam file) or ``conversation`` (everything prompt→reply).

    Decided by the first JSON object's keys; CSV/xlsx files are CMExam.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        return "exam"
    keys = _first_keys(path)
    if keys >= {"question", "options"} or keys >= {"Question", "Options"}:
        return "exam"
    return "conversation"


def load_conversations(path: str | Path, on_invalid: str = "error",
                       require_reply: bool = True, duplicates: str = "error") -> tuple[list, list[dict]]:
    """Conversation records from a records file, or from a raw instruction/PromptCBLUE file.

    Raw shapes are recognised by their keys and converted on the fly: PromptCBLUE
    (``input``/``target``), alpaca (``instruction``/``output``), ShareGPT (``conversations``),
    ``messages`` without ids, and question/answer pairs.
    """
    from medtune.io import DataFileError, iter_jsonl
    from medtune.records import Conversation, RecordError

    path = Path(path)
    keys = _first_keys(path)
    if keys >= {"input", "target"}:
        from medtune.data.promptcblue import read_promptcblue

        res = read_promptcblue(path, on_invalid=on_invalid, require_target=require_reply)
        return res.records, res.rejects
    if not keys >= {"id", "messages"}:
        from medtune.data.instructions import read_instructions

        res = read_instructions(path, on_invalid=on_invalid)
        return res.records, res.rejects
    records, rejects, seen = [], [], {}
    for lineno, obj in iter_jsonl(path):
        try:
            record = Conversation.from_dict(obj, require_reply=require_reply)
        except RecordError as exc:
            if on_invalid == "error":
                raise DataFileError(path, lineno, exc.field, exc.reason) from None
            rejects.append({"row": lineno, "field": exc.field, "reason": exc.reason, "raw": obj})
            continue
        if record.id in seen and duplicates != "keep":
            raise DataFileError(path, lineno, "id", f"duplicate id {record.id!r} (first at line {seen[record.id]})")
        seen.setdefault(record.id, lineno)
        records.append(record)
    return records, rejects
