"""Metrics against values worked out by hand (arithmetic in the comments)."""

import math
import random
import warnings
from collections import Counter

import pytest

from medtune.evaluation.metrics import (
    METRICS,
    _lcs_length,
    answer_scores,
    bleu,
    explanation_scores,
    rouge_l,
    rouge_n,
)

# ------------------------------------------------------------------------------ answers


def test_accuracy_with_no_answer_row():
    gold = ["A", "B", "C", "AC"]
    pred = ["A", "", "C", "AB"]
    s = answer_scores(gold, pred)
    # correct rows: 1 and 3 -> 2/4 = 50.0; the "" row stays in the denominator
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["n"] == 4 and s["n_no_answer"] == 1
    # single-answer gold: rows 1-3, 2 correct -> 2/3 = 66.67; multi: row 4, wrong -> 0.0
    assert s["n_single"] == 3 and s["accuracy_single"] == pytest.approx(200 / 3)
    assert s["n_multi"] == 1 and s["accuracy_multi"] == 0.0


def test_weighted_f1_four_rows():
    gold = ["A", "A", "A", "B"]
    pred = ["A", "A", "B", ""]
    s = answer_scores(gold, pred)
    # class A: TP=2 FP=0 FN=1 -> P=1, R=2/3, F=2*1*(2/3)/(1+2/3)=0.8, support 3
    # class B: TP=0 FP=1 FN=1 -> F=0, support 1
    # class NO_ANSWER: support 0 -> weight 0
    # weighted F = (3*0.8 + 1*0) / 4 = 0.6 -> 60.0 ; accuracy = 2/4 = 50.0
    assert s["f1"] == pytest.approx(60.0)
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["n_no_answer"] == 1
    assert s["accuracy_multi"] is None and s["n_multi"] == 0


def test_answer_scores_rejects_bad_input():
    with pytest.raises(ValueError):
        answer_scores(["A"], ["A", "B"])
    with pytest.raises(ValueError):
        answer_scores(["A", ""], ["A", "B"])


# ------------------------------------------------------------------------------ BLEU


def _bleu_by_definition(hyps, refs, n):
    """METRICS.md formula on non-whitespace characters, written independently of sacrebleu."""
    hyp_toks = [[c for c in h if not c.isspace()] for h in hyps]
    ref_toks = [[c for c in r if not c.isspace()] for r in refs]
    c, r = sum(map(len, hyp_toks)), sum(map(len, ref_toks))
    log_sum = 0.0
    for k in range(1, n + 1):
        match = total = 0
        for h, rf in zip(hyp_toks, ref_toks, strict=True):
            hc = Counter(tuple(h[i:i + k]) for i in range(len(h) - k + 1))
            rc = Counter(tuple(rf[i:i + k]) for i in range(len(rf) - k + 1))
            match += sum(min(v, rc[g]) for g, v in hc.items())
            total += max(0, len(h) - k + 1)
        if match == 0:
            return 0.0
        log_sum += math.log(match / total)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return 100 * bp * math.exp(log_sum / n)


def test_bleu_with_brevity_penalty_c_less_than_r():
    hyp, ref = "变异型心绞痛发作", "变异型心绞痛夜间发作"
    # c = 8, r = 10 -> BP = exp(1 - 10/8) = exp(-0.25) = 0.7788
    # p1 = 8/8 (every hyp char is in ref)
    # p2 = 6/7 (变异 异型 型心 心绞 绞痛 发作 match; 痛发 does not)
    # p3 = 4/6 (变异型 异型心 型心绞 心绞痛)
    # p4 = 3/5 (变异型心 异型心绞 型心绞痛)
    # BLEU-1 = 0.7788 * 1 = 77.88
    # BLEU-4 = 0.7788 * (1 * 6/7 * 4/6 * 3/5) ** 0.25 = 0.7788 * 0.342857 ** 0.25 = 0.7788 * 0.7652 = 59.59
    assert bleu([hyp], [ref], 1) == pytest.approx(77.88, abs=0.01)
    assert bleu([hyp], [ref], 4) == pytest.approx(59.59, abs=0.01)


def test_bleu_without_brevity_penalty_c_greater_than_r():
    hyp, ref = "患者胸痛三天伴发热", "患者胸痛三天"
    # c = 9 > r = 6 -> BP = 1
    # p1 = 6/9, p2 = 5/8 (患者 者胸 胸痛 痛三 三天), p3 = 4/7, p4 = 3/6
    # BLEU-1 = 6/9 = 66.67
    # BLEU-4 = (6/9 * 5/8 * 4/7 * 3/6) ** 0.25 = 0.119048 ** 0.25 = 0.5874 -> 58.74
    assert bleu([hyp], [ref], 1) == pytest.approx(66.67, abs=0.01)
    assert bleu([hyp], [ref], 4) == pytest.approx(58.74, abs=0.01)


def test_bleu_is_corpus_level():
    hyps = ["变异型心绞痛发作", "患者胸痛三天伴发热"]
    refs = ["变异型心绞痛夜间发作", "患者胸痛三天"]
    # statistics are pooled before dividing: c = 8+9 = 17 > r = 10+6 = 16 -> BP = 1
    # p1 = (8+6)/(8+9) = 14/17, p2 = (6+5)/(7+8) = 11/15, p3 = (4+4)/(6+7) = 8/13, p4 = (3+3)/(5+6) = 6/11
    # BLEU-4 = (14/17 * 11/15 * 8/13 * 6/11) ** 0.25 = 0.202715 ** 0.25 = 0.6710 -> 67.10
    expected = 100 * (14 / 17 * 11 / 15 * 8 / 13 * 6 / 11) ** 0.25
    assert expected == pytest.approx(67.10, abs=0.01)
    assert bleu(hyps, refs, 4) == pytest.approx(expected)


def test_bleu_latin_word_is_characters_and_c_equals_r():
    hyp, ref = "HBsAg阳性", "HBsAg阴性"
    # HBsAg is five tokens: H B s A g 阳 性 -> c = r = 7 -> BP = 1
    # p1 = 6/7 -> BLEU-1 = 85.71 (a word tokenizer would give 2/3)
    # p2 = 4/6 (HB Bs sA Ag), p3 = 3/5 (HBs BsA sAg), p4 = 2/4 (HBsA BsAg)
    # BLEU-4 = (6/7 * 4/6 * 3/5 * 2/4) ** 0.25 = 0.171429 ** 0.25 = 0.6435 -> 64.35
    assert bleu([hyp], [ref], 1) == pytest.approx(85.71, abs=0.01)
    assert bleu([hyp], [ref], 4) == pytest.approx(64.35, abs=0.01)


def test_bleu_zero_precision_gives_zero():
    hyp, ref = "胸痛发热", "腹痛发冷"
    # p1 = 2/4 (痛 发), p2 = 1/3 (痛发), p3 = 0/2 -> BLEU-4 = 0 ; BLEU-1 = 1 * 2/4 = 50.0 (c = r)
    assert bleu([hyp], [ref], 1) == pytest.approx(50.0)
    assert bleu([hyp], [ref], 4) == 0.0
    # a hypothesis shorter than 4 characters has no 4-grams at all -> p4 = 0/0 -> 0
    assert bleu(["胸痛"], ["胸痛"], 4) == 0.0


def test_bleu_whitespace_is_not_a_token():
    assert bleu(["胸 痛"], ["胸痛"], 2) == pytest.approx(100.0)


def test_bleu_all_empty_hypotheses_warn_and_score_zero():
    with pytest.warns(UserWarning, match="empty"):
        assert bleu(["", " "], ["胸痛", "发热"], 4) == 0.0


def test_bleu_matches_definition_on_random_corpora():
    rng = random.Random(0)
    alphabet = "心绞痛胸闷发热 AB"
    for _ in range(50):
        hyps = ["".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(3)]
        refs = ["".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(3)]
        if not any(h.strip() for h in hyps) or not any(r.strip() for r in refs):
            continue
        for n in (1, 2, 4):
            assert bleu(hyps, refs, n) == pytest.approx(_bleu_by_definition(hyps, refs, n), abs=1e-9)


def test_bleu_jieba_variant():
    assert bleu(["患者胸痛三天"], ["患者胸痛三天"], 1, tokenizer="jieba") == pytest.approx(100.0)
    with pytest.raises(ValueError):
        bleu(["a"], ["a"], 1, tokenizer="zh")


# ------------------------------------------------------------------------------ ROUGE


def test_rouge_uses_sets_not_counts():
    # H = {痛}, R = {痛} -> o = 1, P = 1, Rc = 1 -> F = 2/(2 + 1e-8) = 100 (counts would give P = 1/3)
    assert rouge_n(["痛痛痛"], ["痛"], 1) == pytest.approx(100.0)
    # ROUGE-1: H = {胸, 痛}, R = {胸, 闷, 痛} -> o = 2, P = 1, Rc = 2/3 -> F = (4/3)/(5/3) = 0.8 -> 80
    assert rouge_n(["胸痛胸痛"], ["胸闷胸痛"], 1) == pytest.approx(80.0)
    # ROUGE-2: H = {胸痛, 痛胸}, R = {胸闷, 闷胸, 胸痛} -> o = 1, P = 1/2, Rc = 1/3
    #          F = 2 * 1/6 / (5/6) = 0.4 -> 40
    assert rouge_n(["胸痛胸痛"], ["胸闷胸痛"], 2) == pytest.approx(40.0)


def test_rouge_whitespace_characters_are_tokens():
    # " ".join("胸 痛").split(" ") = [胸, "", "", 痛]; ref tokens = [胸, 痛]
    # ROUGE-1: H = {胸, "", 痛}, R = {胸, 痛} -> P = 2/3, Rc = 1 -> F = (4/3)/(5/3) = 0.8 -> 80
    assert rouge_n(["胸 痛"], ["胸痛"], 1) == pytest.approx(80.0)
    # ROUGE-L: LCS = 2, P = 2/4 = 0.5, Rc = 1, beta = 0.5
    #          F = 1.25 * 1 * 0.5 / (1 + 0.25 * 0.5) = 0.625 / 1.125 = 0.5556 -> 55.56
    assert rouge_l(["胸 痛"], ["胸痛"]) == pytest.approx(55.56, abs=0.01)


def test_rouge_l_beta_formula():
    # LCS(心绞, 心绞疼痛) = 2 -> P = 2/2 = 1, Rc = 2/4 = 0.5, beta = 2
    # F = (1 + 4) * 0.5 * 1 / (0.5 + 4 * 1) = 2.5 / 4.5 = 0.5556 -> 55.56 (plain F1 would be 66.67)
    assert rouge_l(["心绞"], ["心绞疼痛"]) == pytest.approx(55.56, abs=0.01)


def test_rouge_empty_hypothesis_scores_zero_and_is_not_dropped():
    # pair 1 scores 0, pair 2 scores 100 -> mean = 50
    assert rouge_n(["", "胸痛"], ["胸痛", "胸痛"], 1) == pytest.approx(50.0)
    assert rouge_n(["", "胸痛"], ["胸 痛", "胸痛"], 1) == pytest.approx(50.0)  # no "" token for ""
    assert rouge_l(["", "胸痛"], ["胸痛", "胸痛"]) == pytest.approx(50.0)


def test_rouge_rejects_empty_reference():
    with pytest.raises(ValueError):
        rouge_n(["胸痛"], [""], 1)
    with pytest.raises(ValueError):
        rouge_l(["胸痛"], ["  "])


def test_lcs_matches_dynamic_programming():
    dp = _lcs_dp

    rng = random.Random(1)
    for _ in range(200):
        a = rng.choices("abcd ", k=rng.randint(0, 15))
        b = rng.choices("abcd ", k=rng.randint(0, 15))
        assert _lcs_length(a, b) == dp(a, b)


# ------------------------------------------------------------------------------ explanations


def test_explanation_scores_excludes_empty_references_and_keeps_empty_hypotheses():
    hyps = ["", "胸痛", "随便"]
    refs = ["胸痛", "胸痛", "  "]
    s = explanation_scores(hyps, refs)
    assert s["n_explanations_scored"] == 2 and s["n_explanations_excluded"] == 1
    # BLEU-1 over the two kept pairs: c = 0 + 2 = 2, r = 4 -> BP = exp(1 - 4/2) = e^-1; p1 = 2/2
    # -> 100 * 0.3679 = 36.79
    assert s["bleu_1"] == pytest.approx(100 * math.exp(-1))
    # ROUGE: pair 1 = 0, pair 2 = 100 -> 50
    assert s["rouge_1"] == pytest.approx(50.0)
    assert s["rouge_l"] == pytest.approx(50.0)
    assert s["tokenizer"].startswith("characters")


def test_explanation_scores_nothing_scorable():
    s = explanation_scores(["胸痛"], [""])
    assert s["n_explanations_scored"] == 0 and s["n_explanations_excluded"] == 1
    assert s["bleu_4"] is None and s["rouge_l"] is None


def test_explanation_scores_jieba_variant_is_labelled():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = explanation_scores(["患者胸痛三天"], ["患者胸痛三天"], tokenizer="jieba")
    assert "legacy jieba-word BLEU" in s["tokenizer"]
    assert s["bleu_1"] == pytest.approx(100.0)


def test_metric_metadata():
    assert set(METRICS) == {"accuracy", "f1", "bleu_1", "bleu_4", "rouge_1", "rouge_2", "rouge_l"}
    assert METRICS["bleu_4"].level == "corpus"
    assert METRICS["rouge_l"].level == "mean over items"
    assert all(m.higher_is_better and m.tokenisation for m in METRICS.values())


def _sacrebleu(hyps, refs, n, tokenize):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize, smooth_method="none", max_ngram_order=n).corpus_score(hyps, [refs]).score


@pytest.mark.parametrize("seed", range(6))
def test_streamed_bleu_statistics_equal_sacrebleu_to_the_last_bit(seed):
    """medtune counts BLEU's statistics pair by pair (68k rows took 5.4 GB in sacrebleu); sacrebleu is the reference."""
    from medtune.evaluation.metrics import bleu_scores

    rng = random.Random(seed)
    alphabet = list("心脾肝肾肺气血阴阳虚实寒热") + list("ABCDE ab") + [" ", "\u3000", "\t", "，", "。"]

    def text(lo, hi):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    refs = [text(1, 60) for _ in range(200)]
    hyps = [text(0, 60) if rng.random() < 0.7 else r[: rng.randint(0, len(r))] for r in refs]
    hyps[3] = ""  # an empty hypothesis among others
    ours = bleu_scores(hyps, refs, (1, 2, 4), "char")
    for n in (1, 2, 4):
        assert ours[n] == _sacrebleu(hyps, refs, n, "char")  # exactly: same integer statistics, same formula


def test_streamed_bleu_jieba_equals_sacrebleu_on_jieba_words():
    from medtune.evaluation.metrics import _jieba_tokens, bleu_scores

    refs = ["患者发热三天，伴咳嗽，诊断为上呼吸道感染。", "带状疱疹沿肋间神经分布，疼痛剧烈。", "HBsAg 阳性提示乙型肝炎病毒感染"]
    hyps = ["患者发热，咳嗽，上呼吸道感染", "带状疱疹疼痛沿神经分布", "乙型肝炎 HBsAg 阳性"]
    ours = bleu_scores(hyps, refs, (1, 4), "jieba")
    words = [_jieba_tokens(h) for h in hyps], [_jieba_tokens(r) for r in refs]
    assert ours == {1: _sacrebleu(*words, 1, "none"), 4: _sacrebleu(*words, 4, "none")}


# ------------------------------------------------------------------------------ vectorised counting
# BLEU's statistics and ROUGE-N's sets are counted a chunk of pairs at a time in numpy, and the
# LCS runs over character strings: the per-pair implementations they replaced are kept below as
# the reference and must agree exactly (==, not approx), chunk boundaries, chunk splits and the
# per-pair fallback included.


def _lcs_dp(a, b) -> int:
    """Longest common subsequence by textbook dynamic programming (the oracle for the fast LCS)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _reference_rouge_n(hyps, refs, n):
    total = 0.0
    for hyp, ref in zip(hyps, refs, strict=True):
        ht = " ".join(hyp).split(" ") if hyp else []
        rt = " ".join(ref).split(" ") if ref else []
        h = set(zip(*(ht[i:] for i in range(n)), strict=False))
        r = set(zip(*(rt[i:] for i in range(n)), strict=False))
        overlap = len(h & r)
        p = overlap / len(h) if h else 0.0
        rc = overlap / len(r) if r else 0.0
        total += 2 * p * rc / (p + rc + 1e-8)
    return 100.0 * total / len(hyps)


def _reference_rouge_l(hyps, refs):
    lcs = _lcs_dp

    total = 0.0
    for hyp, ref in zip(hyps, refs, strict=True):
        h = " ".join(hyp).split(" ") if hyp else []
        r = " ".join(ref).split(" ") if ref else []
        n = lcs(r, h)
        if n == 0:
            continue
        rc, p = n / len(r), n / len(h)
        beta = p / (rc + 1e-12)
        total += (1 + beta**2) * rc * p / (rc + beta**2 * p + 1e-12)
    return 100.0 * total / len(hyps)


def _random_pairs(seed, n_pairs=120):
    rng = random.Random(seed)
    # whitespace of several kinds, Latin, supplementary-plane characters, a lone surrogate (JSON allows it)
    alphabet = list("心脾肝肾肺气血阴阳") + list("ABab") + [" ", " ", "\u3000", "\t", "\n", "，", "\U00020000", "\ud800"]

    def text(lo, hi):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    refs = [text(1, 40) for _ in range(n_pairs)]
    refs = [r if r.strip() else r + "心" for r in refs]
    hyps = [text(0, 40) if rng.random() < 0.6 else r[: rng.randint(0, len(r))] for r in refs]
    hyps[:4] = ["", " ", "心", refs[4]]  # empty, only a space, one token, the reference itself
    refs[5] = "肺"  # a one-token reference has no bigram
    return hyps, refs


def test_rouge_string_maps_rouge_tokens_one_to_one():
    from medtune.evaluation.metrics import _rouge_string, _rouge_tokens

    hyps, refs = _random_pairs(7)
    for text in [*hyps, *refs, " ", "  ", " a ", "a  b"]:
        tokens, chars = _rouge_tokens(text), _rouge_string(text)
        assert len(tokens) == len(chars)
        assert [t or " " for t in tokens] == list(chars)


@pytest.mark.parametrize("chunk_pairs, key_bits", [(2048, 63), (7, 63), (8, 22), (1, 9)])
@pytest.mark.parametrize("seed", range(3))
def test_vectorised_counting_equals_the_per_pair_implementation(monkeypatch, seed, chunk_pairs, key_bits):
    """Small chunks cut pairs across chunk boundaries; 22-bit keys make chunks split in halves, 9-bit
    keys leave single pairs to the per-pair fallback (BLEU and ROUGE-N)."""
    from medtune.evaluation import metrics
    from medtune.evaluation.metrics import _char_bleu_statistics, _token_bleu_statistics

    monkeypatch.setattr(metrics, "_CHUNK_PAIRS", chunk_pairs)
    monkeypatch.setattr(metrics, "_KEY_BITS", key_bits)
    hyps, refs = _random_pairs(seed)
    stripped = ["".join(t.split()) for t in hyps], ["".join(t.split()) for t in refs]
    # the oracle: the per-pair Counter code (itself checked against sacrebleu above), one token per character
    assert _char_bleu_statistics(*stripped, 4) == _token_bleu_statistics([list(t) for t in stripped[0]],
                                                                         [list(t) for t in stripped[1]], 4)
    for n in (1, 2, 3):
        assert rouge_n(hyps, refs, n) == _reference_rouge_n(hyps, refs, n)
    assert rouge_l(hyps, refs) == _reference_rouge_l(hyps, refs)
    ours = explanation_scores(hyps, refs)
    assert ours["bleu_4"] == _sacrebleu(hyps, refs, 4, "char") and ours["bleu_1"] == _sacrebleu(hyps, refs, 1, "char")


def test_weighted_f1_equals_sklearn_bit_for_bit():
    """answer_scores no longer imports scikit-learn (1.8 s); its F1 must still be sklearn's exactly."""
    from sklearn.metrics import precision_recall_fscore_support

    from medtune.evaluation.metrics import NO_ANSWER, _weighted_f1

    rng = random.Random(3)
    pool = ["A", "B", "C", "D", "E", "AB", "ACD", "BE", "ABCDE", NO_ANSWER, "X"]
    for _ in range(300):
        labels = rng.sample(pool, rng.randint(1, len(pool)))
        n = rng.randint(1, 80)
        gold = [rng.choice(labels) for _ in range(n)]
        pred = [rng.choice(labels + [NO_ANSWER]) for _ in range(n)]
        ours = _weighted_f1(gold, pred)
        assert ours == float(precision_recall_fscore_support(gold, pred, average="weighted", zero_division=0)[2])
    gold, pred = ["A"] * 5, ["B"] * 5  # no label right: F1 0, not nan
    assert _weighted_f1(gold, pred) == 0.0


def test_lcs_of_pairs_sharing_a_reference_equals_dynamic_programming():
    """References several pairs share are taken together with their masks built once (bits over the
    reference, the loop over the hypothesis); the lengths must be the per-pair ones."""
    from medtune.evaluation.metrics import _lcs_lengths

    rng = random.Random(4)
    shared = ["", " ", "心", "心肺 心 肺", "abcab ba", "".join(rng.choices("心肺ab  ", k=60))]
    refs = [rng.choice(shared) if rng.random() < 0.7 else "".join(rng.choices("心肺ab ", k=rng.randint(0, 30)))
            for _ in range(400)]
    hyps = ["".join(rng.choices("心肺abc  ", k=rng.randint(0, 70))) for _ in refs]
    hyps[:3] = [refs[0], "", refs[2][::-1]]
    assert _lcs_lengths(refs, hyps) == [_lcs_dp(r, h) for r, h in zip(refs, hyps, strict=True)]
    repeated = [r for r in refs if r.strip()]
    kept = [h for r, h in zip(refs, hyps, strict=True) if r.strip()]
    assert rouge_l(kept, repeated) == _reference_rouge_l(kept, repeated)
