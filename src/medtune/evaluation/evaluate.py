"""predictions.jsonl → scored.jsonl + results.json, with the CMExam metrics (METRICS.md)."""

from __future__ import annotations

import logging
import re
from functools import cache
from pathlib import Path
from typing import Any

from medtune.evaluation.breakdowns import accuracy_breakdowns, confusion_matrix, letter_distribution
from medtune.evaluation.extract import parse_strict, read_answer, strict_explanation
from medtune.evaluation.metrics import TOKENIZER_LABELS, answer_scores, explanation_scores
from medtune.io import DataFileError, atomic_write_json, iter_jsonl, write_jsonl
from medtune.records import ExamRecord, normalise_letters
from medtune.templates import ExamTemplate, TemplateError, get_template

log = logging.getLogger(__name__)

PARSERS = ("robust", "strict")


@cache
def _template(name: str) -> ExamTemplate | None:
    try:
        return get_template(name)
    except TemplateError:
        return None


def score_item(row: dict[str, Any], parser: str, template: ExamTemplate | None) -> dict[str, Any]:
    """Parse one prediction: chosen letters, the explanation text that will be scored, ambiguity.

    ``robust``: :func:`medtune.evaluation.extract.read_answer` with the template's markers (the
    same reader the chat helpers and the RL reward use); without a template (predictions from
    elsewhere) the whole output is read and the explanation falls back to the usual markers.
    ``strict``: the CMExam paper's answer parser and explanation extraction, both on the raw
    output whatever the template, bugs included; it never flags ambiguity.

    Args:
        row: A predictions row with ``output``, ``options`` and the (normalised) gold ``answer``.
        parser: ``"robust"`` or ``"strict"``.
        template: The template the output was generated with, or ``None`` when unknown.

    Returns:
        The row plus ``parsed``, ``correct``, ``explanation_scored`` and ``ambiguous``.
    """
    output, options = row["output"], row["options"]
    if parser == "strict":
        # The paper's code reads the raw output for both halves; "" is its empty cell → 无答案.
        parsed, explanation, ambiguous = parse_strict(output, options), strict_explanation(output), False
    else:
        if template is not None:
            reading = read_answer(output, options, template.answer_marker, template.explanation_marker)
        else:
            reading = read_answer(output, options, fallback_explanation=True)
        parsed, explanation, ambiguous = reading.letters, reading.explanation, reading.ambiguous
    return {**row, "parsed": parsed, "correct": parsed == row["answer"], "explanation_scored": explanation,
            "ambiguous": ambiguous}


def evaluate(
    predictions: str | Path,
    out_dir: str | Path,
    parser: str = "robust",
    template: str | Path | None = None,
    tokenizer: str = "char",
    rows: list[tuple[int, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Score a predictions file; write ``scored.jsonl`` and ``results.json`` to ``out_dir``.

    Rows without a gold answer are not scorable: they are excluded and counted. Rows without a
    reference explanation are excluded from the explanation metrics only, and counted.

    ``rows``: the file's ``(line, row)`` pairs when the caller has read them already (the CLI
    reads the file once to tell exam predictions from conversations); they are checked here as
    :func:`read_prediction_rows` checks them, and the file is not parsed a second time.
    """
    if parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}; expected one of {PARSERS}")
    forced = get_template(template) if template else None
    if rows is None:
        rows = read_prediction_rows(predictions)
    else:
        check_prediction_rows(predictions, rows)
    scored, unscorable, templates_seen = [], [], set()
    for lineno, row in rows:
        gold = gold_letters(predictions, lineno, row)
        if not gold:
            unscorable.append({"id": row["id"], "reason": "no gold answer"})
            continue
        row = {**row, "answer": gold}
        tpl = forced or (_template(row["template"]) if row.get("template") else None)
        templates_seen.add(tpl.name if tpl else "(none: fallback markers)")
        scored.append(score_item(row, parser, tpl))
    if not scored:
        raise DataFileError(predictions, None, "answer", "no row has a gold answer; nothing to evaluate")

    results = summarise(scored, unscorable, tokenizer=tokenizer)
    results.update(
        mode="generate",
        parser=parser,
        templates=sorted(templates_seen),
        predictions=str(predictions),
    )
    write_outputs(out_dir, results, scored, unscorable)
    return results


_TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx", ".xls")


def read_prediction_rows(path: str | Path, required: tuple[str, ...] = ("id", "options", "output"),
                         ) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` of a predictions file, each checked; anything that would score wrong is refused.

    A row is scored once: repeated ids (a file written twice, or two files concatenated) would
    count one question several times, so they are an error naming the lines. So are lines from
    different producers (their ``source`` keys differ; see ``medtune.inference.predict``), an
    ``output`` that is not text (null, NaN, a number), options that are not letter → text, and
    a spreadsheet given instead of the JSON lines ``medtune predict`` writes.

    Raises:
        DataFileError: Naming the file, the line and the field.
    """
    if Path(path).suffix.lower() in _TABLE_SUFFIXES:
        raise DataFileError(path, None, None, f"a {Path(path).suffix} file; evaluate reads the predictions .jsonl "
                            "that medtune predict writes (one JSON object per line with id, options, output)")
    rows = list(iter_jsonl(path))
    check_prediction_rows(path, rows, required)
    return rows


def check_prediction_rows(path: str | Path, rows: list[tuple[int, dict[str, Any]]],
                          required: tuple[str, ...] = ("id", "options", "output")) -> None:
    """The checks of :func:`read_prediction_rows` on rows read from ``path``.

    Raises:
        DataFileError: Naming the file, the line and the field.
    """
    lines_of: dict[str, list[int]] = {}
    for lineno, row in rows:
        for key in required:
            if key not in row:
                raise DataFileError(path, lineno, key, "missing")
        if not isinstance(row["output"], str):
            shown = "null" if row["output"] is None else repr(row["output"])
            raise DataFileError(path, lineno, "output", f"expected the model's output as text, got {shown} "
                                "(an empty output is \"\")")
        if "options" in required and not (isinstance(row["options"], dict) and row["options"] and all(
                isinstance(k, str) and isinstance(v, str) for k, v in row["options"].items())):
            raise DataFileError(path, lineno, "options", "expected an object mapping option letter to text")
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise DataFileError(path, lineno, "id", f"expected a string id, got {row['id']!r}")
        lines_of.setdefault(str(row["id"]), []).append(lineno)
    repeated = {i: lines for i, lines in lines_of.items() if len(lines) > 1}
    if repeated:
        shown = "; ".join(f"{i!r} on lines {', '.join(map(str, lines))}" for i, lines in list(repeated.items())[:3])
        more = f" (and {len(repeated) - 3} more)" if len(repeated) > 3 else ""
        raise DataFileError(path, None, "id", f"{len(repeated)} id(s) occur more than once: {shown}{more}; each "
                            "question must be scored once (was the file written twice, or two files joined?)")
    producers: dict[Any, int] = {}
    for lineno, row in rows:
        producers.setdefault(row.get("source"), lineno)
    if len(producers) > 1:
        firsts = ", ".join(f"line {line}" for line in producers.values())
        raise DataFileError(path, None, "source", f"the lines come from {len(producers)} different producers "
                            f"(first lines of each: {firsts}); score each model's predictions separately")


def gold_letters(path: str | Path, lineno: int, row: dict[str, Any]) -> str:
    """The row's gold answer as letters in option order; ``""`` when it has none.

    A gold letter that is not one of the row's options is an error, not silently dropped.
    """
    answer = row.get("answer")
    if answer is None:
        return ""
    if not isinstance(answer, str):
        raise DataFileError(path, lineno, "answer", f"expected the gold letters as text (e.g. \"AC\"), got {answer!r}")
    letters = re.sub(r"[\s,，、;；/|+&]+", "", answer).upper()  # "A, C" and "A、C" are AC
    unknown = sorted(set(letters) - set(row["options"]))
    if unknown:
        raise DataFileError(path, lineno, "answer", f"gold answer {answer!r} has letter(s) {''.join(unknown)} that are "
                            f"not among the options {''.join(row['options'])}")
    return normalise_letters(letters, row["options"])


def summarise(scored: list[dict[str, Any]], unscorable: list[dict[str, Any]], tokenizer: str | None) -> dict[str, Any]:
    """Answer metrics, explanation metrics (when ``tokenizer`` is given) and breakdowns.

    ``n_ambiguous`` counts scored rows flagged ``ambiguous`` by the robust reader (rows without
    the flag, e.g. strict or log-likelihood rows, count as not ambiguous).
    """
    answers = answer_scores([r["answer"] for r in scored], [r["parsed"] for r in scored])
    results: dict[str, Any] = {k: answers[k] for k in ("accuracy", "f1")}
    if tokenizer is not None and any(str(r.get("explanation") or "").strip() for r in scored):
        explanations = explanation_scores(
            [r["explanation_scored"] for r in scored], [str(r.get("explanation") or "") for r in scored], tokenizer
        )
    else:
        explanations = {"n_explanations_scored": 0, "n_explanations_excluded": len(scored)}
    results.update({k: explanations.get(k) for k in ("bleu_1", "bleu_4", "rouge_1", "rouge_2", "rouge_l")})
    results.update(
        n=answers["n"],
        n_no_answer=answers["n_no_answer"],
        n_ambiguous=sum(bool(r.get("ambiguous")) for r in scored),
        # predictions whose prompt + new tokens did not fit the model's context (see predict)
        n_over_context=sum(bool(r.get("over_context")) for r in scored),
        n_explanations_scored=explanations["n_explanations_scored"],
        n_explanations_excluded=explanations["n_explanations_excluded"],
        n_unscorable=len(unscorable),
        accuracy_single=answers["accuracy_single"],
        n_single=answers["n_single"],
        accuracy_multi=answers["accuracy_multi"],
        n_multi=answers["n_multi"],
        tokenizer=TOKENIZER_LABELS[tokenizer] if tokenizer else None,
        breakdowns=accuracy_breakdowns(scored),
        confusion=confusion_matrix(scored),
        letter_distribution=letter_distribution(scored),
    )
    return results


def write_outputs(out_dir: str | Path, results: dict[str, Any], scored: list[dict[str, Any]],
                  unscorable: list[dict[str, Any]]) -> None:
    """``scored.jsonl``, ``unscorable.jsonl`` (when any) and ``results.json``, each atomically."""
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "scored.jsonl", scored)
    if unscorable:
        write_jsonl(out_dir / "unscorable.jsonl", unscorable)
    atomic_write_json(out_dir / "results.json", results)


def evaluate_loglik(
    records: list[ExamRecord],
    backend: Any,
    tokenizer: Any,
    template: ExamTemplate,
    out_dir: str | Path,
    choices: str = "letters",
    batch_size: int = 16,
    source: str = "",
) -> dict[str, Any]:
    """Log-likelihood evaluation (no generation); same output files as ``evaluate``.

    ``backend`` is any backend with ``loglikelihood`` (transformers, vLLM, the fake one).
    """
    from medtune.evaluation.loglik import MULTI_METHOD, build_requests, pick

    requests, cand_lists = build_requests(records, template, tokenizer, choices)
    scores = backend.loglikelihood(requests, batch_size=batch_size)
    picks = pick(records, cand_lists, scores, choices)
    scored = [
        {**rec.to_dict(), "template": template.name, **p, "correct": p["parsed"] == rec.answer,
         "correct_norm": p["parsed_norm"] == rec.answer}
        for rec, p in zip(records, picks, strict=True)
    ]
    results = summarise(scored, [], tokenizer=None)
    norm = answer_scores([r["answer"] for r in scored], [r["parsed_norm"] for r in scored])
    results.update(
        acc_norm=norm["accuracy"],
        acc_norm_single=norm["accuracy_single"],
        acc_norm_multi=norm["accuracy_multi"],
        mode="loglik",
        parser=f"loglik ({choices})",
        choices=choices,
        multi_answer_method=MULTI_METHOD,
        templates=[template.name],
        predictions=source,
    )
    write_outputs(out_dir, results, scored, [])
    return results
