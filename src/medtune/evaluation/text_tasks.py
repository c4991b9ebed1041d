"""Evaluation of prompt→reply predictions: PromptCBLUE, free text (summaries), question generation.

Input is what ``medtune predict`` writes for conversations: one line per item with ``id``,
``messages``, ``reference`` (the gold reply), ``meta`` and ``output``. PromptCBLUE can also be
scored against the official structured gold (:func:`evaluate_promptcblue_gold`), from medtune's
rows or from the official submission shape (``sample_id`` and the model's text in ``target``).

Tokenisation of ROUGE (free text and question generation)
---------------------------------------------------------
ROUGE counts shared units, so the unit decides what a score means. Characters suit Chinese, where
a character carries meaning, and are the CMExam definition; on English they are meaningless: two
unrelated English sentences share most of their letters (an unrelated sentence scores ROUGE-1
around 78). So the unit follows the language:

=========  ========================================================================================
``char``   characters, ``" ".join(text).split(" ")`` (the CMExam definition); default for Chinese
``word``   words: NFKC, lower-cased, runs of letters and digits, each CJK character its own token,
           punctuation dropped; default for space-delimited languages (English)
``jieba``  jieba's words (``jieba.lcut``), whitespace dropped; an option for Chinese
=========  ========================================================================================

The language is ``--lang`` when given, else detected from the references (:func:`detect_lang`).
Every unit uses the same ROUGE formulas (``medtune.evaluation.metrics``: n-gram sets, the CMExam
ROUGE-L), so only the unit changes; ``char`` gives exactly the numbers of earlier releases. The
unit is stored in ``results.json`` (``tokenization``, ``tokenizer``) and printed with the scores,
and a baseline scored with another unit is refused, since such a Δ would compare nothing.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medtune.io import DataFileError, atomic_write_json, iter_jsonl, write_jsonl

TASKS = ("promptcblue", "text", "question-generation")
LANGS = ("zh", "en")
TOKENIZATIONS = ("char", "word", "jieba")
#: What each tokenisation is, as results.json and the printed table state it.
TOKENIZATION_LABELS = {
    "char": 'characters (ROUGE: " ".join(chars).split(" "))',
    "word": "words (NFKC, lower-cased runs of letters/digits, each CJK character a token, punctuation dropped)",
    "jieba": "jieba words (jieba.lcut, whitespace dropped)",
}
PROMPTCBLUE_TOKENIZER = "BERT BasicTokenizer tokens (ROUGE-L of MedDG and IMCS-V2-MRG: CJK characters, lower-cased words)"

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\U00030000-\U0003134f"
_WORD = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
# Private-use code points stand for word tokens when the character-level ROUGE scores them.
_PRIVATE_USE = [*range(0xF0000, 0xFFFFE), *range(0x100000, 0x10FFFE)]


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


# ---- tokenisation ---------------------------------------------------------------------------------


def detect_lang(texts: Iterable[str]) -> str:
    """``zh`` when the texts hold at least as many CJK characters as Latin words, else ``en``.

    Counting Latin *words* against CJK *characters* keeps a Chinese text with a few drug names
    Chinese, and an English text with a Chinese name English.

    Args:
        texts: Texts of one language (the references).

    Returns:
        ``"zh"`` or ``"en"`` (``"zh"`` when there is no text at all: the project's default).
    """
    cjk = latin = 0
    for text in texts:
        cjk += len(_CJK_CHAR.findall(text))
        latin += len(_LATIN_WORD.findall(text))
    return "zh" if cjk >= latin else "en"


def default_tokenization(lang: str) -> str:
    """``char`` for Chinese, ``word`` for English (and any other space-delimited language)."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected one of {LANGS}")
    return "char" if lang == "zh" else "word"


def tokenize(text: str, tokenization: str) -> list[str]:
    """The ROUGE units of ``text`` under ``tokenization`` (see the module docstring).

    Args:
        text: Any text.
        tokenization: ``char``, ``word`` or ``jieba``.

    Returns:
        The tokens, in order.
    """
    if tokenization == "char":
        return " ".join(text).split(" ") if text else []
    if tokenization == "word":
        return _WORD.findall(unicodedata.normalize("NFKC", text).lower())
    if tokenization == "jieba":
        import jieba

        return [t for t in jieba.lcut(text) if t.strip()]
    raise ValueError(f"unknown tokenization {tokenization!r}; expected one of {TOKENIZATIONS}")


def _as_characters(hyp: list[str], ref: list[str]) -> tuple[str, str]:
    """Both token lists as strings of one private-use character per distinct token.

    ``medtune.evaluation.metrics`` scores characters; giving each token its own character lets it
    score tokens with exactly the same formulas (and its fast LCS). ROUGE compares a hypothesis
    with its own reference only, so the mapping is made per pair.
    """
    codes: dict[str, str] = {}
    for token in (*ref, *hyp):
        if token not in codes:
            if len(codes) == len(_PRIVATE_USE):
                raise ValueError(f"a pair has more than {len(_PRIVATE_USE)} distinct tokens")
            codes[token] = chr(_PRIVATE_USE[len(codes)])
    return "".join(codes[t] for t in hyp), "".join(codes[t] for t in ref)


def text_scores(outputs: list[str], references: list[str], tokenization: str = "char") -> dict[str, Any]:
    """ROUGE-1/2/L (× 100) over ``tokenization`` units, as METRICS.md defines them, mean over pairs.

    A pair whose reference has no unit at all (e.g. only punctuation, under ``word``) cannot be
    scored; it is left out and counted (``n_reference_without_tokens``).

    Args:
        outputs: Model outputs.
        references: Gold texts, non-blank, same order.
        tokenization: ``char`` (default: the CMExam definition), ``word`` or ``jieba``.

    Returns:
        ``{"rouge_1", "rouge_2", "rouge_l", "n_reference_without_tokens"}``.

    Raises:
        ValueError: Lengths differ, or no pair is left to score.
    """
    from medtune.evaluation.metrics import rouge_l, rouge_n

    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    if tokenization == "char":
        hyps, refs, empty = list(outputs), list(references), 0
    else:
        pairs = [_as_characters(tokenize(o, tokenization), tokenize(r, tokenization))
                 for o, r in zip(outputs, references, strict=True)]
        kept = [(h, r) for h, r in pairs if r]
        hyps, refs, empty = [h for h, _ in kept], [r for _, r in kept], len(pairs) - len(kept)
    if not refs:
        raise ValueError(f"no pair to score: none of the {len(references)} references has a {tokenization} token")
    return {
        "rouge_1": rouge_n(hyps, refs, 1),
        "rouge_2": rouge_n(hyps, refs, 2),
        "rouge_l": rouge_l(hyps, refs),
        "n_reference_without_tokens": empty,
    }


def choose_tokenization(references: list[str], lang: str = "auto",
                        tokenization: str | None = None) -> dict[str, str]:
    """The language and ROUGE unit for these references: what was asked, else detected.

    Returns:
        ``{"lang", "lang_source" ("--lang" or "detected"), "tokenization", "tokenizer" (its label)}``.
    """
    if lang == "auto":
        lang, lang_source = detect_lang(references), "detected"
    else:
        default_tokenization(lang)  # validates
        lang_source = "--lang"
    tokenization = tokenization or default_tokenization(lang)
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"unknown tokenization {tokenization!r}; expected one of {TOKENIZATIONS}")
    return {"lang": lang, "lang_source": lang_source, "tokenization": tokenization,
            "tokenizer": TOKENIZATION_LABELS[tokenization]}


def evaluate_question_generation(
    outputs: list[str], references: list[str], lang: str, n_questions: int | None = None,
    tokenization: str | None = None,
) -> dict[str, Any]:
    """Score generated question sets against reference outputs.

    Every output is scored, well-formed or not: a base model that never writes the format gets
    ``well_formed`` 0, ``answer_valid`` None (a share of nothing) and its ROUGE-L.

    Args:
        outputs: Model outputs, one per passage.
        references: The reference outputs (``medtune.data.exam_xlsx.format_output`` text), same order.
        lang: ``"zh"`` or ``"en"``.
        n_questions: Questions an output must have to be well-formed; default: as many as its
            reference has (4 when the reference has none that parse).
        tokenization: ROUGE unit (``char``, ``word``, ``jieba``; see the module docstring);
            default characters for ``zh``, words for ``en`` (on English, characters make
            unrelated texts look alike).

    Returns:
        ``{"n", "well_formed", "n_well_formed", "answer_valid", "rouge_l", "lang", "tokenization",
        "tokenizer", "per_output"}``: ``well_formed`` is the share (× 100) of outputs with the
        expected number of questions, each with a stem, exactly the options A-D and one answer
        letter; ``answer_valid`` the share (× 100) of well-formed outputs whose every answer is
        one of A-D and names a non-empty option (``None`` when no output is well-formed);
        ``rouge_l`` the mean ROUGE-L × 100 (``medtune.evaluation.metrics.rouge_l``'s formula)
        against the references over ``tokenization`` units (``tokenizer`` describes them);
        ``per_output`` one diagnostics dict per output
        (``medtune.data.exam_xlsx.GeneratedParse.to_dict`` plus ``expected_questions``).

    Raises:
        ValueError: Unknown ``lang`` or ``tokenization``, lengths differ, no outputs, or an
            empty reference.
    """
    # The question parser belongs to the data format; imported here so that loading the text
    # metrics does not load openpyxl.
    from medtune.data.exam_xlsx import parse_generated

    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    if not outputs:
        raise ValueError("no outputs to evaluate")
    if any(not str(r or "").strip() for r in references):
        raise ValueError("empty reference: exclude such rows before scoring")
    unit = tokenization or default_tokenization(lang)
    if unit not in TOKENIZATION_LABELS:
        raise ValueError(f"unknown tokenization {unit!r}; expected one of {list(TOKENIZATION_LABELS)}")
    per_output = []
    for output, reference in zip(outputs, references, strict=True):
        expected = n_questions or len(parse_generated(reference, lang).questions) or 4
        # None (a failed generation) is an empty output: it is scored, never a crash
        details = parse_generated(output or "", lang).to_dict(expected)
        details["expected_questions"] = expected
        per_output.append(details)
    n_well = sum(1 for d in per_output if d["well_formed"])
    n_valid = sum(1 for d in per_output if d["answer_valid"])
    rouge = text_scores([o or "" for o in outputs], list(references), unit)
    return {
        "n": len(outputs),
        "well_formed": 100.0 * n_well / len(outputs),
        "n_well_formed": n_well,
        "answer_valid": 100.0 * n_valid / n_well if n_well else None,
        "rouge_l": rouge["rouge_l"],
        "lang": lang,
        "tokenization": unit,
        "tokenizer": TOKENIZATION_LABELS[unit],
        "per_output": per_output,
    }


# ---- evaluation -----------------------------------------------------------------------------------


def evaluate_text(predictions: str | Path, out_dir: str | Path, task: str = "auto",
                  baseline: str | Path | None = None, lang: str = "auto",
                  tokenization: str | None = None) -> dict[str, Any]:
    """Score a conversation-predictions file; write ``results.json`` (and ``scored.jsonl``).

    Args:
        predictions: The predictions JSON lines.
        out_dir: Evaluation directory.
        task: ``auto`` (from the rows' metadata) or one of :data:`TASKS`.
        baseline: Another evaluation directory of the same task (e.g. the base model's); its
            scores are reported beside these with the difference.
        lang: Text and question generation: ``zh``, ``en`` or ``auto`` (detected from the
            references; question generation uses its rows' ``meta.lang``).
        tokenization: ROUGE unit (``char``, ``word``, ``jieba``); default by language.

    Returns:
        The results written to ``results.json``.
    """
    from medtune.evaluation.evaluate import read_prediction_rows

    # the same checks as exam predictions: text outputs, each id once, one producer
    rows = [row for _, row in read_prediction_rows(predictions, required=("id", "output"))]
    if not rows:
        raise DataFileError(predictions, None, None, "no predictions")
    task = detect_task(rows) if task == "auto" else task
    if task == "promptcblue" and tokenization is not None:
        raise ValueError("PromptCBLUE's ROUGE uses the official tokenisation (BasicTokenizer); "
                         "leave --tokenizer out")
    scorable = [r for r in rows if str(r.get("reference") or "").strip()]
    if not scorable:  # e.g. predictions for a test split, whose answers are not published
        hint = (" (a test split?); score the official submission against the structured gold with "
                "--task promptcblue --gold FILE" if task == "promptcblue" else " (a test split?)")
        raise DataFileError(predictions, None, "reference",
                            f"none of the {len(rows)} rows has a reference text to score against{hint}")
    results: dict[str, Any] = {"task": task, "predictions": str(predictions), "n": len(scorable),
                               "n_without_reference": len(rows) - len(scorable)}
    if task == "promptcblue":
        from medtune.evaluation.promptcblue import score

        results.update(score(scorable))
        results["tokenizer"] = PROMPTCBLUE_TOKENIZER
    elif task == "text":
        references = [r["reference"] for r in scorable]
        if lang == "auto" and tokenization is None:
            _refuse_mixed_languages(predictions, [detect_lang([ref]) for ref in references], "detected from the references")
        unit = choose_tokenization(references, lang, tokenization)
        results.update(unit)
        results.update(text_scores([str(r["output"]) for r in scorable], references, unit["tokenization"]))
    elif task == "question-generation":
        if lang == "auto":  # each row's meta.lang decides its format and ROUGE unit: one per file
            _refuse_mixed_languages(predictions, [(r.get("meta") or {}).get("lang", "zh") for r in scorable],
                                    "meta.lang")
        row_lang = (scorable[0].get("meta") or {}).get("lang", "zh") if scorable else "zh"
        qg_lang = row_lang if lang == "auto" else lang
        qg = evaluate_question_generation([str(r["output"]) for r in scorable],
                                          [r["reference"] for r in scorable], qg_lang, tokenization=tokenization)
        results.update({k: v for k, v in qg.items() if not isinstance(v, list)})
        results["lang_source"] = "meta.lang" if lang == "auto" else "--lang"
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if baseline is not None:
        _add_baseline(results, baseline)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "scored.jsonl", rows)
    atomic_write_json(out_dir / "results.json", results)
    return results


def _refuse_mixed_languages(predictions: str | Path, langs: list[str], source: str) -> None:
    """Refuse a file whose rows are in several languages: one ROUGE unit would be wrong for some rows.

    Scoring took the first row's language for all of them, so the same rows scored 11.85 (char) in
    one order and 6.48 (word) in the other.
    """
    counts = Counter(langs)
    if len(counts) > 1:
        found = " and ".join(f"{n} rows in {lang}" for lang, n in sorted(counts.items()))
        raise DataFileError(predictions, None, None,
                            f"{found} ({source}): a ROUGE unit fits one language (characters for zh, words for en); "
                            "evaluate each language's rows separately, or pass --lang or --tokenizer to score all "
                            "rows on one unit")


def read_submission_rows(path: str | Path) -> list[dict[str, Any]]:
    """Prediction rows for scoring against a structured gold: JSON lines, or one JSON array.

    Accepts medtune's prediction rows and the official submission shape (``sample_id`` and the
    model's text in ``target``). Rows from two producers (different ``source`` keys) are refused,
    as for any prediction file.

    Raises:
        DataFileError: Not JSON lines / a JSON array of objects, or mixed producers (naming lines).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFileError(path, exc.lineno, None, f"invalid JSON array: {exc.msg}") from None
        bad = next((i for i, item in enumerate(items, start=1) if not isinstance(item, dict)), None)
        if bad is not None:
            raise DataFileError(path, bad, None, "expected a JSON object per array element")
        numbered = list(enumerate(items, start=1))
    else:
        numbered = list(iter_jsonl(path))
    producers: dict[Any, int] = {}
    for lineno, row in numbered:
        producers.setdefault(row.get("source"), lineno)
    if len(producers) > 1:
        firsts = ", ".join(f"line {line}" for line in producers.values())
        raise DataFileError(path, None, "source", f"the lines come from {len(producers)} different producers "
                            f"(first lines of each: {firsts}); score each model's predictions separately")
    return [row for _, row in numbered]


def evaluate_promptcblue_gold(predictions: str | Path, gold: str | Path, out_dir: str | Path,
                              baseline: str | Path | None = None) -> dict[str, Any]:
    """Score PromptCBLUE predictions against the official structured gold; write results.

    Ids that do not pair up are reported, counted and named, in ``results.json``
    (``missing_predictions``: gold ids without a prediction, scored as empty outputs;
    ``not_in_gold``: prediction ids the gold lacks, not scored).

    Args:
        predictions: medtune prediction rows or official submission rows (see
            :func:`read_submission_rows`).
        gold: The structured gold JSON (``{task: [{"sample_id", "answer"}]}``, e.g.
            ``dev_structured.json``).
        out_dir: Evaluation directory (``results.json``, ``scored.jsonl``).
        baseline: Another PromptCBLUE evaluation directory, shown beside with Δ.

    Returns:
        The results written.

    Raises:
        DataFileError: Unreadable predictions or gold.
        ValueError: No prediction pairs with the gold (both sides counted, with examples).
    """
    from medtune.evaluation.promptcblue import score_against_structured

    rows = read_submission_rows(predictions)
    if not rows:
        raise DataFileError(predictions, None, None, "no predictions")
    try:
        structured = json.loads(Path(gold).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataFileError(gold, exc.lineno, None, f"invalid JSON: {exc.msg}") from None
    if not (isinstance(structured, dict) and all(isinstance(v, list) for v in structured.values())):
        raise DataFileError(gold, None, None, "expected the structured gold: an object mapping each task name to a "
                            "list of {sample_id, answer} (e.g. dev_structured.json)")
    results: dict[str, Any] = {"task": "promptcblue", "predictions": str(predictions), "gold": str(gold),
                               "n_predictions": len(rows)}
    results.update(score_against_structured(rows, structured))
    results["tokenizer"] = PROMPTCBLUE_TOKENIZER
    if baseline is not None:
        _add_baseline(results, baseline)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "scored.jsonl", rows)
    atomic_write_json(out_dir / "results.json", results)
    return results


def _tokenization_of(results: dict[str, Any]) -> str | None:
    """The ROUGE unit an evaluation used, also for results.json written before it was stored."""
    if results.get("tokenization"):
        return results["tokenization"]
    if results.get("task") == "text" and str(results.get("tokenizer", "")).startswith("characters"):
        return "char"
    if results.get("task") == "question-generation":
        return "char"  # before tokenisations existed, question generation scored characters
    return None


def _add_baseline(results: dict[str, Any], baseline: str | Path) -> None:
    with open(Path(baseline) / "results.json", encoding="utf-8") as fh:
        base = json.load(fh)
    task = results["task"]
    if base.get("task") != task:
        raise ValueError(f"baseline {baseline} is a {base.get('task')} evaluation, not {task}")
    ours, theirs = _tokenization_of(results), _tokenization_of(base)
    if ours != theirs:
        raise ValueError(f"baseline {baseline} scored ROUGE on {theirs or 'unknown'} tokens, this evaluation on "
                         f"{ours} tokens: their difference would mean nothing; evaluate both with the same "
                         "--tokenizer (or --lang)")
    keys = [k for k in headline_keys(task) if isinstance(results.get(k), int | float)
            and isinstance(base.get(k), int | float)]
    results["baseline"] = {"dir": str(baseline), **{k: base.get(k) for k in headline_keys(task)}}
    results["improvement"] = {k: results[k] - base[k] for k in keys}


def headline_keys(task: str) -> list[str]:
    """The numbers a task's table shows."""
    return {"promptcblue": ["overall"], "text": ["rouge_1", "rouge_2", "rouge_l"],
            "question-generation": ["well_formed", "answer_valid", "rouge_l"]}[task]


def _cell(value: Any, signed: bool = False) -> str:
    # None is a score that is not defined (e.g. answer_valid when no output is well-formed)
    if not isinstance(value, int | float):
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def format_table(results: dict[str, Any], label: str) -> str:
    """Markdown table of the headline numbers (with base, tuned and Δ when a baseline is given).

    The ROUGE tokenisation is a column of every row, and its full description follows the table.
    """
    keys = headline_keys(results["task"])
    unit = _tokenization_of(results) or ("BasicTokenizer" if results["task"] == "promptcblue" else "?")
    lines = ["| run | n | " + " | ".join(keys) + " | tokens |", "|" + "---|" * (len(keys) + 3)]
    if "baseline" in results:
        base = results["baseline"]
        lines.append(f"| base ({Path(base['dir']).name}) | {results['n']} | "
                     + " | ".join(_cell(base.get(k)) for k in keys) + f" | {unit} |")
    lines.append(f"| {label} | {results['n']} | " + " | ".join(_cell(results.get(k)) for k in keys)
                 + f" | {unit} |")
    if "improvement" in results:
        lines.append("| Δ | | " + " | ".join(_cell(results["improvement"].get(k), signed=True) for k in keys)
                     + " | |")
    if results.get("tokenizer"):
        where = f"; language {results['lang']} ({results['lang_source']})" if results.get("lang") else ""
        lines += ["", f"tokenisation: {results['tokenizer']}{where}"]
    if results["task"] == "question-generation":
        lines.append(f"well-formed: {results.get('n_well_formed', 0)} of {results['n']} outputs"
                     + ("; answer_valid is n/a (it is a share of the well-formed outputs)"
                        if results.get("answer_valid") is None else ""))
    if results.get("n_reference_without_tokens"):
        lines.append(f"{results['n_reference_without_tokens']} pair(s) left out: the reference has no "
                     f"{results.get('tokenization')} token")
    if results["task"] == "promptcblue":
        lines += ["", "| task | metric | n | score |", "|---|---|---|---|"]
        for name, t in sorted(results["tasks"].items()):
            lines.append(f"| {name} | {t['metric']} | {t['n']} | {t['score']:.2f} |")
        lines += _pairing_lines(results)
    return "\n".join(lines)


def _pairing_lines(results: dict[str, Any], shown: int = 10) -> list[str]:
    """What did not pair with the structured gold, counted and named (first ``shown`` ids)."""
    out = []
    for key, what in (("missing_predictions", "gold id(s) without a prediction (scored as empty outputs)"),
                      ("not_in_gold", "prediction id(s) not in the gold (not scored)")):
        ids = results.get(key) or []
        if ids:
            more = f", … ({len(ids) - shown} more in results.json)" if len(ids) > shown else ""
            out.append(f"{len(ids)} {what}: " + ", ".join(ids[:shown]) + more)
    return [""] + out if out else []
