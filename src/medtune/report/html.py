"""``report.html``: one self-contained page with the metrics table, every available plot and samples.

The page carries its plots as base64 ``data:`` URIs and its CSS inline, and loads nothing from the
network, so it can be mailed, archived or opened offline and still look the same. The PNGs are also
saved beside it in ``<stem>_plots/`` so that ``report.md`` can link them (see
``markdown_plot_section``).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from medtune.io import atomic_write_json, atomic_write_text, read_jsonl
from medtune.report import plots
from medtune.report.results import COLUMNS, PAPER_ROWS, load_eval, variant_note

__all__ = [
    "PLOTS_MANIFEST",
    "list_plots",
    "make_plots",
    "markdown_plot_section",
    "plots_dir_for",
    "write_html_report",
]

#: File in the plots directory listing ``{file name: title}`` in display order; lets ``list_plots``
#: recover titles (run labels can hold any character, file names cannot).
PLOTS_MANIFEST = "plots.json"

_OUTPUT_CHARS = 300  # model outputs can run to thousands of characters; the sample only needs a taste

_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dde5; --accent:#0072B2; --ok:#1a7f37; --bad:#c0392b; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #f6f7f9; line-height: 1.55;
  font-family: "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "PingFang SC",
    "Microsoft YaHei", "WenQuanYi Zen Hei", system-ui, -apple-system, "Segoe UI", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 48px; background: #fff;
  box-shadow: 0 0 0 1px var(--line); min-height: 100vh; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 8px; }
p.lead, p.meta, footer { color: var(--muted); }
p.meta { font-size: 13px; margin-top: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; margin: 8px 0; width: 100%; }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: #eef1f5; font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.paper td { color: var(--muted); font-style: italic; }
tr.paper-first td { border-top: 2px solid var(--line); }
td.best { font-weight: 700; }
dl.method { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; font-size: 14px; }
dl.method dt { font-weight: 600; }
dl.method dd { margin: 0; word-break: break-word; }
figure { margin: 18px 0 26px; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 0 16px; }
.grid figure { margin: 8px 0 18px; }
.sample { border: 1px solid var(--line); border-left: 4px solid var(--line); border-radius: 4px;
  padding: 10px 14px; margin: 10px 0; font-size: 14px; }
.sample.ok { border-left-color: var(--ok); }
.sample.bad { border-left-color: var(--bad); }
.sample .q { font-weight: 600; }
.sample .mark { font-weight: 700; margin-right: 6px; }
.sample.ok .mark { color: var(--ok); }
.sample.bad .mark { color: var(--bad); }
.sample ol { margin: 6px 0; padding-left: 0; list-style: none; display: flex; flex-wrap: wrap; gap: 4px 18px; }
.sample .verdict { color: var(--muted); font-size: 13px; }
.sample code { background: #eef1f5; padding: 1px 5px; border-radius: 3px; }
.sample pre { white-space: pre-wrap; word-break: break-word; background: #f6f7f9; margin: 6px 0 0;
  padding: 8px 10px; border-radius: 4px; font-size: 13px; font-family: inherit; }
footer { font-size: 12px; margin-top: 40px; border-top: 1px solid var(--line); padding-top: 10px; }
"""


def _esc(value: Any) -> str:
    """HTML-escape any value (quotes included, for use inside attributes too)."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "–"
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return "–"


def _unique_labels(evals: list[dict[str, Any]]) -> None:
    """Make run labels unique in place: plots key their data by label, so twins would merge."""
    seen: dict[str, int] = {}
    for ev in evals:
        label = str(ev["label"])
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} ({seen[label]})"
        ev["label"] = label


def _load(eval_dirs: list[str | os.PathLike], labels: list[str] | None = None) -> list[dict[str, Any]]:
    evals = [load_eval(d) for d in eval_dirs]
    if labels:
        if len(labels) != len(evals):
            raise ValueError(f"{len(labels)} labels for {len(evals)} evaluation directories")
        for ev, label in zip(evals, labels, strict=True):
            ev["label"] = label
    _unique_labels(evals)
    return evals


def plots_dir_for(out_html: str | os.PathLike) -> Path:
    """Directory the report's PNGs are saved in: ``<out_html stem>_plots/`` beside the page."""
    out_html = Path(out_html)
    return out_html.parent / f"{out_html.stem}_plots"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:40] or "run"


def _make_plots(
    evals: list[dict[str, Any]], plots_dir: Path, run_dirs: Mapping[str, str | os.PathLike] | None
) -> dict[str, Path]:
    results_by_label = {ev["label"]: ev["results"] for ev in evals}
    jobs: list[tuple[str, str, Any]] = [
        ("Metrics by run", "metrics.png", lambda p: plots.plot_metric_comparison(results_by_label, p)),
        (
            "Accuracy by category (95% CI)",
            "category_accuracy.png",
            lambda p: plots.plot_category_accuracy(results_by_label, p),
        ),
        (
            "Answer letters: predicted vs gold",
            "letter_distribution.png",
            lambda p: plots.plot_letter_distribution(results_by_label, p),
        ),
    ]
    for i, ev in enumerate(evals, start=1):
        title = f"Confusion matrix: {ev['label']}"
        jobs.append(
            (
                title,
                f"confusion_{i}_{_slug(ev['label'])}.png",
                lambda p, ev=ev, title=title: plots.plot_confusion(ev["results"].get("confusion"), p, title),
            )
        )
    if run_dirs:
        jobs.append(("Training loss", "loss.png", lambda p: plots.plot_loss_curve(run_dirs, p)))

    plots_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for title, name, draw in jobs:
        path = draw(plots_dir / name)
        if path is not None:
            made[title] = Path(path)
    # The directory belongs to this report: drop PNGs a previous, richer run left behind, so the
    # markdown links and the manifest never point at stale plots of other data.
    keep = {p.name for p in made.values()}
    for old in plots_dir.glob("*.png"):
        if old.name not in keep:
            old.unlink()
    atomic_write_json(plots_dir / PLOTS_MANIFEST, {p.name: title for title, p in made.items()})
    return made


def make_plots(
    eval_dirs: list[str | os.PathLike],
    plots_dir: str | os.PathLike,
    run_dirs: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, Path]:
    """Draw every plot the evaluation (and training) data allow into ``plots_dir``.

    Args:
        eval_dirs: ``medtune evaluate`` output directories (each with ``results.json``).
        plots_dir: where the PNGs and ``plots.json`` go; PNGs from an earlier call that this one
            did not draw are removed.
        run_dirs: optional run label → training run directory (or its ``metrics.jsonl``) for the
            loss curve.

    Returns:
        Plot title → PNG path, in display order; plots without data are absent.
    """
    return _make_plots(_load(eval_dirs), Path(plots_dir), run_dirs)


def list_plots(out_html: str | os.PathLike) -> dict[str, Path]:
    """Plots saved by ``write_html_report(…, out_html)``: title → PNG path, in display order.

    Reads the manifest in the plots directory; an absent directory or manifest gives ``{}``.
    """
    plots_dir = plots_dir_for(out_html)
    try:
        manifest = json.loads((plots_dir / PLOTS_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(title): plots_dir / name for name, title in manifest.items() if (plots_dir / name).is_file()}


def markdown_plot_section(png_paths: Mapping[str, str | os.PathLike], md_dir: str | os.PathLike) -> str:
    """Markdown ``## Plots`` section linking the PNGs by paths relative to the markdown file's folder.

    Args:
        png_paths: plot title → PNG path (e.g. from ``list_plots`` or ``make_plots``).
        md_dir: directory holding the markdown file the section goes into.

    Returns:
        The section text ending in a newline, or ``""`` when there are no plots.
    """
    if not png_paths:
        return ""
    lines = ["## Plots", ""]
    for title, png in png_paths.items():
        rel = Path(os.path.relpath(Path(png).resolve(), Path(md_dir).resolve())).as_posix()
        # Percent-encode so spaces or brackets in a path cannot break the link syntax; the alt text
        # loses the characters that would end it early.
        alt = re.sub(r"[\[\]\n]", " ", str(title))
        lines += [f"![{alt}]({quote(rel)})", ""]
    return "\n".join(lines)


def _metrics_table(evals: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{_esc(title)}</th>" for _, title in COLUMNS)
    rows = [f"<thead><tr><th>run</th><th>n</th>{head}<th>no answer</th></tr></thead><tbody>"]
    best: dict[str, float] = {}
    if len(evals) > 1:  # bold marks the best run per metric; meaningless with a single run
        for key, _ in COLUMNS:
            vals = [ev["results"].get(key) for ev in evals]
            vals = [float(v) for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
            if vals:
                best[key] = max(vals)
    for ev in evals:
        r = ev["results"]
        cells = "".join(
            f'<td class="best">{_fmt(r.get(k))}</td>'
            if k in best and isinstance(r.get(k), int | float) and float(r[k]) == best[k]
            else f"<td>{_fmt(r.get(k))}</td>"
            for k, _ in COLUMNS
        )
        rows.append(
            f"<tr><td>{_esc(ev['label'] + variant_note(r))}</td><td>{_esc(r.get('n', '–'))}</td>{cells}"
            f"<td>{_esc(r.get('n_no_answer', '–'))}</td></tr>"
        )
    for i, (name, values) in enumerate(PAPER_ROWS):
        cells = "".join(f"<td>{_fmt(v)}</td>" for v in values)
        cls = "paper paper-first" if i == 0 else "paper"
        rows.append(f'<tr class="{cls}"><td>paper: {_esc(name)}</td><td>6811</td>{cells}<td>–</td></tr>')
    rows.append("</tbody>")
    return '<div class="scroll"><table>' + "".join(rows) + "</table></div>"


def _counts_table(evals: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>run</th><th>scored</th><th>no answer</th><th>unscorable (no gold)</th>"
        "<th>explanations scored</th><th>excluded (no reference)</th>"
        "<th>single-answer acc (n)</th><th>multi-answer acc (n)</th></tr>"
    )
    rows = []
    for ev in evals:
        r = ev["results"]
        rows.append(
            f"<tr><td>{_esc(ev['label'])}</td><td>{_esc(r.get('n', '–'))}</td>"
            f"<td>{_esc(r.get('n_no_answer', '–'))}</td><td>{_esc(r.get('n_unscorable', 0))}</td>"
            f"<td>{_esc(r.get('n_explanations_scored', '–'))}</td>"
            f"<td>{_esc(r.get('n_explanations_excluded', 0))}</td>"
            f"<td>{_fmt(r.get('accuracy_single'))} ({_esc(r.get('n_single', 0))})</td>"
            f"<td>{_fmt(r.get('accuracy_multi'))} ({_esc(r.get('n_multi', 0))})</td></tr>"
        )
    return f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'


def _method(evals: list[dict[str, Any]]) -> str:
    def joined(key: str) -> str:
        seen: list[str] = []
        for ev in evals:
            value = ev["results"].get(key)
            for v in value if isinstance(value, list) else [value if value is not None else "?"]:
                if str(v) not in seen:
                    seen.append(str(v))
        return "; ".join(seen)

    return (
        '<dl class="method">'
        f"<dt>Answer parser</dt><dd>{_esc(joined('parser'))}</dd>"
        f"<dt>Explanation tokens</dt><dd>{_esc(joined('tokenizer'))}</dd>"
        f"<dt>Prompt templates</dt><dd>{_esc(joined('templates'))}</dd>"
        "</dl>"
    )


def _pick_samples(eval_dir: Path, k: int) -> list[dict[str, Any]]:
    path = eval_dir / "scored.jsonl"
    if k <= 0 or not path.exists():
        return []
    rows = read_jsonl(path)
    # Successes and failures both, as report.md does, so the sample is not cherry-picked.
    right = [r for r in rows if r.get("correct")]
    wrong = [r for r in rows if not r.get("correct")]
    return right[: (k + 1) // 2] + wrong[: k // 2]


def _sample_html(row: dict[str, Any]) -> str:
    ok = bool(row.get("correct"))
    options = row.get("options") or {}
    items = (
        "".join(f"<li><b>{_esc(key)}.</b> {_esc(text)}</li>" for key, text in options.items())
        if isinstance(options, Mapping)
        else ""
    )
    output = str(row.get("output") or "").strip()
    if len(output) > _OUTPUT_CHARS:
        output = output[:_OUTPUT_CHARS] + "…"
    return (
        f'<div class="sample {"ok" if ok else "bad"}">'
        f'<div class="q"><span class="mark">{"✓" if ok else "✗"}</span>{_esc(row.get("question", ""))}</div>'
        f"<ol>{items}</ol>"
        f'<div class="verdict">gold <code>{_esc(row.get("answer") or "—")}</code> · parsed '
        f"<code>{_esc(row.get('parsed') or '—')}</code> · id {_esc(row.get('id', '?'))}</div>"
        f"<pre>{_esc(output) or '(empty output)'}</pre>"
        "</div>"
    )


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def write_html_report(
    eval_dirs: list[str | os.PathLike],
    out_html: str | os.PathLike,
    run_dirs: Mapping[str, str | os.PathLike] | None = None,
    samples: int = 4,
    labels: list[str] | None = None,
) -> Path:
    """Write a self-contained HTML report comparing evaluation directories.

    Contains the metrics table (runs, then the CMExam paper's reference rows), the answer parser and
    explanation tokenisation used, counts, every plot the data allow (embedded as base64 PNGs, also
    saved to ``plots_dir_for(out_html)``), and sample answers. All text from the data is escaped.

    Args:
        eval_dirs: ``medtune evaluate`` output directories (each with ``results.json``).
        out_html: the page to write (atomically).
        run_dirs: optional run label → training run directory (or ``metrics.jsonl``) for the loss
            curve.
        samples: sample answers per run (half correct, half wrong when available).
        labels: run names, one per evaluation directory (default: the directory names).

    Returns:
        ``out_html`` as a ``Path``.
    """
    out_html = Path(out_html)
    evals = _load(eval_dirs, labels)
    made = _make_plots(evals, plots_dir_for(out_html), run_dirs)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="zh">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>medtune evaluation report</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body><main>",
        "<h1>medtune evaluation report</h1>",
        f'<p class="meta">{len(evals)} run(s) · generated {_esc(datetime.now().isoformat(timespec="seconds"))}</p>',
        '<p class="lead">Answer accuracy and F1, and explanation BLEU/ROUGE, computed as the CMExam paper '
        "computes them (all × 100). Paper rows are on the CMExam test split (6,811 questions); compare "
        "with care when the data differ.</p>",
        "<h2>Metrics</h2>",
        _metrics_table(evals),
        "<h2>Method</h2>",
        _method(evals),
        "<h2>Counts</h2>",
        _counts_table(evals),
    ]
    if made:
        parts.append("<h2>Plots</h2>")
        # Each PNG carries its own title, so the figures need no caption; the per-run confusion
        # matrices sit side by side in a grid, where they are easier to compare than stacked.
        confusions = [(t, p) for t, p in made.items() if p.name.startswith("confusion_")]
        for title, png in made.items():
            if png.name.startswith("confusion_"):
                if confusions and (title, png) == confusions[0]:
                    parts.append(
                        '<div class="grid">'
                        + "".join(
                            f'<figure><img src="{_data_uri(p)}" alt="{_esc(t)}"></figure>'
                            for t, p in confusions
                        )
                        + "</div>"
                    )
                continue
            parts.append(f'<figure><img src="{_data_uri(png)}" alt="{_esc(title)}"></figure>')
    for ev in evals:
        picked = _pick_samples(ev["dir"], samples)
        if picked:
            parts.append(f"<h2>Sample answers: {_esc(ev['label'])}</h2>")
            parts.extend(_sample_html(row) for row in picked)
    sources = "".join(f"<li>{_esc(ev['label'])}: <code>{_esc(ev['dir'])}</code></li>" for ev in evals)
    parts += [f"<footer>Evaluation directories:<ul>{sources}</ul></footer>", "</main></body>", "</html>"]
    atomic_write_text(out_html, "\n".join(parts) + "\n")
    return out_html
