"""Log-likelihood multiple choice: accuracy without generation.

Each question's candidate answers are scored as continuations of the prompt plus the template's
answer cue (e.g. ``答案：`` or ``正确选项：``); the prediction is the highest-scoring candidate.

- Candidates (``choices="letters"``, default): single-answer questions choose among the option
  letters. Multi-answer questions (the exam marks them as such, e.g. 多选题) choose among every
  letter set of two or more options, in option order (``AB``, ``AC``, …, ``ABCDE``): 26
  candidates for five options. Both groups are reported separately.
- ``choices="text"``: the option texts instead (multi-answer: the texts joined with ``；``, as the
  templates render them).

Scores. Each candidate ``c`` has a *text*, ``text(c)``: its letters, or its option text(s).
``cue + text(c)`` is tokenised in one piece, exactly as the training target is, and

- ``S(c)`` is the sum of the log-probabilities of every token of ``text(c)``, each given the
  prompt, the cue and the tokens before it. Tokens that all candidates share are part of every
  sum (``急性`` in ``急性胃炎`` and ``急性肠炎`` is scored for both); the cue's tokens are not;
- ``acc``: the argmax of ``S(c)``;
- ``acc_norm``: the argmax of ``S(c) / len(text(c))``, the text's length in characters (the cue
  not counted).

So the cue's tokens form the end of the context, and each candidate's continuation is the rest
of its tokens. The context must not take the candidates' shared leading tokens as well: ``acc``
would not change (those tokens add the same constant to every sum), but ``acc_norm`` would
divide a partial sum by the whole text's length.

Where the tokenizer merges the cue's end with the text, the token lies partly in both and
counts with the text: ``"答案: " + "A"`` is ``"答案"``, ``":"``, ``" A"``, and ``" A"`` is
scored. Precisely, the context takes the leading tokens of ``cue + text(c)`` that match the
cue's own tokenisation, as far as they match for every candidate of the question. If the merges
differ between candidates (``" 甲"`` one token, ``" 乙"`` two: ``" "`` and ``"乙"``), the
context stops before the first cue token that differs, and every candidate's sum covers that
same cue tail (here ``" "``) before its text.

When every continuation of a question is one token (letters after the cue, the usual case), the
backend scores the question with one forward pass; the split above keeps that case.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

from medtune.data.sft import encode_prompt
from medtune.records import ExamRecord
from medtune.templates import ExamTemplate

MULTI_METHOD = "candidate letter sets of size >= 2 (question known to be multi-answer)"


def answer_cue(template: ExamTemplate) -> str:
    """The text a template puts between the prompt and the answer letters (may be empty)."""
    target = template.target_without_explanation
    if "{letters}" not in target:
        raise ValueError(f"template '{template.name}' has no {{letters}} in its target; cannot score letters")
    return target[: target.index("{letters}")]


def candidates(record: ExamRecord, choices: str = "letters") -> list[str]:
    """Letter strings to choose among (see module docstring)."""
    letters = list(record.options)
    if record.is_multi:
        sets = ["".join(c) for size in range(2, len(letters) + 1) for c in combinations(letters, size)]
    else:
        sets = letters
    if choices == "letters":
        return sets
    if choices == "text":
        return sets  # letter sets are the keys; their text is built in candidate_text
    raise ValueError(f"unknown choices {choices!r}; expected letters or text")


def candidate_text(record: ExamRecord, letters: str, choices: str) -> str:
    """What is actually scored for a candidate letter set."""
    if choices == "letters":
        return letters
    return "；".join(record.options[letter] for letter in letters)


def _cue_tokens(cand_ids: list[list[int]], cue_ids: list[int]) -> int:
    """How many leading tokens go into the context: cue tokens that every candidate shares.

    Args:
        cand_ids: Each candidate's tokens of ``cue + candidate text``.
        cue_ids: The cue tokenised on its own.

    Returns:
        The length of the longest prefix of ``cue_ids`` that starts every candidate. A token that
        matches the cue's own tokenisation lies wholly inside the cue; one that does not (a merge
        across the cue/text boundary) ends the count, so it is scored with the candidate.
    """
    n = 0
    # every candidate is compared with the same cue_ids, so the prefixes found are identical
    while n < len(cue_ids) and all(len(ids) > n and ids[n] == cue_ids[n] for ids in cand_ids):
        n += 1
    return n


def build_requests(
    records: list[ExamRecord], template: ExamTemplate, tokenizer: Any, choices: str = "letters"
) -> tuple[list[tuple[list[int], list[list[int]]]], list[list[str]]]:
    """Token-level requests for ``continuation_logprobs`` and each record's candidate letter sets.

    Args:
        records: The questions.
        template: Renders the prompt and supplies the answer cue.
        tokenizer: A Hugging Face tokenizer (anything called as ``tokenizer(text, ...)`` that
            returns ``{"input_ids": [...]}``).
        choices: ``"letters"`` or ``"text"`` (see the module docstring).

    Returns:
        One ``(context_ids, [continuation_ids, ...])`` per record, with the context ending in the
        cue's tokens and each continuation covering the whole candidate text (module docstring),
        and the records' candidate letter sets in the same order as the continuations.

    Raises:
        ValueError: A candidate tokenises to nothing beyond the cue (an empty option text), which
            would score 0 and win every ``acc_norm`` comparison.
    """
    cue = answer_cue(template)
    cue_ids = tokenizer(cue, add_special_tokens=False)["input_ids"] if cue else []
    requests, cand_lists = [], []
    for rec in records:
        prompt_ids = encode_prompt(tokenizer, template.render_prompt(rec, tokenizer), template)
        cands = candidates(rec, choices)
        cand_ids = [
            tokenizer(cue + candidate_text(rec, c, choices), add_special_tokens=False)["input_ids"] for c in cands
        ]
        n_cue = _cue_tokens(cand_ids, cue_ids)
        conts = [ids[n_cue:] for ids in cand_ids]
        empty = [c for c, ids in zip(cands, conts, strict=True) if not ids]
        if empty:
            raise ValueError(f"record {rec.id}: candidate(s) {empty} have no tokens to score (empty option text?)")
        requests.append((prompt_ids + cue_ids[:n_cue], conts))
        cand_lists.append(cands)
    return requests, cand_lists


def pick(records: list[ExamRecord], cand_lists: list[list[str]], scores: list[list[float]],
         choices: str) -> list[dict[str, Any]]:
    """Per record: the argmax candidate by raw and by length-normalised score, with all scores.

    Args:
        records: The questions, in the order of ``build_requests``.
        cand_lists: Each record's candidate letter sets (from ``build_requests``).
        scores: Each candidate's summed continuation log-probability ``S(c)`` (from the backend).
        choices: ``"letters"`` or ``"text"``: what the candidate text is.

    Returns:
        One dict per record: ``parsed`` (argmax of ``S(c)``), ``parsed_norm`` (argmax of
        ``S(c) / len(text(c))``), ``option_scores`` and ``option_scores_norm``. Ties go to the
        first candidate in option order.
    """
    out = []
    for rec, cands, row in zip(records, cand_lists, scores, strict=True):
        norm = [s / max(1, len(candidate_text(rec, c, choices))) for c, s in zip(cands, row, strict=True)]
        best = max(range(len(cands)), key=row.__getitem__)
        best_norm = max(range(len(cands)), key=norm.__getitem__)
        out.append({
            "parsed": cands[best],
            "parsed_norm": cands[best_norm],
            "option_scores": dict(zip(cands, row, strict=True)),
            "option_scores_norm": dict(zip(cands, norm, strict=True)),
        })
    return out
