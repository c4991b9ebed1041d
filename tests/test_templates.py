"""Shipped prompt templates: exact rendered strings, save/load, lookup and validation errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from medtune.records import ExamRecord
from medtune.templates import ExamTemplate, TemplateError, available, get_template

QUESTION = "下列哪种病变引起的胸痛常沿一侧肋间神经分布"
OPTIONS = {"A": "胸肌劳损", "B": "流行性胸痛", "C": "颈椎病", "D": "带状疱疹", "E": "皮下蜂窝组织炎"}
OPTION_LINES = "A: 胸肌劳损\nB: 流行性胸痛\nC: 颈椎病\nD: 带状疱疹\nE: 皮下蜂窝组织炎"

MULTI_QUESTION = "下列属于脂溶性维生素的是"
MULTI_OPTIONS = {"A": "维生素A", "B": "维生素C", "C": "维生素D", "D": "维生素B1"}
MULTI_OPTION_LINES = "A: 维生素A\nB: 维生素C\nC: 维生素D\nD: 维生素B1"

INSTRUCTION = (
    "对于后续问题，你需按照以下格式，向分析和正确选项字段填入答案。\n格式：\n问题：问题内容\n"
    "分析：{填入分析，50字以内}\n正确选项：{填入正确的选项和选项文本}\n\n"
)
SYSTEM = "你是一名医学专家，请回答下面的医学考试选择题。"


@pytest.fixture
def single() -> ExamRecord:
    return ExamRecord("s1", QUESTION, dict(OPTIONS), "D", "带状疱疹沿神经分布。").validate()


@pytest.fixture
def multi() -> ExamRecord:
    # Given as "CA": validation puts the letters in option order.
    return ExamRecord.from_dict(
        {"id": "m1", "question": MULTI_QUESTION, "options": MULTI_OPTIONS, "answer": "CA",
         "explanation": "维生素A、D为脂溶性维生素。"}
    )


@pytest.fixture
def no_explanation() -> ExamRecord:
    # Whitespace only counts as no explanation.
    return ExamRecord("e1", QUESTION, dict(OPTIONS), "D", "  \n").validate()


def test_available_lists_exactly_the_shipped_templates():
    assert available() == ["analysis_first", "chat", "cmexam_paper", "instructed", "qa"]


# name → (prompt(question, option lines), target single, target multi, target no explanation)
PLAIN = {
    "qa": (
        lambda q, o: f"问题：{q}\n{o}\n答案：",
        "D\n理由：带状疱疹沿神经分布。",
        "AC\n理由：维生素A、D为脂溶性维生素。",
        "D",
    ),
    "analysis_first": (
        lambda q, o: f"问题：{q}\n{o}\n分析：",
        "带状疱疹沿神经分布。\n正确选项：D.带状疱疹",
        "维生素A、D为脂溶性维生素。\n正确选项：AC.维生素A；维生素D",
        "正确选项：D.带状疱疹",
    ),
    "instructed": (
        lambda q, o: INSTRUCTION + f"问题：{q}\n{o}\n分析：",
        "带状疱疹沿神经分布。\n正确选项：D.带状疱疹",
        "维生素A、D为脂溶性维生素。\n正确选项：AC.维生素A；维生素D",
        "正确选项：D.带状疱疹",
    ),
    "cmexam_paper": (
        lambda q, o: f"问题: {q}, \n 选项: {o}",
        "答案: D 带状疱疹. \n 解释:带状疱疹沿神经分布。",
        "答案: AC 维生素A；维生素D. \n 解释:维生素A、D为脂溶性维生素。",
        "答案: D 带状疱疹.",
    ),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_template_renders_exact_strings(name, single, multi, no_explanation):
    prompt, target_single, target_multi, target_bare = PLAIN[name]
    tpl = get_template(name)
    assert tpl.name == name and tpl.version == 1 and tpl.chat is False
    assert tpl.render_prompt(single) == prompt(QUESTION, OPTION_LINES)
    assert tpl.render_target(single) == target_single
    assert tpl.render_prompt(multi) == prompt(MULTI_QUESTION, MULTI_OPTION_LINES)
    assert tpl.render_target(multi) == target_multi
    assert tpl.render_prompt(no_explanation) == prompt(QUESTION, OPTION_LINES)
    assert tpl.render_target(no_explanation) == target_bare


def test_instructed_starts_with_fixed_instruction_with_literal_braces(single):
    prompt = get_template("instructed").render_prompt(single)
    assert prompt.startswith("对于后续问题，你需按照以下格式")
    assert "分析：{填入分析，50字以内}\n" in prompt
    assert "正确选项：{填入正确的选项和选项文本}\n" in prompt
    assert "{{" not in prompt


def test_render_options_default_format():
    tpl = get_template("qa")
    assert tpl.render_options({"A": "甲", "B": "乙"}) == "A: 甲\nB: 乙"
    custom = dataclasses.replace(tpl, option_format="({letter}) {text}", option_separator=" / ")
    assert custom.render_options({"A": "甲", "B": "乙"}) == "(A) 甲 / (B) 乙"


def test_explanation_is_stripped_in_target(single):
    rec = dataclasses.replace(single, explanation="  带状疱疹沿神经分布。 \n")
    assert get_template("qa").render_target(rec) == "D\n理由：带状疱疹沿神经分布。"


def test_markers_of_shipped_templates():
    got = {n: (get_template(n).answer_marker, get_template(n).explanation_marker) for n in available()}
    assert got == {
        "analysis_first": ("正确选项：", None),
        "chat": ("答案：", "理由："),
        "cmexam_paper": ("答案:", "解释:"),
        "instructed": ("正确选项：", None),
        "qa": (None, "理由："),
    }


def test_chat_template_renders_through_tokenizer_chat_template(single, multi, no_explanation, tiny_tokenizer):
    tpl = get_template("chat")
    assert tpl.chat is True and tpl.system == SYSTEM
    assert tpl.render_prompt(single, tiny_tokenizer) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n问题：{QUESTION}\n{OPTION_LINES}\n请给出答案和理由。<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tpl.render_prompt(multi, tiny_tokenizer) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n问题：{MULTI_QUESTION}\n{MULTI_OPTION_LINES}\n请给出答案和理由。<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tpl.render_target(single) == "答案：D\n理由：带状疱疹沿神经分布。"
    assert tpl.render_target(multi) == "答案：AC\n理由：维生素A、D为脂溶性维生素。"
    assert tpl.render_target(no_explanation) == "答案：D"


def test_chat_template_without_system_has_no_system_turn(single, tiny_tokenizer):
    tpl = dataclasses.replace(get_template("chat"), system=None)
    assert tpl.render_prompt(single, tiny_tokenizer) == (
        f"<|im_start|>user\n问题：{QUESTION}\n{OPTION_LINES}\n请给出答案和理由。<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_needs_a_tokenizer_with_a_chat_template(single):
    tpl = get_template("chat")
    with pytest.raises(TemplateError, match="chat template"):
        tpl.render_prompt(single)

    class NoChat:
        chat_template = None

    with pytest.raises(TemplateError, match="'qa'"):
        tpl.render_prompt(single, NoChat())


@pytest.mark.parametrize("name", ["analysis_first", "chat", "cmexam_paper", "instructed", "qa"])
def test_save_load_round_trip(name, tmp_path, single, tiny_tokenizer):
    tpl = get_template(name)
    path = tmp_path / "run" / "template.yaml"
    tpl.save(path)
    loaded = ExamTemplate.load(path)
    assert loaded == tpl
    assert loaded.render_prompt(single, tiny_tokenizer) == tpl.render_prompt(single, tiny_tokenizer)
    assert loaded.render_target(single) == tpl.render_target(single)
    # Saved as a plain mapping with every field.
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data == dataclasses.asdict(tpl)
    assert sorted(p.name for p in path.parent.iterdir()) == ["template.yaml"]


def test_get_template_by_path(tmp_path, single):
    custom = dataclasses.replace(get_template("qa"), name="custom", prompt="Q：{question}\n{options}\nA：")
    path = tmp_path / "custom.yaml"
    custom.save(path)
    for ref in (path, str(path)):
        tpl = get_template(ref)
        assert tpl == custom
        assert tpl.render_prompt(single) == f"Q：{QUESTION}\n{OPTION_LINES}\nA："


def test_unknown_name_lists_available():
    with pytest.raises(TemplateError) as exc:
        get_template("qna")
    msg = str(exc.value)
    assert "unknown template 'qna'" in msg
    assert "available: analysis_first, chat, cmexam_paper, instructed, qa" in msg


def test_missing_yaml_path_is_an_unknown_template(tmp_path):
    with pytest.raises(TemplateError, match="unknown template"):
        get_template(tmp_path / "nope.yaml")


def _write(tmp_path, data) -> str:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_unknown_key_is_named(tmp_path):
    data = {**get_template("qa").to_dict(), "answer_cue": "答案："}
    with pytest.raises(TemplateError, match=r"unknown template key\(s\) \['answer_cue'\]"):
        ExamTemplate.load(_write(tmp_path, data))


def test_unknown_placeholder_is_named(tmp_path):
    data = {**get_template("qa").to_dict(), "prompt": "问题：{question}\n{choices}\n答案："}
    with pytest.raises(TemplateError) as exc:
        get_template(_write(tmp_path, data))
    msg = str(exc.value)
    assert "'prompt'" in msg and "choices" in msg and "['options', 'question']" in msg


def test_placeholder_not_allowed_in_target_without_explanation(tmp_path):
    data = {**get_template("qa").to_dict(), "target_without_explanation": "{letters}\n{explanation}"}
    with pytest.raises(TemplateError) as exc:
        ExamTemplate.load(_write(tmp_path, data))
    assert "'target_without_explanation'" in str(exc.value) and "explanation" in str(exc.value)


def test_missing_key_and_non_mapping(tmp_path):
    data = get_template("qa").to_dict()
    del data["target"]
    with pytest.raises(TemplateError, match="missing template key 'target'"):
        ExamTemplate.load(_write(tmp_path, data))
    with pytest.raises(TemplateError, match="expected a mapping"):
        ExamTemplate.load(_write(tmp_path, ["a", "b"]))
