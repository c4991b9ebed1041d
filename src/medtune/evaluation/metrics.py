"""CMExam metrics, implemented to the letter of docs/METRICS.md.

All scores are × 100. Every metric states its tokenisation and level in :data:`METRICS`.

Why ROUGE is implemented here rather than taken from a library: no ROUGE package reproduces the
paper's definition. ``rouge-score`` counts repeated n-grams (the paper uses n-gram *sets*) and
its default tokenizer drops non-ASCII text, i.e. all Chinese; ``rouge-chinese`` collapses
whitespace, rejects empty hypotheses and uses plain F1 for ROUGE-L instead of the β formula.
BLEU, in contrast, is reproduced exactly by sacrebleu's ``char`` tokenizer with no smoothing.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

NO_ANSWER = "NO_ANSWER"
"""Class label given to unparsed answers before sklearn sees them (so "" is a class too)."""

CHAR_LABEL = 'characters (BLEU: every non-whitespace character; ROUGE: " ".join(chars).split(" "))'
JIEBA_LABEL = 'legacy jieba-word BLEU (jieba.lcut words, whitespace dropped); ROUGE on characters'
TOKENIZER_LABELS = {"char": CHAR_LABEL, "jieba": JIEBA_LABEL}


@dataclass(frozen=True)
class Metric:
    """Metadata of one metric.

    Attributes:
        name: Key used in results.
        higher_is_better: Whether larger values are better.
        level: ``"corpus"`` (statistics pooled over all items first) or ``"mean over items"``.
        tokenisation: How text is split into units before scoring.
    """

    name: str
    higher_is_better: bool
    level: Literal["corpus", "mean over items"]
    tokenisation: str


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", True, "mean over items", "none: parsed answer string == gold string"),
    "f1": Metric("f1", True, "corpus", "none: each answer string is a class (weighted by gold support)"),
    "bleu_1": Metric("bleu_1", True, "corpus", "non-whitespace characters (sacrebleu char)"),
    "bleu_4": Metric("bleu_4", True, "corpus", "non-whitespace characters (sacrebleu char)"),
    "rouge_1": Metric("rouge_1", True, "mean over items", 'unigram sets of " ".join(chars).split(" ")'),
    "rouge_2": Metric("rouge_2", True, "mean over items", 'bigram sets of " ".join(chars).split(" ")'),
    "rouge_l": Metric("rouge_l", True, "mean over items", 'LCS over " ".join(chars).split(" ")'),
}


# ---------------------------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------------------------


def answer_scores(gold: list[str], pred: list[str]) -> dict:
    """Accuracy and weighted F1 of parsed answers (CMExam definition).

    Args:
        gold: Gold answer strings in option order (``"ACD"``); must all be non-empty (rows
            without a gold answer are excluded by the caller).
        pred: Parsed answers; ``""`` means no answer and is scored as wrong.

    Returns:
        ``accuracy``, ``f1`` (× 100), ``n``, ``n_no_answer``, and accuracy split by gold
        length: ``accuracy_single``/``n_single`` and ``accuracy_multi``/``n_multi`` (accuracy is
        ``None`` for a split with no rows).

    Raises:
        ValueError: On a length mismatch, no rows, or an empty gold answer.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} rows but pred has {len(pred)}")
    if not gold:
        raise ValueError("no rows to score")
    if any(not g.strip() for g in gold):
        raise ValueError("empty gold answer: exclude rows without a gold answer before scoring")

    from sklearn.metrics import precision_recall_fscore_support

    # The no-answer label must be a class of its own, as in the paper's F1.
    pred_labels = [p if p.strip() else NO_ANSWER for p in pred]
    correct = [g == p for g, p in zip(gold, pred_labels, strict=True)]
    _, _, f1, _ = precision_recall_fscore_support(gold, pred_labels, average="weighted", zero_division=0)

    def _acc(flags: list[bool]) -> float | None:
        return 100.0 * sum(flags) / len(flags) if flags else None

    single = [c for g, c in zip(gold, correct, strict=True) if len(g) == 1]
    multi = [c for g, c in zip(gold, correct, strict=True) if len(g) > 1]
    return {
        "accuracy": _acc(correct),
        "f1": 100.0 * float(f1),
        "n": len(gold),
        "n_no_answer": pred_labels.count(NO_ANSWER),
        "accuracy_single": _acc(single),
        "n_single": len(single),
        "accuracy_multi": _acc(multi),
        "n_multi": len(multi),
    }


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------


def _jieba_tokens(text: str) -> str:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # jieba prints dictionary-loading chatter otherwise
    return " ".join(w for w in jieba.lcut(text) if w.strip())


def bleu(hyps: list[str], refs: list[str], n: int, tokenizer: str = "char") -> float:
    """Corpus BLEU-n without smoothing, × 100 (CMExam definition).

    ``tokenizer="char"`` makes every non-whitespace character a token (``HBsAg`` is five
    tokens), as sacrebleu's ``char`` tokenizer does; with ``smooth_method="none"`` this is exactly
    the METRICS.md formula, including BP = exp(1 − r/c) for c ≤ r and 0 when any p_k is 0.
    ``tokenizer="jieba"`` is the legacy jieba-word variant and must be labelled as such.

    Args:
        hyps: Model explanations.
        refs: Reference explanations, one per hypothesis.
        n: Maximum n-gram order (1 for BLEU-1, 4 for BLEU-4).
        tokenizer: ``"char"`` (default) or ``"jieba"``.

    Returns:
        The score in [0, 100]; 0.0 with a warning when every hypothesis is empty.

    Raises:
        ValueError: On a length mismatch, ``n < 1`` or an unknown tokenizer.
    """
    return bleu_scores(hyps, refs, (n,), tokenizer)[n]


def bleu_scores(hyps: Iterable[str], refs: Iterable[str], orders: Sequence[int] = (1, 4),
                tokenizer: str = "char") -> dict[int, float]:
    """Corpus BLEU of each order in ``orders`` from one pass over the pairs, × 100.

    sacrebleu's ``corpus_score`` keeps every reference's n-gram counter until the end (5.4 GB
    and most of ``evaluate``'s 4 minutes at 68,000 rows, twice: once for BLEU-1, once for BLEU-4).
    BLEU only needs its sufficient statistics: per order the hypothesis n-grams and those matched
    in the reference (clipped counts), and the two lengths, summed over pairs. They are counted
    here pair by pair and handed to sacrebleu's own ``BLEU.compute_bleu`` for the formula, so the
    scores are sacrebleu's to the last bit (tests/test_metrics.py compares them). Character tokens
    are the characters of the text without its whitespace.

    Raises:
        ValueError: On a length mismatch, an order < 1 or an unknown tokenizer.
    """
    if tokenizer not in ("char", "jieba"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; use 'char' or 'jieba'")
    if not orders or min(orders) < 1:
        raise ValueError("n must be >= 1")
    top = max(orders)
    correct, total = [0] * top, [0] * top
    sys_len = ref_len = pairs = 0
    any_hyp = False
    for hyp, ref in zip_strict(hyps, refs):
        pairs += 1
        if tokenizer == "char":
            h = "".join(hyp.split())  # sacrebleu: " ".join(chars), then split on whitespace
            r = "".join(ref.split())
        else:
            h, r = tuple(_jieba_tokens(hyp).split()), tuple(_jieba_tokens(ref).split())
        any_hyp = any_hyp or bool(hyp.strip())
        sys_len += len(h)
        ref_len += len(r)  # one reference: the closest reference length is its length
        for k in range(1, top + 1):
            if len(h) < k:
                break
            # k-grams as tuples from zip over shifted copies: counted in C, no Python loop per n-gram
            h_grams = Counter(zip(*(h[i:] for i in range(k)), strict=False))
            r_grams = Counter(zip(*(r[i:] for i in range(k)), strict=False))
            total[k - 1] += len(h) - k + 1
            if len(r_grams) < len(h_grams):
                correct[k - 1] += sum(min(count, h_grams[gram]) for gram, count in r_grams.items() if gram in h_grams)
            else:
                correct[k - 1] += sum(min(count, r_grams[gram]) for gram, count in h_grams.items() if gram in r_grams)
    if not any_hyp:
        # The paper's code crashes here (c = 0); report 0 but make it visible.
        warnings.warn("all hypotheses are empty; BLEU reported as 0.0", stacklevel=3)
        return dict.fromkeys(orders, 0.0)

    from sacrebleu.metrics import BLEU

    return {k: float(BLEU.compute_bleu(correct[:k], total[:k], sys_len, ref_len, smooth_method="none",
                                       max_ngram_order=k).score) for k in orders}


def zip_strict(hyps: Iterable[str], refs: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Pairs of two equally long iterables; a length mismatch is a ``ValueError`` naming both counts."""
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    return zip(hyps, refs, strict=True)


# ---------------------------------------------------------------------------------------------
# ROUGE (see the module docstring for why no library is used)
# ---------------------------------------------------------------------------------------------


def _rouge_tokens(text: str) -> list[str]:
    # The paper's tokens: whitespace characters survive (as "" tokens). An empty text has no
    # tokens -- not the single "" token str.split would give -- so an empty hypothesis scores 0.
    return " ".join(text).split(" ") if text else []


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("no pairs to score")
    if any(not r.strip() for r in refs):
        raise ValueError("empty reference: exclude such rows before scoring (explanation_scores does)")


def _ngram_set(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    # zip over shifted copies builds the n-gram tuples in C (the same set as slicing each position)
    return set(zip(*(tokens[i:] for i in range(n)), strict=False))  # shorter copies end it


def rouge_n(hyps: list[str], refs: list[str], n: int) -> float:
    """Mean ROUGE-N F over pairs, on n-gram sets, × 100 (CMExam definition).

    Per pair: o = |H ∩ R|, P = o/|H| (0 if H is empty), Rc = o/|R|, F = 2·P·Rc/(P + Rc + 1e-8).

    Raises:
        ValueError: On a length mismatch, no pairs, or an empty reference.
    """
    _check_pairs(hyps, refs)
    total = 0.0
    for hyp, ref in zip(hyps, refs, strict=True):
        h, r = _ngram_set(_rouge_tokens(hyp), n), _ngram_set(_rouge_tokens(ref), n)
        overlap = len(h & r)
        p = overlap / len(h) if h else 0.0
        rc = overlap / len(r) if r else 0.0
        total += 2 * p * rc / (p + rc + 1e-8)
    return 100.0 * total / len(hyps)


def _lcs_length(a: list[str], b: list[str]) -> int:
    # Bit-parallel LCS (Allison-Dix / Hyyrö): one big-int update per token of b instead of a
    # len(a)·len(b) Python loop, which would take minutes on a full test split.
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L over pairs with the paper's β formula, × 100 (CMExam definition).

    Per pair: Rc = LCS/len(ref), P = LCS/len(hyp), β = P/(Rc + 1e-12),
    F = (1 + β²)·Rc·P/(Rc + β²·P + 1e-12). This is not the usual F1: P = 1, Rc = 0.5 gives
    0.5556.

    Raises:
        ValueError: On a length mismatch, no pairs, or an empty reference.
    """
    _check_pairs(hyps, refs)
    total = 0.0
    for hyp, ref in zip(hyps, refs, strict=True):
        h, r = _rouge_tokens(hyp), _rouge_tokens(ref)
        lcs = _lcs_length(r, h)
        if lcs == 0:
            continue  # F = 0 (also covers the empty hypothesis)
        rc, p = lcs / len(r), lcs / len(h)
        beta = p / (rc + 1e-12)
        total += (1 + beta**2) * rc * p / (rc + beta**2 * p + 1e-12)
    return 100.0 * total / len(hyps)


# ---------------------------------------------------------------------------------------------
# explanations
# ---------------------------------------------------------------------------------------------


def explanation_scores(hyps: list[str], refs: list[str], tokenizer: str = "char") -> dict:
    """BLEU-1/4 and ROUGE-1/2/L of explanations, × 100 (CMExam definition).

    Pairs whose reference is empty or whitespace are excluded and counted; an empty hypothesis
    is scored (as empty), never dropped.

    Args:
        hyps: Model explanations.
        refs: Reference explanations.
        tokenizer: BLEU tokenisation, ``"char"`` (default) or ``"jieba"`` (legacy); ROUGE is
            always on characters.

    Returns:
        ``bleu_1``, ``bleu_4``, ``rouge_1``, ``rouge_2``, ``rouge_l`` (``None`` when no pair is
        scorable), ``n_explanations_scored``, ``n_explanations_excluded`` and ``tokenizer`` (a
        label to print in every report).

    Raises:
        ValueError: On a length mismatch or an unknown tokenizer.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if tokenizer not in TOKENIZER_LABELS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; use 'char' or 'jieba'")
    kept = [(h, r) for h, r in zip(hyps, refs, strict=True) if r.strip()]
    result: dict = {
        "n_explanations_scored": len(kept),
        "n_explanations_excluded": len(refs) - len(kept),
        "tokenizer": TOKENIZER_LABELS[tokenizer],
    }
    if not kept:
        return {**dict.fromkeys(("bleu_1", "bleu_4", "rouge_1", "rouge_2", "rouge_l")), **result}
    h, r = [p[0] for p in kept], [p[1] for p in kept]
    return {
        **{f"bleu_{k}": v for k, v in bleu_scores(h, r, (1, 4), tokenizer).items()},
        "rouge_1": rouge_n(h, r, 1),
        "rouge_2": rouge_n(h, r, 2),
        "rouge_l": rouge_l(h, r),
        **result,
    }

