"""``report.md``: runs side by side with the CMExam paper's reference rows, and sample answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.io import atomic_write_text, read_jsonl
from medtune.report.html import list_plots, markdown_plot_section, write_html_report

# Shared with the HTML report; imported here too so ``from medtune.report.markdown import load_eval``
# keeps working.
from medtune.report.results import COLUMNS, PAPER_ROWS, load_eval, variant_note

__all__ = ["COLUMNS", "PAPER_ROWS", "load_eval", "results_table", "variant_note", "write_report"]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


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
    html = write_html_report(eval_dirs, out.with_suffix(".html"), run_dirs=run_dirs, samples=samples,
                             labels=[ev["label"] for ev in evals])
    section = markdown_plot_section(list_plots(html), out.parent)
    if section:
        parts += ["", section]
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out
