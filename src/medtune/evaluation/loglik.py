"""Log-likelihood multiple choice: accuracy without generation.

Each question's candidate answers are scored as continuations of the prompt plus the template's
answer cue (e.g. ``答案：`` or ``正确选项：``); the prediction is the highest-scoring candidate.

- ``acc``: argmax of the summed log-probability of the candidate's tokens.
- ``acc_norm``: argmax of that sum divided by the candidate's length in characters.
- Candidates (``choices="letters"``, default): single-answer questions choose among the option
  letters. Multi-answer questions (the exam marks them as such, e.g. 多选题) choose among every
  letter set of two or more options, in option order (``AB``, ``AC``, …, ``ABCDE``): 26
  candidates for five options. Both groups are reported separately.
- ``choices="text"``: the option texts instead (multi-answer: the texts joined with ``；``, as the
  templates render them).

The candidate string is tokenised together with the cue, exactly as the training target is, and
the tokens all candidates share are moved into the context.
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


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != seqs[0][k] for s in seqs[1:]):
            return k
    # keep at least one token in every continuation
    return max(n - 1, 0) if any(len(s) == n for s in seqs) else n


def build_requests(
    records: list[ExamRecord], template: ExamTemplate, tokenizer: Any, choices: str = "letters"
) -> tuple[list[tuple[list[int], list[list[int]]]], list[list[str]]]:
    """Token-level requests for ``continuation_logprobs`` and each record's candidate letter sets."""
    cue = answer_cue(template)
    requests, cand_lists = [], []
    for rec in records:
        prompt_ids = encode_prompt(tokenizer, template.render_prompt(rec, tokenizer), template)
        cands = candidates(rec, choices)
        cand_ids = [
            tokenizer(cue + candidate_text(rec, c, choices), add_special_tokens=False)["input_ids"] for c in cands
        ]
        shared = _common_prefix(cand_ids)
        requests.append((prompt_ids + cand_ids[0][:shared], [ids[shared:] for ids in cand_ids]))
        cand_lists.append(cands)
    return requests, cand_lists


def pick(records: list[ExamRecord], cand_lists: list[list[str]], scores: list[list[float]],
         choices: str) -> list[dict[str, Any]]:
    """Per record: the argmax candidate by raw and by length-normalised score, with all scores."""
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
