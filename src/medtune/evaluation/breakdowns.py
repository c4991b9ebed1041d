"""Where a model is right and wrong: accuracy per category, confusion matrix, letter bias.

Pure functions over the rows of ``scored.jsonl`` (see ``medtune.evaluation.evaluate``): each row
has ``answer`` (gold letters in option order), ``parsed`` (chosen letters, ``""`` = no answer),
``correct`` (bool), ``options`` (letter → text) and ``annotations`` (CMExam labels such as
``Disease Group`` or ``Difficulty level``).

Every accuracy cell carries its count and a Wilson 95% interval, because CMExam categories are
very uneven (some disease groups have a handful of questions) and a bare percentage over 7
questions reads as more certain than it is. Breakdowns with no data are left out rather than
filled with zeros, so an absent key always means "no question carried this label".
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from medtune.data.cmexam import ANNOTATION_COLUMNS

__all__ = [
    "ANSWER_TYPES",
    "accuracy_breakdowns",
    "confusion_matrix",
    "letter_distribution",
    "wilson_interval",
]

#: Two-sided 95% normal quantile, Φ⁻¹(0.975), written out so no scipy import is needed here.
Z_95 = 1.959963984540054

#: Answer types in the order they are reported.
ANSWER_TYPES = ("single", "multi")

#: Column labels of the confusion matrix for predictions that are not one letter.
MULTI_LABEL = "multi"
NONE_LABEL = "none"


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k / n``, in percent (0-100).

    Wilson rather than the textbook normal ("Wald") interval ``p ± z·√(p(1-p)/n)``: at 0% or
    100% the Wald interval has zero width (claiming certainty from, say, 3/3 correct), and for
    small ``n`` it runs past 0 or 100. Wilson stays inside [0, 100], keeps a sensible width at
    the extremes and has close to nominal coverage for the small category counts seen in
    CMExam breakdowns.

    Args:
        k: Number of successes (correct answers), ``0 <= k <= n``.
        n: Number of trials (questions), ``> 0``.
        z: Normal quantile; the default gives a two-sided 95% interval.

    Returns:
        ``(low, high)`` in percent.

    Raises:
        ValueError: If ``n == 0`` (no data, no interval) or ``k`` is outside ``[0, n]``.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At k = 0 or k = n the exact bound is 0 or 1; clamp away floating-point dust like -1e-17.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return 100 * low, 100 * high


def _label(value: Any) -> str | None:
    """A category value as a string, or ``None`` when the row carries no label."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None  # a blank spreadsheet cell that slipped through as NaN
        if value.is_integer():
            value = int(value)  # 3.0 and 3 are the same difficulty
    text = str(value).strip()
    return text or None


def _sort_key(value: str) -> tuple[int, float, str]:
    # Numbers (difficulty levels, option counts) sort numerically, so "10" follows "9"; any
    # non-numeric labels follow them in string order.
    try:
        number = float(value)
    except ValueError:
        return (1, 0.0, value)
    if math.isnan(number):
        return (1, 0.0, value)
    return (0, number, value)


def _cells(tally: dict[str, list[int]]) -> list[dict[str, Any]]:
    """``{value: [n, correct]}`` → sorted accuracy cells with Wilson intervals."""
    cells = []
    for value in sorted(tally, key=_sort_key):
        n, correct = tally[value]
        low, high = wilson_interval(correct, n)
        cells.append({
            "value": value, "n": n, "correct": correct,
            "accuracy": 100 * correct / n, "ci_low": low, "ci_high": high,
        })
    return cells


def _add(tally: dict[str, list[int]], value: str, correct: bool) -> None:
    counts = tally.setdefault(value, [0, 0])
    counts[0] += 1
    counts[1] += int(correct)


def accuracy_breakdowns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per annotation value, per answer type and per number of options.

    Args:
        rows: Scored rows (``scored.jsonl``).

    Returns:
        ``{"by_annotation": {name: [cell, ...]}, "by_answer_type": [cell, ...],
        "by_n_options": [cell, ...]}``, each cell being ``{"value": str, "n": int,
        "correct": int, "accuracy": float, "ci_low": float, "ci_high": float}`` (percentages).
        Annotation names are the CMExam columns, in their canonical order, then any other
        annotation key in alphabetical order. A row without a label for an annotation (key
        missing, ``None`` or empty) is left out of that annotation's breakdown only. Cells are
        sorted by value, numerically where the value is a number. Empty breakdowns are omitted:
        an annotation no row carries has no key, ``by_annotation`` itself is absent when no row
        has any annotation, and ``by_answer_type`` lists only the types that occur.
    """
    annotations: dict[str, dict[str, list[int]]] = {}
    answer_types: dict[str, list[int]] = {}
    n_options: dict[str, list[int]] = {}
    for row in rows:
        correct = bool(row.get("correct"))
        for name, raw in (row.get("annotations") or {}).items():
            value = _label(raw)
            if value is not None:
                _add(annotations.setdefault(str(name), {}), value, correct)
        gold = str(row.get("answer") or "")
        if gold:  # evaluate() drops gold-less rows; a stray one has no type rather than a wrong one
            _add(answer_types, "multi" if len(gold) > 1 else "single", correct)
        count = len(row.get("options") or {})
        if count:
            _add(n_options, str(count), correct)

    out: dict[str, Any] = {}
    extra = sorted(name for name in annotations if name not in ANNOTATION_COLUMNS)
    order = [name for name in ANNOTATION_COLUMNS if name in annotations] + extra
    if order:
        out["by_annotation"] = {name: _cells(annotations[name]) for name in order}
    if answer_types:
        cells = {cell["value"]: cell for cell in _cells(answer_types)}
        out["by_answer_type"] = [cells[t] for t in ANSWER_TYPES if t in cells]
    if n_options:
        out["by_n_options"] = _cells(n_options)
    return out


def _pred_label(parsed: str) -> str:
    if not parsed:
        return NONE_LABEL
    return MULTI_LABEL if len(parsed) > 1 else parsed


def confusion_matrix(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Gold letter × predicted label counts over the single-answer questions.

    Multi-answer questions are left out: their gold is a set, which has no single row to sit in.
    A prediction of several letters on a single-answer question is the column ``"multi"``; no
    answer is the column ``"none"``.

    Args:
        rows: Scored rows.

    Returns:
        ``{"gold_labels": [letter, ...], "pred_labels": [letter, ..., "multi", "none"],
        "matrix": [[int, ...], ...]}`` with ``matrix[i][j]`` = questions with gold
        ``gold_labels[i]`` answered ``pred_labels[j]``. Labels are those that occur: letters
        sorted, then ``"multi"`` and ``"none"`` if present. ``None`` when there is no
        single-answer question.
    """
    pairs = [
        (str(row["answer"]), _pred_label(str(row.get("parsed") or "")))
        for row in rows
        if len(str(row.get("answer") or "")) == 1
    ]
    if not pairs:
        return None
    gold_labels = sorted({gold for gold, _ in pairs})
    predicted = {pred for _, pred in pairs}
    pred_labels = sorted(predicted - {MULTI_LABEL, NONE_LABEL})
    pred_labels += [label for label in (MULTI_LABEL, NONE_LABEL) if label in predicted]
    counts = Counter(pairs)
    matrix = [[counts[(gold, pred)] for pred in pred_labels] for gold in gold_labels]
    return {"gold_labels": gold_labels, "pred_labels": pred_labels, "matrix": matrix}


def letter_distribution(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How often each option letter is the gold answer and how often the model picks it.

    A model with position bias (favouring ``A``, or the last option) shows up as a predicted
    distribution that departs from the gold one. Every letter of an answer string counts, so a
    multi-answer ``"AC"`` adds one to ``A`` and one to ``C``.

    Args:
        rows: Scored rows (single- and multi-answer alike).

    Returns:
        ``{"gold": {letter: int}, "predicted": {letter: int}, "n_no_answer": int}``. Both letter
        maps have the same keys, sorted: every letter that occurs in either, with 0 where it
        occurs in only one, so the two can be read side by side.
    """
    gold: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    n_no_answer = 0
    for row in rows:
        gold.update(str(row.get("answer") or ""))
        parsed = str(row.get("parsed") or "")
        predicted.update(parsed)
        n_no_answer += not parsed
    letters = sorted(set(gold) | set(predicted))
    return {
        "gold": {letter: gold[letter] for letter in letters},
        "predicted": {letter: predicted[letter] for letter in letters},
        "n_no_answer": n_no_answer,
    }
