"""Evaluation of prompt→reply predictions: PromptCBLUE, free text (summaries), question generation.

Input is what ``medtune predict`` writes for conversations: one line per item with ``id``,
``messages``, ``reference`` (the gold reply), ``meta`` and ``output``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtune.io import DataFileError, atomic_write_json, write_jsonl

TASKS = ("promptcblue", "text", "question-generation")


def detect_task(rows: list[dict[str, Any]]) -> str:
    """The task a predictions file belongs to, from its rows' metadata.

    ``promptcblue`` when rows carry a PromptCBLUE task, ``question-generation`` for exam-xlsx
    pairs, else ``text`` (ROUGE against the reference).
    """
    meta = rows[0].get("meta") or {}
    if meta.get("task_dataset") or meta.get("type"):
        return "promptcblue"
    if meta.get("n_questions") and meta.get("lang"):
        return "question-generation"
    return "text"


def text_scores(outputs: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L (× 100) on characters, as METRICS.md defines them, mean over pairs."""
    from medtune.evaluation.metrics import rouge_l, rouge_n

    return {
        "rouge_1": rouge_n(outputs, references, 1),
        "rouge_2": rouge_n(outputs, references, 2),
        "rouge_l": rouge_l(outputs, references),
    }


def evaluate_text(predictions: str | Path, out_dir: str | Path, task: str = "auto",
                  baseline: str | Path | None = None) -> dict[str, Any]:
    """Score a conversation-predictions file; write ``results.json`` (and ``scored.jsonl``).

    ``baseline`` is another evaluation directory of the same task (e.g. the base model's); its
    scores are reported beside these with the difference.
    """
    from medtune.evaluation.evaluate import read_prediction_rows

    # the same checks as exam predictions: text outputs, each id once, one producer
    rows = [row for _, row in read_prediction_rows(predictions, required=("id", "output"))]
    if not rows:
        raise DataFileError(predictions, None, None, "no predictions")
    task = detect_task(rows) if task == "auto" else task
    scorable = [r for r in rows if str(r.get("reference") or "").strip()]
    results: dict[str, Any] = {"task": task, "predictions": str(predictions), "n": len(scorable),
                               "n_without_reference": len(rows) - len(scorable)}
    if task == "promptcblue":
        from medtune.evaluation.promptcblue import score

        results.update(score(scorable))
    elif task == "text":
        results.update(text_scores([str(r["output"]) for r in scorable], [r["reference"] for r in scorable]))
        results["tokenizer"] = 'characters (ROUGE: " ".join(chars).split(" "))'
    elif task == "question-generation":
        from medtune.data.exam_xlsx import evaluate_question_generation

        lang = (scorable[0].get("meta") or {}).get("lang", "zh")
        qg = evaluate_question_generation([str(r["output"]) for r in scorable],
                                          [r["reference"] for r in scorable], lang)
        results.update({k: v for k, v in qg.items() if not isinstance(v, list)})
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if baseline is not None:
        with open(Path(baseline) / "results.json", encoding="utf-8") as fh:
            base = json.load(fh)
        if base.get("task") != task:
            raise ValueError(f"baseline {baseline} is a {base.get('task')} evaluation, not {task}")
        keys = [k for k in headline_keys(task) if isinstance(results.get(k), int | float)
                and isinstance(base.get(k), int | float)]
        results["baseline"] = {"dir": str(baseline), **{k: base[k] for k in keys}}
        results["improvement"] = {k: results[k] - base[k] for k in keys}
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "scored.jsonl", rows)
    atomic_write_json(out_dir / "results.json", results)
    return results


def headline_keys(task: str) -> list[str]:
    """The numbers a task's table shows."""
    return {"promptcblue": ["overall"], "text": ["rouge_1", "rouge_2", "rouge_l"],
            "question-generation": ["well_formed", "answer_valid", "rouge_l"]}[task]


def format_table(results: dict[str, Any], label: str) -> str:
    """Markdown table of the headline numbers (with base, tuned and Δ when a baseline is given)."""
    keys = headline_keys(results["task"])
    lines = ["| run | n | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    if "baseline" in results:
        base = results["baseline"]
        lines.append(f"| base ({Path(base['dir']).name}) | {results['n']} | "
                     + " | ".join(f"{base.get(k, float('nan')):.2f}" for k in keys) + " |")
    lines.append(f"| {label} | {results['n']} | " + " | ".join(f"{results.get(k, float('nan')):.2f}" for k in keys)
                 + " |")
    if "improvement" in results:
        lines.append("| Δ | | " + " | ".join(f"{results['improvement'].get(k, float('nan')):+.2f}" for k in keys)
                     + " |")
    if results["task"] == "promptcblue":
        lines += ["", "| task | metric | n | score |", "|---|---|---|---|"]
        for name, t in sorted(results["tasks"].items()):
            lines.append(f"| {name} | {t['metric']} | {t['n']} | {t['score']:.2f} |")
    return "\n".join(lines)
