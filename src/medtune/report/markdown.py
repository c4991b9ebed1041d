"""``report.md``: runs side by side with the CMExam paper's reference rows, and sample answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtune.io import atomic_write_text, read_jsonl

COLUMNS = [
    ("accuracy", "Acc"), ("f1", "F1"), ("bleu_1", "BLEU-1"), ("bleu_4", "BLEU-4"),
    ("rouge_1", "ROUGE-1"), ("rouge_2", "ROUGE-2"), ("rouge_l", "ROUGE-L"),
]

# CMExam test split, from the paper (NeurIPS 2023, arXiv:2306.03030), Table as in METRICS.md.
PAPER_ROWS: list[tuple[str, list[float | None]]] = [
    ("GPT-4", [61.6, 61.7, 0.17, 0.06, 29.74, 14.84, 11.51]),
    ("GPT-3.5-turbo", [46.4, 46.1, 3.56, 1.49, 33.80, 16.39, 14.83]),
    ("ChatGLM-6B + CMExam fine-tune", [45.3, 45.2, 31.10, 18.94, 43.94, 31.48, 29.39]),
    ("LLaMA-7B + CMExam fine-tune", [18.3, 20.6, 29.25, 16.46, 45.88, 26.57, 23.31]),
    ("Human volunteers", [71.6, None, None, None, None, None, None]),
]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def load_eval(eval_dir: str | Path) -> dict[str, Any]:
    """``results.json`` of an evaluation directory, labelled with the directory name."""
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


def results_table(evals: list[dict[str, Any]], paper: bool = True) -> str:
    """Markdown table of the metrics, one row per run, paper rows beneath."""
    head = "| run | n | " + " | ".join(title for _, title in COLUMNS) + " | no answer |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for ev in evals:
        r = ev["results"]
        cells = " | ".join(_fmt(r.get(key)) for key, _ in COLUMNS)
        lines.append(f"| {ev['label']}{variant_note(r)} | {r['n']} | {cells} | {r['n_no_answer']} |")
    if paper:
        for name, values in PAPER_ROWS:
            cells = " | ".join(_fmt(v) for v in values)
            lines.append(f"| *paper: {name}* | 6811 | {cells} | – |")
    return "\n".join(lines)


def _samples(ev: dict[str, Any], k: int) -> list[str]:
    path = ev["dir"] / "scored.jsonl"
    if not path.exists() or k <= 0:
        return []
    rows = read_jsonl(path)
    # Show both successes and failures, so the sample is not cherry-picked.
    picked = [r for r in rows if r["correct"]][: (k + 1) // 2] + [r for r in rows if not r["correct"]][: k // 2]
    out = []
    for r in picked:
        options = "；".join(f"{key}. {text}" for key, text in r["options"].items())
        output = r["output"].strip().replace("\n", " ⏎ ")
        if len(output) > 160:
            output = output[:160] + "…"
        mark = "✓" if r["correct"] else "✗"
        out.append(
            f"- {mark} **{r['question']}** {options}  \n  gold `{r['answer']}`, parsed "
            f"`{r['parsed'] or '—'}`; output: {output}"
        )
    return out


def write_report(
    eval_dirs: list[str | Path],
    out: str | Path,
    samples: int = 4,
    labels: list[str] | None = None,
    run_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write ``report.md`` comparing the given evaluation directories.

    ``labels`` name the runs (default: folder names); ``run_dirs`` maps a label to its training
    run directory, for the loss curves.
    """
    evals = [load_eval(d) for d in eval_dirs]
    if labels:
        if len(labels) != len(evals):
            raise ValueError(f"{len(labels)} labels for {len(evals)} evaluation directories")
        for ev, label in zip(evals, labels, strict=True):
            ev["label"] = label
    parsers = sorted({str(ev["results"].get("parser", "?")) for ev in evals})
    tokenizers = sorted({ev["results"]["tokenizer"] for ev in evals if ev["results"].get("tokenizer")}) or ["–"]
    parts = [
        "# medtune evaluation report",
        "",
        "Answer accuracy and F1, and explanation BLEU/ROUGE, computed as the CMExam paper computes them "
        "(all × 100).",
        f"Answer parser: **{', '.join(parsers)}**. Explanation tokens: {'; '.join(tokenizers)}.",
        "Paper rows are on the CMExam test split (6,811 questions); compare with care when the data differ.",
        "",
        results_table(evals),
        "",
        "## Counts",
        "",
        "| run | scored | no answer | unscorable (no gold) | explanations scored | excluded (no reference) "
        "| single-answer acc (n) | multi-answer acc (n) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ev in evals:
        r = ev["results"]
        parts.append(
            f"| {ev['label']} | {r['n']} | {r['n_no_answer']} | {r.get('n_unscorable', 0)} | "
            f"{r['n_explanations_scored']} | {r.get('n_explanations_excluded', 0)} | "
            f"{_fmt(r.get('accuracy_single'))} ({r.get('n_single', 0)}) | "
            f"{_fmt(r.get('accuracy_multi'))} ({r.get('n_multi', 0)}) |"
        )
    for ev in evals:
        lines = _samples(ev, samples)
        if lines:
            parts += ["", f"## Sample answers: {ev['label']}", "", *lines]
    out = Path(out)
    # The HTML page (self-contained, plots embedded) is written beside report.md; the markdown
    # links the same PNGs.
    from medtune.report.html import list_plots, markdown_plot_section, write_html_report

    html = write_html_report(eval_dirs, out.with_suffix(".html"), run_dirs=run_dirs, samples=samples,
                             labels=[ev["label"] for ev in evals])
    section = markdown_plot_section(list_plots(html), out.parent)
    if section:
        parts += ["", section]
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out
