"""Data-quality commands: ``inspect`` one data file, ``check`` train/val/test for duplicates and leakage.

Both read any data file medtune trains on, placed by ``medtune.data.detect.detect`` like every
command places it (pre-training text excepted):

* exam records (``{"id", "question", "options", "answer", ...}`` lines, ``medtune convert``'s
  output) and raw CMExam files (CSV / xlsx / JSON lines with ``Question``, ``Options``, read with
  ``medtune.data.exam.load_exam_file``);
* conversation lines (``Conversation.to_dict()``) and raw SFT shapes (alpaca, ShareGPT, messages,
  question/answer), read with ``medtune.data.instructions``; PromptCBLUE lines (``input``,
  ``target``, ``task_dataset``), read with ``medtune.data.promptcblue``;
* preference pairs (``PreferencePair.to_dict()`` or raw ``{prompt|conversations, chosen,
  rejected}``).

Invalid rows never stop either command: they are listed as ``malformed`` with their row and
reason, which is one of the things a data check is for. This module computes; the ``inspect``
report files and charts are written by ``medtune.report.data_report``, so it needs no matplotlib.

Near-duplicate search uses an exact set-similarity join (length filter + prefix filter on
character 3-grams ordered rarest first), not MinHash: for a Jaccard threshold ``t`` two texts can
only reach ``t`` when they share one of the first ``|x| - ceil(t·|x|) + 1`` rarest 3-grams of each,
so only texts sharing such a rare 3-gram are compared. That finds every pair at or above the
threshold (no false negatives, unlike LSH), is deterministic, and at ``t = 0.9`` compares a tiny
fraction of all pairs. ``benchmarks/data_check_speed.py`` measures it against brute force.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.data.detect import DataShape, detect, iter_json_rows
from medtune.io import DataFileError
from medtune.records import Conversation, ExamRecord, PreferencePair, RecordError

__all__ = [
    "DEFAULT_MAX_LENGTHS",
    "LoadedData",
    "check",
    "check_exit_code",
    "inspect",
    "jaccard",
    "load_data",
    "near_duplicate_pairs",
    "normalise_text",
    "shingles",
]

#: Sequence lengths (tokens) that ``inspect`` counts overlong records against.
DEFAULT_MAX_LENGTHS = (512, 1024, 2048)
_KINDS = ("exam", "conversation", "preference")  # what inspect and check read (not pre-training text)
_SPLITS = ("train", "val", "test")
_MAX_LISTED = 200  # malformed rows listed in an inspect report; the count is always complete
_MAX_META_VALUES = 30  # distinct meta values listed per key (task names fit; free text is cut)
_HIST_BINS = 30
_EPS = 1e-9


# --------------------------------------------------------------------------------------------
# Loading any supported file
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedData:
    """One data file read leniently for inspection.

    Attributes:
        path: The file read ("" for in-memory records).
        kind: ``"exam"``, ``"conversation"`` or ``"preference"``.
        source_format: ``"records"`` (exam records), ``"cmexam"`` (raw CMExam: CSV, xlsx or JSON),
            ``"promptcblue"`` or one of ``medtune.data.instructions.FORMATS``.
        records: Valid records in file order.
        rows: Source row of each record (1-based; JSON lines: the physical line).
        raw_rows: Every row that could be decoded, as a dict of its original fields.
        malformed: ``{"row", "field", "reason"}`` for each invalid row.
        n_rows: Rows in the file (valid + malformed).
        shape: What ``medtune.data.detect.detect`` placed the file as (``None`` for in-memory
            records); its ``format`` tells the CMExam shapes apart.
    """

    path: str
    kind: str
    source_format: str
    records: list[Any]
    rows: list[int]
    raw_rows: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[dict[str, Any]] = field(default_factory=list)
    n_rows: int = 0
    shape: DataShape | None = None


def load_data(path: str | os.PathLike) -> LoadedData:
    """Read any supported data file, collecting invalid rows instead of raising.

    The file is placed by ``medtune.data.detect.detect`` (as every command places it) and read
    with the public readers of its shape, with invalid rows kept as ``malformed``.

    Args:
        path: Exam records, a raw CMExam file, conversation or preference records, or a raw SFT /
            preference file (see the module docstring).

    Returns:
        The records with their rows, the raw rows (for field statistics) and the malformed rows.

    Raises:
        DataFileError: File-level problems only: unreadable, empty, unknown shape.
    """
    path = Path(path)
    shape = detect(path, kinds=_KINDS)
    data = _read(path, shape)
    data.shape = shape
    return data


def _read(path: Path, shape: DataShape) -> LoadedData:
    if shape.layout == "table":
        raw_rows = _table_rows(path)
        return _load_cmexam(path, shape, list(range(1, len(raw_rows) + 1)), raw_rows)

    rows = list(iter_json_rows(path))
    raw_rows = [r.obj for r in rows if r.error is None]
    if shape.format == "records":
        return _load_exam_records(path, rows)
    if shape.format == "cmexam-jsonl":
        return _load_cmexam(path, shape, [r.row for r in rows], raw_rows)
    if shape.format == "promptcblue":
        return _load_promptcblue(path, [r.row for r in rows], raw_rows)

    from medtune.data.instructions import read_instructions, read_preferences

    read = read_preferences if shape.kind == "preference" else read_instructions
    result = read(path, fmt=shape.format, on_invalid="skip")
    return LoadedData(
        path=str(path),
        kind=shape.kind,
        source_format=shape.format,
        records=result.records,
        rows=result.rows,
        raw_rows=raw_rows,
        malformed=[{k: r[k] for k in ("row", "field", "reason")} for r in result.rejects],
        n_rows=result.n_rows,
    )


def _table_rows(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        else:
            frame = pd.read_excel(path, dtype=str, keep_default_na=False, engine="openpyxl")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataFileError(path, None, None, f"unreadable table: {exc}") from None
    return frame.to_dict(orient="records")


def _load_cmexam(path: Path, shape: DataShape, row_numbers: list[int], raw_rows: list[dict[str, Any]]) -> LoadedData:
    from medtune.data.exam import load_exam_file

    records, rejects = load_exam_file(path, on_invalid="skip", shape=shape)
    # The converter keeps every row as a record or a reject, in order, so the records' rows are
    # the file's rows minus the rejects' (the converter itself does not return them).
    rejected = {r["row"] for r in rejects}
    rows = [r for r in row_numbers if r not in rejected]
    if len(rows) != len(records):
        rows = list(range(1, len(records) + 1))  # should not happen; keep rows aligned regardless
    return LoadedData(
        path=str(path),
        kind="exam",
        source_format="cmexam",  # the converter family, one name for its CSV, xlsx and JSON shapes
        records=records,
        rows=rows,
        raw_rows=raw_rows,
        malformed=[{"row": r["row"], "field": r["field"], "reason": r["reason"]} for r in rejects],
        n_rows=len(records) + len(rejects),
    )


def _load_promptcblue(path: Path, row_numbers: list[int], raw_rows: list[dict[str, Any]]) -> LoadedData:
    from medtune.data.promptcblue import read_promptcblue

    result = read_promptcblue(path, on_invalid="skip")
    rejected = {r["row"] for r in result.rejects}
    rows = [r for r in row_numbers if r not in rejected]
    if len(rows) != len(result.records):
        rows = list(range(1, len(result.records) + 1))
    return LoadedData(
        path=str(path),
        kind="conversation",
        source_format="promptcblue",
        records=result.records,
        rows=rows,
        raw_rows=raw_rows,
        malformed=[{"row": r["row"], "field": r["field"], "reason": r["reason"]} for r in result.rejects],
        n_rows=result.n_rows,
    )


def _load_exam_records(path: Path, rows: list[Any]) -> LoadedData:
    data = LoadedData(path=str(path), kind="exam", source_format="records", records=[], rows=[])
    seen: dict[str, int] = {}
    for row in rows:
        data.n_rows += 1
        if row.error is not None:
            data.malformed.append({"row": row.row, "field": None, "reason": row.error})
            continue
        data.raw_rows.append(row.obj)
        try:
            record = ExamRecord.from_dict(row.obj)
        except RecordError as exc:
            data.malformed.append({"row": row.row, "field": exc.field, "reason": exc.reason})
            continue
        except (TypeError, ValueError, AttributeError) as exc:
            data.malformed.append({"row": row.row, "field": None, "reason": f"invalid record: {exc}"})
            continue
        if record.id in seen:
            data.malformed.append(
                {"row": row.row, "field": "id", "reason": f"duplicate id {record.id!r} (first at row {seen[record.id]})"}
            )
            continue
        seen[record.id] = row.row
        data.records.append(record)
        data.rows.append(row.row)
    return data


def _from_records(records: Sequence[Any], name: str) -> LoadedData:
    """Wrap in-memory records (tests, benchmarks) as if read from a file; rows are positions."""
    records = list(records)
    kind = _record_kind(records[0]) if records else "exam"
    return LoadedData(
        path=name, kind=kind, source_format="records", records=records,
        rows=list(range(1, len(records) + 1)), n_rows=len(records),
    )


def _record_kind(record: Any) -> str:
    if isinstance(record, ExamRecord):
        return "exam"
    if isinstance(record, Conversation):
        return "conversation"
    if isinstance(record, PreferencePair):
        return "preference"
    raise TypeError(f"expected ExamRecord, Conversation or PreferencePair, got {type(record).__name__}")


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def inspect(
    path: str | os.PathLike,
    tokenizer: Any = None,
    max_lengths: Iterable[int] = DEFAULT_MAX_LENGTHS,
) -> dict[str, Any]:
    """Describe one data file: counts, empty fields, lengths and the label distributions.

    Args:
        path: Any file ``load_data`` reads.
        tokenizer: Optional Hugging Face tokenizer (or a name/path to load one) for token lengths.
            Tokens are counted on the plain texts without special tokens or chat-template markup,
            so a rendered training example is a few tokens per message longer.
        max_lengths: Token budgets to count overlong records against.

    Returns:
        A JSON-ready dict (see ``medtune.report.data_report.write_inspect_report`` for the files
        made from it)::

            {"path", "kind", "source_format", "n_rows", "n_records", "n_malformed",
             "malformed": [{"row", "field", "reason"}],          # first 200
             "fields": {name: {"missing": int, "empty": int}},   # over decodable rows
             "lengths_chars": {text: {"n", "min", "p50", "p90", "p99", "max", "mean"}},
             "tokenizer": str | None, "max_lengths": [int],
             "lengths_tokens": {text: {"n", "min", "p50", "p90", "p99", "max", "mean",
                                       "over": {"512": int, ...}}} | None,
             "histograms": {"chars": {text: {"edges": [...], "counts": [...]}}, "tokens": {...}},
             # one of, by kind:
             "exam": {"answer_letters", "answer_letters_single", "answer_type",
                      "answer_length", "n_options", "annotations", "missing_explanation"},
             "conversation": {"turns", "n_multi_turn", "n_with_system", "meta_keys", "meta_values"},
             "preference": {"turns", "n_multi_turn", "n_with_system", "n_chosen_longer",
                            "n_rejected_longer", "n_same_length", "meta_keys", "meta_values"}}

        ``text`` names: exams ``question``, ``options``, ``explanation``, ``total``;
        conversations ``prompt``, ``reply``, ``total``; preferences ``prompt``, ``chosen``,
        ``rejected``, ``total`` (prompt + the longer reply). Count keys are strings so the dict
        survives a JSON round trip unchanged.

    Raises:
        DataFileError: The file cannot be read at all.
    """
    data = load_data(path)
    max_lengths = sorted({int(m) for m in max_lengths})
    texts = _texts(data)
    stats: dict[str, Any] = {
        "path": data.path,
        "kind": data.kind,
        "source_format": data.source_format,
        "n_rows": data.n_rows,
        "n_records": len(data.records),
        "n_malformed": len(data.malformed),
        "malformed": data.malformed[:_MAX_LISTED],
        "fields": _field_stats(data.raw_rows),
        "lengths_chars": {name: _distribution([len(t) for t in values]) for name, values in texts.items()},
        "tokenizer": None,
        "max_lengths": max_lengths,
        "lengths_tokens": None,
        "histograms": {
            "chars": {name: _histogram([len(t) for t in values]) for name, values in texts.items()},
            "tokens": {},
        },
    }
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from medtune.models import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer))
        stats["tokenizer"] = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        stats["lengths_tokens"] = {}
        for name, values in texts.items():
            counts = _token_counts(tokenizer, values)
            dist = _distribution(counts)
            dist["over"] = {str(m): sum(1 for c in counts if c > m) for m in max_lengths}
            stats["lengths_tokens"][name] = dist
            stats["histograms"]["tokens"][name] = _histogram(counts)
    if data.kind == "exam":
        stats["exam"] = _exam_stats(data.records)
    elif data.kind == "conversation":
        stats["conversation"] = _conversation_stats(data.records)
    else:
        stats["preference"] = _preference_stats(data.records)
    return stats


def _texts(data: LoadedData) -> dict[str, list[str]]:
    """The texts whose lengths are reported, per kind (see ``inspect``)."""
    if data.kind == "exam":
        question = [r.question for r in data.records]
        options = ["\n".join(f"{k} {v}" for k, v in r.options.items()) for r in data.records]
        explanation = [r.explanation for r in data.records]
        total = ["\n".join(p for p in parts if p) for parts in zip(question, options, explanation, strict=True)]
        return {"question": question, "options": options, "explanation": explanation, "total": total}
    if data.kind == "conversation":
        prompt = ["\n".join(m["content"] for m in r.prompt_messages) for r in data.records]
        reply = [r.reply for r in data.records]
        return {"prompt": prompt, "reply": reply, "total": [f"{p}\n{a}" for p, a in zip(prompt, reply, strict=True)]}
    prompt = ["\n".join(m["content"] for m in r.prompt) for r in data.records]
    chosen = [r.chosen for r in data.records]
    rejected = [r.rejected for r in data.records]
    # DPO trains on prompt + chosen and prompt + rejected: the longer of the two must fit.
    total = [f"{p}\n{max(c, j, key=len)}" for p, c, j in zip(prompt, chosen, rejected, strict=True)]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "total": total}


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, dict, tuple)):
        return len(value) == 0
    return False


def _field_stats(raw_rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    names: dict[str, None] = {}
    for row in raw_rows:
        for key in row:
            names.setdefault(str(key))
    out = {}
    for name in names:
        missing = sum(1 for row in raw_rows if name not in row)
        empty = sum(1 for row in raw_rows if name in row and _is_empty(row[name]))
        out[name] = {"missing": missing, "empty": empty}
    return out


def _percentile(sorted_values: list[int], q: float) -> int:
    # Nearest rank: the reported value is a length that actually occurs in the data.
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _distribution(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "min": ordered[0],
        "p50": _percentile(ordered, 50),
        "p90": _percentile(ordered, 90),
        "p99": _percentile(ordered, 99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 2),
    }


def _histogram(values: list[int]) -> dict[str, list[float]]:
    import numpy as np

    if not values:
        return {"edges": [], "counts": []}
    lo, hi = min(values), max(values)
    counts, edges = np.histogram(values, bins=_HIST_BINS, range=(lo, hi if hi > lo else lo + 1))
    return {"edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts]}


def _token_counts(tokenizer: Any, texts: list[str], batch: int = 512) -> list[int]:
    counts: list[int] = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
        counts.extend(len(ids) for ids in encoded)
    return counts


def _sorted_counts(counter: Counter) -> dict[str, int]:
    """String keys, numeric keys in numeric order, others by descending count."""
    if all(isinstance(k, int) for k in counter):
        return {str(k): counter[k] for k in sorted(counter)}
    return {str(k): v for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _exam_stats(records: list[ExamRecord]) -> dict[str, Any]:
    letters = Counter(letter for r in records for letter in r.answer)
    single = Counter(r.answer for r in records if not r.is_multi)
    annotations: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        for name, value in r.annotations.items():
            annotations[name][str(value)] += 1
    return {
        # Letter order, not count order: the bars must line up with the option positions.
        "answer_letters": {k: letters[k] for k in sorted(letters)},
        "answer_letters_single": {k: single[k] for k in sorted(single)},
        "answer_type": {"single": sum(not r.is_multi for r in records), "multi": sum(r.is_multi for r in records)},
        "answer_length": _sorted_counts(Counter(len(r.answer) for r in records)),
        "n_options": _sorted_counts(Counter(len(r.options) for r in records)),
        "annotations": {name: _sorted_counts(c) for name, c in annotations.items()},
        "missing_explanation": sum(1 for r in records if not r.explanation.strip()),
    }


def _meta_stats(metas: list[dict[str, Any]]) -> dict[str, Any]:
    keys = Counter(k for m in metas for k in m)
    values: dict[str, Any] = {}
    for key in keys:
        scalars = Counter(
            str(m[key]) for m in metas if key in m and isinstance(m[key], (str, int, float, bool))
        )
        if scalars:
            top = _sorted_counts(scalars)
            values[key] = {"n_distinct": len(scalars), "counts": dict(list(top.items())[:_MAX_META_VALUES])}
    return {"meta_keys": _sorted_counts(keys), "meta_values": values}


def _conversation_stats(records: list[Conversation]) -> dict[str, Any]:
    turns = Counter(sum(1 for m in r.messages if m["role"] == "user") for r in records)
    return {
        "turns": _sorted_counts(turns),  # user messages per conversation
        "n_multi_turn": sum(v for k, v in turns.items() if k > 1),
        "n_with_system": sum(1 for r in records if r.messages[0]["role"] == "system"),
        **_meta_stats([r.meta for r in records]),
    }


def _preference_stats(records: list[PreferencePair]) -> dict[str, Any]:
    turns = Counter(sum(1 for m in r.prompt if m["role"] == "user") for r in records)
    return {
        "turns": _sorted_counts(turns),  # user messages per prompt
        "n_multi_turn": sum(v for k, v in turns.items() if k > 1),
        "n_with_system": sum(1 for r in records if r.prompt[0]["role"] == "system"),
        # Reward models pick up "longer is better" when chosen is systematically longer.
        "n_chosen_longer": sum(1 for r in records if len(r.chosen) > len(r.rejected)),
        "n_rejected_longer": sum(1 for r in records if len(r.chosen) < len(r.rejected)),
        "n_same_length": sum(1 for r in records if len(r.chosen) == len(r.rejected)),
        **_meta_stats([r.meta for r in records]),
    }


# --------------------------------------------------------------------------------------------
# Text normalisation and near-duplicate join
# --------------------------------------------------------------------------------------------


def _deletion_table() -> dict[int, None]:
    # Built once: str.translate with a table is ~20x faster than a per-character category test,
    # which matters at tens of thousands of texts. Astral-plane characters are handled per
    # character in normalise_text (they are rare, and scanning all planes here costs ~0.4 s).
    table = {}
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        if _droppable(chr(cp)):
            table[cp] = None
    return table


def _droppable(ch: str) -> bool:
    category = unicodedata.category(ch)
    # P*: punctuation; Z*: separators; Cc/Cf: controls and invisible format characters (zero-width
    # spaces) that make identical-looking texts differ.
    return category[0] in "PZ" or category in ("Cc", "Cf") or ch.isspace()


_DELETE: dict[int, None] | None = None


def normalise_text(text: str) -> str:
    """Canonical form used for duplicate detection.

    NFKC (full-width → half-width, compatibility forms), casefold, then whitespace, punctuation
    (Unicode ``P*``) and invisible control/format characters removed. Symbols (``℃``, ``+``, ``↑``)
    are kept: in medical text they change the meaning.

    Args:
        text: Any text.

    Returns:
        The normalised text (possibly empty).
    """
    global _DELETE
    if _DELETE is None:
        _DELETE = _deletion_table()
    out = unicodedata.normalize("NFKC", text).casefold().translate(_DELETE)
    if out and max(out) > "\uffff":
        out = "".join(ch for ch in out if not (ch > "\uffff" and _droppable(ch)))
    return out


def shingles(text: str, n: int = 3) -> set[str]:
    """Character ``n``-grams of ``text``; a text shorter than ``n`` is its own single shingle."""
    if len(text) < n:
        return {text} if text else set()
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def jaccard(a: set[Any], b: set[Any]) -> float:
    """Jaccard similarity ``|a ∩ b| / |a ∪ b|`` (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def near_duplicate_pairs(texts: Sequence[str], threshold: float) -> list[tuple[int, int, float]]:
    """All pairs of texts whose character 3-gram Jaccard similarity is at least ``threshold``.

    Exact (every qualifying pair is returned), via a length filter and a prefix filter: each
    3-gram set is sorted rarest first, and two sets can only reach the threshold if their first
    ``|x| - ceil(threshold·|x|) + 1`` elements intersect. Candidates are confirmed with the exact
    Jaccard similarity.

    Args:
        texts: Already-normalised texts (empty ones are ignored).
        threshold: Jaccard threshold in ``(0, 1]``.

    Returns:
        ``(i, j, similarity)`` with ``i < j`` indexes into ``texts``, sorted.

    Raises:
        ValueError: ``threshold`` is not in ``(0, 1]``.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    # Order 3-grams by document frequency (rarest first), so prefixes hold the most selective
    # grams and the inverted lists stay short. A gram found in one text only can never be shared,
    # so it is neither indexed nor probed: for most texts the whole prefix is such grams, and they
    # cost nothing beyond the sort.
    gram_sets = [shingles(t) for t in texts]
    df: Counter = Counter()
    for grams in gram_sets:
        df.update(grams)
    rank = {g: r for r, g in enumerate(sorted(df, key=df.__getitem__))}
    sizes = [len(grams) for grams in gram_sets]
    order = sorted((i for i in range(len(texts)) if sizes[i]), key=sizes.__getitem__)

    index: dict[str, list[int]] = defaultdict(list)  # gram → texts whose prefix holds it
    start: dict[str, int] = defaultdict(int)  # per gram: entries before this are too short forever
    pairs: list[tuple[int, int, float]] = []
    for i in order:
        size = sizes[i]
        min_size = threshold * size - _EPS  # a partner y needs |y| ≥ t·|x| (and |y| ≤ |x| here)
        prefix_len = size - math.ceil(threshold * size - _EPS) + 1
        prefix = [g for g in sorted(gram_sets[i], key=rank.__getitem__)[:prefix_len] if df[g] > 1]
        candidates: set[int] = set()
        for gram in prefix:
            postings = index.get(gram)
            if not postings:
                continue
            # Texts arrive in increasing size, so min_size only grows: skip (for good) the
            # postings that are now too short.
            s = start[gram]
            while s < len(postings) and sizes[postings[s]] < min_size:
                s += 1
            start[gram] = s
            candidates.update(postings[s:])
        xs = gram_sets[i]
        for j in candidates:
            similarity = jaccard(xs, gram_sets[j])
            if similarity >= threshold - _EPS:
                pairs.append((min(i, j), max(i, j), similarity))
        for gram in prefix:
            index[gram].append(i)
    return sorted(pairs)


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    split: str
    id: str
    row: int
    key: str
    target: str


def _dedup_text(record: Any) -> str:
    """The normalised question/prompt a duplicate is judged on (see ``check``)."""
    if isinstance(record, ExamRecord):
        # Sorted option texts: the same question with its options shuffled is the same item.
        options = sorted(normalise_text(v) for v in record.options.values())
        return "|".join([normalise_text(record.question), *options])
    messages = record.prompt_messages if isinstance(record, Conversation) else record.prompt
    # System prompts are left out: a long shared system prompt would make unrelated questions
    # look alike.
    return normalise_text("\n".join(m["content"] for m in messages if m["role"] != "system"))


def _target_text(record: Any) -> str:
    if isinstance(record, ExamRecord):
        return "|".join(sorted(normalise_text(record.options[letter]) for letter in record.answer))
    if isinstance(record, Conversation):
        return normalise_text(record.reply)
    return normalise_text(record.chosen)


def _pair(a: _Item, b: _Item, similarity: float, match: str) -> dict[str, Any]:
    return {
        "a_split": a.split, "a_id": a.id, "a_row": a.row,
        "b_split": b.split, "b_id": b.id, "b_row": b.row,
        "similarity": round(similarity, 4), "match": match,
        # Same question with a different answer is a label conflict, worse than a plain duplicate.
        "same_target": a.target == b.target,
    }


def check(
    train: str | os.PathLike | Sequence[Any],
    val: str | os.PathLike | Sequence[Any] | None = None,
    test: str | os.PathLike | Sequence[Any] | None = None,
    near_threshold: float = 0.9,
) -> dict[str, Any]:
    """Find malformed rows, duplicates within and across splits, and val/test items leaking into train.

    Each record is reduced to a normalised text (``normalise_text``): for exams the question plus
    the sorted option texts, for conversations and preference pairs the prompt's user (and earlier
    assistant) messages, system message excluded. Two records are exact duplicates when these
    texts are equal, near duplicates when their character 3-gram Jaccard similarity is at least
    ``near_threshold`` (and they are not equal).

    Pairs are listed as follows. Exact, within a split: each repeat paired with the first record
    of its text. Exact, across splits: each record of the later split (order train, val, test)
    paired with the first record of the earlier split with its text. Near, within a split: one
    pair per pair of distinct texts, using the first record of each. Near, across splits: each
    record of the later split paired with the first record of the earlier split with the other text.

    Args:
        train: Training data: any file ``load_data`` reads, or a list of records.
        val: Optional validation data.
        test: Optional test data.
        near_threshold: Jaccard threshold for near duplicates, in ``(0, 1]``.

    Returns:
        A JSON-ready dict::

            {"near_threshold": float, "seconds": float,
             "splits": {split: {"path", "kind", "source_format", "n_rows", "n_records",
                                "n_malformed", "n_empty_text"}},
             "malformed": [{"split", "row", "field", "reason"}],
             "exact_duplicates": {"within": {split: [pair]}, "across": [pair]},
             "near_duplicates": {"within": {split: [pair]}, "across": [pair]},
             "leakage": {"val_in_train": [pair], "test_in_train": [pair], "test_in_val": [pair]},
             "counts": {"records": {split: n}, "malformed": {split: n},
                        "exact_within": {split: n}, "near_within": {split: n},
                        "exact_across": n, "near_across": n,
                        "val_in_train": n, "test_in_train": n, "test_in_val": n, "leaked": n}}

        A ``pair`` is ``{"a_split", "a_id", "a_row", "b_split", "b_id", "b_row", "similarity",
        "match": "exact"|"near", "same_target"}`` (``same_target``: the answers / replies agree
        after normalisation). Leakage pairs have the val/test record as ``a`` and its closest
        match (exact first) as ``b``, one pair per leaked record; ``leaked`` counts
        ``val_in_train + test_in_train`` (val/test vs. train; ``test_in_val`` is informational).

    Raises:
        DataFileError: A split's file cannot be read at all.
        ValueError: ``near_threshold`` is out of range.
    """
    if not 0 < near_threshold <= 1:
        raise ValueError(f"--near-threshold must be in (0, 1], got {near_threshold}")
    started = time.perf_counter()
    given = {"train": train, "val": val, "test": test}
    loaded: dict[str, LoadedData] = {}
    for split in _SPLITS:
        source = given[split]
        if source is None:
            continue
        loaded[split] = load_data(source) if isinstance(source, (str, os.PathLike)) else _from_records(source, split)
    splits = list(loaded)

    items: dict[str, list[_Item]] = {}
    report_splits: dict[str, Any] = {}
    malformed: list[dict[str, Any]] = []
    for split, data in loaded.items():
        items[split] = []
        n_empty = 0
        for record, row in zip(data.records, data.rows, strict=True):
            key = _dedup_text(record)
            if not key.strip("|"):
                n_empty += 1  # nothing left after normalisation: every such text would "match"
                continue
            items[split].append(_Item(split, record.id, row, key, _target_text(record)))
        malformed += [{"split": split, **m} for m in data.malformed]
        report_splits[split] = {
            "path": data.path, "kind": data.kind, "source_format": data.source_format,
            "n_rows": data.n_rows, "n_records": len(data.records), "n_malformed": len(data.malformed),
            "n_empty_text": n_empty,
        }

    # Group by normalised text: exact duplicates come from the groups, and the near join runs on
    # distinct texts only (k copies of one text would otherwise cost k² comparisons).
    by_key: dict[str, dict[str, list[_Item]]] = defaultdict(lambda: defaultdict(list))
    for split in splits:
        for item in items[split]:
            by_key[item.key][split].append(item)
    keys = list(by_key)

    exact_within: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    exact_across: list[dict[str, Any]] = []
    for groups in by_key.values():
        for split, members in groups.items():
            exact_within[split] += [_pair(members[0], m, 1.0, "exact") for m in members[1:]]
        present = [s for s in splits if s in groups]
        for i, earlier in enumerate(present):
            for later in present[i + 1 :]:
                exact_across += [_pair(groups[earlier][0], m, 1.0, "exact") for m in groups[later]]

    near_within: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    near_across: list[dict[str, Any]] = []
    near_by_key: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for ka, kb, similarity in near_duplicate_pairs(keys, near_threshold):
        near_by_key[ka].append((kb, similarity))
        near_by_key[kb].append((ka, similarity))
        ga, gb = by_key[keys[ka]], by_key[keys[kb]]
        for split in splits:
            if split in ga and split in gb:
                near_within[split].append(_pair(ga[split][0], gb[split][0], similarity, "near"))
        for i, earlier in enumerate(splits):
            for later in splits[i + 1 :]:
                for first, second in ((ga, gb), (gb, ga)):
                    if earlier in first and later in second:
                        near_across += [_pair(first[earlier][0], m, similarity, "near") for m in second[later]]

    key_index = {k: i for i, k in enumerate(keys)}

    def leaks(split: str, reference: str) -> list[dict[str, Any]]:
        if split not in loaded or reference not in loaded:
            return []
        found = []
        for item in items[split]:
            ref = by_key[item.key].get(reference)
            if ref:
                found.append(_pair(item, ref[0], 1.0, "exact"))
                continue
            best = max(
                ((s, k) for k, s in near_by_key.get(key_index[item.key], []) if reference in by_key[keys[k]]),
                default=None,
            )
            if best is not None:
                found.append(_pair(item, by_key[keys[best[1]]][reference][0], best[0], "near"))
        return found

    leakage = {
        "val_in_train": leaks("val", "train"),
        "test_in_train": leaks("test", "train"),
        "test_in_val": leaks("test", "val"),
    }
    counts = {
        "records": {s: report_splits[s]["n_records"] for s in splits},
        "malformed": {s: report_splits[s]["n_malformed"] for s in splits},
        "exact_within": {s: len(exact_within[s]) for s in splits},
        "near_within": {s: len(near_within[s]) for s in splits},
        "exact_across": len(exact_across),
        "near_across": len(near_across),
        **{name: len(pairs) for name, pairs in leakage.items()},
    }
    counts["leaked"] = counts["val_in_train"] + counts["test_in_train"]
    return {
        "near_threshold": near_threshold,
        "seconds": round(time.perf_counter() - started, 3),
        "splits": report_splits,
        "malformed": malformed,
        "exact_duplicates": {"within": exact_within, "across": exact_across},
        "near_duplicates": {"within": near_within, "across": near_across},
        "leakage": leakage,
        "counts": counts,
    }


def check_exit_code(report: dict[str, Any], allow_leakage: bool = False) -> int:
    """Process exit status for ``medtune data check``.

    Args:
        report: The dict returned by ``check``.
        allow_leakage: Return 0 even when val/test records appear in train.

    Returns:
        1 when val or test records leak into train (exactly or near) and leakage is not allowed,
        else 0. Duplicates within a split and malformed rows are reported but do not fail.
    """
    return 1 if report["counts"]["leaked"] and not allow_leakage else 0


def _main(argv: list[str] | None = None) -> int:
    """Tiny stand-alone entry point until the CLI wires ``medtune data``; prints JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medtune.data.quality")
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect")
    ins.add_argument("path")
    ins.add_argument("--out")
    ins.add_argument("--tokenizer")
    chk = sub.add_parser("check")
    chk.add_argument("train")
    chk.add_argument("--val")
    chk.add_argument("--test")
    chk.add_argument("--near-threshold", type=float, default=0.9)
    chk.add_argument("--allow-leakage", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        stats = inspect(args.path, tokenizer=args.tokenizer)
        if args.out:
            # imported here: only writing the report loads matplotlib
            from medtune.report.data_report import write_inspect_report

            for path in write_inspect_report(stats, args.out):
                print(path, file=sys.stderr)
        stats.pop("histograms")
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        return 0
    report = check(args.train, args.val, args.test, near_threshold=args.near_threshold)
    print(json.dumps(report["counts"], ensure_ascii=False, indent=2))
    return check_exit_code(report, allow_leakage=args.allow_leakage)


if __name__ == "__main__":
    raise SystemExit(_main())
