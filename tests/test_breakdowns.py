"""Breakdowns of scored rows: Wilson intervals, per-category accuracy, confusion matrix, letter bias.

Every expected value below is worked out by hand in the comments.
"""

from __future__ import annotations

import pytest

from medtune.evaluation.breakdowns import (
    accuracy_breakdowns,
    confusion_matrix,
    letter_distribution,
    wilson_interval,
)

# z = Φ⁻¹(0.975) = 1.959963984540054, z² = 3.8414588206941254.


def test_wilson_k8_n10_by_hand():
    # p = 0.8, n = 10, z²/n = 0.38414588
    # denominator   1 + z²/n                  = 1.38414588
    # centre        (p + z²/2n) / denominator = 0.99207294 / 1.38414588 = 0.71674016
    # half width    z·√(p(1−p)/n + z²/4n²) / denominator
    #             = 1.95996398·√(0.016 + 0.00960365) / 1.38414588
    #             = 1.95996398·0.16001140 / 1.38414588 = 0.31361657 / 1.38414588 = 0.22657769
    # → low = 0.71674016 − 0.22657769 = 0.49016247, high = 0.71674016 + 0.22657769 = 0.94331785
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(49.016247, abs=1e-5)
    assert high == pytest.approx(94.331785, abs=1e-5)


def test_wilson_extremes_by_hand():
    # k = 0: p = 0, the centre equals the half width (both (z²/2n)/(1 + z²/n)), so low = 0 exactly
    # and high = 2·(z²/2n)/(1 + z²/n) = z²/(n + z²) = 3.84145882 / 8.84145882 = 0.43448246.
    assert wilson_interval(0, 5) == (0.0, pytest.approx(43.448246, abs=1e-5))
    # k = n: mirror image: high = 1 exactly, low = n/(n + z²) = 5 / 8.84145882 = 0.56551754.
    # (A normal/Wald interval would give 100 ± 0, i.e. certainty from 5 questions.)
    assert wilson_interval(5, 5) == (pytest.approx(56.551754, abs=1e-5), 100.0)


def test_wilson_rejects_empty_and_impossible_counts():
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(6, 5)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(-1, 5)


DG, CD, DL = "Disease Group", "Clinical Department", "Difficulty level"
CIRC, RESP = "循环系统疾病", "呼吸系统疾病"  # 呼 U+547C sorts before 循 U+5FAA
FIVE = {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}
FOUR = {"A": "a", "B": "b", "C": "c", "D": "d"}


def _row(id_, answer, parsed, annotations, options=FIVE):
    row = {"id": id_, "question": f"question {id_}", "options": options, "answer": answer,
           "parsed": parsed, "correct": parsed == answer, "output": parsed}
    if annotations is not None:
        row["annotations"] = annotations
    return row


ROWS = [
    _row("q1", "A", "A", {DG: CIRC, CD: "内科", DL: 3}),  # right
    _row("q2", "B", "C", {DG: CIRC, CD: "内科", DL: 1}),  # wrong
    _row("q3", "C", "C", {DG: RESP, CD: "外科", DL: 3}),  # right
    _row("q4", "D", "", {DG: RESP, DL: 10}, options=FOUR),  # no answer; 4 options
    _row("q5", "AC", "AC", {DG: CIRC, DL: 2}),  # multi-answer, right
    # labels present but empty → not counted for DG or DL; an extra, non-CMExam annotation key
    _row("q6", "A", "AB", {DG: "", DL: None, "Source": "mock"}),  # wrong: two letters
    _row("q7", "A", "A", None),  # no annotations at all; right
    _row("q8", "BD", "B", {DG: RESP, DL: "3"}, options=FOUR),  # multi, wrong; "3" == 3 as strings
]


def _cell(value, n, correct):
    low, high = wilson_interval(correct, n)
    return {"value": value, "n": n, "correct": correct, "accuracy": pytest.approx(100 * correct / n),
            "ci_low": pytest.approx(low), "ci_high": pytest.approx(high)}


def test_accuracy_breakdowns_by_hand():
    got = accuracy_breakdowns(ROWS)
    assert got == {
        "by_annotation": {
            # Canonical CMExam columns first, in their order; the extra key after them. Medical
            # Discipline and Area of Competency occur in no row → no key (not an empty list).
            DG: [
                _cell(RESP, 3, 1),  # q3 ✓, q4 ✗, q8 ✗ → 33.33
                _cell(CIRC, 3, 2),  # q1 ✓, q2 ✗, q5 ✓ → 66.67   (q6 "" and q7 missing: not counted)
            ],
            CD: [_cell("内科", 2, 1), _cell("外科", 1, 1)],  # q1 ✓ q2 ✗ | q3 ✓
            DL: [  # numeric order 1, 2, 3, 10 (string order would put 10 second)
                _cell("1", 1, 0),  # q2
                _cell("2", 1, 1),  # q5
                _cell("3", 3, 2),  # q1 ✓, q3 ✓, q8 ✗ (given as the string "3")
                _cell("10", 1, 0),  # q4
            ],
            "Source": [_cell("mock", 1, 0)],  # q6
        },
        # single: q1 ✓ q2 ✗ q3 ✓ q4 ✗ q6 ✗ q7 ✓ → 3/6; multi: q5 ✓ q8 ✗ → 1/2
        "by_answer_type": [_cell("single", 6, 3), _cell("multi", 2, 1)],
        # 4 options: q4 ✗ q8 ✗ → 0/2; 5 options: q1 ✓ q2 ✗ q3 ✓ q5 ✓ q6 ✗ q7 ✓ → 4/6
        "by_n_options": [_cell("4", 2, 0), _cell("5", 6, 4)],
    }
    # Spot-check the rounding-free numbers of one cell: 1/3 correct.
    resp = got["by_annotation"][DG][0]
    assert resp["accuracy"] == pytest.approx(33.333333)
    assert 0 < resp["ci_low"] < resp["accuracy"] < resp["ci_high"] < 100


def test_empty_breakdowns_are_omitted():
    # No row has any annotation → no "by_annotation" key at all (chosen over an empty dict, so
    # "key present" always means "there is something to show"); only single-answer rows →
    # "by_answer_type" has no "multi" cell.
    rows = [_row("a", "A", "A", None), _row("b", "B", "A", {}), _row("c", "C", "C", {DG: ""})]
    got = accuracy_breakdowns(rows)
    assert "by_annotation" not in got
    assert got["by_answer_type"] == [_cell("single", 3, 2)]
    assert got["by_n_options"] == [_cell("5", 3, 2)]
    assert accuracy_breakdowns([]) == {}


def test_confusion_matrix_by_hand():
    # Single-answer gold only: q1 A→A, q2 B→C, q3 C→C, q4 D→none, q6 A→multi ("AB"), q7 A→A.
    # q5 and q8 (multi-answer gold) are left out.
    assert confusion_matrix(ROWS) == {
        "gold_labels": ["A", "B", "C", "D"],
        "pred_labels": ["A", "C", "multi", "none"],  # letters sorted, then multi, none
        "matrix": [
            [2, 0, 1, 0],  # A: q1, q7 → A; q6 → multi
            [0, 1, 0, 0],  # B: q2 → C
            [0, 1, 0, 0],  # C: q3 → C
            [0, 0, 0, 1],  # D: q4 → none
        ],
    }


def test_confusion_matrix_none_without_single_answer_rows():
    assert confusion_matrix([_row("m", "AC", "A", None)]) is None
    assert confusion_matrix([]) is None


def test_letter_distribution_by_hand():
    # gold:      A q1 q5 q6 q7 = 4; B q2 q8 = 2; C q3 q5 = 2; D q4 q8 = 2
    # predicted: A q1 q5 q6 q7 = 4; B q6 q8 = 2; C q2 q3 q5 = 3; D never = 0 (kept: same keys
    #            on both sides); q4 gave no answer → n_no_answer 1
    assert letter_distribution(ROWS) == {
        "gold": {"A": 4, "B": 2, "C": 2, "D": 2},
        "predicted": {"A": 4, "B": 2, "C": 3, "D": 0},
        "n_no_answer": 1,
    }


def test_letter_distribution_includes_letters_only_predicted():
    rows = [_row("x", "A", "E", None), _row("y", "B", "", None)]
    assert letter_distribution(rows) == {
        "gold": {"A": 1, "B": 1, "E": 0},
        "predicted": {"A": 0, "B": 0, "E": 1},
        "n_no_answer": 1,
    }
