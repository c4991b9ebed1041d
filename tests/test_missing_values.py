"""The one missing-value rule every converter shares (medtune.io.is_missing and its helpers)."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest

from medtune.io import (
    MISSING_MARKERS,
    DataFileError,
    check_convert_paths,
    default_rejects_path,
    is_missing,
    missing_note,
    present_text,
    reading_workbook,
)

MISSING = [
    None,
    float("nan"),
    np.float64("nan"),
    "",
    "   ",
    "\t\n",
    "\u3000",  # an ideographic space, what a Chinese spreadsheet cell often holds
    "nan",
    "NaN",
    "NAN",
    " nan ",
    "None",
    "none",
    "NONE",
    "null",
    "NULL",
    "Null",
    "\u3000null\n",
]

PRESENT = [
    "甲",
    "A",
    "0",
    0,
    1.5,
    False,
    "NA",  # not a marker: "Na" (sodium) is a real option text
    "Na",
    "N/A",
    "nan nan",
    "none of the above",
    "None of the above",
    "A nan",
    "nullable",
    "'nan'",
    [],
    {},
]


@pytest.mark.parametrize("value", MISSING, ids=repr)
def test_is_missing_markers_and_blanks(value):
    assert is_missing(value) is True
    assert present_text(value) == ""


@pytest.mark.parametrize("value", PRESENT, ids=repr)
def test_is_missing_leaves_real_values_alone(value):
    assert is_missing(value) is False


def test_marker_set_is_exactly_nan_none_null():
    assert MISSING_MARKERS == frozenset({"nan", "none", "null"})


def test_present_text_strips_and_stringifies():
    assert present_text("  甲 乙\n") == "甲 乙"
    assert present_text(3) == "3"
    assert present_text("Na") == "Na"
    assert present_text(" None of the above ") == "None of the above"


@pytest.mark.parametrize(
    ("value", "note"),
    [
        (None, ""),
        ("", ""),
        ("  ", ""),
        ("nan", " ('nan' counts as missing)"),
        (" NULL\n", " ('NULL' counts as missing)"),
        ("None", " ('None' counts as missing)"),
        (float("nan"), " (NaN counts as missing)"),
        (",", ""),  # not missing by the rule: no note, even where a reason says "no answer"
        ("Na", ""),
    ],
    ids=repr,
)
def test_missing_note_says_what_was_found(value, note):
    assert missing_note(value) == note


def test_reading_workbook_turns_parse_failures_into_one_data_file_error(tmp_path):
    path = tmp_path / "book.xlsx"
    with pytest.raises(DataFileError) as info, reading_workbook(path):
        raise zipfile.BadZipFile("File is not a zip file")
    assert str(info.value) == (
        f"{path}: not a readable .xlsx workbook (BadZipFile: File is not a zip file); expected an Excel "
        "workbook: the file may be truncated or corrupt, re-save it from Excel"
    )
    assert (info.value.row, info.value.field) == (None, None)


def test_reading_workbook_lets_os_errors_through(tmp_path):
    with pytest.raises(FileNotFoundError), reading_workbook(tmp_path / "x.xlsx"):
        raise FileNotFoundError(2, "No such file or directory")


def test_check_convert_paths_messages(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("x", encoding="utf-8")
    folder = tmp_path / "folder"
    folder.mkdir()
    check_convert_paths(src, tmp_path / "new" / "out.jsonl", None)  # fine: folders are created

    with pytest.raises(DataFileError) as info:
        check_convert_paths(folder, tmp_path / "out.jsonl", None)
    assert str(info.value) == f"{folder}: the input is a directory; expected one data file"
    with pytest.raises(ValueError) as info:
        check_convert_paths(src, src, None)
    assert str(info.value) == f"output {src} is the input file; refusing to overwrite it"
    with pytest.raises(ValueError) as info:
        check_convert_paths(src, folder, None, out_label="--out")
    assert str(info.value) == (
        f"--out {folder} is a directory; expected a file path such as {folder / 'records.jsonl'}"
    )
    with pytest.raises(ValueError) as info:
        check_convert_paths(src, tmp_path / "out.jsonl", folder, rejects_label="--rejects")
    assert str(info.value) == (
        f"--rejects {folder} is a directory; expected a file path such as {folder / 'rejects.jsonl'}"
    )
    with pytest.raises(ValueError) as info:
        check_convert_paths(src, tmp_path / "out.jsonl", src)
    assert str(info.value) == f"rejects output {src} is the input file; refusing to overwrite it"
    with pytest.raises(ValueError) as info:
        check_convert_paths(src, src / "sub" / "out.jsonl", None)
    assert str(info.value) == f"output {src / 'sub' / 'out.jsonl'} is inside {src}, which is a file, not a folder"
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError) as info:
        check_convert_paths(src, out, out)
    assert str(info.value) == f"records and rejects would both be written to {out} (output and rejects output)"
    # The default rejects path counts too.
    default_rejects_path(out).mkdir()
    with pytest.raises(ValueError, match=r"^rejects output .* is a directory"):
        check_convert_paths(src, out, None)


def test_nan_float_is_not_confused_with_numbers():
    assert not is_missing(math.inf)
    assert not is_missing(0.0)
