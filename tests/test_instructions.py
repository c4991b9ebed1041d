"""Tests for medtune.data.instructions: the shipped MedicalGPT samples and row fixtures per shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import medtune
from medtune.data.instructions import (
    FORMATS,
    alpaca_to_conversation,
    convert_instructions,
    convert_row,
    detect_format,
    messages_to_conversation,
    preference_to_pair,
    qa_to_conversation,
    read_instructions,
    read_preferences,
    sharegpt_to_conversation,
)
from medtune.io import DataFileError
from medtune.records import Conversation, PreferencePair, RecordError

SAMPLES = Path(medtune.__file__).parent / "examples" / "medicalgpt"
SFT = SAMPLES / "medical_sft_1K_format.jsonl"
DPO = SAMPLES / "dpo_zh_500.jsonl"
GRPO = SAMPLES / "grpo_sample.jsonl"
SHARED = Path("/work/shared/data/medicalgpt")


def write_lines(path: Path, rows: list) -> Path:
    """Write rows as JSON lines; a str row is written verbatim (for broken lines)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# --------------------------------------------------------------------------------------------
# The shipped samples
# --------------------------------------------------------------------------------------------


def test_samples_shipped_with_provenance():
    for name in ("medical_sft_1K_format.jsonl", "dpo_zh_500.jsonl", "grpo_sample.jsonl", "fever.txt"):
        assert (SAMPLES / name).is_file()
    provenance = (SAMPLES / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "shibing624/MedicalGPT" in provenance and "Apache-2.0" in provenance
    assert "research" in provenance
    assert len((SAMPLES / "fever.txt").read_text(encoding="utf-8").split("\n")) - 1 == 996


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not present")
@pytest.mark.parametrize("name", ["medical_sft_1K_format.jsonl", "dpo_zh_500.jsonl", "grpo_sample.jsonl", "fever.txt"])
def test_samples_unchanged_copies(name):
    assert (SAMPLES / name).read_bytes() == (SHARED / name).read_bytes()


@pytest.fixture(scope="module")
def sft():
    return read_instructions(SFT)


def test_sft_sample_counts(sft):
    assert sft.format == "sharegpt"
    assert sft.n_rows == 1000 and len(sft.records) == 1000 and sft.rejects == []
    assert sft.rows == list(range(1, 1001))
    # Every dialogue in this sample is a single exchange: no multi-turn rows at all.
    assert sum(1 for c in sft.records if len(c.messages) > 2) == 0
    assert all([m["role"] for m in c.messages] == ["user", "assistant"] for c in sft.records)
    assert len({c.id for c in sft.records}) == 1000


def test_sft_sample_first_record(sft):
    first = sft.records[0]
    assert first.id == "medical_sft_1K_format-00001"
    assert first.meta == {}
    assert first.messages == [
        user(
            "治疗阳痿吃什么药呢？，性生活一直很正常的，但是这段时间感觉性欲变低了，有时勃起都感觉很困难，"
            "试过许多的方法都没效果，听朋友说我这种情况可能会是早泄，想知道治疗早泄的药物？"
        ),
        assistant(
            "男子早泄、早泄病症的再次发生，多由恣情纵欲，或青年误犯性交，至命门火衰，精气虚寒；或思量忧郁，"
            "伤损心脾；或因恐惧伤肾，也有因湿热下注，宗筋弛而痿的。但主要是肾阳虚衰而痿。肾阳为那身阳气之根本，"
            "有温煦形体，蒸化水液，增进围产生长发育等功能。肾阳虚衰则温煦失责，气化无权。因而再次发生畏寒肢冷，"
            "性机能减退。故见男子早泄不举或不坚，且伴发头晕目眩。"
        ),
    ]
    assert sft.records[2].messages == [user("精子生成减少的病因是什么？"), assistant("支持细胞错位")]


def test_dpo_sample():
    result = read_preferences(DPO)
    assert result.format == "preference"
    assert len(result.records) == 500 and result.rejects == []
    assert all(isinstance(p, PreferencePair) for p in result.records)
    assert sum(1 for p in result.records if p.prompt[0]["role"] == "system") == 84
    assert all(p.prompt[-1]["role"] == "user" for p in result.records)
    first = result.records[0]
    assert first.id == "dpo_zh_500-00001"
    assert first.prompt == [user('20个关于新鲜果汁菜单的口号，适用于一家名为"Dishes"的餐厅')]
    assert first.chosen.startswith("这里是一个名为“Dishes”的餐厅的20个口号，突出了其新鲜果汁菜单：\n\n1.")
    assert first.rejected.startswith('1. "与菜肴一起品尝新鲜！"')
    third = result.records[2]
    assert third.prompt[0] == system("你是一个非常聪明的AI助手，非常擅长按照指示行事。尽你所能地帮助。")
    assert third.prompt[1]["content"].startswith("请为以下电影情节提供一个电影标题")


def test_grpo_sample():
    result = read_instructions(GRPO)
    assert result.format == "qa"
    assert len(result.records) == 32 and result.rejects == []
    assert result.records[0].messages == [user("肛门病变可能是什么疾病的症状?"), assistant("食管克罗恩病")]


def test_detect_format_on_samples():
    first = {p: json.loads(p.read_text(encoding="utf-8").split("\n", 1)[0]) for p in (SFT, DPO, GRPO)}
    assert detect_format(first[SFT]) == "sharegpt"
    assert detect_format(first[DPO]) == "preference"
    assert detect_format(first[GRPO]) == "qa"


def test_convert_sft_sample_round_trips(tmp_path):
    out = tmp_path / "sft.jsonl"
    result = convert_instructions(SFT, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000 == len(result.records)
    back = [Conversation.from_dict(json.loads(line)) for line in lines]
    assert back == result.records
    assert not (tmp_path / "sft.rejects.jsonl").exists()


def test_convert_dpo_sample_writes_pairs(tmp_path):
    out = tmp_path / "dpo.jsonl"
    convert_instructions(DPO, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 500
    pair = PreferencePair.from_dict(json.loads(lines[0]))
    assert pair.id == "dpo_zh_500-00001"


# --------------------------------------------------------------------------------------------
# detect_format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"conversations": []}, "sharegpt"),
        ({"messages": []}, "messages"),
        ({"id": "x", "messages": [], "meta": {}}, "messages"),
        ({"question": "q", "answer": "a"}, "qa"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"conversations": [], "chosen": "a", "rejected": "b"}, "preference"),
        ({"question": "q", "response_chosen": "a", "response_rejected": "b"}, "preference"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row) == expected
    assert expected in FORMATS


def test_detect_format_refuses_exam_and_unknown_rows():
    with pytest.raises(ValueError, match="exam"):
        detect_format({"question": "q", "options": {"A": "a"}, "answer": "A"})
    with pytest.raises(ValueError, match="unknown data shape"):
        detect_format({"text": "plain"})


# --------------------------------------------------------------------------------------------
# alpaca rows
# --------------------------------------------------------------------------------------------


def test_alpaca_without_input():
    conv = alpaca_to_conversation({"instruction": "发热怎么办？", "input": "", "output": "多喝水。"}, "r1")
    assert conv.id == "r1"
    assert conv.messages == [user("发热怎么办？"), assistant("多喝水。")]


def test_alpaca_with_input_joins_with_newline():
    row = {"instruction": "判断下列症状属于哪一科", "input": "咳嗽三天", "output": "呼吸科"}
    assert alpaca_to_conversation(row, "r").messages[0] == user("判断下列症状属于哪一科\n咳嗽三天")


def test_alpaca_whitespace_input_is_ignored_and_missing_input_ok():
    assert alpaca_to_conversation({"instruction": "问", "input": "  ", "output": "答"}, "r").messages[0] == user("问")
    assert alpaca_to_conversation({"instruction": "问", "output": "答"}, "r").messages[0] == user("问")


def test_alpaca_empty_instruction_uses_input_alone():
    conv = alpaca_to_conversation({"instruction": "", "input": "头痛怎么办", "output": "休息"}, "r")
    assert conv.messages[0] == user("头痛怎么办")


def test_alpaca_with_system_and_history():
    row = {
        "instruction": "那要吃什么药？",
        "input": "",
        "output": "可以服用对乙酰氨基酚。",
        "system": "你是医生。",
        "history": [["我发烧了", "体温多少？"], ["38.5度", "建议退热。"]],
    }
    assert alpaca_to_conversation(row, "r").messages == [
        system("你是医生。"),
        user("我发烧了"),
        assistant("体温多少？"),
        user("38.5度"),
        assistant("建议退热。"),
        user("那要吃什么药？"),
        assistant("可以服用对乙酰氨基酚。"),
    ]


def test_alpaca_extra_keys_go_to_meta():
    row = {"instruction": "问", "input": "", "output": "答", "task_dataset": "CMeEE", "meta": {"src": "x"}}
    assert alpaca_to_conversation(row, "r").meta == {"src": "x", "task_dataset": "CMeEE"}


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"instruction": "问", "input": "", "output": ""}, "output", "empty reply"),
        ({"instruction": "问", "input": "", "output": "  "}, "output", "empty reply"),
        ({"instruction": "问", "input": ""}, "output", "missing"),
        ({"instruction": "", "input": "", "output": "答"}, "instruction", "empty user message"),
        ({"instruction": "问", "output": ["a", "b"]}, "output", "expected a string"),
        ({"instruction": "问", "output": "答", "history": [["只有一半"]]}, "history[0]", "pair"),
        ({"instruction": "问", "output": "答", "history": [["问", ""]]}, "history[0][1]", "empty reply"),
        ({"instruction": "问", "output": "答", "history": "不是列表"}, "history", "list"),
    ],
)
def test_alpaca_bad_rows(row, field, reason):
    with pytest.raises(RecordError) as info:
        alpaca_to_conversation(row, "r")
    assert info.value.field == field
    assert reason in info.value.reason


# --------------------------------------------------------------------------------------------
# ShareGPT rows
# --------------------------------------------------------------------------------------------


def test_sharegpt_multi_turn_kept():
    row = {"conversations": [
        {"from": "human", "value": "我咳嗽"},
        {"from": "gpt", "value": "多久了？"},
        {"from": "human", "value": "一周"},
        {"from": "gpt", "value": "建议就医。"},
    ]}
    conv = sharegpt_to_conversation(row, "r")
    assert conv.messages == [user("我咳嗽"), assistant("多久了？"), user("一周"), assistant("建议就医。")]


def test_sharegpt_with_system_turn():
    row = {"conversations": [
        {"from": "system", "value": "你是医生"},
        {"from": "human", "value": "问"},
        {"from": "gpt", "value": "答"},
    ]}
    assert sharegpt_to_conversation(row, "r").messages == [system("你是医生"), user("问"), assistant("答")]


def test_sharegpt_with_system_key():
    row = {"system": "你是医生", "conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]}
    assert sharegpt_to_conversation(row, "r").messages == [system("你是医生"), user("问"), assistant("答")]


def test_sharegpt_empty_system_dropped():
    row = {"system": "", "conversations": [{"from": "system", "value": " "}, {"from": "human", "value": "问"},
                                           {"from": "gpt", "value": "答"}]}
    assert sharegpt_to_conversation(row, "r").messages == [user("问"), assistant("答")]


@pytest.mark.parametrize(
    ("user_role", "assistant_role"),
    [("human", "gpt"), ("user", "assistant"), ("Human", "ChatGPT"), ("user", "bot"), (" USER ", "model")],
)
def test_sharegpt_role_aliases(user_role, assistant_role):
    row = {"conversations": [{"from": user_role, "value": "问"}, {"from": assistant_role, "value": "答"}]}
    assert sharegpt_to_conversation(row, "r").messages == [user("问"), assistant("答")]


def test_sharegpt_accepts_role_content_keys():
    row = {"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}
    assert sharegpt_to_conversation(row, "r").messages == [user("问"), assistant("答")]


@pytest.mark.parametrize(
    ("conversations", "field", "reason"),
    [
        ([{"from": "human", "value": "问"}, {"from": "tool", "value": "答"}], "conversations[1].from", "unknown role 'tool'"),
        ([{"from": "human", "value": "问"}, {"from": "gpt", "value": ""}], "conversations[1].value", "empty reply"),
        ([{"from": "human", "value": ""}, {"from": "gpt", "value": "答"}], "conversations[0].value", "empty user message"),
        ([{"from": "human", "value": "问"}, {"from": "human", "value": "再问"}], "conversations[1].from", "in a row"),
        ([{"from": "gpt", "value": "答"}], "conversations[0].from", "first message must be the user's"),
        ([{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}, {"from": "human", "value": "又问"}],
         "conversations", "last message must be the assistant's"),
        ([{"from": "human", "value": "问"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "答"}],
         "conversations[1].from", "only come first"),
        ([{"from": "human", "value": "问"}, {"from": "gpt", "value": 3}], "conversations[1].value", "expected a string"),
        ([{"from": "human", "value": "问"}, {"value": "答"}], "conversations[1].role", "missing role"),
        ([{"from": "human", "value": "问"}, "答"], "conversations[1]", "expected a message object"),
        ([], "conversations", "non-empty list"),
    ],
)
def test_sharegpt_bad_rows(conversations, field, reason):
    with pytest.raises(RecordError) as info:
        sharegpt_to_conversation({"conversations": conversations}, "r")
    assert info.value.field == field
    assert reason in info.value.reason


def test_sharegpt_conflicting_system():
    row = {"system": "甲", "conversations": [{"from": "system", "value": "乙"}, {"from": "human", "value": "问"},
                                            {"from": "gpt", "value": "答"}]}
    with pytest.raises(RecordError) as info:
        sharegpt_to_conversation(row, "r")
    assert info.value.field == "system"


# --------------------------------------------------------------------------------------------
# messages and question/answer rows
# --------------------------------------------------------------------------------------------


def test_messages_row_and_medtune_record_round_trip():
    conv = Conversation("c1", [system("s"), user("问"), assistant("答")], {"task_dataset": "CMeIE"})
    again = messages_to_conversation(conv.to_dict(), conv.id)
    assert again == conv


def test_messages_bad_role():
    with pytest.raises(RecordError) as info:
        messages_to_conversation({"messages": [user("问"), {"role": "function", "content": "x"}]}, "r")
    assert info.value.field == "messages[1].role"


def test_qa_row():
    conv = qa_to_conversation({"question": "问", "answer": "答", "system": "你是医生"}, "q")
    assert conv.messages == [system("你是医生"), user("问"), assistant("答")]
    assert qa_to_conversation({"question": "1+1?", "answer": 2}, "q").reply == "2"


@pytest.mark.parametrize(
    ("row", "field"),
    [({"question": "问"}, "answer"), ({"question": "问", "answer": " "}, "answer"), ({"question": "", "answer": "答"}, "question")],
)
def test_qa_bad_rows(row, field):
    with pytest.raises(RecordError) as info:
        qa_to_conversation(row, "q")
    assert info.value.field == field


def test_convert_row_dispatch_and_unknown_format():
    assert isinstance(convert_row({"question": "问", "answer": "答"}, "qa", "x"), Conversation)
    with pytest.raises(ValueError, match="unknown format"):
        convert_row({}, "csv", "x")


# --------------------------------------------------------------------------------------------
# preference rows
# --------------------------------------------------------------------------------------------


def test_preference_prompt_string():
    pair = preference_to_pair({"prompt": "问", "chosen": "好答", "rejected": "坏答"}, "p")
    assert pair == PreferencePair("p", [user("问")], "好答", "坏答", {})


def test_preference_prompt_messages_and_system_key():
    row = {"system": "你是医生", "prompt": [user("问"), assistant("答"), user("再问")], "chosen": "好", "rejected": "坏"}
    pair = preference_to_pair(row, "p")
    assert pair.prompt == [system("你是医生"), user("问"), assistant("答"), user("再问")]


def test_preference_sharegpt_style_with_message_replies():
    row = {
        "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "问"}],
        "chosen": {"from": "gpt", "value": "好"},
        "rejected": [{"role": "assistant", "content": "坏"}],
    }
    pair = preference_to_pair(row, "p")
    assert pair.prompt == [system("s"), user("问")]
    assert (pair.chosen, pair.rejected) == ("好", "坏")


def test_preference_reply_lists_repeating_the_prompt():
    row = {"prompt": [user("问")], "chosen": [user("问"), assistant("好")], "rejected": [user("问"), assistant("坏")]}
    assert preference_to_pair(row, "p").chosen == "好"


def test_preference_implicit_prompt():
    row = {"chosen": [user("问"), assistant("好")], "rejected": [user("问"), assistant("坏")]}
    pair = preference_to_pair(row, "p")
    assert pair.prompt == [user("问")] and pair.chosen == "好" and pair.rejected == "坏"


def test_preference_medicalgpt_reward_aliases():
    row = {"question": "问", "response_chosen": "好", "response_rejected": "坏", "source": "rm"}
    pair = preference_to_pair(row, "p")
    assert pair.prompt == [user("问")] and pair.meta == {"source": "rm"}


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "问", "chosen": "同一个回答", "rejected": " 同一个回答 "}, "rejected", "identical"),
        ({"prompt": "问", "chosen": "", "rejected": "坏"}, "chosen", "empty reply"),
        ({"prompt": "问", "chosen": "好", "rejected": None}, "rejected", "missing"),
        ({"prompt": "问", "chosen": "好"}, "rejected", "missing"),
        ({"prompt": "", "chosen": "好", "rejected": "坏"}, "prompt", "empty user message"),
        ({"prompt": [user("问"), assistant("答")], "chosen": "好", "rejected": "坏"}, "prompt[1].role", "end with the user"),
        ({"prompt": "问", "chosen": {"role": "user", "content": "好"}, "rejected": "坏"}, "chosen[0].role", "assistant"),
        ({"prompt": "问", "chosen": [user("别的"), assistant("好")], "rejected": "坏"}, "chosen", "prompt's messages"),
        ({"conversations": [{"from": "human", "value": "问"}, {"from": "robot", "value": "x"}], "chosen": "好",
          "rejected": "坏"}, "conversations[1].from", "unknown role"),
        ({"chosen": [user("问"), assistant("好")], "rejected": [user("别的问"), assistant("坏")]}, "rejected",
         "different prompts"),
        ({"prompt": "问", "chosen": 5, "rejected": "坏"}, "chosen", "expected a string"),
    ],
)
def test_preference_bad_rows(row, field, reason):
    with pytest.raises(RecordError) as info:
        preference_to_pair(row, "p")
    assert info.value.field == field
    assert reason in info.value.reason


# --------------------------------------------------------------------------------------------
# File readers: errors name file, line and field; skip mode keeps rejects
# --------------------------------------------------------------------------------------------


GOOD = {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]}


@pytest.fixture
def dirty_sharegpt(tmp_path) -> Path:
    return write_lines(tmp_path / "dirty.jsonl", [
        GOOD,
        {"conversations": [{"from": "human", "value": "问"}, {"from": "tool", "value": "答"}]},
        "",
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": ""}]},
        '{"conversations": [',
        {"id": "keep-me", **GOOD},
        {"id": "keep-me", **GOOD},
        [1, 2],
    ])


def test_error_mode_names_file_line_field(dirty_sharegpt):
    with pytest.raises(DataFileError) as info:
        read_instructions(dirty_sharegpt)
    err = info.value
    assert err.row == 2 and err.field == "conversations[1].from"
    message = str(err)
    assert "dirty.jsonl" in message and "row 2" in message and "conversations[1].from" in message
    assert "unknown role 'tool'" in message


def test_skip_mode_collects_rejects(dirty_sharegpt):
    result = read_instructions(dirty_sharegpt, on_invalid="skip")
    assert [c.id for c in result.records] == ["dirty-00001", "keep-me"]
    assert result.rows == [1, 6]
    assert result.n_rows == 7 == len(result.records) + len(result.rejects)
    rejects = {r["row"]: r for r in result.rejects}
    assert sorted(rejects) == [2, 4, 5, 7, 8]
    assert rejects[2]["field"] == "conversations[1].from"
    assert rejects[4]["field"] == "conversations[1].value" and rejects[4]["reason"] == "empty reply"
    assert rejects[5]["field"] is None and "invalid JSON" in rejects[5]["reason"]
    assert rejects[5]["raw"] == {"line": '{"conversations": ['}
    assert rejects[7]["field"] == "id" and "duplicate id 'keep-me'" in rejects[7]["reason"]
    assert rejects[8]["field"] is None and "expected a JSON object" in rejects[8]["reason"]
    assert rejects[2]["raw"]["conversations"][1]["from"] == "tool"


def test_error_mode_preference_identical(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [
        {"prompt": "问", "chosen": "好", "rejected": "坏"},
        {"prompt": "问", "chosen": "一样", "rejected": "一样"},
    ])
    with pytest.raises(DataFileError) as info:
        read_preferences(path)
    assert info.value.row == 2 and info.value.field == "rejected"
    assert "prefs.jsonl" in str(info.value) and "identical" in str(info.value)


def test_json_array_file(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "问一", "input": "", "output": "答一"},
        {"instruction": "问二", "input": "补充", "output": "答二"},
    ], ensure_ascii=False), encoding="utf-8")
    result = read_instructions(path)
    assert result.format == "alpaca"
    assert [c.id for c in result.records] == ["alpaca-00001", "alpaca-00002"]
    assert result.records[1].messages[0] == user("问二\n补充")


def test_explicit_format_overrides_detection(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [{"question": "问", "answer": "答", "instruction": "x"}])
    # Auto would say alpaca only with "output"; here an explicit format reads it as qa.
    assert read_instructions(path, fmt="qa").records[0].meta == {"instruction": "x"}
    with pytest.raises(DataFileError) as info:
        read_instructions(path, fmt="alpaca")
    assert info.value.field == "output"


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="empty file"):
        read_instructions(empty)
    unknown = write_lines(tmp_path / "unknown.jsonl", [{"text": "纯文本"}])
    with pytest.raises(DataFileError, match="unknown data shape"):
        read_instructions(unknown)
    with pytest.raises(DataFileError, match="read_preferences"):
        read_instructions(DPO)
    with pytest.raises(DataFileError, match="read_instructions"):
        read_preferences(SFT)
    with pytest.raises(ValueError, match="on_invalid"):
        read_instructions(SFT, on_invalid="ignore")
    with pytest.raises(ValueError, match="format"):
        read_instructions(SFT, fmt="preference")
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(json.dumps({"question": "发热", "answer": "退热"}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataFileError, match="not UTF-8"):
        read_instructions(gbk)


def test_convert_writes_rejects_and_clears_stale_ones(tmp_path, dirty_sharegpt):
    out = tmp_path / "out" / "conv.jsonl"
    result = convert_instructions(dirty_sharegpt, out, on_invalid="skip")
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    rejects_file = tmp_path / "out" / "conv.rejects.jsonl"
    rejects = [json.loads(line) for line in rejects_file.read_text(encoding="utf-8").splitlines()]
    assert [r["row"] for r in rejects] == [r["row"] for r in result.rejects] == [2, 4, 5, 7, 8]

    clean = write_lines(tmp_path / "clean.jsonl", [GOOD])
    convert_instructions(clean, out)
    assert not rejects_file.exists()


def test_convert_error_mode_writes_nothing(tmp_path, dirty_sharegpt):
    out = tmp_path / "conv.jsonl"
    with pytest.raises(DataFileError):
        convert_instructions(dirty_sharegpt, out)
    assert not out.exists()


def test_convert_refuses_to_overwrite_input(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD])
    with pytest.raises(ValueError, match="overwrite"):
        convert_instructions(path, path)
    with pytest.raises(ValueError, match="both"):
        convert_instructions(path, tmp_path / "o.jsonl", rejects_path=tmp_path / "o.jsonl")


# --------------------------------------------------------------------------------------------
# Missing values: "nan", "None", "null", NaN and null are missing in every shape
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"instruction": "问", "input": "", "output": "nan"}, "output", "empty reply ('nan' counts as missing)"),
        ({"instruction": "问", "input": "", "output": float("nan")}, "output",
         "empty reply (NaN counts as missing)"),
        ({"instruction": "NULL", "input": "None", "output": "答"}, "instruction",
         "empty user message ('NULL' counts as missing)"),
        ({"instruction": "问", "output": "答", "history": [["问", "None"]]}, "history[0][1]",
         "empty reply ('None' counts as missing)"),
    ],
)
def test_alpaca_nan_values_are_missing_not_text(row, field, reason):
    with pytest.raises(RecordError) as info:
        alpaca_to_conversation(row, "r")
    assert (info.value.field, info.value.reason) == (field, reason)


def test_alpaca_nan_input_and_system_are_absent():
    row = {"instruction": "问", "input": "nan", "output": "答", "system": "None", "source": "NULL", "tag": "内科"}
    conversation = alpaca_to_conversation(row, "r")
    assert conversation.messages == [user("问"), assistant("答")]  # no "问\nnan", no system "None"
    assert conversation.meta == {"source": None, "tag": "内科"}


def test_sharegpt_and_messages_nan_content_is_missing():
    with pytest.raises(RecordError) as info:
        sharegpt_to_conversation({"conversations": [{"from": "human", "value": "问"},
                                                    {"from": "gpt", "value": " NaN "}]}, "r")
    assert (info.value.field, info.value.reason) == ("conversations[1].value", "empty reply ('NaN' counts as missing)")
    with pytest.raises(RecordError) as info:
        messages_to_conversation({"messages": [user("null"), assistant("答")]}, "r")
    assert (info.value.field, info.value.reason) == ("messages[0].content", "empty user message ('null' counts as missing)")
    # A system message reading "None" is no system prompt, not the prompt "None".
    conversation = messages_to_conversation({"messages": [system("None"), user("问"), assistant("答")]}, "r")
    assert conversation.messages == [user("问"), assistant("答")]


def test_qa_and_preference_nan_replies_are_missing():
    with pytest.raises(RecordError) as info:
        qa_to_conversation({"question": "问", "answer": "nan"}, "r")
    assert (info.value.field, info.value.reason) == ("answer", "empty reply ('nan' counts as missing)")
    with pytest.raises(RecordError) as info:
        preference_to_pair({"prompt": "问", "chosen": "None", "rejected": "坏"}, "r")
    assert (info.value.field, info.value.reason) == ("chosen", "empty reply ('None' counts as missing)")
    with pytest.raises(RecordError) as info:
        preference_to_pair({"prompt": "问", "chosen": "好", "rejected": [assistant("NULL")]}, "r")
    assert (info.value.field, info.value.reason) == ("rejected", "empty reply ('NULL' counts as missing)")
    with pytest.raises(RecordError) as info:
        preference_to_pair({"prompt": "nan", "chosen": "好", "rejected": "坏"}, "r")
    assert (info.value.field, info.value.reason) == ("prompt", "empty user message ('nan' counts as missing)")


def test_instructions_file_nan_id_is_generated_and_rejects_are_json(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        json.dumps({"id": "nan", "instruction": "问", "input": "", "output": "答"}) + "\n"
        + json.dumps({"id": None, "instruction": "问二", "input": "", "output": "答二"}) + "\n"
        + json.dumps({"id": "x", "instruction": "问三", "input": "", "output": float("nan")}) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    result = convert_instructions(path, out, on_invalid="skip")
    assert [r.id for r in result.records] == ["sft-00001", "sft-00002"]
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (3, "output", "empty reply (NaN counts as missing)"),
    ]
    reject = json.loads((tmp_path / "out.rejects.jsonl").read_text(encoding="utf-8"),
                        parse_constant=lambda c: pytest.fail(f"bare {c} in rejects"))
    assert reject["raw"]["output"] is None
    with pytest.raises(DataFileError) as info:
        read_instructions(path)
    assert str(info.value) == f"{path}, row 3, field 'output': empty reply (NaN counts as missing)"
