"""Tests for medtune.data.cmexam: the real CMExam sample plus small fixtures of each shape."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import medtune
from medtune.data.cmexam import (
    ConvertResult,
    convert_cmexam,
    default_rejects_path,
    load_records,
    read_cmexam,
)
from medtune.io import DataFileError
from medtune.records import ExamRecord

SAMPLE = Path(medtune.__file__).parent / "examples" / "cmexam" / "val_sample.csv"

OPTIONS_5 = "A 原发病\nB 继发病\nC 并发症\nD 后遗症\nE 合并症"


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def row(question="题干", options=OPTIONS_5, answer="A", explanation="解析") -> dict:
    return {"Question": question, "Options": options, "Answer": answer, "Explanation": explanation}


# --------------------------------------------------------------------------------------------
# The real sample
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> ConvertResult:
    return read_cmexam(SAMPLE, on_invalid="skip")


def test_sample_row_count(sample):
    assert sample.n_rows == 1000
    assert len(sample.records) + len(sample.rejects) == 1000


def test_sample_error_mode_names_file_row_field():
    with pytest.raises(DataFileError) as info:
        read_cmexam(SAMPLE)
    message = str(info.value)
    assert "val_sample.csv" in message
    assert "row 764" in message  # pandas index 763 is 1-based data row 764
    assert "answer" in message
    assert info.value.row == 764 and info.value.field == "answer"


def test_sample_skip_mode(sample):
    assert len(sample.records) == 999
    assert len(sample.rejects) == 1
    reject = sample.rejects[0]
    assert reject["row"] == 764
    assert reject["field"] == "answer"
    assert reject["raw"]["Answer"] == ""
    assert (
        reject["raw"]["Question"] == "由国家制定，各省可根据当地经济水平、医疗需求和用药习惯适当进行调整的是"
    )
    assert sample.n_missing_explanation == 159


def test_sample_first_record(sample):
    first = sample.records[0]
    assert first.id == "val_sample-00001"
    assert first.question == "下列哪种病变引起的胸痛常沿一侧肋间神经分布"
    assert first.options == {
        "A": "胸肌劳损",
        "B": "流行性胸痛",
        "C": "颈椎病",
        "D": "带状疱疹",
        "E": "皮下蜂窝组织炎",
    }
    assert first.answer == "D"
    assert first.explanation.startswith("胸痛常沿一侧肋间神经分布的是带状疱疹（D对）")
    assert first.annotations == {}


def test_sample_multi_answer_record(sample):
    by_id = {r.id: r for r in sample.records}
    rec = by_id["val_sample-00724"]
    assert rec.question.startswith("患者，女，47岁，因慢性阻塞性肺疾病使用布地奈德-福莫特罗粉吸入剂")
    assert rec.question.endswith("下列说法正确的有")
    assert rec.options == {
        "A": "在深吸气将药物吸入后，立即恢复正常呼吸",
        "B": "因为药物颗粒非常小，以至于经常感觉不到，可以通过黑布试验证明药物是否被吸入",
        "C": "用药时应有力且深长地吸气，确保药物被充分吸入肺中",
        "D": "为避免口腔念珠菌感染，建议每次用药后及时用水漱口",
        "E": "装置初始化后，每转动一次，听到“咔嗒”声响，即表示单次装药完成，不应连续转动",
    }
    assert rec.answer == "BCD"
    assert rec.is_multi


def test_sample_four_option_record(sample):
    by_id = {r.id: r for r in sample.records}
    rec = by_id["val_sample-00074"]
    assert rec.question == "用复合树脂充填深龋时"
    assert rec.options == {
        "A": "用氧化锌丁香油水门汀作基底",
        "B": "用磷酸锌水门汀作基底",
        "C": "不必用基底",
        "D": "用聚羧酸锌水门汀作基底",
    }
    assert rec.answer == "D"
    assert sum(len(r.options) == 4 for r in sample.records) == 30


def test_sample_multi_answer_count(sample):
    # The data README says 40 multi-answer rows; the file actually holds 63 (all in the last
    # ~280 rows, where the sample switches to multiple-selection questions).
    assert sum(r.is_multi for r in sample.records) == 63


def test_sample_ids_unique(sample):
    ids = [r.id for r in sample.records]
    assert len(set(ids)) == len(ids)


# --------------------------------------------------------------------------------------------
# Option lines and answers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell",
    [
        "A 甲\nB 乙\nC 丙",
        "A. 甲\nB. 乙\nC. 丙",
        "A、甲\nB、乙\nC、丙",
        "A：甲\nB：乙\nC：丙",
        "A:甲\nB:乙\nC:丙",
        "Ａ 甲\nＢ　乙\nＣ．丙",  # full-width letters, ideographic space, full-width full stop
        "\nA 甲\n\n  B 乙  \r\nC 丙\n",  # blank lines, padding, CRLF
        "A 甲\\nB 乙\\nC 丙",  # literal backslash-n
    ],
)
def test_option_line_formats(tmp_path, cell):
    path = write_csv(tmp_path / "opts.csv", [row(options=cell, answer="B")])
    (rec,) = read_cmexam(path).records
    assert rec.options == {"A": "甲", "B": "乙", "C": "丙"}
    assert rec.answer == "B"


@pytest.mark.parametrize("answer", ["A,C", "A、C", " c a ", "C，A", "ＡＣ", "CA", "A C"])
def test_answer_normalisation(tmp_path, answer):
    path = write_csv(tmp_path / "ans.csv", [row(answer=answer)])
    (rec,) = read_cmexam(path).records
    assert rec.answer == "AC"


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def test_jsonl_shape(tmp_path):
    opts = [{"key": "A", "value": "原发病"}, {"key": "B", "value": "继发病"}, {"key": "C", "value": "并发症"}]
    lines = [
        json.dumps({"id": "q-1", "Question": "题一", "Options": opts, "Answer": "B", "Explanation": "因为"}),
        "",  # a blank line is skipped but still counted, so line numbers match an editor's
        json.dumps(
            {"Question": "题二", "Options": opts, "Answer": "A,C", "Explanation": None}, ensure_ascii=False
        ),
    ]
    path = tmp_path / "hf.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_cmexam(path)
    assert result.n_rows == 2
    first, second = result.records
    assert first.id == "q-1"
    assert first.options == {"A": "原发病", "B": "继发病", "C": "并发症"}
    assert (first.answer, first.explanation) == ("B", "因为")
    assert second.id == "hf-00003"  # no id: stem + JSON line number
    assert (second.answer, second.explanation) == ("AC", "")
    assert result.n_missing_explanation == 1


def test_jsonl_bad_line_is_a_reject(tmp_path):
    opts = [{"key": "A", "value": "甲"}, {"key": "B", "value": "乙"}]
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"Question": "q", "Options": opts, "Answer": "A"}) + "\n{not json\n", encoding="utf-8"
    )
    with pytest.raises(DataFileError, match=r"bad\.jsonl, row 2"):
        read_cmexam(path)
    result = read_cmexam(path, on_invalid="skip")
    assert len(result.records) == 1
    assert result.rejects[0]["row"] == 2
    assert result.rejects[0]["raw"] == {"line": "{not json"}


def test_jsonl_duplicate_id_rejected(tmp_path):
    opts = [{"key": "A", "value": "甲"}, {"key": "B", "value": "乙"}]
    path = tmp_path / "dup.jsonl"
    obj = {"id": 7, "Question": "q", "Options": opts, "Answer": "A"}
    path.write_text(json.dumps(obj) + "\n" + json.dumps(obj) + "\n", encoding="utf-8")
    result = read_cmexam(path, on_invalid="skip")
    assert [r.id for r in result.records] == ["7"]
    assert result.rejects[0]["row"] == 2 and result.rejects[0]["field"] == "id"


def test_xlsx_shape_literal_backslash_n_and_annotations(tmp_path):
    frame = pd.DataFrame(
        [
            {
                "Question": "哪种情况属于急症",
                "Options": "A 甲\\nB 乙\\nC 丙\\nD 丁",  # the two characters \ and n
                "Answer": "C",
                "Explanation": "",
                "Disease Group": "Diseases of the circulatory system",
                "Clinical Department": "Internal Medicine",
                "Medical Discipline": "Clinical Medicine",
                "Area of Competency": "Medical Knowledge",
                "Difficulty level": 3,
            },
            {
                "Question": "第二题",
                "Options": "A 甲\r\nB 乙",
                "Answer": "a、b",
                "Explanation": "解析",
                "Disease Group": None,  # empty cell: no annotation
                "Clinical Department": "Surgery",
                "Medical Discipline": "",
                "Area of Competency": "Clinical Skills",
                "Difficulty level": 5,
            },
        ]
    )
    path = tmp_path / "copy.xlsx"
    frame.to_excel(path, index=False)
    result = read_cmexam(path)
    first, second = result.records
    assert first.id == "copy-00001"
    assert first.options == {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}
    assert first.answer == "C"
    assert first.annotations == {
        "Disease Group": "Diseases of the circulatory system",
        "Clinical Department": "Internal Medicine",
        "Medical Discipline": "Clinical Medicine",
        "Area of Competency": "Medical Knowledge",
        "Difficulty level": 3,
    }
    assert second.options == {"A": "甲", "B": "乙"}
    assert second.answer == "AB"
    assert second.annotations == {
        "Clinical Department": "Surgery",
        "Area of Competency": "Clinical Skills",
        "Difficulty level": 5,
    }
    assert result.n_missing_explanation == 1


def test_csv_with_annotation_columns(tmp_path):
    ann = {
        "Disease Group": "Certain infectious or parasitic diseases",
        "Clinical Department": "Infectious Diseases",
        "Medical Discipline": "Clinical Medicine",
        "Area of Competency": "Medical Knowledge",
    }
    path = write_csv(
        tmp_path / "test_with_annotations.csv",
        [
            {**row(answer="E"), **ann, "Difficulty level": "2"},
            {**row(answer="B"), **ann, "Disease Group": "", "Difficulty level": "nan"},
        ],
    )
    first, second = read_cmexam(path).records
    assert first.annotations == {**ann, "Difficulty level": 2}
    assert isinstance(first.annotations["Difficulty level"], int)
    assert second.annotations == {k: v for k, v in ann.items() if k != "Disease Group"}


# --------------------------------------------------------------------------------------------
# Invalid rows
# --------------------------------------------------------------------------------------------

INVALID = [
    pytest.param(row(answer="F"), "answer", "not among the options", id="answer-not-an-option"),
    pytest.param(row(answer=""), "answer", "no answer", id="no-answer"),
    pytest.param(row(options="A 唯一选项"), "options", "at least 2 options", id="one-option"),
    pytest.param(
        row(options="A 甲\n这一行没有字母\nC 丙"), "options", "unparsable option line", id="unparsable"
    ),
    pytest.param(
        row(options="A 甲\nB 乙\nB 丙"), "options", "duplicate option letter B", id="duplicate-letter"
    ),
    pytest.param(row(question="  "), "question", "empty question", id="empty-question"),
]


@pytest.mark.parametrize(("bad", "field", "reason"), INVALID)
def test_invalid_row_error_names_file_row_field(tmp_path, bad, field, reason):
    path = write_csv(tmp_path / "broken.csv", [row(), row(), bad, row()])
    with pytest.raises(DataFileError) as info:
        read_cmexam(path)
    message = str(info.value)
    assert "broken.csv" in message
    assert "row 3" in message
    assert f"field '{field}'" in message
    assert reason in message
    assert (info.value.row, info.value.field) == (3, field)


@pytest.mark.parametrize(("bad", "field", "reason"), INVALID)
def test_invalid_row_skip_collects_reject(tmp_path, bad, field, reason):
    path = write_csv(tmp_path / "broken.csv", [row(), row(), bad, row()])
    result = read_cmexam(path, on_invalid="skip")
    assert result.n_rows == 4
    assert [r.id for r in result.records] == ["broken-00001", "broken-00002", "broken-00004"]
    (reject,) = result.rejects
    assert (reject["row"], reject["field"]) == (3, field)
    assert reason in reject["reason"]
    assert reject["raw"] == {k: str(v) for k, v in bad.items()}


def test_missing_column_is_a_file_error(tmp_path):
    path = tmp_path / "nocol.csv"
    pd.DataFrame([{"Question": "q", "Options": OPTIONS_5}]).to_csv(path, index=False)
    with pytest.raises(DataFileError, match="Answer"):
        read_cmexam(path, on_invalid="skip")


def test_unsupported_extension_and_mode(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataFileError, match="unsupported extension"):
        read_cmexam(path)
    with pytest.raises(ValueError, match="on_invalid"):
        read_cmexam(SAMPLE, on_invalid="ignore")


# --------------------------------------------------------------------------------------------
# convert_cmexam and load_records
# --------------------------------------------------------------------------------------------


def test_convert_writes_records_and_rejects_and_round_trips(tmp_path):
    out = tmp_path / "out" / "cmexam.jsonl"
    result = convert_cmexam(SAMPLE, out, on_invalid="skip")
    assert len(result.records) == 999

    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 999
    assert json.loads(lines[0])["question"] == "下列哪种病变引起的胸痛常沿一侧肋间神经分布"

    rejects_path = tmp_path / "out" / "cmexam.rejects.jsonl"
    assert default_rejects_path(out) == rejects_path
    rejects = [json.loads(line) for line in rejects_path.read_text(encoding="utf-8").splitlines()]
    assert [(r["row"], r["field"]) for r in rejects] == [(764, "answer")]

    loaded = load_records(out)
    assert loaded == result.records
    assert all(isinstance(r, ExamRecord) for r in loaded)


def test_convert_custom_rejects_path_and_stale_rejects_removed(tmp_path):
    src = write_csv(tmp_path / "in.csv", [row(), row(answer="Z")])
    out, rej = tmp_path / "records.jsonl", tmp_path / "bad_rows.jsonl"
    convert_cmexam(src, out, on_invalid="skip", rejects_path=rej)
    assert len(rej.read_text(encoding="utf-8").splitlines()) == 1

    write_csv(src, [row(), row(answer="B")])
    result = convert_cmexam(src, out, on_invalid="skip", rejects_path=rej)
    assert result.rejects == []
    assert not rej.exists()  # an old rejects file must not be mistaken for this run's
    assert len(load_records(out)) == 2


def test_convert_error_mode_writes_nothing(tmp_path):
    out = tmp_path / "cmexam.jsonl"
    with pytest.raises(DataFileError, match="row 764"):
        convert_cmexam(SAMPLE, out)
    assert not out.exists()
    assert not default_rejects_path(out).exists()


def test_convert_refuses_to_overwrite_input(tmp_path):
    src = write_csv(tmp_path / "in.csv", [row()])
    with pytest.raises(ValueError, match="overwrite"):
        convert_cmexam(src, src)


def test_load_records_bad_record_names_line(tmp_path):
    good = ExamRecord("a", "q", {"A": "甲", "B": "乙"}, "A").to_dict()
    bad = {**good, "id": "b", "answer": "C"}
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError) as info:
        load_records(path)
    assert (info.value.row, info.value.field) == (2, "answer")
    assert "records.jsonl, row 2, field 'answer'" in str(info.value)


def test_load_records_bad_json_and_duplicate_id(tmp_path):
    good = ExamRecord("a", "q", {"A": "甲", "B": "乙"}, "A").to_dict()
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(good) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="row 2"):
        load_records(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="duplicate id"):
        load_records(path)


# --------------------------------------------------------------------------------------------
# Missing values: "nan", "None", "NULL" and blank cells are missing, in every shape
# --------------------------------------------------------------------------------------------

XLSX_HEADER = ["Question", "Options", "Answer", "Explanation", "Disease Group", "Difficulty level"]
OPTS_3 = "A 甲\nB 乙\nC 丙"


def write_xlsx(path: Path, rows: list[list]) -> Path:
    """A workbook written cell by cell with openpyxl: str cells stay text, None stays an empty cell."""
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(XLSX_HEADER)
    for values in rows:
        sheet.append(values)
    book.save(path)
    return path


@pytest.fixture
def nan_xlsx(tmp_path) -> Path:
    # The shape of a third-party val.xlsx: pandas wrote str(NaN) == "nan" into empty cells.
    return write_xlsx(
        tmp_path / "val.xlsx",
        [
            ["题一", OPTS_3, "A", "nan", "Diseases of the eye", 3],  # 1
            ["题二", OPTS_3, "B", "None", None, None],  # 2
            ["题三", OPTS_3, "C", "NULL", "", ""],  # 3
            ["题四", OPTS_3, "AB", None, "NaN", "null"],  # 4: a real empty explanation cell
            ["题五", OPTS_3, "BA", "解析", "none", " NAN "],  # 5
            ["题六", OPTS_3, "nan", "解析", None, None],  # 6: the answerless row
            ["题七", OPTS_3, None, "解析", None, None],  # 7: a real empty answer cell
            ["题八", "A 甲\nB nan\nC 丙", "A", "解析", None, None],  # 8
            ["None", OPTS_3, "A", "解析", None, None],  # 9
            ["题十", "NULL", "A", "解析", None, None],  # 10
            ["题十一", "A 甲\nB\nC 丙", "A", "解析", None, None],  # 11: an option with no text at all
        ],
    )


def test_xlsx_nan_explanation_is_missing_not_text(nan_xlsx):
    result = read_cmexam(nan_xlsx, on_invalid="skip")
    assert result.n_rows == 11
    assert [r.id for r in result.records] == ["val-00001", "val-00002", "val-00003", "val-00004", "val-00005"]
    assert [r.explanation for r in result.records] == ["", "", "", "", "解析"]
    assert result.n_missing_explanation == 4
    assert [r.answer for r in result.records] == ["A", "B", "C", "AB", "AB"]


def test_xlsx_nan_annotations_are_left_out(nan_xlsx):
    result = read_cmexam(nan_xlsx, on_invalid="skip")
    assert [r.annotations for r in result.records] == [
        {"Disease Group": "Diseases of the eye", "Difficulty level": 3},
        {},
        {},
        {},
        {},
    ]


def test_xlsx_nan_answer_is_a_missing_answer_not_letters(nan_xlsx):
    result = read_cmexam(nan_xlsx, on_invalid="skip")
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (6, "answer", "no answer ('nan' counts as missing)"),
        (7, "answer", "no answer"),
        (8, "options", "option B has no text ('nan' counts as missing)"),
        (9, "question", "empty question ('None' counts as missing)"),
        (10, "options", "no options ('NULL' counts as missing)"),
        (11, "options", "option B has no text"),
    ]
    # The reject keeps the cell as it was written, so a person can find it.
    assert result.rejects[0]["raw"]["Answer"] == "nan"
    assert len(result.records) + len(result.rejects) == result.n_rows


def test_xlsx_nan_answer_error_mode_message(tmp_path):
    path = write_xlsx(tmp_path / "val.xlsx", [["题一", OPTS_3, "A", "解析", None, None],
                                              ["题二", OPTS_3, "NAN", "nan", None, None]])
    with pytest.raises(DataFileError) as info:
        read_cmexam(path)
    assert str(info.value) == f"{path}, row 2, field 'answer': no answer ('NAN' counts as missing)"
    assert (info.value.row, info.value.field, info.value.reason) == (2, "answer", "no answer ('NAN' counts as missing)")


@pytest.mark.parametrize("marker", ["nan", "NaN", "None", "none", "null", "NULL", "", "  "])
def test_csv_nan_cells_are_missing(tmp_path, marker):
    import csv

    path = tmp_path / "val.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Question", "Options", "Answer", "Explanation", "Clinical Department"])
        writer.writerow(["题一", OPTS_3, "A", marker, marker])
        writer.writerow(["题二", OPTS_3, marker, "解析", "Surgery"])
        writer.writerow(["题三", f"A 甲\nB {marker}", "A", "解析", ""])
    result = read_cmexam(path, on_invalid="skip")
    (record,) = result.records
    assert (record.id, record.explanation, record.annotations) == ("val-00001", "", {})
    assert result.n_missing_explanation == 1
    note = f" ({marker.strip()!r} counts as missing)" if marker.strip() else ""
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (2, "answer", "no answer" + note),
        (3, "options", "option B has no text" + note),
    ]


def test_jsonl_null_nan_and_marker_values_are_missing(tmp_path):
    opts = [{"key": "A", "value": "甲"}, {"key": "B", "value": "乙"}]
    rows = [
        {"id": "nan", "Question": "题一", "Options": opts, "Answer": "A", "Explanation": None},
        {"id": "q2", "Question": "题二", "Options": opts, "Answer": "B", "Explanation": float("nan"),
         "Difficulty level": "None"},
        {"id": "q3", "Question": "题三", "Options": opts, "Answer": "A", "Explanation": "null"},
        {"id": "q4", "Question": "题四", "Options": opts, "Answer": "None", "Explanation": "解析"},
        {"id": "q5", "Question": "题五", "Options": [{"key": "A", "value": "甲"}, {"key": "B", "value": None}],
         "Answer": "A"},
        {"id": "q6", "Question": "题六", "Options": [{"key": "A", "value": "甲"}, {"key": "B", "value": "NaN"}],
         "Answer": "A"},
        {"id": "q7", "Question": float("nan"), "Options": opts, "Answer": "A"},
        {"id": "q8", "Question": "题八", "Options": None, "Answer": "A"},
    ]
    path = tmp_path / "hf.jsonl"
    # json.dumps writes float NaN as the bare token NaN, which Python's json (and pandas) read back.
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = read_cmexam(path, on_invalid="skip")
    assert [(r.id, r.explanation, r.annotations) for r in result.records] == [
        ("hf-00001", "", {}),  # the id "nan" is missing: a generated id, not the id "nan"
        ("q2", "", {}),
        ("q3", "", {}),
    ]
    assert result.n_missing_explanation == 3
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (4, "answer", "no answer ('None' counts as missing)"),
        (5, "options", "option B has no text"),
        (6, "options", "option B has no text ('NaN' counts as missing)"),
        (7, "question", "empty question (NaN counts as missing)"),
        (8, "options", "no options"),
    ]
    # Rejects are written as JSON: the NaN question must come back as null, not as invalid JSON.
    assert result.rejects[3]["raw"]["Question"] is None


def test_json_array_nan_values_are_missing(tmp_path):
    opts = {"A": "甲", "B": "乙", "C": "null"}
    path = tmp_path / "copy.json"
    path.write_text(json.dumps([
        {"Question": "题一", "Options": {"A": "甲", "B": "乙"}, "Answer": ["A", "nan"], "Explanation": "nan"},
        {"Question": "题二", "Options": opts, "Answer": "A", "Explanation": "解析"},
    ], ensure_ascii=False), encoding="utf-8")
    result = read_cmexam(path, on_invalid="skip")
    (record,) = result.records
    assert (record.id, record.answer, record.explanation) == ("copy-00001", "A", "")
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (2, "options", "option C has no text ('null' counts as missing)"),
    ]


def test_xlsx_truncated_workbook_is_one_clear_error(tmp_path):
    real = Path(medtune.__file__).parent / "examples" / "exam_xlsx" / "gaokao_reading.xlsx"
    data = real.read_bytes()
    path = tmp_path / "val.xlsx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError) as info:
        read_cmexam(path, on_invalid="skip")
    assert str(info.value) == (
        f"{path}: not a readable .xlsx workbook (BadZipFile: File is not a zip file); expected an Excel "
        "workbook: the file may be truncated or corrupt, re-save it from Excel"
    )


def test_xlsx_corrupt_sheet_inside_a_valid_zip_is_one_clear_error(tmp_path):
    import zipfile

    good = write_xlsx(tmp_path / "good.xlsx", [["题一", OPTS_3, "A", "解析", None, None]])
    bad = tmp_path / "bad.xlsx"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            body = src.read(name)
            dst.writestr(name, body[: len(body) // 2] if name == "xl/worksheets/sheet1.xml" else body)
    with pytest.raises(DataFileError) as info:
        read_cmexam(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: not a readable .xlsx workbook (")
    assert message.endswith("expected an Excel workbook: the file may be truncated or corrupt, re-save it from Excel")


def test_separator_only_answer_gets_no_missing_note(tmp_path):
    # "," is empty only once separators are dropped; it is not a missing marker, so no note.
    path = write_csv(tmp_path / "sep.csv", [row(answer=" , ")])
    (reject,) = read_cmexam(path, on_invalid="skip").rejects
    assert (reject["row"], reject["field"], reject["reason"]) == (1, "answer", "no answer")
