"""Converter prompts the user controls: summary and question-generation instructions, --lang and --prompt."""

from __future__ import annotations

import json

import pytest

from medtune.cli import main
from medtune.data.exam_xlsx import load_instruction, question_prompt, read_exam_xlsx
from medtune.data.instructions import convert_summaries, summary_instruction, summary_to_conversation
from medtune.templates import TemplateError, prompt_text
from test_exam_xlsx import EN_ROWS, ZH_ROWS, write_book  # the converter tests' workbook builder

EN_DIALOGUE = {"dialogue": [{"speaker": "Patient", "text": "I have had a cough for a week."},
                            {"speaker": "Doctor", "text": "Any fever? Drink water and rest."}],
               "summary": "A week of cough without fever; advised fluids and rest."}
ZH_DIALOGUE = {"dialogue": [{"speaker": "患者", "text": "我咳嗽一周了。"}, {"speaker": "医生", "text": "多喝水，注意休息。"}],
               "summary": "患者咳嗽一周；医生建议多饮水、休息。"}
EN_PROMPT = ("Read the doctor-patient dialogue below and summarise, in one paragraph, the patient's main complaint, "
             "the doctor's assessment and the advice given.\n\n{dialogue}\n\nSummary:")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_summary_prompt_per_language():
    assert summary_instruction() == "请阅读下面的医患对话，用一段话总结患者的主诉、医生的判断和建议。\n\n{dialogue}\n\n总结："
    assert summary_instruction("en") == EN_PROMPT
    conv = summary_to_conversation(EN_DIALOGUE, "e1", lang="en")
    assert conv.messages[0]["content"] == EN_PROMPT.replace(
        "{dialogue}", "Patient: I have had a cough for a week.\nDoctor: Any fever? Drink water and rest.")
    assert conv.reply == EN_DIALOGUE["summary"]
    # the default stays the Chinese prompt with full-width speaker colons
    assert "患者：我咳嗽一周了。\n医生：多喝水，注意休息。\n\n总结：" in summary_to_conversation(ZH_DIALOGUE, "z1").messages[0]["content"]
    with pytest.raises(TemplateError, match=r"no shipped summary prompt for language 'fr' \(shipped: en, zh\); "
                                            "write your own and pass it with --prompt FILE"):
        summary_instruction("fr")


def test_own_summary_prompt_file(tmp_path):
    own = tmp_path / "prompt.txt"
    own.write_text("总结这段对话（不超过50字）：\n{dialogue}\n摘要：\n", encoding="utf-8")  # editor's final newline
    result = convert_summaries(_jsonl(tmp_path / "d.jsonl", [ZH_DIALOGUE]), tmp_path / "out.jsonl", prompt_path=own)
    assert [r.messages[0]["content"] for r in result.read.records] == [
        "总结这段对话（不超过50字）：\n患者：我咳嗽一周了。\n医生：多喝水，注意休息。\n摘要："]
    assert result.other_language == []
    (tmp_path / "bad.txt").write_text("Summarise this.", encoding="utf-8")
    with pytest.raises(TemplateError, match="bad.txt: a summary prompt must contain {dialogue}"):
        prompt_text("summary", path=tmp_path / "bad.txt")
    with pytest.raises(TemplateError, match="prompt file .*missing.txt: cannot read it"):
        prompt_text("summary", path=tmp_path / "missing.txt")


def test_dialogues_in_the_other_language_are_counted(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [EN_DIALOGUE, ZH_DIALOGUE, EN_DIALOGUE])
    zh = convert_summaries(data, tmp_path / "zh.jsonl", lang="zh")
    assert zh.other_language == ["d-00001", "d-00003"] and len(zh.read.records) == 3
    en = convert_summaries(data, tmp_path / "en.jsonl", lang="en")
    assert en.other_language == ["d-00002"]


def test_cli_summary_lang_and_prompt(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [EN_DIALOGUE])
    assert main(["convert", "summary", str(data), "--lang", "en", "--out", str(tmp_path / "en.jsonl")]) == 0
    record = json.loads((tmp_path / "en.jsonl").read_text(encoding="utf-8"))
    assert record["messages"][0]["content"].startswith("Read the doctor-patient dialogue below")
    assert capsys.readouterr().err == ""
    # English dialogues with the Chinese prompt: written, with a warning that says what to do
    assert main(["convert", "summary", str(data), "--out", str(tmp_path / "zh.jsonl")]) == 0
    assert capsys.readouterr().err == (
        "medtune convert: warning: 1 of 1 dialogues look English (e.g. d-00001) but the prompt is Chinese "
        "(--lang zh); pass --lang en or --prompt FILE\n")
    (tmp_path / "bad.txt").write_text("no placeholder", encoding="utf-8")
    assert main(["convert", "summary", str(data), "--prompt", str(tmp_path / "bad.txt"),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "a summary prompt must contain {dialogue}" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_auto_on_a_summary_file_is_the_summary_converter(tmp_path, capsys):
    """Symptom: convert auto put English dialogues under the Chinese prompt without the summary converter's warning."""
    data = _jsonl(tmp_path / "d.jsonl", [EN_DIALOGUE])
    assert main(["convert", "auto", str(data), "--out", str(tmp_path / "zh.jsonl")]) == 0
    assert capsys.readouterr().err == (
        "medtune convert: warning: 1 of 1 dialogues look English (e.g. d-00001) but the prompt is Chinese "
        "(--lang zh); pass --lang en or --prompt FILE\n")
    assert main(["convert", "auto", str(data), "--lang", "en", "--out", str(tmp_path / "en.jsonl")]) == 0
    record = json.loads((tmp_path / "en.jsonl").read_text(encoding="utf-8"))
    assert record["messages"][0]["content"].startswith("Read the doctor-patient dialogue below")


@pytest.mark.parametrize("argv, message", [
    (["alpaca", "--lang", "en"], "--lang applies to exam-xlsx and summary only, not alpaca"),
    (["auto", "--sheet", "英语"], "--sheet applies to exam-xlsx only, not summary"),  # auto found a summary file
    (["summary", "--sheet", "英语"], "--sheet applies to exam-xlsx only, not summary"),
])
def test_cli_refuses_options_a_format_would_ignore(tmp_path, capsys, argv, message):
    data = _jsonl(tmp_path / "d.jsonl", [ZH_DIALOGUE])
    fmt, *options = argv
    assert main(["convert", fmt, str(data), *options, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert message in capsys.readouterr().err


def test_question_generation_prompt_per_language_and_own_file(tmp_path):
    book = write_book(tmp_path / "exam.xlsx", {"语文": ZH_ROWS, "英语": EN_ROWS})
    english = read_exam_xlsx(book, "en").records[0]
    assert english.messages[0]["content"].startswith(
        "Read the passage below and write 4 multiple-choice questions about it. Each question has a stem, "
        "four options A-D and the answer.\n\n")
    own = tmp_path / "qg.txt"
    own.write_text("Passage:\n{passage}\n\nWrite {n} exam questions (A-D) on it.\n", encoding="utf-8")
    assert load_instruction("en", 3, own) == "Passage:\n{passage}\n\nWrite 3 exam questions (A-D) on it."
    assert question_prompt("Q{passage}Q", "P") == "QPQ" and question_prompt("Do it.", "P") == "Do it.\n\nP"
    mine = read_exam_xlsx(book, "en", prompt_path=own).records[0]
    passage = english.messages[0]["content"].split("\n\n", 1)[1]
    assert mine.messages[0]["content"] == f"Passage:\n{passage}\n\nWrite 4 exam questions (A-D) on it."
    assert mine.messages[1] == english.messages[1]  # the target does not depend on the prompt
    with pytest.raises(ValueError, match="lang must be one of"):
        load_instruction("fr")


def test_cli_exam_xlsx_prompt(tmp_path):
    book = write_book(tmp_path / "exam.xlsx", {"英语": EN_ROWS})
    own = tmp_path / "qg.txt"
    own.write_text("Write {n} questions about this text.", encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    assert main(["convert", "exam-xlsx", str(book), "--lang", "en", "--prompt", str(own), "--out", str(out)]) == 0
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first["messages"][0]["content"].startswith("Write 4 questions about this text.\n\n")
