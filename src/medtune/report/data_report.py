"""The ``medtune data inspect`` report: ``inspect.json``, ``inspect.md`` and the PNG charts.

``medtune.data.quality.inspect`` computes the statistics; this module only writes them out, beside
the evaluation reports (``markdown``, ``html``) and drawing its charts with ``data_plots``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medtune.io import atomic_write_json, atomic_write_text
from medtune.report.data_plots import inspect_plots

__all__ = ["inspect_markdown", "write_inspect_report"]


def write_inspect_report(stats: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``inspect.json``, ``inspect.md`` and PNG charts for an ``inspect`` result.

    PNGs: ``lengths_chars.png`` (a histogram per text), ``lengths_tokens.png`` when token lengths
    exist (with the ``max_lengths`` budgets marked), ``answer_letters.png`` for exams,
    ``annotations.png`` for exams with annotations, ``turns.png`` for conversations and
    preferences. Chinese labels are drawn with ``medtune.report.plots.setup_cjk_font``.

    Args:
        stats: The dict returned by ``inspect``.
        out_dir: Directory to write into (created if needed).

    Returns:
        The paths written, JSON and Markdown first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = inspect_plots(stats, out)
    json_path, md_path = out / "inspect.json", out / "inspect.md"
    atomic_write_json(json_path, stats)
    atomic_write_text(md_path, inspect_markdown(stats, [p.name for p in pngs]))
    return [json_path, md_path, *pngs]


def _cell(value: Any) -> str:
    text = "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _count_table(title: str, counts: dict[str, Any], label: str = "value") -> list[str]:
    total = sum(counts.values()) or 1
    rows = [(k, v, f"{100 * v / total:.1f}%") for k, v in counts.items()]
    return [f"### {title}", "", *_table([label, "count", "share"], rows)]


def inspect_markdown(stats: dict[str, Any], pngs: list[str]) -> str:
    """``inspect.md``: the tables of an ``inspect`` result, then links to its charts.

    Args:
        stats: The dict returned by ``medtune.data.quality.inspect``.
        pngs: Chart file names, relative to the markdown file.

    Returns:
        The markdown text.
    """
    lines = [f"# Data inspection: `{Path(stats['path']).name}`", ""]
    lines += _table(
        ["path", "kind", "format", "rows", "records", "malformed"],
        [(stats["path"], stats["kind"], stats["source_format"], stats["n_rows"], stats["n_records"], stats["n_malformed"])],
    )
    lines += ["## Fields (missing / empty, over decodable rows)", ""]
    lines += _table(["field", "missing", "empty"], [(k, v["missing"], v["empty"]) for k, v in stats["fields"].items()])
    lines += ["## Lengths in characters", ""]
    stat_cols = ["min", "p50", "p90", "p99", "max", "mean"]
    lines += _table(["text", *stat_cols], [(k, *(v[c] for c in stat_cols)) for k, v in stats["lengths_chars"].items()])
    if stats.get("lengths_tokens"):
        budgets = [str(m) for m in stats["max_lengths"]]
        lines += [f"## Lengths in tokens (`{stats['tokenizer']}`, no template tokens)", ""]
        lines += _table(
            ["text", "p50", "p90", "p99", "max", *(f"> {b}" for b in budgets)],
            [(k, v["p50"], v["p90"], v["p99"], v["max"], *(v["over"][b] for b in budgets))
             for k, v in stats["lengths_tokens"].items()],
        )
    if "exam" in stats:
        exam = stats["exam"]
        lines += ["## Exam answers", ""]
        lines += _count_table("Answer letters (every letter of every answer)", exam["answer_letters"], "letter")
        lines += _count_table("Answer letters of single-answer questions", exam["answer_letters_single"], "letter")
        lines += _count_table("Single / multiple answer", exam["answer_type"], "type")
        lines += _count_table("Letters per answer", exam["answer_length"], "letters")
        lines += _count_table("Options per question", exam["n_options"], "options")
        lines += [f"Records without an explanation: {exam['missing_explanation']}", ""]
        for name, counts in exam["annotations"].items():
            lines += _count_table(f"Annotation: {name}", counts)
    for kind in ("conversation", "preference"):
        if kind in stats:
            section = stats[kind]
            lines += [f"## {kind.capitalize()}s", ""]
            lines += _count_table("User turns per record", section["turns"], "turns")
            extra = [("multi-turn", section["n_multi_turn"]), ("with a system message", section["n_with_system"])]
            if kind == "preference":
                extra += [("chosen longer than rejected", section["n_chosen_longer"]),
                          ("rejected longer than chosen", section["n_rejected_longer"]),
                          ("same length", section["n_same_length"])]
            lines += _table(["records", "count"], extra)
            for key, info in section["meta_values"].items():
                if info["n_distinct"] > len(info["counts"]):
                    # Ids and free text: a table of the first 30 values with count 1 says nothing.
                    lines += [f"meta `{key}`: {info['n_distinct']} distinct values (not listed)", ""]
                else:
                    lines += _count_table(f"meta `{key}` ({info['n_distinct']} distinct)", info["counts"])
    if stats["malformed"]:
        lines += [f"## Malformed rows ({stats['n_malformed']})", ""]
        lines += _table(["row", "field", "reason"], [(m["row"], m["field"], m["reason"]) for m in stats["malformed"]])
    if pngs:
        lines += ["## Charts", ""] + [f"![{name}]({name})" for name in pngs] + [""]
    return "\n".join(lines)
