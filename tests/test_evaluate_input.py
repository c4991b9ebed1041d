"""evaluate refuses predictions files that would score wrong, in one line naming file, line, field.

Regression tests named after the symptoms: duplicate ids counted twice (3 copies of a correct
row and 1 wrong row gave n=4, Acc 75 instead of 50), tracebacks on a null/NaN/number output, a
GBK file or a CSV; plus property tests (hypothesis) that the metrics do not depend on row order.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medtune.cli import main
from medtune.evaluation.evaluate import evaluate
from medtune.io import DataFileError, write_jsonl

OPTS = {"A": "胸肌劳损", "B": "流行性胸痛", "C": "颈椎病", "D": "带状疱疹"}


def _row(id_: str, output, answer="D", **extra) -> dict:
    return {"id": id_, "question": "胸痛沿一侧肋间神经分布", "options": OPTS, "answer": answer,
            "explanation": "带状疱疹沿神经分布", "template": "qa", "output": output, **extra}


def _run(tmp_path, capsys, path) -> tuple[int, str]:
    code = main(["evaluate", str(path), "--out", str(tmp_path / "ev")])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("medtune evaluate: error: "), err
    return err


def test_duplicate_ids_are_refused_not_counted_twice(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [_row("q1", "D"), _row("q1", "D"), _row("q1", "D"), _row("q2", "B")])
    code, err = _run(tmp_path, capsys, path)
    assert code == 2
    assert f"{path}, field 'id': 1 id(s) occur more than once: 'q1' on lines 1, 2, 3" in _one_line(err)
    assert not (tmp_path / "ev" / "results.json").exists()
    write_jsonl(path, [_row("q1", "D"), _row("q2", "B")])  # each question once: Acc 50, not 75
    assert evaluate(path, tmp_path / "ev")["accuracy"] == 50.0


@pytest.mark.parametrize(("output", "shown"), [(None, "null"), (float("nan"), "nan"), (3, "3"), (["D"], "['D']")])
def test_output_that_is_not_text_is_one_line(tmp_path, capsys, output, shown):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_row("q1", "D")) + "\n" + json.dumps(_row("q2", output)) + "\n", encoding="utf-8")
    code, err = _run(tmp_path, capsys, path)
    assert code == 2
    assert f"{path}, row 2, field 'output': expected the model's output as text, got {shown}" in _one_line(err)


def test_gbk_predictions_are_one_line_naming_the_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    text = json.dumps(_row("q1", "D"), ensure_ascii=False) + "\n" + json.dumps(_row("q2", "答案：D"), ensure_ascii=False)
    path.write_bytes(text.encode("gbk"))
    code, err = _run(tmp_path, capsys, path)
    assert code == 2 and f"{path}, row 1: not UTF-8 text" in _one_line(err) and "re-save the file as UTF-8" in err


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_a_spreadsheet_given_to_evaluate_is_one_line(tmp_path, capsys, suffix):
    path = tmp_path / f"preds{suffix}"
    path.write_text("id,output\nq1,D\n", encoding="utf-8")
    code, err = _run(tmp_path, capsys, path)
    assert code == 2 and f"{path}: a {suffix} file; evaluate reads the predictions .jsonl" in _one_line(err)


def test_a_directory_or_a_missing_file_is_one_line(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, tmp_path)
    assert code == 2 and "is a directory; expected a JSON-lines file" in _one_line(err)
    code, err = _run(tmp_path, capsys, tmp_path / "nope.jsonl")
    assert code == 2 and "nope.jsonl" in _one_line(err)


def test_lines_from_two_producers_are_refused(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [_row("q1", "D", source="aaaa"), _row("q2", "D", source="bbbb")])
    code, err = _run(tmp_path, capsys, path)
    assert code == 2 and "the lines come from 2 different producers (first lines of each: line 1, line 2)" in _one_line(err)


def test_gold_letter_outside_the_options_is_an_error_not_dropped(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [_row("q1", "D", answer="DF")])  # used to become "D" silently
    code, err = _run(tmp_path, capsys, path)
    assert code == 2
    assert "row 1, field 'answer': gold answer 'DF' has letter(s) F that are not among the options ABCD" in _one_line(err)
    write_jsonl(path, [_row("q1", "答案：A、C", answer="A, C")])  # separators in the gold are fine
    assert evaluate(path, tmp_path / "ev")["accuracy"] == 100.0


# ---- properties ----------------------------------------------------------------------------------

OUTPUTS = st.sampled_from(["D", "B\n理由：流行性胸痛", "答案：D\n理由：带状疱疹沿神经分布", "无法回答", "", "A或B",
                           "答案：AC", "C 颈椎病 理由：颈椎病放射痛", "不知道"])
ROWS = st.lists(st.tuples(OUTPUTS, st.sampled_from(["A", "D", "AC", "BD"]), st.sampled_from(["", "带状疱疹沿神经分布"])),
                min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(rows=ROWS, order=st.randoms(use_true_random=False))
def test_metrics_do_not_depend_on_row_order(tmp_path, rows, order):
    table = [_row(f"q{i}", out, answer=gold, explanation=exp) for i, (out, gold, exp) in enumerate(rows)]
    shuffled = list(table)
    order.shuffle(shuffled)
    write_jsonl(tmp_path / "a.jsonl", table)
    write_jsonl(tmp_path / "b.jsonl", shuffled)
    a, b = evaluate(tmp_path / "a.jsonl", tmp_path / "ea"), evaluate(tmp_path / "b.jsonl", tmp_path / "eb")
    for key in ("accuracy", "f1", "bleu_1", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "n", "n_no_answer",
                "n_ambiguous", "n_explanations_scored", "accuracy_single", "accuracy_multi"):
        if a[key] is None:
            assert b[key] is None, key
        else:
            assert b[key] == pytest.approx(a[key], abs=1e-9), key


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(rows=ROWS, copy=st.integers(min_value=0, max_value=11))
def test_any_repeated_id_is_refused(tmp_path, rows, copy):
    table = [_row(f"q{i}", out, answer=gold) for i, (out, gold, _) in enumerate(rows)]
    table.append(dict(table[copy % len(table)]))
    write_jsonl(tmp_path / "p.jsonl", table)
    with pytest.raises(DataFileError, match="occur more than once"):
        evaluate(tmp_path / "p.jsonl", tmp_path / "ev")
