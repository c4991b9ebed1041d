"""PNG charts of a data file's statistics (``medtune data inspect``), drawn from ``inspect``'s dict.

The statistics are computed in ``medtune.data.quality``; this module only draws them, the way the
evaluation plots in ``medtune.report.plots`` are drawn (explicit Agg canvas, CJK font, atomic
PNG writes), so data and evaluation charts look alike and ``medtune.data`` never needs matplotlib.
Every function returns the PNG written, or ``None`` when the statistics hold nothing to draw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtune.report.plots import new_figure, save_png

__all__ = [
    "inspect_plots",
    "plot_annotations",
    "plot_answer_letters",
    "plot_histograms",
    "plot_lengths_chars",
    "plot_lengths_tokens",
    "plot_turns",
]


def inspect_plots(stats: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Every chart an ``inspect`` result allows, written into ``out_dir``.

    Args:
        stats: The dict returned by ``medtune.data.quality.inspect``.
        out_dir: Existing directory for the PNGs.

    Returns:
        The PNGs written, in the order ``lengths_chars``, ``lengths_tokens``, ``answer_letters``,
        ``annotations``, ``turns`` (absent ones left out).
    """
    out = Path(out_dir)
    pngs: list[Path] = []
    for plot in (plot_lengths_chars, plot_lengths_tokens, plot_answer_letters, plot_annotations, plot_turns):
        path = plot(stats, out)
        if path is not None:
            pngs.append(path)
    return pngs


def plot_histograms(hists: dict[str, Any], title: str, unit: str, out: Path, marks: Sequence[int] = ()) -> Path | None:
    """One histogram panel per text (four to a row), with optional vertical marks.

    Args:
        hists: Text name → ``{"edges", "counts"}`` (``inspect``'s ``histograms`` entries); names
            without counts are left out.
        title: Figure title.
        unit: x-axis label.
        out: PNG path.
        marks: x positions to mark with a dashed line (token budgets).

    Returns:
        ``out``, or ``None`` when there is nothing to draw.
    """
    hists = {k: v for k, v in hists.items() if v.get("counts")}
    if not hists:
        return None
    fig = new_figure(4.2 * min(len(hists), 4), 3.2 * math.ceil(len(hists) / 4) + 0.4)
    axes = fig.subplots(math.ceil(len(hists) / 4), min(len(hists), 4), squeeze=False).ravel()
    for ax, (name, hist) in zip(axes, hists.items(), strict=False):
        edges = hist["edges"]
        widths = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        ax.bar(edges[:-1], hist["counts"], width=widths, align="edge", color="#0072B2", edgecolor="white", lw=0.3)
        for m in marks:
            if edges[0] <= m <= edges[-1] * 1.05:
                ax.axvline(m, color="#D55E00", ls="--", lw=1)
                ax.text(m, ax.get_ylim()[1] * 0.95, f" {m}", color="#D55E00", fontsize=7, va="top")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(unit)
        ax.set_ylabel("records")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(hists):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    return save_png(fig, out)


def plot_lengths_chars(stats: dict[str, Any], out: Path) -> Path | None:
    """``lengths_chars.png`` in ``out``: character lengths of each text of an ``inspect`` result."""
    return plot_histograms(
        stats["histograms"]["chars"], f"Text lengths (characters): {Path(stats['path']).name}",
        "characters", out / "lengths_chars.png",
    )


def plot_lengths_tokens(stats: dict[str, Any], out: Path) -> Path | None:
    """``lengths_tokens.png`` in ``out`` with the ``max_lengths`` budgets marked; ``None`` without tokens."""
    return plot_histograms(
        stats["histograms"].get("tokens") or {}, f"Text lengths (tokens, {stats['tokenizer']})",
        "tokens", out / "lengths_tokens.png", marks=stats["max_lengths"],
    )


def _bars(ax: Any, counts: dict[str, int], horizontal: bool = False) -> None:
    labels, values = list(counts), list(counts.values())
    if horizontal:
        bars = ax.barh(range(len(labels)), values, color="#0072B2")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # first (most frequent) on top, as in the table
    else:
        bars = ax.bar(range(len(labels)), values, color="#0072B2")
        ax.set_xticks(range(len(labels)), labels)
    ax.bar_label(bars, fontsize=7, padding=1)


def plot_answer_letters(stats: dict[str, Any], out: Path) -> Path | None:
    """``answer_letters.png`` in ``out``: answer letters and letters per answer; ``None`` unless exams."""
    exam = stats.get("exam")
    if not exam or not exam["answer_letters"]:
        return None
    fig = new_figure(9.0, 3.4)
    panels = [
        ("Every answer letter", exam["answer_letters"]),
        ("Single-answer questions", exam["answer_letters_single"]),
        ("Letters per answer", exam["answer_length"]),
    ]
    for ax, (title, counts) in zip(fig.subplots(1, 3), panels, strict=True):
        _bars(ax, counts)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Answer letters: {Path(stats['path']).name}", fontsize=12)
    return save_png(fig, out / "answer_letters.png")


def plot_annotations(stats: dict[str, Any], out: Path) -> Path | None:
    """``annotations.png`` in ``out``: the top 20 values of each exam annotation; ``None`` without any."""
    annotations = (stats.get("exam") or {}).get("annotations") or {}
    if not annotations:
        return None
    shown = {name: dict(list(counts.items())[:20]) for name, counts in annotations.items()}
    heights = [max(len(c) * 0.25 + 0.8, 1.5) for c in shown.values()]
    fig = new_figure(9.0, sum(heights) + 0.5)
    axes = fig.subplots(len(shown), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (name, counts) in zip(axes, shown.items(), strict=True):
        _bars(ax, counts, horizontal=True)
        ax.set_title(name, loc="left", fontsize=10, fontweight="bold")
    fig.suptitle("Annotations (top 20 values each)", fontsize=12)
    return save_png(fig, out / "annotations.png")


def plot_turns(stats: dict[str, Any], out: Path) -> Path | None:
    """``turns.png`` in ``out``: user turns per record, beside the first fully listed meta key.

    ``None`` unless the data are conversations or preference pairs.
    """
    section = stats.get("conversation") or stats.get("preference")
    if not section or not section["turns"]:
        return None
    # Only keys whose values are all listed (``inspect`` keeps the first 30) and that vary.
    meta = {k: v for k, v in section["meta_values"].items() if 1 < v["n_distinct"] == len(v["counts"])}
    fig = new_figure(9.0 if meta else 5.0, 3.6)
    axes = fig.subplots(1, 2 if meta else 1, squeeze=False)[0]
    _bars(axes[0], section["turns"])
    axes[0].set_xlabel("user turns")
    axes[0].set_ylabel("records")
    axes[0].set_title("Turns per record", fontsize=10)
    if meta:
        key, info = next(iter(meta.items()))
        _bars(axes[1], info["counts"], horizontal=True)
        axes[1].set_title(f"meta: {key}", fontsize=10)
    fig.suptitle(Path(stats["path"]).name, fontsize=12)
    return save_png(fig, out / "turns.png")
