"""``medtune convert`` failures: one line naming the file, row, field or setting, and a non-zero exit."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import medtune
from medtune.cli import main

EXAMPLES = Path(medtune.__file__).parent / "examples"
REAL_XLSX = EXAMPLES / "exam_xlsx" / "gaokao_reading.xlsx"
UNREADABLE = ("not a readable .xlsx workbook (BadZipFile: File is not a zip file); expected an Excel "
              "workbook: the file may be truncated or corrupt, re-save it from Excel")


def write_cmexam_csv(path: Path, answers: list[str]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Question", "Options", "Answer", "Explanation"])
        for i, answer in enumerate(answers, start=1):
            writer.writerow([f"题{i}", "A 甲\nB 乙", answer, "解析"])
    return path


@pytest.fixture
def half_xlsx(tmp_path) -> Path:
    data = REAL_XLSX.read_bytes()
    path = tmp_path / "half.xlsx"
    path.write_bytes(data[: len(data) // 2])
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("fmt", [["cmexam"], ["exam-xlsx", "--lang", "zh"]])
def test_convert_truncated_xlsx_is_one_line(half_xlsx, tmp_path, capsys, fmt):
    out = tmp_path / "r.jsonl"
    rc, _, err = run(["convert", fmt[0], half_xlsx, *fmt[1:], "--out", out], capsys)
    assert rc == 2
    assert err == f"medtune convert: error: {half_xlsx}: {UNREADABLE}\n"
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["cmexam", "promptcblue", "auto", "exam-xlsx"])
def test_convert_directory_input_is_one_line(tmp_path, capsys, fmt):
    folder = tmp_path / "data.csv"
    folder.mkdir()
    out = tmp_path / "r.jsonl"
    rc, _, err = run(["convert", fmt, folder, "--lang", "zh", "--out", out], capsys)
    assert rc == 2
    assert err == f"medtune convert: error: {folder}: the input is a directory; expected one data file\n"
    assert not out.exists()


def test_convert_output_equal_to_input_is_refused(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", ["A"])
    before = src.read_bytes()
    rc, _, err = run(["convert", "cmexam", src, "--out", src], capsys)
    assert rc == 2
    assert err == f"medtune convert: error: --out {src} is the input file; refusing to overwrite it\n"
    assert src.read_bytes() == before


def test_convert_output_that_is_a_directory_is_refused(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", ["A"])
    folder = tmp_path / "outdir"
    folder.mkdir()
    rc, _, err = run(["convert", "cmexam", src, "--out", folder], capsys)
    assert rc == 2
    assert err == (f"medtune convert: error: --out {folder} is a directory; expected a file path such as "
                   f"{folder / 'records.jsonl'}\n")


def test_convert_rejects_path_equal_to_input_is_refused(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", ["A", "Z"])
    before = src.read_bytes()
    out = tmp_path / "r.jsonl"
    rc, _, err = run(["convert", "cmexam", src, "--out", out, "--on-invalid", "skip", "--rejects", src], capsys)
    assert rc == 2
    assert err == f"medtune convert: error: --rejects {src} is the input file; refusing to overwrite it\n"
    assert src.read_bytes() == before and not out.exists()


def test_convert_rejects_path_that_is_a_directory_is_refused_before_writing(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", ["A", "Z"])
    folder = tmp_path / "rejects"
    folder.mkdir()
    out = tmp_path / "r.jsonl"
    rc, _, err = run(["convert", "cmexam", src, "--out", out, "--on-invalid", "skip", "--rejects", folder], capsys)
    assert rc == 2
    assert err == (f"medtune convert: error: --rejects {folder} is a directory; expected a file path such as "
                   f"{folder / 'rejects.jsonl'}\n")
    assert not out.exists()  # before: the records were written, then the rejects write failed


def test_convert_default_rejects_path_that_is_a_directory_is_refused(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", ["A"])
    out = tmp_path / "r.jsonl"
    folder = tmp_path / "r.rejects.jsonl"
    folder.mkdir()
    rc, _, err = run(["convert", "cmexam", src, "--out", out], capsys)
    assert rc == 2
    assert err == (f"medtune convert: error: rejects file (default; set --rejects) {folder} is a directory; "
                   f"expected a file path such as {folder / 'rejects.jsonl'}\n")


def test_convert_output_below_a_file_is_refused(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", ["A"])
    out = src / "r.jsonl"
    rc, _, err = run(["convert", "cmexam", src, "--out", out], capsys)
    assert rc == 2
    assert err == f"medtune convert: error: --out {out} is inside {src}, which is a file, not a folder\n"


def test_convert_zero_records_warns_and_exits_1(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", ["Z", "nan", ""])
    out = tmp_path / "r.jsonl"
    rejects = tmp_path / "r.rejects.jsonl"
    rc, stdout, err = run(["convert", "cmexam", src, "--out", out, "--on-invalid", "skip"], capsys)
    assert rc == 1
    assert stdout == (f"{src}: 3 rows → 0 records written to {out}\n"
                      f"  3 rows rejected (reasons in {rejects})\n")
    assert err == (f"medtune convert: warning: no records: all 3 rows were rejected (reasons in {rejects}); "
                   f"{out} is empty (exit 1)\n")
    assert out.read_text(encoding="utf-8") == ""  # no stale records from an earlier run survive
    assert len(rejects.read_text(encoding="utf-8").splitlines()) == 3


def test_convert_header_only_file_warns_and_exits_1(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", [])
    out = tmp_path / "r.jsonl"
    rc, stdout, err = run(["convert", "cmexam", src, "--out", out], capsys)
    assert rc == 1
    assert stdout == f"{src}: 0 rows → 0 records written to {out}\n"
    assert err == f"medtune convert: warning: no records: {src} has no data rows; {out} is empty (exit 1)\n"


def test_convert_exam_xlsx_zero_records_warns_and_exits_1(tmp_path, capsys):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "语文"
    sheet.append(["阅读文本", "选项", "答案"])
    sheet.append(["nan", "1．题干\nA．甲\nB．乙\nC．丙\nD．丁", "1．B"])
    src = tmp_path / "exam.xlsx"
    book.save(src)
    out = tmp_path / "pairs.jsonl"
    rejects = tmp_path / "pairs.rejects.jsonl"
    rc, stdout, err = run(["convert", "exam-xlsx", src, "--lang", "zh", "--out", out], capsys)
    assert rc == 1
    assert stdout == (f"{src} [sheet '语文', zh]: 1 rows → 0 training pairs written to {out}\n"
                      f"  1 rows rejected (reasons in {rejects})\n")
    assert err == (f"medtune convert: warning: no records: all 1 rows were rejected (reasons in {rejects}); "
                   f"{out} is empty (exit 1)\n")


def test_convert_nan_answer_error_names_file_row_field(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "val.csv", ["A", "nan"])
    rc, _, err = run(["convert", "cmexam", src, "--out", tmp_path / "r.jsonl"], capsys)
    assert rc == 2
    assert err == f"medtune convert: error: {src}, row 2, field 'answer': no answer ('nan' counts as missing)\n"


def test_convert_with_records_still_exits_0(tmp_path, capsys):
    src = write_cmexam_csv(tmp_path / "in.csv", ["A", "nan"])
    out = tmp_path / "r.jsonl"
    rc, stdout, err = run(["convert", "cmexam", src, "--out", out, "--on-invalid", "skip"], capsys)
    assert (rc, err) == (0, "")
    assert stdout.splitlines()[0] == f"{src}: 2 rows → 1 records written to {out}"
