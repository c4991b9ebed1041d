"""``--parser strict`` reproduces the CMExam paper in both halves: answer and explanation.

The paper's code (``evaluate_lora_result.py``) takes the explanation as
``output.split('解释:')[1].strip()`` when the ASCII ``解释:`` occurs, else the whole output
unstripped, and ``无答案`` for an empty cell. The robust parser uses the template's markers
instead. The evaluation tests below check numbers worked out by hand from docs/METRICS.md.
"""

from __future__ import annotations

import math

import pytest

from medtune.evaluation.evaluate import evaluate
from medtune.evaluation.extract import parse_strict, read_answer, strict_explanation
from medtune.evaluation.metrics import bleu, rouge_l, rouge_n
from medtune.io import read_jsonl, write_jsonl

OPTS = {"A": "胸肌劳损", "B": "流行性胸痛", "C": "颈椎病", "D": "带状疱疹", "E": "皮下蜂窝组织炎"}


@pytest.mark.parametrize(("output", "expected"), [
    # ASCII 解释: → text between the first and the second marker, stripped
    ("答案: D 带状疱疹. \n 解释:沿神经分布的疱疹 ", "沿神经分布的疱疹"),
    ("答案: D 解释:带状疱疹 解释:沿神经分布", "带状疱疹"),
    ("D 解释:", ""),
    # full-width 解释：, 理由：, 分析：, 解释 without a colon: not markers → whole output, unstripped
    ("D\n解释：带状疱疹沿神经分布", "D\n解释：带状疱疹沿神经分布"),
    ("D\n理由：沿神经分布的疱疹  ", "D\n理由：沿神经分布的疱疹  "),
    ("分析：带状疱疹\n正确选项：D", "分析：带状疱疹\n正确选项：D"),
    ("D 解释 带状疱疹", "D 解释 带状疱疹"),
    # no marker: trailing (and leading) whitespace stays
    (" 带状疱疹   ", " 带状疱疹   "),
    ("   ", "   "),  # whitespace is not the paper's empty cell
    # the empty cell (NaN in the paper's CSV) → the literal 无答案
    ("", "无答案"),
    (None, "无答案"),
])
def test_strict_explanation_exact_strings(output, expected):
    assert strict_explanation(output) == expected


def test_strict_answer_matches_the_paper():
    # '解释' anywhere (any colon, even none) → only the first line is read.
    assert parse_strict("答案：D\n解释：A项胸肌劳损错误", OPTS) == "D"
    assert parse_strict("答案：D\n解释 A项错误", OPTS) == "D"
    # otherwise the whole output: letter A of the second line is a substring too
    assert parse_strict("答案：D\n理由：A项胸肌劳损错误", OPTS) == "AD"
    # option chosen iff its letter or the first whitespace token of its text is a substring
    assert parse_strict("皮下 蜂窝", {"A": "皮下 蜂窝组织炎", "B": "颈椎病"}) == "A"
    assert parse_strict("蜂窝组织炎", {"A": "皮下 蜂窝组织炎", "B": "颈椎病"}) == ""
    # the empty cell: no answer
    assert parse_strict("", OPTS) == ""


def _rows(outputs_refs, template=None):
    rows = []
    for i, (output, ref) in enumerate(outputs_refs):
        row = {"id": f"q{i}", "question": "下列哪种病变引起的胸痛常沿一侧肋间神经分布", "options": OPTS,
               "answer": "D", "explanation": ref, "output": output}
        if template:
            row["template"] = template
        rows.append(row)
    return rows


def test_strict_scores_trailing_spaces_and_empty_output_by_hand(tmp_path):
    # Row a: no marker, two trailing spaces. Row b: empty output (strict hypothesis: 无答案).
    path = tmp_path / "p.jsonl"
    write_jsonl(path, _rows([("疱疹  ", "疱疹"), ("", "答案不明")]))
    strict = evaluate(path, tmp_path / "s", parser="strict")
    robust = evaluate(path, tmp_path / "r")
    scored = read_jsonl(tmp_path / "s" / "scored.jsonl")
    assert [r["explanation_scored"] for r in scored] == ["疱疹  ", "无答案"]
    assert [r["explanation_scored"] for r in read_jsonl(tmp_path / "r" / "scored.jsonl")] == ["疱疹", ""]

    # ROUGE tokens of "疱疹  ": " ".join → "疱 疹    " → ['疱', '疹', '', '', '', ''] (6 tokens).
    # ROUGE-1 a: H = {疱, 疹, ''}, R = {疱, 疹}: P = 2/3, Rc = 1 → F = 0.8.
    #         b: H = {无, 答, 案}, R = {答, 案, 不, 明}: P = 2/3, Rc = 1/2 → F = 4/7.
    assert strict["rouge_1"] == pytest.approx(100 * (0.8 + 4 / 7) / 2, abs=1e-5)
    # ROUGE-2 a: H = {疱疹, 疹'', ''''}, R = {疱疹}: P = 1/3, Rc = 1 → F = 0.5.
    #         b: H = {无答, 答案}, R = {答案, 案不, 不明}: P = 1/2, Rc = 1/3 → F = 0.4.
    assert strict["rouge_2"] == pytest.approx(100 * (0.5 + 0.4) / 2, abs=1e-5)
    # ROUGE-L a: LCS 2, Rc = 1, P = 2/6, β = 1/3 → F = (10/9 · 1/3) / (1 + 1/27) = 10/28.
    #         b: LCS 2 (答案), Rc = 1/2, P = 2/3, β = 4/3 → F = (25/9 · 1/3) / (1/2 + 32/27) = 50/91.
    assert strict["rouge_l"] == pytest.approx(100 * (10 / 28 + 50 / 91) / 2, abs=1e-5)
    # BLEU ignores whitespace: hypotheses 疱疹 (2) and 无答案 (3), references 2 and 4 tokens.
    # Clipped unigram matches 2 + 2 → p1 = 4/5; c = 5 ≤ r = 6 → BP = exp(1 − 6/5).
    assert strict["bleu_1"] == pytest.approx(100 * 0.8 * math.exp(-0.2), abs=1e-4)
    # BLEU-4: the only trigram, 无答案, does not occur in 答案不明 → p3 = 0 → 0.
    assert strict["bleu_4"] == 0.0

    # Robust: "疱疹" is exact (1.0 for every ROUGE), "" scores 0 → mean 0.5.
    for key in ("rouge_1", "rouge_2", "rouge_l"):
        assert robust[key] == pytest.approx(50.0, abs=1e-5)
    # p1 = 2/2, c = 2, r = 6 → BP = exp(1 − 3).
    assert robust["bleu_1"] == pytest.approx(100 * math.exp(-2), abs=1e-4)


NON_CANONICAL = [
    # (output, reference, strict hypothesis, robust hypothesis)
    ("D\n解释：带状疱疹沿肋间神经分布", "带状疱疹沿肋间神经分布",
     "D\n解释：带状疱疹沿肋间神经分布", "带状疱疹沿肋间神经分布"),   # full-width colon: not strict's marker
    ("D\n理由：疼痛呈刀割样  ", "疼痛呈刀割样，剧烈难忍",
     "D\n理由：疼痛呈刀割样  ", "疼痛呈刀割样"),                     # 理由： unknown to strict; spaces kept
    ("答案: D 解释:带状疱疹可见疱疹 解释:沿神经分布", "带状疱疹可见沿神经分布的疱疹",
     "带状疱疹可见疱疹", "带状疱疹可见疱疹 解释:沿神经分布"),        # a second 解释:
    ("", "带状疱疹沿神经分布", "无答案", ""),                             # the empty cell
    ("带状疱疹，沿神经分布 ", "带状疱疹沿神经分布",
     "带状疱疹，沿神经分布 ", "带状疱疹，沿神经分布"),                 # no marker: whole output
]


def test_strict_explanations_on_non_canonical_outputs(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, _rows([(o, r) for o, r, _, _ in NON_CANONICAL]))  # no template: fallback markers
    strict = evaluate(path, tmp_path / "s", parser="strict")
    robust = evaluate(path, tmp_path / "r")
    refs = [r for _, r, _, _ in NON_CANONICAL]
    strict_hyps = [s for _, _, s, _ in NON_CANONICAL]
    robust_hyps = [h for _, _, _, h in NON_CANONICAL]
    assert [r["explanation_scored"] for r in read_jsonl(tmp_path / "s" / "scored.jsonl")] == strict_hyps
    assert [r["explanation_scored"] for r in read_jsonl(tmp_path / "r" / "scored.jsonl")] == robust_hyps
    for results, hyps in ((strict, strict_hyps), (robust, robust_hyps)):
        assert results["bleu_1"] == pytest.approx(bleu(hyps, refs, 1))
        assert results["bleu_4"] == pytest.approx(bleu(hyps, refs, 4))
        assert results["rouge_1"] == pytest.approx(rouge_n(hyps, refs, 1))
        assert results["rouge_2"] == pytest.approx(rouge_n(hyps, refs, 2))
        assert results["rouge_l"] == pytest.approx(rouge_l(hyps, refs))
    for key in ("bleu_1", "rouge_1", "rouge_2", "rouge_l"):
        assert strict[key] != pytest.approx(robust[key]), key


def test_strict_ignores_the_template_robust_follows_it(tmp_path):
    # cmexam_paper's markers are ASCII (答案:/解释:); qa's explanation marker is 理由：.
    path = tmp_path / "p.jsonl"
    write_jsonl(path, _rows([("D\n理由：沿神经分布 ", "沿神经分布")], template="qa"))
    evaluate(path, tmp_path / "s", parser="strict")
    evaluate(path, tmp_path / "r")
    assert read_jsonl(tmp_path / "s" / "scored.jsonl")[0]["explanation_scored"] == "D\n理由：沿神经分布 "
    assert read_jsonl(tmp_path / "r" / "scored.jsonl")[0]["explanation_scored"] == "沿神经分布"
    assert read_answer("D\n理由：沿神经分布 ", OPTS, None, "理由：").explanation == "沿神经分布"
