"""Compare evaluation runs: did the fine-tune help, where, and is it more than noise.

Two runs scored on the same questions are paired data: each question is answered by both. The
accuracy difference alone hides how many questions changed in each direction; McNemar's test
looks only at the discordant questions (right in one run, wrong in the other) and says whether
the split between them is plausibly a coin flip. ``compare_runs`` writes ``comparison.json``
and ``comparison.md`` with the metrics table, the paired test, the accuracy change per
category, and before/after answers for questions the second run fixed or broke.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from medtune.evaluation.breakdowns import accuracy_breakdowns
from medtune.io import atomic_write_json, atomic_write_text, read_jsonl
from medtune.report.markdown import load_eval, results_table

__all__ = ["category_deltas", "compare_runs", "mcnemar", "pair_rows", "pick_examples", "sign_test_p_value"]

MCNEMAR_METHOD = "exact binomial (two-sided)"
#: Characters of a model output shown in comparison.md (comparison.json keeps it whole).
_OUTPUT_CHARS = 300


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> dict[str, Any]:
    """McNemar's paired test of two runs' correctness on the same questions.

    With ``b`` = questions A got right and B wrong, and ``c`` = A wrong and B right, under the
    null hypothesis (equal accuracy) each discordant question is equally likely to fall either
    way, so ``c ~ Binomial(b + c, 1/2)``. The exact two-sided binomial p-value is reported
    because category-level and small-sample comparisons often have few discordant pairs, where
    the chi-square approximation is poor; the continuity-corrected chi-square statistic is
    included for readers who expect it.

    Args:
        a_correct: Per-question correctness of run A (the baseline).
        b_correct: Per-question correctness of run B, same questions in the same order.

    Returns:
        ``{"n", "a_only" (= b), "b_only" (= c), "both", "neither", "p_value", "chi2_cc",
        "method"}``. With no discordant question ``p_value`` is 1.0 and ``chi2_cc`` 0.0.

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"mcnemar needs paired results: {len(a_correct)} vs {len(b_correct)} items")
    a_only = b_only = both = neither = 0
    for a, b in zip(a_correct, b_correct, strict=True):
        if a and b:
            both += 1
        elif a:
            a_only += 1
        elif b:
            b_only += 1
        else:
            neither += 1
    discordant = a_only + b_only
    if discordant:
        p_value = sign_test_p_value(b_only, discordant)
        chi2_cc = (abs(a_only - b_only) - 1) ** 2 / discordant
    else:
        p_value, chi2_cc = 1.0, 0.0  # the runs agree on every question: no evidence of a difference
    return {
        "n": len(a_correct), "a_only": a_only, "b_only": b_only, "both": both, "neither": neither,
        "p_value": p_value, "chi2_cc": float(chi2_cc), "method": MCNEMAR_METHOD,
    }


def sign_test_p_value(k: int, n: int) -> float:
    """Two-sided exact binomial p-value of ``k`` successes in ``n`` trials at p = 1/2 (McNemar's exact test).

    The same number as ``scipy.stats.binomtest(k, n, 0.5).pvalue`` (tests/test_compare.py checks
    it), without importing scipy, which alone made ``medtune compare`` take 1.5 s to start. At
    p = 1/2 the distribution is symmetric, so the outcomes at most as likely as ``k`` are the two
    tails beyond ``min(k, n - k)``: p = min(1, 2 P(X <= min(k, n - k))). The terms are summed in
    log space relative to the largest, so large ``n`` neither overflows nor loses the small tail.
    """
    if not 0 <= k <= n:
        raise ValueError(f"expected 0 <= k <= n, got k={k}, n={n}")
    small = min(k, n - k)
    if 2 * small == n:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(small + 1)]
    top = max(logs)
    log_tail = top + math.log(math.fsum(math.exp(v - top) for v in logs)) - n * math.log(2)
    return min(1.0, 2 * math.exp(log_tail))


def _index(rows: list[dict[str, Any]], side: str) -> dict[str, dict[str, Any]]:
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = str(row["id"])
        if key in by_id:
            # Pairing by id is meaningless if one id names two questions.
            raise ValueError(f"run {side}: duplicate id {key!r} in scored rows")
        by_id[key] = row
    return by_id


def pair_rows(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """Match two runs' scored rows by ``id``.

    Only ids present in both runs are paired; the caller counts the rest (``compare_runs``
    reports them), so a run on a different subset is never compared silently.

    Args:
        a_rows: Scored rows of run A.
        b_rows: Scored rows of run B.

    Returns:
        ``(a_row, b_row)`` pairs in run A's order.

    Raises:
        ValueError: If an id occurs twice within one run.
    """
    a_by_id, b_by_id = _index(a_rows, "A"), _index(b_rows, "B")
    return [(row, b_by_id[key]) for key, row in a_by_id.items() if key in b_by_id]


def _flatten(breakdowns: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``accuracy_breakdowns`` output → ``{(group, value): cell}``, in report order."""
    flat: dict[tuple[str, str], dict[str, Any]] = {}
    for name, cells in (breakdowns.get("by_annotation") or {}).items():
        for cell in cells:
            flat[(f"by_annotation/{name}", cell["value"])] = cell
    for group in ("by_answer_type", "by_n_options"):
        for cell in breakdowns.get(group) or []:
            flat[(group, cell["value"])] = cell
    return flat


def category_deltas(a_breakdowns: dict[str, Any], b_breakdowns: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy change per category between two runs' ``accuracy_breakdowns``.

    Args:
        a_breakdowns: Breakdowns of run A (the baseline).
        b_breakdowns: Breakdowns of run B.

    Returns:
        One ``{"group", "value", "n_a", "acc_a", "n_b", "acc_b", "delta"}`` per (group, value)
        present in both, ``delta = acc_b - acc_a`` in percentage points. Groups are
        ``"by_annotation/<name>"``, ``"by_answer_type"`` and ``"by_n_options"``; order follows A.
    """
    b_flat = _flatten(b_breakdowns)
    out = []
    for (group, value), a_cell in _flatten(a_breakdowns).items():
        b_cell = b_flat.get((group, value))
        if b_cell is None:
            continue
        out.append({
            "group": group, "value": value,
            "n_a": a_cell["n"], "acc_a": a_cell["accuracy"],
            "n_b": b_cell["n"], "acc_b": b_cell["accuracy"],
            "delta": b_cell["accuracy"] - a_cell["accuracy"],
        })
    return out


def _example(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": a["id"], "question": a.get("question", ""), "options": a.get("options") or {},
        "answer": a.get("answer", ""),
        "a": {"output": a.get("output", ""), "parsed": a.get("parsed") or ""},
        "b": {"output": b.get("output", ""), "parsed": b.get("parsed") or ""},
    }


def pick_examples(pairs: list[tuple[dict, dict]], k: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Questions B fixed ("wins") and questions B broke ("losses"), for before/after reading.

    Both directions are shown so the sample is not cherry-picked; the first ``k`` of each by id
    are taken, so reruns and reviewers see the same questions.

    Args:
        pairs: ``(a_row, b_row)`` pairs from ``pair_rows``.
        k: Most examples of each kind.

    Returns:
        ``{"wins": [example, ...], "losses": [example, ...]}``, each example
        ``{"id", "question", "options", "answer", "a": {"output", "parsed"},
        "b": {"output", "parsed"}}``.
    """
    ordered = sorted(pairs, key=lambda pair: str(pair[0]["id"]))
    wins = [_example(a, b) for a, b in ordered if not a.get("correct") and b.get("correct")]
    losses = [_example(a, b) for a, b in ordered if a.get("correct") and not b.get("correct")]
    return {"wins": wins[:k], "losses": losses[:k]}


# ---------------------------------------------------------------------------------------------
# compare_runs and its Markdown


def _fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3g}"


def _questions(n: int) -> str:
    return f"{n} question" + ("" if n == 1 else "s")


def _reading(test: dict[str, Any], label_a: str, label_b: str) -> str:
    """One sentence a reader can quote: what changed, in which direction, how surprising."""
    n = test["n"]
    acc_a = 100 * (test["both"] + test["a_only"]) / n if n else 0.0
    acc_b = 100 * (test["both"] + test["b_only"]) / n if n else 0.0
    return (
        f"{label_b} fixes {_questions(test['b_only'])} {label_a} got wrong and breaks "
        f"{test['a_only']} it got right; p {_fmt_p(test['p_value'])} (exact McNemar); "
        f"accuracy on the {_questions(n)} both runs scored (matched by id; no answer counts as wrong): "
        f"{acc_a:.2f} → {acc_b:.2f}."
    )


def _load_scored(ev: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(ev["dir"]) / "scored.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{ev['dir']}: no scored.jsonl (run `medtune evaluate` first)")
    return read_jsonl(path)


def _compare_pair(a_ev: dict[str, Any], b_ev: dict[str, Any], examples: int) -> dict[str, Any]:
    a_rows, b_rows = _load_scored(a_ev), _load_scored(b_ev)
    pairs = pair_rows(a_rows, b_rows)
    a_ids = {str(r["id"]) for r in a_rows}
    b_ids = {str(r["id"]) for r in b_rows}
    test = mcnemar([bool(a.get("correct")) for a, _ in pairs], [bool(b.get("correct")) for _, b in pairs])
    # Breakdowns on the paired rows only, so both sides of every delta cover the same questions.
    deltas = category_deltas(
        accuracy_breakdowns([a for a, _ in pairs]), accuracy_breakdowns([b for _, b in pairs])
    )
    return {
        "a": a_ev["label"], "b": b_ev["label"],
        "n_paired": len(pairs),
        "n_unmatched_a": len(a_ids - b_ids), "n_unmatched_b": len(b_ids - a_ids),
        "mcnemar": test,
        "reading": _reading(test, a_ev["label"], b_ev["label"]) if pairs else "no question in common",
        "category_deltas": deltas,
        "examples": pick_examples(pairs, examples),
    }


def _cell(text: Any) -> str:
    # Keep labels from breaking the Markdown table.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _oneline(text: str, limit: int = _OUTPUT_CHARS) -> str:
    text = str(text).strip().replace("\n", " ⏎ ")
    return text if len(text) <= limit else text[:limit] + "…"


def _example_md(ex: dict[str, Any], label_a: str, label_b: str) -> list[str]:
    options = "；".join(f"{key}. {text}" for key, text in ex["options"].items())
    return [
        f"- **{ex['id']}** {_oneline(ex['question'])}  ",
        f"  {options}  ",
        f"  gold `{ex['answer']}`  ",
        f"  before ({label_a}): parsed `{ex['a']['parsed'] or '—'}`; output: {_oneline(ex['a']['output'])}  ",
        f"  after ({label_b}): parsed `{ex['b']['parsed'] or '—'}`; output: {_oneline(ex['b']['output'])}",
    ]


def _pair_md(cmp: dict[str, Any]) -> list[str]:
    a, b, test = cmp["a"], cmp["b"], cmp["mcnemar"]
    lines = [
        f"## {b} vs {a} (baseline)",
        "",
        f"Paired questions: {cmp['n_paired']} (only in {a}: {cmp['n_unmatched_a']}, "
        f"only in {b}: {cmp['n_unmatched_b']}; unmatched questions are left out of everything below).",
        "",
        cmp["reading"],
        "",
        f"| both right | only {_cell(a)} right | only {_cell(b)} right | both wrong | p (exact) | χ² (cc) |",
        "|---|---|---|---|---|---|",
        f"| {test['both']} | {test['a_only']} | {test['b_only']} | {test['neither']} | "
        f"{test['p_value']:.4g} | {test['chi2_cc']:.3f} |",
    ]
    if cmp["category_deltas"]:
        lines += [
            "",
            "### Accuracy by category",
            "",
            "Same paired questions on both sides. Cells with few questions are noisy: read Δ with n.",
            "",
            f"| group | value | n | {_cell(a)} | {_cell(b)} | Δ |",
            "|---|---|---|---|---|---|",
        ]
        for d in cmp["category_deltas"]:
            n = d["n_a"] if d["n_a"] == d["n_b"] else f"{d['n_a']} / {d['n_b']}"
            lines.append(
                f"| {_cell(d['group'])} | {_cell(d['value'])} | {n} | {d['acc_a']:.2f} | "
                f"{d['acc_b']:.2f} | {d['delta']:+.2f} |"
            )
    for kind, title, total in (
        ("wins", f"fixed by {b} ({a} wrong, {b} right)", test["b_only"]),
        ("losses", f"broken by {b} ({a} right, {b} wrong)", test["a_only"]),
    ):
        shown = cmp["examples"][kind]
        if not shown:
            continue
        lines += ["", f"### Questions {title}: {len(shown)} of {total}", ""]
        for ex in shown:
            lines += _example_md(ex, a, b)
    return lines


def compare_runs(
    eval_dirs: list[str | Path],
    out_dir: str | Path,
    labels: list[str] | None = None,
    examples: int = 6,
) -> dict[str, Any]:
    """Compare evaluation directories; write ``comparison.json`` and ``comparison.md``.

    The first directory is the baseline A; every other run B is compared with it on the
    questions both runs scored (matched by id): McNemar's test, accuracy change per category,
    and before/after answers for questions B fixed and broke.

    Args:
        eval_dirs: Evaluation directories, each with ``results.json`` (and ``scored.jsonl`` when
            there are two or more runs).
        out_dir: Where to write ``comparison.json`` and ``comparison.md``.
        labels: Display names, one per directory; default the ``label`` in ``results.json``,
            else the directory name.
        examples: Most wins and most losses shown per comparison.

    Returns:
        ``{"runs": [{"label", "dir", "results"}], "baseline": label | None,
        "comparisons": [{"a", "b", "n_paired", "n_unmatched_a", "n_unmatched_b", "mcnemar",
        "reading", "category_deltas", "examples"}]}`` — the content of ``comparison.json``.

    Raises:
        ValueError: If no directory is given or ``labels`` has the wrong length.
        FileNotFoundError: If a directory lacks ``results.json``, or ``scored.jsonl`` when needed.
    """
    if not eval_dirs:
        raise ValueError("compare_runs needs at least one evaluation directory")
    if labels is not None and len(labels) != len(eval_dirs):
        raise ValueError(f"{len(labels)} labels for {len(eval_dirs)} evaluation directories")
    evals = [load_eval(d) for d in eval_dirs]
    if labels is not None:
        evals = [{**ev, "label": label} for ev, label in zip(evals, labels, strict=True)]
    comparisons = [_compare_pair(evals[0], ev, examples) for ev in evals[1:]]
    comparison = {
        "runs": [{"label": ev["label"], "dir": str(ev["dir"]), "results": ev["results"]} for ev in evals],
        "baseline": evals[0]["label"] if comparisons else None,
        "comparisons": comparisons,
    }

    parts = [
        "# medtune run comparison",
        "",
        "Metrics as in METRICS.md (all × 100). Paper rows are on the CMExam test split (6,811 "
        "questions); compare with care when the data differ.",
        "",
        results_table(evals),
    ]
    if comparisons:
        parts += [
            "",
            f"Baseline: **{evals[0]['label']}**. McNemar's test counts only the questions the two runs "
            "disagree on; the p-value is the exact two-sided binomial one.",
        ]
    for cmp in comparisons:
        parts += ["", *_pair_md(cmp)]

    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "comparison.json", comparison)
    atomic_write_text(out_dir / "comparison.md", "\n".join(parts) + "\n")
    return comparison
