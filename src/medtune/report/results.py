"""What the markdown and HTML reports share: the metric columns, the paper's rows, loading results.

Both ``medtune.report.markdown`` and ``medtune.report.html`` import from here, and neither from
the other's internals, so the two report writers do not import each other in a cycle
(``markdown.write_report`` calls ``html.write_html_report`` for the page beside ``report.md``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "PAPER_ROWS", "load_eval", "variant_note"]

#: ``results.json`` key → column title, in the column order of the CMExam paper's tables.
COLUMNS = [
    ("accuracy", "Acc"), ("f1", "F1"), ("bleu_1", "BLEU-1"), ("bleu_4", "BLEU-4"),
    ("rouge_1", "ROUGE-1"), ("rouge_2", "ROUGE-2"), ("rouge_l", "ROUGE-L"),
]

#: CMExam test split, from the paper (NeurIPS 2023, arXiv:2306.03030), Table as in METRICS.md.
PAPER_ROWS: list[tuple[str, list[float | None]]] = [
    ("GPT-4", [61.6, 61.7, 0.17, 0.06, 29.74, 14.84, 11.51]),
    ("GPT-3.5-turbo", [46.4, 46.1, 3.56, 1.49, 33.80, 16.39, 14.83]),
    ("ChatGLM-6B + CMExam fine-tune", [45.3, 45.2, 31.10, 18.94, 43.94, 31.48, 29.39]),
    ("LLaMA-7B + CMExam fine-tune", [18.3, 20.6, 29.25, 16.46, 45.88, 26.57, 23.31]),
    ("Human volunteers", [71.6, None, None, None, None, None, None]),
]


def load_eval(eval_dir: str | os.PathLike) -> dict[str, Any]:
    """``results.json`` of an evaluation directory, labelled with the directory name.

    Args:
        eval_dir: A ``medtune evaluate`` output directory.

    Returns:
        ``{"label", "dir", "results"}``; the label is the results' own ``label`` when set.

    Raises:
        FileNotFoundError: The directory has no ``results.json``.
    """
    eval_dir = Path(eval_dir)
    path = eval_dir / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{eval_dir}: no results.json (run `medtune evaluate` first)")
    with open(path, encoding="utf-8") as fh:
        results = json.load(fh)
    return {"label": results.get("label") or eval_dir.name, "dir": eval_dir, "results": results}


def variant_note(results: dict[str, Any]) -> str:
    """A label suffix for scores that are not the paper's definition (so they are never mixed up)."""
    if str(results.get("tokenizer") or "").startswith("legacy jieba"):
        return " (BLEU: legacy jieba-word variant)"
    return ""
