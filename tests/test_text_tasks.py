"""Dialogue summarisation and question generation: convert → SFT → predict → evaluate, base vs tuned."""

from __future__ import annotations

import json

import pytest

from medtune.cli import main
from medtune.data.instructions import summary_to_conversation
from medtune.evaluation.text_tasks import (
    TOKENIZATION_LABELS,
    choose_tokenization,
    detect_lang,
    detect_task,
    evaluate_text,
    format_table,
    text_scores,
    tokenize,
)

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
    assert text_scores(["患者咳嗽"], ["患者咳嗽"]) == pytest.approx(
        {"rouge_1": 100.0, "rouge_2": 100.0, "rouge_l": 100.0, "n_reference_without_tokens": 0})
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


# ---- ROUGE tokenisation follows the language ---------------------------------------------------------

REF_EN = "The patient has had a dry cough for a week and no fever."
UNRELATED_EN = "Stock markets rallied sharply on Friday afternoon."


def test_unrelated_english_sentence_no_longer_scores_rouge_1_near_80():
    # Characters (the old unit): hyp has 21 distinct characters, ref 22 (the space counts, as ""), and
    # they share 17 (t o c k "" a r e s i d h p y n f .): F = 2·17 / (21 + 22) = 34/43.
    char = text_scores([UNRELATED_EN], [REF_EN], "char")
    assert char["rouge_1"] == pytest.approx(100 * 34 / 43, abs=1e-5)
    # Words: no word in common.
    word = text_scores([UNRELATED_EN], [REF_EN], "word")
    assert (word["rouge_1"], word["rouge_2"], word["rouge_l"]) == (0.0, 0.0, 0.0)


def test_word_rouge_values_by_hand():
    hyp = "The cat sat on the mat near the door."
    assert tokenize(hyp, "word") == ["the", "cat", "sat", "on", "the", "mat", "near", "the", "door"]
    scores = text_scores([hyp], [REF_EN], "word")
    # sets: hyp {the cat sat on mat near door} = 7, ref 12 distinct words, shared {the}:
    # F1 = 2·1 / (7 + 12) = 2/19
    assert scores["rouge_1"] == pytest.approx(100 * 2 / 19, abs=1e-5)
    assert scores["rouge_2"] == 0.0
    # LCS = 1 over 9 hyp and 13 ref tokens: R = 1/13, P = 1/9, β = P/R = 13/9,
    # F = (1 + β²)·R·P / (R + β²·P) = (250/81 · 1/117) / (1/13 + 169/729) = 250/2926
    assert scores["rouge_l"] == pytest.approx(100 * 250 / 2926, abs=1e-6)
    # punctuation is dropped, case and width folded, CJK characters are tokens of their own
    assert tokenize("ＣＯＶＩＤ-19患者, fever!", "word") == ["covid", "19", "患", "者", "fever"]


def test_jieba_words_are_an_option_for_chinese():
    assert tokenize("患者咳嗽", "jieba") == ["患者", "咳嗽"]
    # jieba: ["患者", "咳嗽"] vs ["患者", "发热"]: one shared word of two → 50; characters share 2 of 4 → 50 too,
    # but bigrams differ: characters share "患者", jieba words share no bigram
    assert text_scores(["患者咳嗽"], ["患者发热"], "jieba")["rouge_1"] == pytest.approx(50.0, abs=1e-5)
    assert text_scores(["患者咳嗽"], ["患者发热"], "jieba")["rouge_2"] == 0.0
    assert text_scores(["患者咳嗽"], ["患者发热"], "char")["rouge_2"] == pytest.approx(100 / 3, abs=1e-5)


def test_language_detection_counts_cjk_characters_against_latin_words():
    assert detect_lang([REF_EN, "Paracetamol 500 mg"]) == "en"
    assert detect_lang(["患者服用Paracetamol和Ibuprofen后好转"]) == "zh"   # 8 CJK characters vs 2 words
    assert detect_lang(["Dr. Wang (王医生) advised rest and fluids."]) == "en"  # 3 CJK characters vs 6 words
    assert choose_tokenization([REF_EN]) == {"lang": "en", "lang_source": "detected", "tokenization": "word",
                                             "tokenizer": TOKENIZATION_LABELS["word"]}
    assert choose_tokenization([REF_EN], lang="zh")["tokenization"] == "char"
    assert choose_tokenization(["患者"], tokenization="jieba")["tokenization"] == "jieba"


def test_reference_without_word_tokens_is_left_out_and_counted():
    scores = text_scores(["fever", "anything"], [REF_EN, "……！"], "word")
    assert scores["n_reference_without_tokens"] == 1
    assert scores["rouge_1"] == pytest.approx(100 * 2 * (1 / 1) * (1 / 12) / (1 + 1 / 12 + 1e-8))


def _write_predictions(path, pairs, meta=None):
    rows = [{"id": f"s{i}", "messages": [{"role": "user", "content": "Summarise."}], "reference": ref,
             "meta": meta or {}, "output": out} for i, (out, ref) in enumerate(pairs)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_english_summaries_are_scored_on_words_and_the_unit_is_stored_and_printed(tmp_path, capsys):
    preds = _write_predictions(tmp_path / "p.jsonl", [(UNRELATED_EN, REF_EN), ("The cat sat on the mat near the door.",
                                                                                REF_EN)])
    assert main(["evaluate", str(preds), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "ev" / "results.json").read_text(encoding="utf-8"))
    assert (res["lang"], res["lang_source"], res["tokenization"]) == ("en", "detected", "word")
    assert res["tokenizer"] == TOKENIZATION_LABELS["word"]
    assert res["rouge_1"] == pytest.approx((0 + 100 * 2 / 19) / 2, abs=1e-5)
    assert f"| ev | 2 | {res['rouge_1']:.2f} | {res['rouge_2']:.2f} | {res['rouge_l']:.2f} | word |" in printed
    assert f"tokenisation: {TOKENIZATION_LABELS['word']}; language en (detected)" in printed
    # asked for: characters
    assert main(["evaluate", str(preds), "--out", str(tmp_path / "ev-char"), "--tokenizer", "char"]) == 0
    res_char = json.loads((tmp_path / "ev-char" / "results.json").read_text(encoding="utf-8"))
    assert res_char["tokenization"] == "char" and res_char["rouge_1"] > 70


def test_baseline_scored_on_other_tokens_is_refused(tmp_path, capsys):
    preds = _write_predictions(tmp_path / "p.jsonl", [(UNRELATED_EN, REF_EN)])
    assert main(["evaluate", str(preds), "--out", str(tmp_path / "base"), "--tokenizer", "char"]) == 0
    assert main(["evaluate", str(preds), "--out", str(tmp_path / "tuned"), "--baseline", str(tmp_path / "base")]) == 2
    assert ("scored ROUGE on char tokens, this evaluation on word tokens: their difference would mean nothing"
            in capsys.readouterr().err)
    assert main(["evaluate", str(preds), "--out", str(tmp_path / "tuned"), "--baseline", str(tmp_path / "base"),
                 "--tokenizer", "char"]) == 0


def test_chinese_summaries_keep_character_rouge_of_earlier_releases(tmp_path):
    from medtune.evaluation.metrics import rouge_l, rouge_n

    pairs = [("患者咳嗽一周，无发热。", DIALOGUES[0]["summary"]), ("腹泻两天。", DIALOGUES[1]["summary"])]
    preds = _write_predictions(tmp_path / "p.jsonl", pairs)
    results = evaluate_text(preds, tmp_path / "ev")
    outs, refs = [o for o, _ in pairs], [r for _, r in pairs]
    assert (results["lang"], results["tokenization"]) == ("zh", "char")
    assert results["rouge_1"] == rouge_n(outs, refs, 1) and results["rouge_l"] == rouge_l(outs, refs)


def test_question_generation_evaluate_with_no_well_formed_output_does_not_raise_typeerror_nonetype(tmp_path, capsys):
    # The base model's case: nothing it writes has the question format, so answer_valid is undefined (None);
    # printing the table used to fail with "TypeError: unsupported format string passed to NoneType.__format__".
    reference = "1．黄帝内经分为哪两部分？\nA．素问和灵枢\nB．伤寒和金匮\nC．本草和方剂\nD．针经和脉经\n答案：A"
    preds = _write_predictions(tmp_path / "p.jsonl", [("黄帝内经是医书。", reference), ("", reference)],
                               meta={"lang": "zh", "n_questions": 1})
    assert main(["evaluate", str(preds), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "ev" / "results.json").read_text(encoding="utf-8"))
    assert (res["task"], res["n"], res["n_well_formed"], res["well_formed"], res["answer_valid"]) == (
        "question-generation", 2, 0, 0.0, None)
    assert res["rouge_l"] > 0 and res["tokenization"] == "char"
    assert f"| ev | 2 | 0.00 | n/a | {res['rouge_l']:.2f} | char |" in printed
    assert "well-formed: 0 of 2 outputs; answer_valid is n/a" in printed
    # and as the baseline of a run that does write the format: its Δ is n/a where the base has none
    tuned = _write_predictions(tmp_path / "t.jsonl", [(reference, reference), (reference, reference)],
                               meta={"lang": "zh", "n_questions": 1})
    assert main(["evaluate", str(tuned), "--out", str(tmp_path / "ev-t"), "--baseline",
                 str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "| base (ev) | 2 | 0.00 | n/a |" in printed and "| Δ | | +100.00 | n/a |" in printed


def test_predictions_without_any_reference_say_so(tmp_path):
    """Symptom: PromptCBLUE test-split predictions (no targets) gave only "no rows to score"."""
    from medtune.evaluation.text_tasks import evaluate_text
    from medtune.io import DataFileError, write_jsonl

    rows = [{"id": f"test-{i}", "prompt": "问诊对话的实体抽取：但吃奶就吐\n选项：医疗操作，症状", "reference": "",
             "output": "上述句子中的实体包含：\n症状实体：吐", "meta": {"task_dataset": "IMCS-V2-NER",
                                                               "answer_choices": ["医疗操作", "症状"]}}
            for i in range(3)]
    write_jsonl(tmp_path / "pred_test.jsonl", rows)
    with pytest.raises(DataFileError, match=r"pred_test\.jsonl, field 'reference': none of the 3 rows has a "
                                            r"reference text .*--task promptcblue --gold FILE"):
        evaluate_text(tmp_path / "pred_test.jsonl", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("task", ["question-generation", "text"])
def test_rows_in_two_languages_are_refused_not_scored_by_the_first_rows_language(tmp_path, task):
    """Symptom: the same 4 question-generation rows scored 11.85 (char) in one order and 6.48 (word) reversed."""
    from medtune.evaluation.text_tasks import evaluate_text
    from medtune.io import DataFileError, write_jsonl

    zh = {"reference": "患者发热三天，伴咳嗽，诊断为上呼吸道感染。", "output": "患者发热，咳嗽。"}
    en = {"reference": "The patient had a fever for three days with a cough.", "output": "Fever and cough."}
    rows = [{"id": f"r{i}", "prompt": "p", **pair,
             **({"meta": {"lang": "zh" if pair is zh else "en", "task": "question-generation"}}
                if task == "question-generation" else {})}
            for i, pair in enumerate([zh, zh, en, en])]
    for order in (rows, rows[::-1]):
        write_jsonl(tmp_path / "mixed.jsonl", order)
        with pytest.raises(DataFileError, match=r"2 rows in en and 2 rows in zh \(.*\): a ROUGE unit fits one "
                                                r"language .*pass --lang or --tokenizer"):
            evaluate_text(tmp_path / "mixed.jsonl", tmp_path / "eval", task=task)
    # told which unit to use, it scores every row on it
    results = evaluate_text(tmp_path / "mixed.jsonl", tmp_path / "eval", task=task, lang="zh")
    assert results["n"] == 4
