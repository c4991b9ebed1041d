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

    # The no-answer label must be a class of its own, as in the paper's F1.
    pred_labels = [p if p.strip() else NO_ANSWER for p in pred]
    correct = [g == p for g, p in zip(gold, pred_labels, strict=True)]
    f1 = _weighted_f1(gold, pred_labels)

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


def _weighted_f1(gold: list[str], pred: list[str]) -> float:
    """Weighted F1 as scikit-learn computes it, with the same numpy operations in the same order.

    That is ``precision_recall_fscore_support(gold, pred, average="weighted", zero_division=0)[2]``.
    Importing ``sklearn.metrics`` took 1.8 s, more than the F1 of 68,000 rows. The statistics are
    integers (per label, in sorted order of all labels: true positives, gold and predicted counts);
    F = 2·tp / (gold + pred) in float64 (0 where both are 0); the weighted mean is
    ``numpy.average`` with the gold counts as weights, over every label in that order, so the
    float result is sklearn's bit for bit (tests/test_metrics.py compares them with ==).
    """
    import numpy as np

    labels = sorted({*gold, *pred})
    index = {label: i for i, label in enumerate(labels)}
    g = np.fromiter(map(index.__getitem__, gold), dtype=np.int64, count=len(gold))
    p = np.fromiter(map(index.__getitem__, pred), dtype=np.int64, count=len(pred))
    true_sum = np.bincount(g, minlength=len(labels))
    pred_sum = np.bincount(p, minlength=len(labels))
    tp_sum = np.bincount(g[g == p], minlength=len(labels))
    denominator = 1.0 * true_sum.astype(np.float64) + pred_sum.astype(np.float64)  # β² = 1
    empty = denominator == 0
    denominator[empty] = 1
    f = (2.0 * tp_sum.astype(np.float64)) / denominator
    f[empty] = 0.0
    return float(np.average(f, weights=true_sum))


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
# n-grams of many pairs at once (BLEU and ROUGE-N on characters)
#
# Counting n-grams pair by pair in Python (a Counter or a set per text and order) was most of
# evaluate's time: 68,000 pairs hold 20 million characters. Here a chunk of pairs becomes numpy
# arrays, one entry per character: the entry at position i gets one integer key holding its pair,
# the ``top`` characters from i (0 past the end of its text; characters are numbered from 1) and
# its side (hypothesis 0, reference 1) in the lowest bit. One sort of these keys orders every
# n-gram, n = 1..top, at once: the n-gram at i is the key's top bits (pair and first n
# characters), and keys sorted as wholes are sorted by any such prefix too. Equal prefixes are
# then runs, and a run's entries are that n-gram's occurrences in the pair's two texts. Only
# integers are counted, so the statistics are the ones the per-pair code counted
# (tests/test_metrics.py compares both on random texts, chunk splits and fallbacks included).
# ---------------------------------------------------------------------------------------------

_CHUNK_PAIRS = 2048
"""Pairs counted together: a chunk's arrays take a few tens of MB whatever the number of rows."""

_KEY_BITS = 63
"""Bits a key may use (pair, ``top`` characters, side): int64 keys stay non-negative. A chunk whose
keys would need more is split in halves; a single pair that still would is counted in Python."""


class _Grams(NamedTuple):
    """The distinct n-grams of every pair of a chunk (sorted by pair), one entry per n-gram."""

    pair: Any  # np.ndarray: the pair (index in the chunk) the n-gram belongs to; None when not asked for
    hyp: Any  # np.ndarray: how often it occurs in the pair's hypothesis
    ref: Any  # np.ndarray: how often it occurs in the pair's reference


class _CharIds:
    """Dense ids (1, 2, ...) of the characters present in a chunk.

    Two code-point tables are allocated once per pass: allocating and clearing 0x110000 entries
    per chunk cost more than the chunk's own arithmetic.
    """

    def __init__(self) -> None:
        import numpy as np

        self.present = np.zeros(0x110000, dtype=np.bool_)
        self.ids = np.zeros(0x110000, dtype=np.int64)

    def __call__(self, codes: Any) -> tuple[Any, int]:
        """``(id of each code, number of distinct codes)``."""
        import numpy as np

        self.present[codes] = True
        distinct = np.flatnonzero(self.present)
        self.present[distinct] = False  # clean for the next chunk
        self.ids[distinct] = np.arange(1, len(distinct) + 1, dtype=np.int64)
        return self.ids[codes], len(distinct)


def _chunk_grams(hyps: Sequence[str], refs: Sequence[str], top: int, char_ids: _CharIds | None = None,
                 with_pairs: bool = True) -> dict[int, _Grams] | None:
    """:class:`_Grams` of n = 1..``top`` for the pairs ``zip(hyps, refs)``; ``None`` when keys would not fit.

    ``with_pairs=False`` leaves :attr:`_Grams.pair` ``None`` (BLEU sums over all pairs and does not need it).
    """
    import numpy as np

    pairs = len(hyps)
    texts = [*hyps, *refs]
    # One code point per character ("surrogatepass": a lone surrogate from JSON is a character too)
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    chars, distinct = (char_ids or _CharIds())(codes)
    bits = distinct.bit_length()  # ids 1..distinct: 0 stays free for "past the end"
    if (pairs - 1).bit_length() + top * bits + 1 > _KEY_BITS:
        return None
    size = len(codes)
    if not size:
        return {n: _Grams(*(np.zeros(0, dtype=np.int64),) * 3) for n in range(1, top + 1)}
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    ends = np.cumsum(lengths)
    keys = np.repeat(np.tile(np.arange(pairs, dtype=np.int64), 2), lengths)  # the pair
    mask = (1 << bits) - 1
    for j in range(top):
        keys <<= bits
        if j < size:
            keys[: size - j] |= chars[j:]
        if j:
            # the j-th next character of the last j characters of a text lies past its end (in the
            # next text, or beyond the array): 0
            past = np.concatenate([(ends - 1 - t)[lengths > t] for t in range(j)])
            keys[past] &= ~mask
    keys <<= 1
    keys[int(ends[pairs - 1]):] |= 1  # the side: references follow the hypotheses
    keys.sort()
    # occurrences in a reference among the first i sorted entries
    ref_before = np.concatenate(([0], np.cumsum(keys & 1)))
    grams: dict[int, _Grams] = {}
    for n in range(1, top + 1):
        prefix = keys >> (1 + bits * (top - n))
        starts = np.concatenate(([0], np.flatnonzero(prefix[1:] != prefix[:-1]) + 1))
        stops = np.append(starts[1:], size)
        first = prefix[starts]
        # A run is one n-gram of one pair; its n-th character is 0 (for all its entries alike) when
        # the n-gram runs past the end of its text, and then it is no n-gram.
        valid = (first & mask) != 0
        starts, stops = starts[valid], stops[valid]
        in_ref = ref_before[stops] - ref_before[starts]
        grams[n] = _Grams(first[valid] >> (bits * n) if with_pairs else None, stops - starts - in_ref, in_ref)
    return grams


def _grams_by_chunk(hyps: Sequence[str], refs: Sequence[str], top: int, with_pairs: bool = True,
                    ) -> Iterator[tuple[int, int, dict[int, _Grams] | None]]:
    """``(start, stop, grams)`` over chunks of pairs, in pair order.

    ``grams`` is ``None`` for a single pair whose keys do not fit (tens of thousands of distinct
    characters), which the caller counts in Python.
    """
    char_ids = _CharIds()
    todo = [(s, min(s + _CHUNK_PAIRS, len(hyps))) for s in range(0, len(hyps), _CHUNK_PAIRS)]
    todo.reverse()
    while todo:
        start, stop = todo.pop()
        grams = _chunk_grams(hyps[start:stop], refs[start:stop], top, char_ids, with_pairs)
        if grams is None and stop - start > 1:
            mid = (start + stop) // 2
            todo += [(mid, stop), (start, mid)]  # the first half next: pairs stay in order
            continue
        yield start, stop, grams


def _char_bleu_statistics(hyps: Sequence[str], refs: Sequence[str], top: int) -> tuple[list[int], list[int], int, int]:
    """:func:`_token_bleu_statistics` for texts whose every character is a token, chunk by chunk in numpy."""
    import numpy as np

    correct, total = [0] * top, [0] * top
    sys_len, ref_len = sum(map(len, hyps)), sum(map(len, refs))
    for k in range(1, top + 1):
        total[k - 1] = sum(len(h) - k + 1 for h in hyps if len(h) >= k)
    for start, _stop, grams in _grams_by_chunk(hyps, refs, top, with_pairs=False):
        if grams is None:
            correct = [c + d for c, d in zip(correct, _token_bleu_statistics(
                [tuple(hyps[start])], [tuple(refs[start])], top)[0], strict=True)]
            continue
        for n, g in grams.items():
            # clipped matches: an n-gram counts as often as it occurs in the hypothesis, at most
            # as often as in the reference
            correct[n - 1] += int(np.minimum(g.hyp, g.ref).sum())
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

    A chunk of pairs at a time in numpy: |H|, |R| and |H ∩ R| are counted from the distinct
    n-grams of :func:`_chunk_grams`; the F formula then runs element-wise in float64 in the order
    of :func:`_rouge_n_f` (the same IEEE operations, so the same bits).
    """
    import numpy as np

    scores: dict[int, list[float]] = {n: [] for n in orders}
    for start, stop, grams in _grams_by_chunk(hyps, refs, max(orders)):
        if grams is None:  # one pair with too many distinct characters for a key
            for n in orders:
                scores[n].append(_rouge_n_f(_ngram_set(hyps[start], n), _ngram_set(refs[start], n)))
            continue
        pairs = stop - start
        for n in orders:
            g = grams[n]
            in_h, in_r = g.hyp > 0, g.ref > 0
            n_h = np.bincount(g.pair[in_h], minlength=pairs)
            n_r = np.bincount(g.pair[in_r], minlength=pairs)
            overlap = np.bincount(g.pair[in_h & in_r], minlength=pairs)
            p = np.divide(overlap, n_h, out=np.zeros(pairs), where=n_h > 0)
            rc = np.divide(overlap, n_r, out=np.zeros(pairs), where=n_r > 0)
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
    for tok, bit in zip(a, _bits(len(a)), strict=False):  # zip stops at the end of a
        masks[tok] = get(tok, 0) | bit
    full = (1 << len(a)) - 1
    v = full
    for mask in map(get, b):
        if mask:  # a token absent from a leaves v as it is (u = 0)
            u = v & mask
            # No "& full" per step: carries only move upwards, so the low len(a) bits, the only
            # ones counted, do not depend on the bits above them.
            v = (v + u) | (v - u)
    return len(a) - (v & full).bit_count()


_BITS: list[int] = []
"""``_BITS[i] == 1 << i``, grown as needed: the masks are built without a shift per character."""


def _bits(n: int) -> list[int]:
    if len(_BITS) < n:
        _BITS.extend(1 << i for i in range(len(_BITS), n))
    return _BITS


def _masks(a: str) -> dict[str, int]:
    """Character → the bit mask of its positions in ``a`` (bit i for ``a[i]``)."""
    masks: dict[str, int] = {}
    get = masks.get
    for char, bit in zip(a, _bits(len(a)), strict=False):  # zip stops at the end of a
        masks[char] = get(char, 0) | bit
    return masks


def _lcs_with_masks(n: int, masks: dict[str, int], b: str) -> int:
    """LCS length of a text of ``n`` characters with the masks ``masks`` and ``b`` (see :func:`_lcs_length`)."""
    full = (1 << n) - 1
    v = full
    for mask in map(masks.get, b):
        if mask:
            u = v & mask
            v = (v + u) | (v - u)
    return n - (v & full).bit_count()


def _lcs_lengths(refs: Sequence[str], hyps: Sequence[str]) -> list[int]:
    """``[_lcs_length(r, h) for r, h in zip(refs, hyps)]`` for character strings.

    Building a text's masks costs about as much as the LCS loop over the other text. A reference
    that several pairs share (a question evaluated more than once, several samples or checkpoints
    in one file) gets its masks built once: its pairs are taken together, the bit vector over the
    reference and the loop over each hypothesis (the LCS is symmetric, and the bit-parallel
    recurrence is exact with the bits over either text). Taken reference by reference, only one
    reference's masks are held at a time. Other pairs run :func:`_lcs_length` as before.
    """
    lengths = [0] * len(refs)
    by_ref: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        by_ref.setdefault(ref, []).append(i)
    for ref, indices in by_ref.items():
        if len(indices) == 1:
            lengths[indices[0]] = _lcs_length(ref, hyps[indices[0]])
            continue
        masks = _masks(ref)
        for i in indices:
            lengths[i] = _lcs_with_masks(len(ref), masks, hyps[i])
    return lengths


def rouge_l(hyps: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L over pairs with the paper's β formula, × 100 (CMExam definition).

    Per pair: Rc = LCS/len(ref), P = LCS/len(hyp), β = P/(Rc + 1e-12),
    F = (1 + β²)·Rc·P/(Rc + β²·P + 1e-12). This is not the usual F1: P = 1, Rc = 0.5 gives
    0.5556.

    Raises:
        ValueError: On a length mismatch, no pairs, or an empty reference.
    """
    _check_pairs(hyps, refs)
    hyps, refs = [_rouge_string(h) for h in hyps], [_rouge_string(r) for r in refs]
    total = 0.0
    for h, r, lcs in zip(hyps, refs, _lcs_lengths(refs, hyps), strict=True):
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

