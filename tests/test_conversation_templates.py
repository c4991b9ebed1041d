"""Conversation templates as YAML: shipped renderings, the user's own system/instruction text, save/reload, errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from medtune.data.conversations import conversation_prompt, encode_segments, segments
from medtune.data.sft import IGNORE_INDEX
from medtune.templates import (
    ConversationTemplate,
    TemplateError,
    available,
    conversation_template,
    load_template_file,
)

EOS = "<|im_end|>"  # the tiny tokenizer's EOS token
SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
SINGLE = [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息"}]
MULTI = [{"role": "system", "content": "你是医生"},
         {"role": "user", "content": "头痛怎么办"}, {"role": "assistant", "content": "多休息"},
         {"role": "user", "content": "还有呢"}, {"role": "assistant", "content": "多喝水"}]

# template → (single-turn segments, multi-turn segments); True marks a trained (reply) segment
RENDERED = {
    "plain": (
        [("头痛怎么办？", False), ("多休息" + EOS, True)],
        [("你是医生\n", False), ("用户：头痛怎么办\n助手：", False), ("多休息" + EOS, True),
         ("\n用户：还有呢\n助手：", False), ("多喝水" + EOS, True)],
    ),
    "alpaca": (
        [(SYSTEM + "\n\n", False), ("### Instruction:\n头痛怎么办？\n\n### Response:\n", False), ("多休息" + EOS, True)],
        # the conversation's own system message replaces the template's
        [("你是医生\n\n", False), ("### Instruction:\n头痛怎么办\n\n### Response:\n", False), ("多休息" + EOS, True),
         ("\n\n### Instruction:\n还有呢\n\n### Response:\n", False), ("多喝水" + EOS, True)],
    ),
    "instruct_zh": (
        [("### 指令\n头痛怎么办？\n\n### 输出\n", False), ("多休息\n\n### 结束" + EOS, True)],
        [("你是医生\n\n", False), ("### 指令\n头痛怎么办\n\n### 输出\n", False), ("多休息\n\n### 结束" + EOS, True),
         ("\n\n### 指令\n还有呢\n\n### 输出\n", False), ("多喝水\n\n### 结束" + EOS, True)],
    ),
    "chat": (
        [("<|im_start|>user\n头痛怎么办？<|im_end|>\n<|im_start|>assistant\n", False), ("多休息<|im_end|>\n", True)],
        [("<|im_start|>system\n你是医生<|im_end|>\n<|im_start|>user\n头痛怎么办<|im_end|>\n<|im_start|>assistant\n",
          False), ("多休息<|im_end|>\n", True),
         ("<|im_start|>user\n还有呢<|im_end|>\n<|im_start|>assistant\n", False), ("多喝水<|im_end|>\n", True)],
    ),
}


def test_shipped_conversation_templates_are_listed_apart_from_exam_ones():
    assert available("conversation") == ["alpaca", "chat", "instruct_zh", "plain"]
    assert available() == ["analysis_first", "chat", "cmexam_paper", "instructed", "qa"]
    assert [conversation_template(n).chat for n in available("conversation")] == [False, True, False, False]
    assert {conversation_template(n).version for n in available("conversation")} == {1}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_shipped_template_renders_exact_segments(name, tiny_tokenizer):
    single, multi = RENDERED[name]
    assert segments(SINGLE, name, tiny_tokenizer) == single
    assert segments(MULTI, name, tiny_tokenizer) == multi
    # the template object and its name give the same text
    assert segments(MULTI, conversation_template(name), tiny_tokenizer) == multi


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_inference_prompt_tokens_equal_training_prefix(name, tiny_tokenizer):
    """Prompt and reply tokenised apart: the inference prompt is exactly the ids trained before the last reply."""
    tok = tiny_tokenizer
    tpl = dataclasses.replace(conversation_template(name), instruction="请简要回答", system="你是全科医生")
    for messages in (SINGLE, MULTI):
        ids, labels = encode_segments(tok, segments(messages, tpl, tok), tpl)
        text, special = conversation_prompt(messages[:-1], tpl, tok)
        prompt_ids = tok(text, add_special_tokens=special)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        reply = segments(messages, tpl, tok)[-1][0]
        assert ids[len(prompt_ids):] == tok(reply, add_special_tokens=False)["input_ids"]
        assert labels[len(prompt_ids):] == ids[len(prompt_ids):]  # the last reply is trained, all of it
        n_trained = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t, a in segments(messages, tpl, tok) if a)
        assert sum(lab != IGNORE_INDEX for lab in labels) == n_trained


def test_own_system_and_instruction_text(tiny_tokenizer):
    alpaca = dataclasses.replace(conversation_template("alpaca"), instruction="根据问题给出诊疗建议。")
    assert segments(SINGLE, alpaca, tiny_tokenizer) == [
        (SYSTEM + "\n\n", False),
        ("### Instruction:\n根据问题给出诊疗建议。\n\n### Input:\n头痛怎么办？\n\n### Response:\n", False),
        ("多休息" + EOS, True)]
    plain = dataclasses.replace(conversation_template("plain"), system="你是医生", instruction="请回答：")
    assert segments(SINGLE, plain, tiny_tokenizer) == [
        ("你是医生\n", False), ("请回答：\n头痛怎么办？", False), ("多休息" + EOS, True)]
    # the instruction goes into the first user message only; a conversation's own system message wins
    assert segments(MULTI, plain, tiny_tokenizer) == [
        ("你是医生\n", False), ("用户：请回答：\n头痛怎么办\n助手：", False), ("多休息" + EOS, True),
        ("\n用户：还有呢\n助手：", False), ("多喝水" + EOS, True)]
    chat = dataclasses.replace(conversation_template("chat"), system="你是医生", instruction="请回答：")
    assert conversation_prompt(SINGLE[:1], chat, tiny_tokenizer) == (
        "<|im_start|>system\n你是医生<|im_end|>\n<|im_start|>user\n请回答：\n头痛怎么办？<|im_end|>\n"
        "<|im_start|>assistant\n", False)


def test_user_yaml_template_saved_and_reloaded_renders_the_same(tmp_path, tiny_tokenizer):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "kind: conversation\nname: triage\nversion: 3\ndescription: 分诊\n"
        "system: 你是分诊护士\ninstruction: 判断应挂哪个科室\n"
        "user_format: \"问：{user}\\n答：\"\nassistant_format: \"{reply}\"\n", encoding="utf-8")
    tpl = conversation_template(path)
    assert (tpl.name, tpl.version, tpl.chat, tpl.system) == ("triage", 3, False, "你是分诊护士")
    assert segments(SINGLE, tpl, tiny_tokenizer) == [
        ("你是分诊护士\n", False), ("问：判断应挂哪个科室\n头痛怎么办？\n答：", False), ("多休息" + EOS, True)]
    # saved with the run as template.yaml and reloaded at inference: same object, same prompt
    tpl.save(tmp_path / "run" / "template.yaml")
    loaded = load_template_file(tmp_path / "run" / "template.yaml")
    assert loaded == tpl
    assert conversation_prompt(SINGLE[:1], loaded, tiny_tokenizer) == conversation_prompt(SINGLE[:1], tpl, tiny_tokenizer)
    assert yaml.safe_load((tmp_path / "run" / "template.yaml").read_text(encoding="utf-8")) == dataclasses.asdict(tpl)


@pytest.mark.parametrize("name", ["plain", "chat", "alpaca", "instruct_zh"])
def test_shipped_template_round_trip(name, tmp_path):
    tpl = conversation_template(name)
    tpl.save(tmp_path / "template.yaml")
    assert load_template_file(tmp_path / "template.yaml") == tpl
    assert conversation_template(tmp_path / "template.yaml") == tpl  # a copy of a shipped one is allowed


@pytest.mark.parametrize("name", ["plain", "chat"])
def test_run_template_written_before_rendering_fields_loads_as_shipped(name, tmp_path):
    path = tmp_path / "template.yaml"
    path.write_text(f"name: {name}\nversion: 1\nkind: conversation\ndescription: old\n", encoding="utf-8")
    assert load_template_file(path) == conversation_template(name)
    path.write_text(f"name: {name}\nversion: 7\nkind: conversation\n", encoding="utf-8")
    with pytest.raises(TemplateError, match=f"'{name}' version 7 is not shipped"):
        load_template_file(path)


def test_clean_output_cuts_at_the_end_marker():
    tpl = conversation_template("instruct_zh")
    assert tpl.reply_end == "\n\n### 结束"
    assert tpl.clean_output("多休息\n\n### 结束\n### 指令\n…") == "多休息"
    assert tpl.clean_output("多休息 ### 结束") == "多休息"
    assert tpl.clean_output("多休息") == "多休息"
    assert conversation_template("plain").clean_output("a\n\n### 结束") == "a\n\n### 结束"


def _write(tmp_path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, message", [
    ("kind: conversation\nname: x\nversion: 1\nuser_fmt: '{user}'\n", r"unknown conversation template key\(s\) \['user_fmt'\]"),
    ("kind: conversation\nname: x\n", "missing template key 'version'"),
    ("kind: conversation\nname: x\nversion: 1\nuser_format: '问：{question}'\n",
     r"'user_format' must use the placeholder\(s\) \['user'\] and no other; found \['question'\]"),
    ("kind: conversation\nname: x\nversion: 1\nuser_format: '问：{user'\n", "'user_format' has bad braces"),
    ("kind: conversation\nname: x\nversion: 1\ninstruction_format: '{instruction}'\n",
     r"'instruction_format' must use the placeholder\(s\) \['instruction', 'user'\]"),
    ("kind: conversation\nname: x\nversion: 1\nassistant_format: '答：{reply}'\n", "must start with {reply}"),
    ("kind: conversation\nname: x\nversion: 1\nchat: true\nuser_format: 'Q: {user}'\n",
     r"\['user_format'\] are not used with chat: true"),
    ("kind: conversation\nname: x\nversion: '1'\n", "'version' must be an integer >= 1"),
    ("kind: conversation\nname: x\nversion: 1\nchat: 'yes'\n", "'chat' must be true or false"),
    ("kind: conversation\nname: x\nversion: 1\nsystem: [a]\n", "'system' must be text or null"),
    ("kind: exam\nname: x\nversion: 1\n", "kind must be 'conversation'"),
    ("kind: conversation\nname: plain\nversion: 1\nsystem: 你是医生\n",
     "'plain' is the name of a shipped conversation template that renders differently"),
])
def test_invalid_template_files_name_the_key(tmp_path, text, message):
    with pytest.raises(TemplateError, match=message):
        conversation_template(_write(tmp_path, text))


def test_unknown_name_and_missing_file():
    with pytest.raises(TemplateError, match="unknown conversation template 'alpacca'; available: alpaca, chat, "
                                            "instruct_zh, plain, or the path of a template .yaml file"):
        conversation_template("alpacca")
    with pytest.raises(TemplateError, match="conversation template file not found: nope.yaml"):
        conversation_template("nope.yaml")


def test_defaults_are_the_plain_template():
    assert dataclasses.replace(ConversationTemplate(), description=conversation_template("plain").description) == \
        conversation_template("plain")
