"""Dialogue summarisation and question generation: convert → SFT → predict → evaluate, base vs tuned."""

from __future__ import annotations

import json

import pytest

from medtune.cli import main
from medtune.data.instructions import summary_to_conversation
from medtune.evaluation.text_tasks import detect_task, format_table, text_scores

DIALOGUES = [
    ({"dialogue": [{"speaker": "患者", "text": "医生，我咳嗽一周了，晚上更厉害。"},
                   {"speaker": "医生", "text": "有没有发烧？痰是什么颜色？"},
                   {"speaker": "患者", "text": "不发烧，痰是白色的。"},
                   {"speaker": "医生", "text": "考虑急性支气管炎，多喝水，可以服用止咳药，一周不好再来复查。"}],
      "summary": "患者咳嗽一周夜间加重，无发热，白痰；医生考虑急性支气管炎，建议多饮水、止咳治疗，一周后复查。"}),
    ({"dialogue": "患者：孩子拉肚子两天，一天五六次。\n医生：有没有呕吐？精神怎么样？\n患者：没有呕吐，精神还好。\n"
                  "医生：注意补液，口服补液盐，清淡饮食，如有脱水及时就医。",
      "summary": "患儿腹泻两天每日五六次，无呕吐，精神可；医生建议口服补液盐补液、清淡饮食，脱水时就医。"}),
    ({"dialogue": [{"speaker": "患者", "text": "最近血压160/100，头有点晕。"},
                   {"speaker": "医生", "text": "以前有高血压吗？在吃什么药？"},
                   {"speaker": "患者", "text": "去年查出来的，一直没吃药。"},
                   {"speaker": "医生", "text": "需要规律服用降压药，低盐饮食，每天监测血压。"}],
      "summary": "患者血压160/100伴头晕，去年诊断高血压未服药；医生建议规律降压治疗、低盐饮食、每日监测血压。"}),
]


def test_summary_row_to_conversation():
    conv = summary_to_conversation(DIALOGUES[0], "d1")
    assert conv.messages[0]["content"].startswith("请阅读下面的医患对话")
    assert "患者：医生，我咳嗽一周了，晚上更厉害。\n医生：有没有发烧？" in conv.messages[0]["content"]
    assert conv.messages[0]["content"].endswith("总结：")
    assert conv.reply == DIALOGUES[0]["summary"]


def test_text_scores_identity_and_detect():
    assert text_scores(["患者咳嗽"], ["患者咳嗽"]) == pytest.approx({"rouge_1": 100.0, "rouge_2": 100.0, "rouge_l": 100.0})
    assert detect_task([{"meta": {"task_dataset": "CHIP-STS"}}]) == "promptcblue"
    assert detect_task([{"meta": {"lang": "zh", "n_questions": 4}}]) == "question-generation"
    assert detect_task([{"meta": {}}]) == "text"


@pytest.mark.slow
def test_summarisation_base_vs_tuned(tmp_path, tiny_model_dir):
    raw = tmp_path / "dialogues.jsonl"
    raw.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DIALOGUES), encoding="utf-8")
    assert main(["convert", "summary", str(raw), "--out", str(tmp_path / "conv.jsonl")]) == 0
    run = tmp_path / "run"
    assert main(["train", "src/medtune/configs/quickstart.yaml", f"model.name_or_path={tiny_model_dir}",
                 f"data.train={tmp_path / 'conv.jsonl'}", f"train.output_dir={run}", "train.epochs=60",
                 "train.batch_size=3", "data.max_length=256", "train.report_to=none"]) == 0
    for name, src in (("base", ["--model", str(tiny_model_dir)]), ("tuned", ["--run", str(run)])):
        assert main(["predict", *src, "--data", str(tmp_path / "conv.jsonl"), "--out", str(tmp_path / f"{name}.jsonl"),
                     "--max-new-tokens", "64"]) == 0
    assert main(["evaluate", str(tmp_path / "base.jsonl"), "--out", str(tmp_path / "eval-base")]) == 0
    assert main(["evaluate", str(tmp_path / "tuned.jsonl"), "--out", str(tmp_path / "eval-tuned"),
                 "--baseline", str(tmp_path / "eval-base")]) == 0
    res = json.loads((tmp_path / "eval-tuned" / "results.json").read_text())
    assert res["task"] == "text" and res["n"] == 3
    # the tuned model reproduces the summaries it was trained on; the random base model does not
    assert res["rouge_l"] > 80 and res["baseline"]["rouge_l"] < 20
    assert res["improvement"]["rouge_l"] == pytest.approx(res["rouge_l"] - res["baseline"]["rouge_l"])
    table = format_table(res, "tuned")
    assert "| base (eval-base) | 3 |" in table and "| Δ |" in table


@pytest.mark.slow
def test_question_generation_pairs_sft_and_evaluation(tmp_path, tiny_model_dir):
    from medtune.data.exam_xlsx import format_output, parse_questions
    from test_exam_xlsx import write_book  # the fixture workbook builder of the converter tests

    passage = "黄帝内经是中国最早的医学典籍，分为素问和灵枢两部分，奠定了中医学的理论基础。"
    questions = ("1．黄帝内经分为哪两部分？（3分）\nA．素问和灵枢 B．伤寒和金匮\nC．本草和方剂 D．针经和脉经\n"
                 "2．黄帝内经的地位是\nA．最早的医学典籍 B．最早的药学专著\nC．最早的方书 D．最早的针灸书\n"
                 "3．黄帝内经奠定了什么？\nA．中医学的理论基础 B．西医学的基础\nC．药物分类 D．外科手术\n"
                 "4．素问属于\nA．黄帝内经 B．伤寒论\nC．神农本草经 D．千金方")
    book = write_book(tmp_path / "exam.xlsx", {"语文": [(passage, questions, "1．A 2．A 3．A 4．A")]})
    assert main(["convert", "exam-xlsx", str(book), "--lang", "zh", "--out", str(tmp_path / "pairs.jsonl")]) == 0
    pair = json.loads((tmp_path / "pairs.jsonl").read_text(encoding="utf-8"))
    assert pair["messages"][1]["content"] == format_output(parse_questions(questions, "zh"), list("AAAA"), "zh")
    run = tmp_path / "run"
    assert main(["train", "src/medtune/configs/quickstart.yaml", f"model.name_or_path={tiny_model_dir}",
                 f"data.train={tmp_path / 'pairs.jsonl'}", f"train.output_dir={run}", "train.max_steps=150",
                 "train.batch_size=1", "data.max_length=512", "train.report_to=none"]) == 0
    assert main(["predict", "--run", str(run), "--data", str(tmp_path / "pairs.jsonl"),
                 "--out", str(tmp_path / "pred.jsonl"), "--max-new-tokens", "300"]) == 0
    assert main(["evaluate", str(tmp_path / "pred.jsonl"), "--out", str(tmp_path / "eval")]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["task"] == "question-generation" and res["n"] == 1
    assert set(res) >= {"well_formed", "answer_valid", "rouge_l"}
    assert res["rouge_l"] > 50  # one memorised passage: the questions come back largely intact
