"""Load exam records from either a records file (``medtune convert`` output) or a raw CMExam file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from medtune.records import ExamRecord


def load_exam_file(path: str | Path, on_invalid: str = "error") -> tuple[list[ExamRecord], list[dict]]:
    """Records and rejects from ``path``.

    A ``.jsonl`` whose first object has a lowercase ``question`` key is a records file; anything
    else (CSV, xlsx, CMExam-shaped JSON lines) goes through the CMExam converter.
    """
    from medtune.data.cmexam import load_records, read_cmexam

    path = Path(path)
    if path.suffix in (".jsonl", ".json") and _first_keys(path) >= {"question", "options", "answer"}:
        return load_records(path), []
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


def split_records(
    records: list[ExamRecord], fraction: float, seed: int
) -> tuple[list[ExamRecord], list[ExamRecord]]:
    """Deterministic ``(train, held_out)`` split; ``fraction`` of records (at least 1) held out."""
    if fraction <= 0:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_out = max(1, round(len(records) * fraction))
    held = set(order[:n_out])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
