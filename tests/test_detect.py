"""medtune.data.detect: one detector places every data file; the public loaders use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import medtune
from medtune.data import detect as detect_module
from medtune.data.detect import (
    FORMATS,
    INSTRUCTION_FORMATS,
    KINDS,
    SHAPES,
    DataShape,
    detect,
    detect_row,
    iter_json_rows,
)
from medtune.data.exam import detect_kind, load_conversations, load_exam_file, load_preferences
from medtune.data.instructions import FORMATS as INSTRUCTIONS_FORMATS
from medtune.data.instructions import detect_format
from medtune.io import DataFileError, write_jsonl

EXAMPLES = Path(medtune.__file__).parent / "examples"


def _lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


EXAM_RECORD = {"id": "q1", "question": "发热首选？", "options": {"A": "甲", "B": "乙"}, "answer": "A"}
CMEXAM_ROW = {"Question": "发热首选？", "Options": [{"key": "A", "value": "甲"}, {"key": "B", "value": "乙"}],
              "Answer": "A", "Explanation": ""}
CONVERSATION = {"id": "c1", "messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
                "meta": {}}

# One row per shape the key rules place, with the (kind, format) it must get.
ROWS = [
    (EXAM_RECORD, "exam", "records"),
    (CMEXAM_ROW, "exam", "cmexam-jsonl"),
    ({"question": "q", "options": {"A": "a"}}, "exam", "cmexam-jsonl"),  # lowercase, no answer
    ({"input": "找实体", "target": "发热", "task_dataset": "CMeEE-V2"}, "conversation", "promptcblue"),
    ({"instruction": "i", "input": "", "output": "o"}, "conversation", "alpaca"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "conversation", "sharegpt"),
    ({"messages": []}, "conversation", "messages"),
    (CONVERSATION, "conversation", "messages"),
    ({"question": "q", "answer": "a"}, "conversation", "qa"),
    ({"dialogue": "医生：你好", "summary": "问候"}, "conversation", "summary"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference", "preference"),
    ({"conversations": [], "chosen": "a", "rejected": "b"}, "preference", "preference"),
    ({"question": "q", "response_chosen": "a", "response_rejected": "b"}, "preference", "preference"),
    ({"text": "发热三天"}, "text", "pt-text"),
]


# --------------------------------------------------------------------------------------------
# The shape table
# --------------------------------------------------------------------------------------------


def test_shape_table_is_consistent():
    assert FORMATS == tuple(s.format for s in SHAPES) and len(set(FORMATS)) == len(FORMATS)
    assert {s.kind for s in SHAPES} == set(KINDS)
    # The instruction shapes are exactly what medtune.data.instructions converts.
    assert INSTRUCTION_FORMATS == INSTRUCTIONS_FORMATS
    assert set(INSTRUCTION_FORMATS) <= set(FORMATS)
    assert {fmt for _, _, fmt in ROWS} | {"cmexam-csv", "cmexam-xlsx"} == set(FORMATS)


@pytest.mark.parametrize(("row", "kind", "fmt"), ROWS)
def test_detect_row_places_every_shape(row, kind, fmt):
    shape = detect_row(row)
    assert (shape.kind, shape.format) == (kind, fmt)
    assert shape.keys == tuple(sorted(row))


@pytest.mark.parametrize(("row", "kind", "fmt"), ROWS)
def test_detect_format_agrees_with_the_detector(row, kind, fmt):
    """instructions.detect_format answers from the same rules, for the shapes it reads."""
    if fmt in INSTRUCTION_FORMATS:
        assert detect_format(row) == fmt
    else:
        with pytest.raises(ValueError, match="exam|unknown data shape"):
            detect_format(row)


@pytest.mark.parametrize(("row", "kind", "fmt"), ROWS)
def test_detect_places_files_of_every_shape(tmp_path, row, kind, fmt):
    shape = detect(_lines(tmp_path / "data.jsonl", [row, row]))
    assert shape == DataShape(kind, fmt, "lines", tuple(sorted(row)), 1)


def test_exam_rows_win_over_qa_and_promptcblue_over_alpaca():
    # An exam row has question and answer too; it must never be read as question/answer text.
    assert detect_row({"question": "q", "options": ["A x"], "answer": "A"}).format == "records"
    assert detect_row({"Question": "q", "Options": "A x", "answer": "A"}).format == "cmexam-jsonl"
    # alpaca rows have "input" too; only "target" makes a row PromptCBLUE.
    assert detect_row({"instruction": "i", "input": "x", "output": "o"}).format == "alpaca"
    assert detect_row({"input": "x", "target": "y", "instruction": "i", "output": "o"}).format == "promptcblue"
    # "text" decides only when no other shape fits.
    assert detect_row({"question": "q", "answer": "a", "text": "t"}).format == "qa"


def test_options_without_question_is_not_guessed():
    with pytest.raises(ValueError, match=r"unknown data shape: keys \['answer', 'options', 'question_text'\]"):
        detect_row({"question_text": "q", "options": "A x", "answer": "A"})


def test_shipped_examples_are_placed():
    cases = {
        "cmexam/val_sample.csv": ("exam", "cmexam-csv", "table"),
        "medicalgpt/medical_sft_1K_format.jsonl": ("conversation", "sharegpt", "lines"),
        "medicalgpt/dpo_zh_500.jsonl": ("preference", "preference", "lines"),
        "medicalgpt/grpo_sample.jsonl": ("conversation", "qa", "lines"),
        "medicalgpt/fever.txt": ("text", "pt-text", "text"),
        "promptcblue/train.json": ("conversation", "promptcblue", "lines"),
        "promptcblue/test.json": ("conversation", "promptcblue", "lines"),
    }
    for name, expected in cases.items():
        shape = detect(EXAMPLES / name)
        assert (shape.kind, shape.format, shape.layout) == expected, name


# --------------------------------------------------------------------------------------------
# File handling: layouts, encodings, what decides
# --------------------------------------------------------------------------------------------


def test_tables_are_placed_by_extension(tmp_path):
    for name, fmt in (("a.csv", "cmexam-csv"), ("b.XLSX", "cmexam-xlsx")):
        path = tmp_path / name
        path.write_bytes(b"")  # not read: the CMExam reader checks the columns itself
        assert detect(path) == DataShape("exam", fmt, "table")


def test_json_array_is_placed_by_its_first_object(tmp_path):
    path = tmp_path / "cmexam.json"
    path.write_text("\ufeff  [\n" + json.dumps(CMEXAM_ROW, ensure_ascii=False) + ", 5]", encoding="utf-8")
    assert detect(path) == DataShape("exam", "cmexam-jsonl", "array", tuple(sorted(CMEXAM_ROW)), 1)
    # The first element is not an object: the first object in the array decides.
    path.write_text(json.dumps([1, {"question": "q", "answer": "a"}]), encoding="utf-8")
    assert (detect(path).format, detect(path).row) == ("qa", 2)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(DataFileError, match="empty file"):
        detect(path)
    path.write_text('[1, {"question": ', encoding="utf-8")
    with pytest.raises(DataFileError, match="invalid JSON array"):
        detect(path)


def test_first_decodable_object_decides(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('\n\nnot json\n[1, 2]\n' + json.dumps(EXAM_RECORD) + "\n", encoding="utf-8")
    shape = detect(path)
    assert (shape.format, shape.row) == ("records", 5)  # physical line, blank lines counted


def test_bom_and_upper_case_suffix(tmp_path):
    path = tmp_path / "records.JSONL"
    path.write_text("\ufeff" + json.dumps(EXAM_RECORD) + "\n", encoding="utf-8")
    assert detect(path).format == "records"


def test_txt_is_text_unless_its_first_line_is_a_json_object(tmp_path):
    plain = tmp_path / "docs.txt"
    plain.write_text("\n患者发热三天。\n{\"question\": 1}\n", encoding="utf-8")
    assert detect(plain) == DataShape("text", "pt-text", "text")
    json_lines = _lines(tmp_path / "sft.txt", [{"instruction": "i", "output": "o"}])
    assert detect(json_lines).format == "alpaca"
    with pytest.raises(DataFileError, match="is pt-text data"):
        detect(plain, kinds=("exam", "conversation"))


def test_file_level_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n[1]\n", encoding="utf-8")
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(json.dumps({"question": "发热"}, ensure_ascii=False).encode("gbk"))
    cases = [
        (empty, "empty file"),
        (bad, r"row 1: no row is a JSON object \(invalid JSON"),
        (gbk, "not UTF-8"),
        (tmp_path, "is a directory"),
    ]
    for path, message in cases:
        with pytest.raises(DataFileError, match=message) as info:
            detect(path)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        detect(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="kinds"):
        detect(EXAMPLES / "medicalgpt" / "fever.txt", kinds=("pictures",))


def test_unknown_shape_lists_the_keys_and_the_known_shapes(tmp_path):
    path = _lines(tmp_path / "x.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataFileError) as info:
        detect(path)
    message = str(info.value)
    assert message.startswith(f"{path}, row 1: unknown data shape: keys ['bar', 'foo']")
    assert all(fmt in message for fmt in FORMATS)
    assert "\n" not in message


def test_a_shape_of_another_kind_is_refused_and_named(tmp_path):
    with pytest.raises(DataFileError) as info:
        detect(EXAMPLES / "medicalgpt" / "dpo_zh_500.jsonl", kinds=("exam", "conversation"))
    message = str(info.value)
    assert "unknown data shape for exam or conversation data: keys ['chosen', 'conversations', 'rejected']" in message
    assert "this is preference data, kind preference" in message
    assert "pt-text" not in message  # only the shapes of the kinds asked for are listed
    with pytest.raises(DataFileError, match="this is cmexam-csv data"):
        detect(EXAMPLES / "cmexam" / "val_sample.csv", kinds=("text",))


def test_iter_json_rows_keeps_every_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\nnope\n[2]\n{"b": "\u2028"}\n', encoding="utf-8")
    rows = list(iter_json_rows(path))
    assert [r.row for r in rows] == [1, 3, 4, 5]
    assert [r.error is None for r in rows] == [True, False, False, True]
    assert rows[1].text == "nope" and rows[2].error == "expected a JSON object, got list"
    assert rows[3].obj == {"b": "\u2028"}  # U+2028 inside a string does not split the line


# --------------------------------------------------------------------------------------------
# The public loaders
# --------------------------------------------------------------------------------------------


def test_load_exam_file_from_every_exam_layout(tmp_path, sample_records):
    records = _lines(tmp_path / "records.jsonl", [r.to_dict() for r in sample_records[:3]])
    assert load_exam_file(records)[0] == sample_records[:3]
    # A CMExam JSON array, which the old first-line check took for a conversation file.
    array = tmp_path / "cmexam.json"
    array.write_text(json.dumps([CMEXAM_ROW, CMEXAM_ROW], ensure_ascii=False), encoding="utf-8")
    got, rejects = load_exam_file(array)
    assert [r.id for r in got] == ["cmexam-00001", "cmexam-00002"] and rejects == []
    assert detect_kind(array) == "exam"
    csv_records, csv_rejects = load_exam_file(EXAMPLES / "cmexam" / "val_sample.csv", on_invalid="skip")
    assert len(csv_records) == 999 and len(csv_rejects) == 1


def test_loaders_refuse_other_kinds_in_one_line():
    with pytest.raises(DataFileError, match="unknown data shape for exam data: keys \\['conversations'\\]"):
        load_exam_file(EXAMPLES / "medicalgpt" / "medical_sft_1K_format.jsonl")
    with pytest.raises(DataFileError, match="this is preference data"):
        load_conversations(EXAMPLES / "medicalgpt" / "dpo_zh_500.jsonl")
    with pytest.raises(DataFileError, match="this is sharegpt data"):
        load_preferences(EXAMPLES / "medicalgpt" / "medical_sft_1K_format.jsonl")
    with pytest.raises(DataFileError, match="this is pt-text data"):
        detect_kind(EXAMPLES / "medicalgpt" / "fever.txt")
    with pytest.raises(ValueError, match="exam loader"):
        load_exam_file("x.jsonl", shape=DataShape("text", "pt-text", "text"))


def test_load_conversations_dispatches_on_the_shape(tmp_path):
    convs, _ = load_conversations(EXAMPLES / "promptcblue" / "test.json", require_reply=False)
    assert convs and convs[0].meta["task_dataset"]
    sft, _ = load_conversations(EXAMPLES / "medicalgpt" / "medical_sft_1K_format.jsonl")
    assert len(sft) == 1000
    # medtune's own records: prompts without a reply are accepted when asked (predict).
    prompt_only = dict(CONVERSATION, messages=[{"role": "user", "content": "问"}])
    path = _lines(tmp_path / "conv.jsonl", [prompt_only])
    assert load_conversations(path, require_reply=False)[0][0].messages == prompt_only["messages"]
    with pytest.raises(DataFileError, match="row 1"):
        load_conversations(path)


def test_conversation_records_with_a_broken_line(tmp_path):
    path = tmp_path / "conv.jsonl"
    path.write_text("{broken\n" + json.dumps(CONVERSATION, ensure_ascii=False) + "\n", encoding="utf-8")
    records, rejects = load_conversations(path, on_invalid="skip")
    assert [r.id for r in records] == ["c1"]
    assert rejects == [{"row": 1, "field": None, "reason": rejects[0]["reason"], "raw": {"line": "{broken"}}]
    assert rejects[0]["reason"].startswith("invalid JSON")
    with pytest.raises(DataFileError, match="row 1: invalid JSON"):
        load_conversations(path)
    _lines(path, [CONVERSATION, CONVERSATION])
    with pytest.raises(DataFileError, match="duplicate id 'c1'"):
        load_conversations(path, on_invalid="skip")
    assert len(load_conversations(path, duplicates="keep")[0]) == 2


def test_load_preferences_reads_raw_and_converted_pairs(tmp_path):
    raw = load_preferences(EXAMPLES / "medicalgpt" / "dpo_zh_500.jsonl")
    assert len(raw.records) == 500 and raw.format == "preference"
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [p.to_dict() for p in raw.records[:5]])
    assert load_preferences(path).records == raw.records[:5]


def test_detect_reads_only_the_first_object_of_an_array(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text("[" + ",".join([json.dumps({"question": "q", "answer": "a"})] * 2000) + "]", encoding="utf-8")
    calls = []
    monkeypatch.setattr(detect_module.json, "loads", lambda *a, **k: calls.append(1))
    assert detect(path).format == "qa" and calls == []  # no whole-array decode
