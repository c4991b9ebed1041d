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
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

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
    here (characters: a few thousand pairs at a time in numpy, :func:`_char_bleu_statistics`;
    jieba words: pair by pair) and handed to sacrebleu's own ``BLEU.compute_bleu`` for the
    formula, so the scores are sacrebleu's to the last bit (tests/test_metrics.py compares them).
    Character tokens are the characters of the text without its whitespace.

    Raises:
        ValueError: On a length mismatch, an order < 1 or an unknown tokenizer.
    """
    if tokenizer not in ("char", "jieba"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; use 'char' or 'jieba'")
    if not orders or min(orders) < 1:
        raise ValueError("n must be >= 1")
    top = max(orders)
    hyps, refs = _paired_lists(hyps, refs)
    if tokenizer == "char":
        # sacrebleu's char tokens: " ".join(chars), then split on whitespace, i.e. the characters
        # of the text without its whitespace (str.split and str.strip agree on what that is).
        correct, total, sys_len, ref_len = _char_bleu_statistics(
            ["".join(h.split()) for h in hyps], ["".join(r.split()) for r in refs], top)
    else:
        correct, total, sys_len, ref_len = _token_bleu_statistics(
            [tuple(_jieba_tokens(h).split()) for h in hyps], [tuple(_jieba_tokens(r).split()) for r in refs], top)
    any_hyp = any(h.strip() for h in hyps)
    if not any_hyp:
        # The paper's code crashes here (c = 0); report 0 but make it visible.
        warnings.warn("all hypotheses are empty; BLEU reported as 0.0", stacklevel=3)
        return dict.fromkeys(orders, 0.0)

    from sacrebleu.metrics import BLEU

    return {k: float(BLEU.compute_bleu(correct[:k], total[:k], sys_len, ref_len, smooth_method="none",
                                       max_ngram_order=k).score) for k in orders}


def zip_strict(hyps: Iterable[str], refs: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Pairs of two equally long iterables; a length mismatch is a ``ValueError`` naming both counts."""
    hyps, refs = _paired_lists(hyps, refs)
    return zip(hyps, refs, strict=True)


def _paired_lists(hyps: Iterable[str], refs: Iterable[str]) -> tuple[list[str], list[str]]:
    """Both iterables as lists of equal length; a length mismatch is a ``ValueError`` naming both counts."""
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    return hyps, refs


def _token_bleu_statistics(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], top: int,
                           ) -> tuple[list[int], list[int], int, int]:
    """BLEU's sufficient statistics pair by pair with ``Counter`` (any tokens: jieba words).

    Returns:
        ``(correct, total, sys_len, ref_len)``: per order 1..``top`` the clipped matches and the
        hypothesis n-grams, and the summed hypothesis and reference lengths.
    """
    correct, total = [0] * top, [0] * top
    sys_len = ref_len = 0
    for h, r in zip(hyps, refs, strict=True):
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
    return correct, total, sys_len, ref_len


# ---------------------------------------------------------------------------------------------
# n-gram keys of many pairs at once (BLEU and ROUGE-N on characters)
#
# Counting n-grams pair by pair in Python (a Counter or a set per text and order) was most of
# evaluate's time: 68,000 pairs hold 20 million characters. Here a chunk of pairs becomes numpy
# arrays, one entry per character: every n-gram starting there gets an integer key that is equal
# for two positions exactly when they belong to the same pair and hold the same n characters,
# and sorting the keys (tagged with the side, hypothesis or reference) gives every distinct
# n-gram of every text with its count. Only integers are counted, so the statistics are the
# ones the per-pair code counted (tests/test_metrics.py compares both on random texts).
# ---------------------------------------------------------------------------------------------

_CHUNK_PAIRS = 2048
"""Pairs counted together: a chunk's arrays take a few MB whatever the number of rows."""

_KEY_BITS = 62
"""Keys stay below 2**62 so that a side bit can be appended within int64."""


class _Chunk(NamedTuple):
    chars: Any  # np.ndarray: dense id of each character (hypotheses first, then references)
    char_bits: int  # bits of the largest char id
    pair: Any  # np.ndarray: pair index (in the chunk) of each character
    side: Any  # np.ndarray: 0 for a hypothesis character, 1 for a reference one
    left: Any  # np.ndarray: characters from this one to the end of its text (1 for the last)
    pairs: int  # pairs in the chunk


def _chunk(hyps: Sequence[str], refs: Sequence[str]) -> _Chunk:
    import numpy as np

    texts = [*hyps, *refs]
    # One code point per character ("surrogatepass": a lone surrogate from JSON is a character too)
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    # Dense ids of the characters present (a few thousand), so that four of them fit in a key
    present = np.zeros(0x110000, dtype=np.int64)
    present[codes] = 1
    dense = np.cumsum(present) - 1
    chars = dense[codes]
    text_of = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    ends = np.cumsum(lengths)
    left = np.repeat(ends, lengths) - np.arange(len(codes), dtype=np.int64)
    return _Chunk(chars, max(1, int(dense[-1]).bit_length()), text_of % len(hyps),
                  (text_of >= len(hyps)).astype(np.int64), left, len(hyps))


def _gram_keys(chunk: _Chunk, top: int, compress: bool = True) -> Iterator[tuple[int, Any, Any, int | None]]:
    """``(n, keys, valid, pair_shift)`` for n = 1..``top``.

    ``keys[i]`` identifies (pair, the n characters from position i); only positions where
    ``valid`` is true have n characters left in their text. While the key is the pair index above
    n char ids, ``pair_shift`` is the shift that recovers the pair; when a key would outgrow
    :data:`_KEY_BITS` it is first renumbered (``np.unique``: equal keys stay equal, different
    ones different) and ``pair_shift`` is ``None`` -- or, with ``compress=False``, the keys stop.
    """
    import numpy as np

    bits = chunk.char_bits
    width = max(1, (chunk.pairs - 1).bit_length()) + bits
    if width > _KEY_BITS:
        return
    keys, pair_shift = (chunk.pair << bits) | chunk.chars, bits
    for n in range(1, top + 1):
        if n > 1:
            if width + bits > _KEY_BITS:
                if not compress:
                    return
                _, keys = np.unique(keys, return_inverse=True)
                keys = keys.astype(np.int64).reshape(-1)
                width, pair_shift = max(1, int(keys.max(initial=0)).bit_length()), None
            # the n-gram at i is the (n-1)-gram at i followed by the character at i + n - 1
            keys = (keys[:-1] << bits) | chunk.chars[n - 1:]
            width += bits
            pair_shift = None if pair_shift is None else pair_shift + bits
        yield n, keys, chunk.left[: len(keys)] >= n, pair_shift


def _distinct(keys: Any, side: Any) -> tuple[Any, Any]:
    """Sorted distinct values of ``keys << 1 | side`` and how often each occurs.

    Sorted, a key found in both texts of its pair is a hypothesis entry (side 0) directly
    followed by a reference entry (side 1) with the same key.
    """
    import numpy as np

    tagged = np.sort((keys << 1) | side)
    if not tagged.size:
        return tagged, tagged
    starts = np.flatnonzero(np.concatenate(([True], tagged[1:] != tagged[:-1])))
    return tagged[starts], np.diff(np.append(starts, tagged.size))


def _char_bleu_statistics(hyps: Sequence[str], refs: Sequence[str], top: int) -> tuple[list[int], list[int], int, int]:
    """:func:`_token_bleu_statistics` for texts whose every character is a token, chunk by chunk in numpy."""
    import numpy as np

    correct, total = [0] * top, [0] * top
    sys_len, ref_len = sum(map(len, hyps)), sum(map(len, refs))
    for k in range(1, top + 1):
        total[k - 1] = sum(len(h) - k + 1 for h in hyps if len(h) >= k)
    for start in range(0, len(hyps), _CHUNK_PAIRS):
        chunk = _chunk(hyps[start: start + _CHUNK_PAIRS], refs[start: start + _CHUNK_PAIRS])
        for n, keys, valid, _ in _gram_keys(chunk, top):
            values, counts = _distinct(keys[valid], chunk.side[: len(keys)][valid])
            both = (values[:-1] >> 1) == (values[1:] >> 1)
            # clipped matches: an n-gram counts as often as it occurs in the hypothesis, at most
            # as often as in the reference
            correct[n - 1] += int(np.minimum(counts[:-1][both], counts[1:][both]).sum())
    return correct, total, sys_len, ref_len


# ---------------------------------------------------------------------------------------------
# ROUGE (see the module docstring for why no library is used)
# ---------------------------------------------------------------------------------------------


def _rouge_tokens(text: str) -> list[str]:
    # The paper's tokens: whitespace characters survive (as "" tokens). An empty text has no
    # tokens -- not the single "" token str.split would give -- so an empty hypothesis scores 0.
    return " ".join(text).split(" ") if text else []


def _rouge_string(text: str) -> str:
    """:func:`_rouge_tokens` as a string with one character per token, in the same order.

    " ".join(text).split(" ") keeps every character but the space as its own token and turns
    each space into two "" tokens; no other token is "" or holds a space, so writing "" as " "
    maps tokens to characters one to one: sets, intersections, lengths and the LCS are the same.
    """
    return text.replace(" ", "  ")


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("no pairs to score")
    if any(not r.strip() for r in refs):
        raise ValueError("empty reference: exclude such rows before scoring (explanation_scores does)")


def _ngram_set(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    # zip over shifted copies builds the n-gram tuples in C (the same set as slicing each position)
    return set(zip(*(tokens[i:] for i in range(n)), strict=False))  # shorter copies end it


def _rouge_n_f(h: set, r: set) -> float:
    """One pair's ROUGE-N F from its n-gram sets."""
    overlap = len(h & r)
    p = overlap / len(h) if h else 0.0
    rc = overlap / len(r) if r else 0.0
    return 2 * p * rc / (p + rc + 1e-8)


def _rouge_n_scores(hyps: Sequence[str], refs: Sequence[str], orders: Sequence[int]) -> dict[int, list[float]]:
    """Per-pair ROUGE-N F of each order, for texts already mapped by :func:`_rouge_string`.

    A chunk of pairs at a time in numpy: |H|, |R| and |H ∩ R| are counted from the distinct keys
    of :func:`_gram_keys`; the F formula then runs element-wise in float64 in the order of
    :func:`_rouge_n_f` (the same IEEE operations, so the same bits).
    """
    import numpy as np

    scores: dict[int, list[float]] = {n: [] for n in orders}
    for start in range(0, len(hyps), _CHUNK_PAIRS):
        h_part, r_part = hyps[start: start + _CHUNK_PAIRS], refs[start: start + _CHUNK_PAIRS]
        chunk = _chunk(h_part, r_part)
        grams = {g[0]: g for g in _gram_keys(chunk, max(orders), compress=False)}
        for n in orders:
            if n not in grams:  # keys too wide for this chunk (tens of thousands of distinct characters)
                scores[n] += [_rouge_n_f(_ngram_set(h, n), _ngram_set(r, n)) for h, r in zip(h_part, r_part, strict=True)]
                continue
            _, keys, valid, pair_shift = grams[n]
            values, _ = _distinct(keys[valid], chunk.side[: len(keys)][valid])
            pair, side = values >> (pair_shift + 1), values & 1
            n_h = np.bincount(pair[side == 0], minlength=chunk.pairs)
            n_r = np.bincount(pair[side == 1], minlength=chunk.pairs)
            overlap = np.bincount(pair[:-1][(values[:-1] >> 1) == (values[1:] >> 1)], minlength=chunk.pairs)
            p = np.divide(overlap, n_h, out=np.zeros(chunk.pairs), where=n_h > 0)
            rc = np.divide(overlap, n_r, out=np.zeros(chunk.pairs), where=n_r > 0)
            scores[n] += (2 * p * rc / (p + rc + 1e-8)).tolist()
    return scores


def rouge_n(hyps: list[str], refs: list[str], n: int) -> float:
    """Mean ROUGE-N F over pairs, on n-gram sets, × 100 (CMExam definition).

    Per pair: o = |H ∩ R|, P = o/|H| (0 if H is empty), Rc = o/|R|, F = 2·P·Rc/(P + Rc + 1e-8).

    Raises:
        ValueError: On a length mismatch, no pairs, or an empty reference.
    """
    return _rouge_n_means(hyps, refs, (n,))[n]


def _rouge_n_means(hyps: list[str], refs: list[str], orders: Sequence[int]) -> dict[int, float]:
    """:func:`rouge_n` of each order in ``orders``, from one pass over the pairs."""
    _check_pairs(hyps, refs)
    scores = _rouge_n_scores([_rouge_string(h) for h in hyps], [_rouge_string(r) for r in refs], orders)
    means = {}
    for n in orders:
        total = 0.0
        # summed one by one in pair order, as the mean was always taken (another order, or
        # math.fsum, could move the last bit)
        for f in scores[n]:
            total += f
        means[n] = 100.0 * total / len(hyps)
    return means


def _lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    # Bit-parallel LCS (Allison-Dix / Hyyrö): one big-int update per token of b instead of a
    # len(a)·len(b) Python loop, which would take minutes on a full test split. The LCS is
    # symmetric, so the bits run over the shorter sequence (fewer mask updates, narrower ints).
    if len(a) > len(b):
        a, b = b, a
    if not a:
        return 0
    masks: dict[Hashable, int] = {}
    get = masks.get
    for i, tok in enumerate(a):
        masks[tok] = get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for mask in map(get, b):
        if mask:  # a token absent from a leaves v as it is (u = 0)
            u = v & mask
            # No "& full" per step: carries only move upwards, so the low len(a) bits, the only
            # ones counted, do not depend on the bits above them.
            v = (v + u) | (v - u)
    return len(a) - (v & full).bit_count()


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
        h, r = _rouge_string(hyp), _rouge_string(ref)
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
        **{f"rouge_{k}": v for k, v in _rouge_n_means(h, r, (1, 2)).items()},
        "rouge_l": rouge_l(h, r),
        **result,
    }

