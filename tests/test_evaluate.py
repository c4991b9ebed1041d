"""evaluate(): a hand-made predictions file with results worked out by hand; write_report()."""

from __future__ import annotations

import json

import pytest

from medtune.evaluation.evaluate import evaluate
from medtune.evaluation.metrics import CHAR_LABEL
from medtune.io import DataFileError, read_jsonl, write_jsonl
from medtune.report.markdown import write_report

Q = "下列哪种病变引起的胸痛常沿一侧肋间神经分布"
OPTS = {"A": "胸肌劳损", "B": "流行性胸痛", "C": "颈椎病", "D": "带状疱疹", "E": "皮下蜂窝组织炎"}
VQ = "下列属于脂溶性维生素的是"
VOPTS = {"A": "维生素A", "B": "维生素C", "C": "维生素D", "D": "维生素B1"}


def _row(id_, output, answer="D", explanation="带状疱疹沿神经分布", template="qa", question=Q, options=OPTS):
    row = {"id": id_, "question": question, "options": options, "answer": answer,
           "explanation": explanation, "annotations": {}, "prompt": "", "output": output}
    if template is not None:
        row["template"] = template
    return row


ROWS = [
    # q1 qa, correct: the qa prompt ends with 答案：, so the output starts with the letter;
    # explanation = text after 理由：.
    _row("q1", "D\n理由：带状疱疹沿神经分布"),
    # q2 qa, wrong answer B.
    _row("q2", "B\n理由：流行性胸痛表现为突发胸痛", explanation="带状疱疹可见沿神经分布的疱疹"),
    # q3 qa, refusal → no answer (scored wrong); no marker, so the whole output is the explanation.
    _row("q3", "无法回答", explanation="带状疱疹疼痛剧烈"),
    # q4 analysis_first, multi-answer; gold given as "CA" is normalised to "AC". Explanation is the
    # text before 正确选项：, the answer region after it ("AC.维生素A；维生素D" → AC).
    _row("q4", "维生素A和维生素D都是脂溶性维生素。\n正确选项：AC.维生素A；维生素D", answer="CA",
         explanation="维生素A、D为脂溶性维生素", template="analysis_first", question=VQ, options=VOPTS),
    # q5 qa, correct, empty reference explanation → excluded from explanation metrics only.
    _row("q5", "D\n理由：带状疱疹", explanation=""),
    # q6 no gold answer → unscorable, excluded and listed.
    _row("q6", "D\n理由：带状疱疹", answer=""),
    # q7 no template field: fallback markers (解释：) and the whole output parsed → 答案：D.
    _row("q7", "答案：D\n解释：带状疱疹沿神经分布", template=None),
]


@pytest.fixture
def predictions(tmp_path):
    path = tmp_path / "predictions.jsonl"
    write_jsonl(path, ROWS)
    return path


def test_results_worked_out_by_hand(predictions, tmp_path):
    out = tmp_path / "robust"
    results = evaluate(predictions, out)
    assert results == json.loads((out / "results.json").read_text(encoding="utf-8"))

    # Scored: q1 q2 q3 q4 q5 q7 (6); correct: q1 q4 q5 q7 → 4/6.
    assert results["n"] == 6
    assert results["accuracy"] == pytest.approx(400 / 6)
    # Weighted F1 over gold classes D (support 5) and AC (support 1):
    # D: predicted D for q1 q5 q7 → P = 3/3, R = 3/5, F1 = 0.75; AC: F1 = 1.
    # (5 · 0.75 + 1 · 1) / 6 = 4.75 / 6.
    assert results["f1"] == pytest.approx(100 * 4.75 / 6)
    assert results["n_no_answer"] == 1  # q3
    assert results["n_unscorable"] == 1  # q6
    # References: q1 q2 q3 q4 q7 scored; q5 (empty reference) excluded.
    assert results["n_explanations_scored"] == 5
    assert results["n_explanations_excluded"] == 1
    # Single-answer: q1 q2 q3 q5 q7 → correct q1 q5 q7 = 3/5; multi: q4 correct.
    assert results["accuracy_single"] == pytest.approx(60.0)
    assert results["n_single"] == 5
    assert results["accuracy_multi"] == pytest.approx(100.0)
    assert results["n_multi"] == 1
    assert results["parser"] == "robust"
    assert results["tokenizer"] == CHAR_LABEL
    assert results["templates"] == ["(none: fallback markers)", "analysis_first", "qa"]
    assert results["predictions"] == str(predictions)
    for key in ("bleu_1", "bleu_4", "rouge_1", "rouge_2", "rouge_l"):
        assert 0.0 <= results[key] <= 100.0

    scored = {r["id"]: r for r in read_jsonl(out / "scored.jsonl")}
    assert list(scored) == ["q1", "q2", "q3", "q4", "q5", "q7"]
    assert {i: r["parsed"] for i, r in scored.items()} == {
        "q1": "D", "q2": "B", "q3": "", "q4": "AC", "q5": "D", "q7": "D"}
    assert {i: r["correct"] for i, r in scored.items()} == {
        "q1": True, "q2": False, "q3": False, "q4": True, "q5": True, "q7": True}
    assert scored["q4"]["answer"] == "AC"
    assert scored["q1"]["explanation_scored"] == "带状疱疹沿神经分布"
    assert scored["q2"]["explanation_scored"] == "流行性胸痛表现为突发胸痛"
    assert scored["q3"]["explanation_scored"] == "无法回答"
    assert scored["q4"]["explanation_scored"] == "维生素A和维生素D都是脂溶性维生素。"
    assert scored["q7"]["explanation_scored"] == "带状疱疹沿神经分布"
    assert read_jsonl(out / "unscorable.jsonl") == [{"id": "q6", "reason": "no gold answer"}]


def test_strict_parser_on_same_file(predictions, tmp_path):
    results = evaluate(predictions, tmp_path / "strict", parser="strict")
    scored = {r["id"]: r["parsed"] for r in read_jsonl(tmp_path / "strict" / "scored.jsonl")}
    # Strict reads the raw output and tests every letter as a substring: q4's output contains
    # "AC" and "维生素D" → ACD (wrong); q7 has 解释 so only its first line "答案：D" is read.
    assert scored == {"q1": "D", "q2": "B", "q3": "", "q4": "ACD", "q5": "D", "q7": "D"}
    assert results["accuracy"] == pytest.approx(50.0)
    assert results["accuracy_multi"] == pytest.approx(0.0)
    assert results["parser"] == "strict"


def test_strict_and_robust_differ_on_answer_colon(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [_row("x", "Answer: B", answer="B", template=None)])
    robust = evaluate(path, tmp_path / "r")
    strict = evaluate(path, tmp_path / "s", parser="strict")
    assert robust["accuracy"] == 100.0
    assert strict["accuracy"] == 0.0  # "A" of "Answer" is a substring → AB
    assert read_jsonl(tmp_path / "s" / "scored.jsonl")[0]["parsed"] == "AB"


def test_exact_explanation_scores_100(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [_row("q1", "D\n理由：带状疱疹沿神经分布")])
    results = evaluate(path, tmp_path / "e")
    assert results["accuracy"] == 100.0 and results["f1"] == pytest.approx(100.0)
    for key in ("bleu_1", "bleu_4", "rouge_1", "rouge_2", "rouge_l"):
        assert results[key] == pytest.approx(100.0, abs=1e-6), key
    assert results["n_explanations_scored"] == 1 and results["n_explanations_excluded"] == 0
    assert results["n_unscorable"] == 0
    assert results["accuracy_multi"] is None and results["n_multi"] == 0
    assert not (tmp_path / "e" / "unscorable.jsonl").exists()


def test_no_reference_explanations_gives_none(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [_row("q1", "D", explanation=""), _row("q2", "C", explanation=" ")])
    results = evaluate(path, tmp_path / "e")
    assert results["accuracy"] == 50.0
    assert [results[k] for k in ("bleu_1", "bleu_4", "rouge_1", "rouge_2", "rouge_l")] == [None] * 5
    assert results["n_explanations_scored"] == 0 and results["n_explanations_excluded"] == 2


def test_forced_template_overrides_row_template(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [_row("q1", "分析略\n正确选项：D.带状疱疹", template="qa")])
    results = evaluate(path, tmp_path / "e", template="analysis_first")
    assert results["templates"] == ["analysis_first"]
    assert read_jsonl(tmp_path / "e" / "scored.jsonl")[0]["explanation_scored"] == "分析略"


def test_input_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [_row("q1", "D"), {"id": "q2", "options": OPTS, "answer": "D"}])
    with pytest.raises(DataFileError) as exc:
        evaluate(path, tmp_path / "e")
    assert exc.value.row == 2 and exc.value.field == "output"
    write_jsonl(path, [_row("q1", "D", answer="")])
    with pytest.raises(DataFileError, match="no row has a gold answer"):
        evaluate(path, tmp_path / "e")
    with pytest.raises(ValueError, match="unknown parser 'fuzzy'"):
        evaluate(path, tmp_path / "e", parser="fuzzy")


def test_write_report(predictions, tmp_path):
    evaluate(predictions, tmp_path / "robust")
    evaluate(predictions, tmp_path / "strict", parser="strict")
    out = write_report([tmp_path / "robust", tmp_path / "strict"], tmp_path / "report.md")
    assert out == tmp_path / "report.md"
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# medtune evaluation report"
    assert "Answer parser: **robust, strict**." in text
    # Results rows: 4/6 = 66.67, F1 79.17; strict 3/6 = 50.00.
    assert any(line.startswith("| robust | 6 | 66.67 | 79.17 | ") and line.endswith(" | 1 |") for line in lines)
    assert any(line.startswith("| strict | 6 | 50.00 | ") for line in lines)
    assert "| *paper: GPT-4* | 6811 | 61.60 | 61.70 | 0.17 | 0.06 | 29.74 | 14.84 | 11.51 | – |" in lines
    assert "| *paper: Human volunteers* | 6811 | 71.60 | – | – | – | – | – | – | – |" in lines
    assert "| robust | 6 | 1 | 1 | 5 | 1 | 60.00 (5) | 100.00 (1) |" in lines
    assert "## Sample answers: robust" in lines and "## Sample answers: strict" in lines
    # Samples: the first two correct (q1, q4) then the first two wrong (q2, q3).
    opts = "A. 胸肌劳损；B. 流行性胸痛；C. 颈椎病；D. 带状疱疹；E. 皮下蜂窝组织炎"
    assert f"- ✓ **{Q}** {opts}  " in lines
    assert "  gold `D`, parsed `D`; output: D ⏎ 理由：带状疱疹沿神经分布" in lines
    assert "  gold `D`, parsed `—`; output: 无法回答" in lines
    section = text.split("## Sample answers: robust")[1].split("## Sample answers: strict")[0]
    assert [line[:3] for line in section.splitlines() if line.startswith("- ")] == ["- ✓", "- ✓", "- ✗", "- ✗"]


def test_report_uses_label_and_needs_results(tmp_path, predictions):
    evaluate(predictions, tmp_path / "e1")
    results_path = tmp_path / "e1" / "results.json"
    data = json.loads(results_path.read_text(encoding="utf-8"))
    results_path.write_text(json.dumps({**data, "label": "my model"}), encoding="utf-8")
    text = write_report([tmp_path / "e1"], tmp_path / "r.md", samples=0).read_text(encoding="utf-8")
    assert "| my model | 6 | 66.67 |" in text
    assert "## Sample answers" not in text
    with pytest.raises(FileNotFoundError, match="no results.json"):
        write_report([tmp_path / "missing"], tmp_path / "r2.md")


def test_jieba_bleu_is_labelled_wherever_the_table_appears(tmp_path):
    import json as _json

    from medtune.evaluation.evaluate import evaluate
    from medtune.report.markdown import load_eval, results_table

    pred = tmp_path / "p.jsonl"
    row = {"id": "1", "question": "q", "options": {"A": "甲", "B": "乙"}, "answer": "A",
           "explanation": "因为甲是对的", "template": "qa", "output": "A\n理由：因为甲是对的"}
    pred.write_text(_json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    evaluate(pred, tmp_path / "char")
    evaluate(pred, tmp_path / "jieba", tokenizer="jieba")
    table = results_table([load_eval(tmp_path / "char"), load_eval(tmp_path / "jieba")], paper=False)
    assert "| jieba (BLEU: legacy jieba-word variant) |" in table
    assert "| char |" in table
