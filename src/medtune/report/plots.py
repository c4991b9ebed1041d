"""PNG plots for evaluation reports: accuracy by category, confusion, loss curves, metrics, letter bias.

Every ``plot_*`` function saves exactly one PNG and returns its path, or returns ``None`` when the
inputs hold nothing to plot (for example ``results.json`` written before breakdowns existed), so a
report never shows an empty or invented chart.

matplotlib is imported inside the functions and figures are drawn on an explicit Agg canvas rather
than through ``pyplot``: importing this module stays cheap, no global backend is switched under a
caller that already uses pyplot interactively, and no figure is left registered in pyplot's global
figure list (which leaks memory in long report runs).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtune.io import read_jsonl_tolerant

__all__ = [
    "CJK_FONT_CANDIDATES",
    "METRIC_COLUMNS",
    "new_figure",
    "plot_category_accuracy",
    "plot_confusion",
    "plot_letter_distribution",
    "plot_loss_curve",
    "plot_metric_comparison",
    "run_colors",
    "save_png",
    "setup_cjk_font",
]

#: Font families able to draw Simplified Chinese, best first. Simplified-Chinese variants lead because
#: CMExam is mainland Chinese; the JP/TC/KR faces of the same Noto/Source Han families still cover
#: every hanzi (with regional glyph shapes), so they beat tofu boxes.
CJK_FONT_CANDIDATES: tuple[str, ...] = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
    "Hiragino Sans GB",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Noto Sans CJK HK",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "Noto Serif CJK SC",
    "AR PL UMing CN",
    "AR PL UKai CN",
)

#: ``results.json`` key → axis label, in the column order of the CMExam paper's tables.
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Acc"),
    ("f1", "F1"),
    ("bleu_1", "BLEU-1"),
    ("bleu_4", "BLEU-4"),
    ("rouge_1", "ROUGE-1"),
    ("rouge_2", "ROUGE-2"),
    ("rouge_l", "ROUGE-L"),
)

# Okabe–Ito palette: distinguishable under the common colour-vision deficiencies, and printable.
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
_GOLD_COLOR = "#999999"
# Panels with more categories than this keep the most frequent ones; a 40-bar panel is unreadable
# and the rare categories have CIs too wide to say anything anyway.
_MAX_CATEGORIES = 20
_DPI = 110

# Process-wide state for setup_cjk_font: the font cache is rescanned at most once (it is slow), and
# the "no CJK font" warning is given once rather than once per plot.
_font_cache_rebuilt = False
_warned_no_cjk = False


def _cjk_font_in_list() -> str | None:
    """Best installed CJK family from matplotlib's current font list, or ``None``."""
    from matplotlib import font_manager

    names = {entry.name for entry in font_manager.fontManager.ttflist}
    for candidate in CJK_FONT_CANDIDATES:
        if candidate in names:
            return candidate
    # Unknown vendor fonts still usually say "CJK" in their family name.
    others = sorted(name for name in names if "CJK" in name and "Mono" not in name)
    return others[0] if others else None


def _rebuild_font_cache() -> None:
    """Rescan the system fonts and add any that matplotlib's (possibly stale) cache lacks.

    matplotlib caches the font list in ``~/.cache/matplotlib/fontlist-*.json`` and never notices fonts
    installed afterwards (``apt-get install fonts-noto-cjk``). The new fonts are added to the live
    ``fontManager`` with the public ``addfont`` so that modules which imported the manager object
    (the Agg backend does) see them too, and the on-disk cache is refreshed so the next process does
    not need to rescan.
    """
    from matplotlib import font_manager

    known = {entry.fname for entry in font_manager.fontManager.ttflist}
    loader = getattr(font_manager, "_load_fontmanager", None)  # private; rewrites the disk cache
    if loader is not None:
        try:
            found = {entry.fname for entry in loader(try_read_cache=False).ttflist}
        except Exception:  # a failed rescan or cache write must not stop the report
            found = set(font_manager.findSystemFonts())
    else:
        found = set(font_manager.findSystemFonts())
    for path in sorted(found - known):
        try:
            font_manager.fontManager.addfont(path)
        except (OSError, RuntimeError, ValueError):
            continue  # an unreadable font file is skipped, as matplotlib itself does


def setup_cjk_font() -> str | None:
    """Make matplotlib draw Chinese text with an installed CJK font.

    Looks for a CJK family in matplotlib's font list; when none is there, rescans the system fonts
    once per process (the cached list is often older than the fonts). Sets ``font.sans-serif`` to put
    the font first and ``axes.unicode_minus`` to False (CJK fonts lack U+2212, which would otherwise
    render as a box on negative tick labels).

    Returns:
        The font family name, or ``None`` (after warning once) when no CJK font is installed.
    """
    global _font_cache_rebuilt, _warned_no_cjk
    import matplotlib

    name = _cjk_font_in_list()
    if name is None and not _font_cache_rebuilt:
        _font_cache_rebuilt = True
        _rebuild_font_cache()
        name = _cjk_font_in_list()
    if name is None:
        if not _warned_no_cjk:
            _warned_no_cjk = True
            warnings.warn(
                "no CJK font found for matplotlib: Chinese labels in report plots will render as "
                "empty boxes. Install one (Debian/Ubuntu: `apt-get install fonts-noto-cjk`) and, if "
                "it is still not found, delete matplotlib's font cache (~/.cache/matplotlib).",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    # DejaVu Sans stays as a fallback for symbols the CJK font lacks (matplotlib ≥ 3.6 falls back
    # glyph by glyph through this list).
    rest = [f for f in matplotlib.rcParams["font.sans-serif"] if f != name]
    matplotlib.rcParams["font.sans-serif"] = [name, *rest]
    matplotlib.rcParams["font.family"] = "sans-serif"
    matplotlib.rcParams["axes.unicode_minus"] = False
    return name


def run_colors(labels: list[str]) -> dict[str, str]:
    """Colour per run label, stable across all plots of one report (same order → same colour)."""
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(labels)}


def new_figure(width: float, height: float) -> Any:
    """A figure on an explicit Agg canvas (see the module docstring for why not pyplot), CJK font set.

    Shared with ``medtune.report.data_plots`` so every medtune chart is drawn the same way.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    setup_cjk_font()
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, out_png: str | os.PathLike) -> Path:
    """Save ``fig`` as PNG atomically (temp file + rename), so a reader never sees half an image."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        # No "Software" text chunk: the PNG bytes then depend only on the data, not the mpl version.
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` for missing/NaN/non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# ---------------------------------------------------------------------------------------------------
# Accuracy by category
# ---------------------------------------------------------------------------------------------------


def _breakdown_groups(results: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(panel title, cells)`` for each non-empty breakdown in one ``results.json``."""
    breakdowns = results.get("breakdowns")
    if not isinstance(breakdowns, Mapping):
        return []
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for key, title in (("by_answer_type", "Answer type"), ("by_n_options", "Number of options")):
        cells = breakdowns.get(key)
        if isinstance(cells, list) and cells:
            groups.append((title, cells))
    annotations = breakdowns.get("by_annotation")
    if isinstance(annotations, Mapping):
        for name, cells in annotations.items():
            if isinstance(cells, list) and cells:
                groups.append((str(name), cells))
    return groups


def plot_category_accuracy(
    results_by_label: Mapping[str, Mapping[str, Any]], out_png: str | os.PathLike
) -> Path | None:
    """Accuracy per category with 95% CI error bars, one panel per breakdown group.

    Panels: answer type, number of options, then each annotation (disease group, department, …)
    present in any run. Bars are horizontal so long Chinese category names stay readable; with
    several runs each run gets its own colour within every category.

    Args:
        results_by_label: run label → parsed ``results.json``; runs without ``breakdowns`` are
            left out of the plot.
        out_png: where to write the PNG.

    Returns:
        The PNG path, or ``None`` when no run has any breakdown.
    """
    # panel title → run label → category value → cell; dicts keep first-seen order.
    panels: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for label, results in results_by_label.items():
        for title, cells in _breakdown_groups(results):
            by_value = panels.setdefault(title, {}).setdefault(label, {})
            for cell in cells:
                if isinstance(cell, Mapping) and _number(cell.get("accuracy")) is not None:
                    by_value[str(cell.get("value"))] = dict(cell)
    panels = {t: runs for t, runs in panels.items() if any(runs.values())}
    if not panels:
        return None

    labels = [label for label in results_by_label if any(label in runs for runs in panels.values())]
    colors = run_colors(list(results_by_label))
    layout: list[tuple[str, list[str], int]] = []  # (title, categories shown, categories in total)
    for title, runs in panels.items():
        n_by_value: dict[str, int] = {}
        for by_value in runs.values():
            for value, cell in by_value.items():
                n_by_value[value] = max(n_by_value.get(value, 0), int(cell.get("n") or 0))
        values = list(n_by_value)
        if len(values) > _MAX_CATEGORIES:
            values = sorted(values, key=lambda v: -n_by_value[v])[:_MAX_CATEGORIES]
        layout.append((title, values, len(n_by_value)))

    bar_h = 0.8 / len(labels)
    rows = [max(len(values) * len(labels) * 0.22 + 0.9, 1.6) for _, values, _ in layout]
    fig = new_figure(10.0, sum(rows) + 0.6)
    axes = fig.subplots(len(layout), 1, squeeze=False, gridspec_kw={"height_ratios": rows})[:, 0]
    for ax, (title, values, total) in zip(axes, layout, strict=True):
        runs = panels[title]
        for j, label in enumerate(labels):
            by_value = runs.get(label, {})
            ys, accs, lows, highs = [], [], [], []
            for i, value in enumerate(values):
                cell = by_value.get(value)
                if cell is None:
                    continue  # this run has no item in the category: no bar, not a zero bar
                acc = _number(cell["accuracy"])
                lo, hi = _number(cell.get("ci_low")), _number(cell.get("ci_high"))
                ys.append(i + (j - (len(labels) - 1) / 2) * bar_h)
                accs.append(acc)
                # A missing CI draws no whisker; clip guards against rounding putting acc outside it.
                lows.append(max(acc - lo, 0.0) if lo is not None else 0.0)
                highs.append(max(hi - acc, 0.0) if hi is not None else 0.0)
            if ys:
                ax.barh(
                    ys,
                    accs,
                    height=bar_h * 0.92,
                    color=colors[label],
                    label=label,
                    xerr=[lows, highs],
                    error_kw={"ecolor": "#333333", "capsize": 2, "lw": 0.8},
                )
        ticks = []
        for value in values:
            ns = sorted({int(runs[lb][value].get("n") or 0) for lb in runs if value in runs[lb]})
            ticks.append(f"{value}  (n={'/'.join(map(str, ns))})")
        ax.set_yticks(range(len(values)), ticks)
        # Fixed limits, reversed: first category on top as in a table, and no autoscale padding.
        ax.set_ylim(len(values) - 0.5, -0.5)
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%) with 95% CI")
        ax.grid(axis="x", alpha=0.3)
        shown = f" (top {len(values)} of {total} by n)" if total > len(values) else ""
        ax.set_title(f"{title}{shown}", loc="left", fontsize=11, fontweight="bold")
    if len(labels) > 1:  # below the panels, where it cannot cover a bar
        fig.legend(
            *axes[0].get_legend_handles_labels(),
            loc="outside lower center",
            ncols=min(len(labels), 4),
            fontsize=9,
            frameon=False,
        )
    fig.suptitle("Accuracy by category", fontsize=13)
    return save_png(fig, out_png)


# ---------------------------------------------------------------------------------------------------
# Confusion matrix
# ---------------------------------------------------------------------------------------------------


def plot_confusion(
    confusion: Mapping[str, Any] | None, out_png: str | os.PathLike, title: str = "Confusion matrix"
) -> Path | None:
    """Heat map of gold answer (rows) against parsed prediction (columns), counts in the cells.

    Colour is the share of the gold row, so a small class's confusion is as visible as a large
    one's, while the written counts keep the absolute numbers.

    Args:
        confusion: ``{"gold_labels": [...], "pred_labels": [...], "matrix": [[int]]}`` from
            ``results.json``, or ``None``.
        out_png: where to write the PNG.
        title: figure title (e.g. the run label).

    Returns:
        The PNG path, or ``None`` when there is no (well-formed, non-empty) matrix.
    """
    if not isinstance(confusion, Mapping):
        return None
    gold = [str(g) for g in confusion.get("gold_labels") or []]
    pred = [str(p) for p in confusion.get("pred_labels") or []]
    matrix = confusion.get("matrix") or []
    if not gold or not pred or len(matrix) != len(gold) or any(len(row) != len(pred) for row in matrix):
        return None
    counts = [[int(c or 0) for c in row] for row in matrix]
    if not any(any(row) for row in counts):
        return None

    import numpy as np

    arr = np.array(counts, dtype=float)
    row_sums = arr.sum(axis=1, keepdims=True)
    share = np.divide(arr, row_sums, out=np.zeros_like(arr), where=row_sums > 0)
    cell = 0.5 if max(len(gold), len(pred)) <= 12 else 0.36
    fig = new_figure(max(len(pred) * cell + 2.6, 4.5), max(len(gold) * cell + 1.8, 3.5))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fontsize = 9 if max(len(gold), len(pred)) <= 12 else 6
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            if count:
                # White text on dark cells, black on light, so every count stays legible.
                color = "white" if share[i, j] > 0.55 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=fontsize, color=color)
    ax.set_xticks(range(len(pred)), pred, rotation=90 if len(pred) > 12 else 0)
    ax.set_yticks(range(len(gold)), gold)
    ax.set_xlabel("parsed prediction")
    ax.set_ylabel("gold answer")
    ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, label="share of gold row", shrink=0.85)
    return save_png(fig, out_png)


# ---------------------------------------------------------------------------------------------------
# Training loss
# ---------------------------------------------------------------------------------------------------


def _loss_points(key: str, rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Sorted ``(step, value)`` points of ``key``, keeping the last value logged for each step.

    A resumed run re-logs the steps after its checkpoint; keeping the latest value per step draws the
    run that actually produced the final model instead of a line that jumps back in time.
    """
    by_step: dict[float, float] = {}
    for row in rows:
        step, value = _number(row.get("step")), _number(row.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    return sorted(by_step.items())


def plot_loss_curve(
    metrics_jsonl_paths: Mapping[str, str | os.PathLike], out_png: str | os.PathLike
) -> Path | None:
    """Training loss against step, one line per run, with eval-loss points where logged.

    Summary lines (``train_loss``, ``train_runtime``) are ignored: they are one number per run, not
    a point of the curve.

    Args:
        metrics_jsonl_paths: run label → ``metrics.jsonl`` (a run directory is accepted too and
            means its ``metrics.jsonl``). Missing files are skipped.
        out_png: where to write the PNG.

    Returns:
        The PNG path, or ``None`` when no file has a loss value.
    """
    series: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]] = {}
    for label, raw in metrics_jsonl_paths.items():
        path = Path(raw)
        if path.is_dir():
            path = path / "metrics.jsonl"
        # Tolerant read: the run may still be training and its last line half written.
        rows = read_jsonl_tolerant(path) if path.is_file() else []
        train, evals = _loss_points("loss", rows), _loss_points("eval_loss", rows)
        if train or evals:
            series[label] = (train, evals)
    if not series:
        return None

    colors = run_colors(list(metrics_jsonl_paths))
    fig = new_figure(9.0, 4.8)
    ax = fig.add_subplot()
    for label, (train, evals) in series.items():
        if train:
            ax.plot(*zip(*train, strict=True), color=colors[label], lw=1.6, label=f"{label}: train loss")
        if evals:
            ax.plot(
                *zip(*evals, strict=True),
                color=colors[label],
                ls="--",
                marker="o",
                ms=5,
                lw=1.0,
                label=f"{label}: eval loss",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training loss", fontsize=12)
    return save_png(fig, out_png)


# ---------------------------------------------------------------------------------------------------
# Metrics side by side
# ---------------------------------------------------------------------------------------------------


def plot_metric_comparison(
    results_by_label: Mapping[str, Mapping[str, Any]], out_png: str | os.PathLike
) -> Path | None:
    """Grouped bars of Acc, F1, BLEU-1/4 and ROUGE-1/2/L (all × 100), one bar per run.

    Metrics a run did not compute (``None``: e.g. no reference explanations) get no bar rather than
    a zero bar, which would read as "scored zero".

    Args:
        results_by_label: run label → parsed ``results.json``.
        out_png: where to write the PNG.

    Returns:
        The PNG path, or ``None`` when no run has any of the metrics.
    """
    values = {
        label: {key: _number(results.get(key)) for key, _ in METRIC_COLUMNS}
        for label, results in results_by_label.items()
    }
    if not any(v is not None for per_run in values.values() for v in per_run.values()):
        return None

    labels = list(values)
    colors = run_colors(labels)
    width = 0.8 / len(labels)
    # Wider with more runs, but capped: an over-wide PNG is shrunk in the page and its text with it.
    fig = new_figure(min(9.0 + 0.6 * max(len(labels) - 2, 0), 12.0), 4.2)
    ax = fig.add_subplot()
    for j, label in enumerate(labels):
        xs, ys = [], []
        for i, (key, _) in enumerate(METRIC_COLUMNS):
            if values[label][key] is not None:
                xs.append(i + (j - (len(labels) - 1) / 2) * width)
                ys.append(values[label][key])
        if xs:
            bars = ax.bar(xs, ys, width=width * 0.92, color=colors[label], label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7 if len(labels) <= 3 else 6, padding=1)
    ax.set_xticks(range(len(METRIC_COLUMNS)), [title for _, title in METRIC_COLUMNS])
    ax.set_ylabel("score (× 100)")
    top = max(v for per_run in values.values() for v in per_run.values() if v is not None)
    ax.set_ylim(0, max(10.0, top * 1.12))  # headroom for the value labels above the tallest bar
    ax.grid(axis="y", alpha=0.3)
    # Legend below the axes: inside, it would hide bars whichever corner it took.
    fig.legend(loc="outside lower center", ncols=min(len(labels), 4), fontsize=8, frameon=False)
    ax.set_title("Metrics by run", fontsize=12)
    return save_png(fig, out_png)


# ---------------------------------------------------------------------------------------------------
# Answer-letter distribution (position bias)
# ---------------------------------------------------------------------------------------------------


def _shares(counts: Mapping[str, Any], letters: list[str]) -> list[float]:
    total = sum(int(counts.get(letter) or 0) for letter in letters)
    return [100.0 * int(counts.get(letter) or 0) / total if total else 0.0 for letter in letters]


def plot_letter_distribution(
    results_by_label: Mapping[str, Mapping[str, Any]], out_png: str | os.PathLike
) -> Path | None:
    """Share of each answer letter, predicted against gold, one panel per run.

    A model that prefers a position (always "A", say) shows a predicted bar far above the gold bar
    for that letter. Shares are of all letters chosen, so multi-answer items count each letter.

    Args:
        results_by_label: run label → parsed ``results.json``; runs without
            ``letter_distribution`` are left out.
        out_png: where to write the PNG.

    Returns:
        The PNG path, or ``None`` when no run has a letter distribution.
    """
    dists = {
        label: results["letter_distribution"]
        for label, results in results_by_label.items()
        if isinstance(results.get("letter_distribution"), Mapping)
        and (results["letter_distribution"].get("gold") or results["letter_distribution"].get("predicted"))
    }
    if not dists:
        return None

    colors = run_colors(list(results_by_label))
    ncols = min(len(dists), 3)
    nrows = math.ceil(len(dists) / ncols)
    fig = new_figure(4.2 * ncols + 0.6, 3.4 * nrows + 0.5)
    # Shared y axis: the same height means the same share in every panel, so runs compare at a glance.
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    for k, (ax, (label, dist)) in enumerate(zip(axes, dists.items(), strict=False)):
        gold, pred = dist.get("gold") or {}, dist.get("predicted") or {}
        letters = sorted(set(gold) | set(pred))
        xs = range(len(letters))
        ax.bar([x - 0.2 for x in xs], _shares(gold, letters), width=0.4, color=_GOLD_COLOR, label="gold")
        ax.bar(
            [x + 0.2 for x in xs], _shares(pred, letters), width=0.4, color=colors[label], label="predicted"
        )
        ax.set_xticks(list(xs), letters)
        if k % ncols == 0:
            ax.set_ylabel("share of letters (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        no_answer = dist.get("n_no_answer")
        suffix = f"\n(no answer parsed: {no_answer})" if no_answer is not None else ""
        ax.set_title(f"{label}{suffix}", fontsize=10)
    for ax in axes[len(dists) :]:
        ax.set_visible(False)  # empty grid slots of the last row
    fig.suptitle("Answer letters: predicted vs gold (position bias)", fontsize=12)
    return save_png(fig, out_png)
