"""Comparing runs: McNemar by hand, pairing by id, category deltas, examples, compare_runs files."""

from __future__ import annotations

import json

import pytest

from medtune.evaluation.compare import category_deltas, compare_runs, mcnemar, pair_rows, pick_examples
from medtune.evaluation.evaluate import evaluate
from medtune.io import atomic_write_json, write_jsonl


def test_mcnemar_by_hand():
    # b = 1 (A right, B wrong), c = 6 (A wrong, B right); plus 2 both right, 3 both wrong.
    # Exact two-sided: under H0 c ~ Bin(7, ½); P(c ≥ 6) = (C(7,6) + C(7,7))/2⁷ = 8/128, doubled
    # (symmetric) → p = 2·8/128 = 0.125. Continuity-corrected χ² = (|1 − 6| − 1)²/7 = 16/7.
    a = [True] * 1 + [False] * 6 + [True] * 2 + [False] * 3
    b = [False] * 1 + [True] * 6 + [True] * 2 + [False] * 3
    got = mcnemar(a, b)
    assert got == {
        "n": 12, "a_only": 1, "b_only": 6, "both": 2, "neither": 3,
        "p_value": pytest.approx(0.125), "chi2_cc": pytest.approx(16 / 7),
        "method": "exact binomial (two-sided)",
    }


def test_mcnemar_no_discordant_pairs():
    got = mcnemar([True, False, True], [True, False, True])
    assert (got["a_only"], got["b_only"], got["both"], got["neither"]) == (0, 0, 2, 1)
    assert got["p_value"] == 1.0 and got["chi2_cc"] == 0.0
    assert mcnemar([], [])["p_value"] == 1.0


def test_mcnemar_symmetric_and_length_checked():
    # Swapping the runs swaps b and c but not the two-sided p-value.
    a, b = [True, False, False, False], [False, True, True, True]
    assert mcnemar(a, b)["p_value"] == mcnemar(b, a)["p_value"]  # c=3, b=1: p = 2·(1+4)/16 = 0.625
    assert mcnemar(a, b)["p_value"] == pytest.approx(0.625)
    with pytest.raises(ValueError, match="paired"):
        mcnemar([True], [True, False])


def test_pair_rows_by_id_in_a_order():
    a = [{"id": "q2"}, {"id": "q1"}, {"id": "only-a"}]
    b = [{"id": "q1", "side": "b"}, {"id": "only-b"}, {"id": "q2", "side": "b"}]
    pairs = pair_rows(a, b)
    assert [(x["id"], y["id"]) for x, y in pairs] == [("q2", "q2"), ("q1", "q1")]
    assert all(y["side"] == "b" for _, y in pairs)
    with pytest.raises(ValueError, match="duplicate id 'q1'"):
        pair_rows(a + [{"id": "q1"}], b)


def _c(value, n, acc):
    return {"value": value, "n": n, "correct": round(n * acc / 100), "accuracy": acc, "ci_low": 0.0,
            "ci_high": 100.0}


def test_category_deltas_only_common_cells():
    a = {
        "by_annotation": {"Disease Group": [_c("x", 4, 25.0), _c("y", 2, 50.0)]},
        "by_answer_type": [_c("single", 6, 50.0)],
    }
    b = {
        "by_annotation": {"Disease Group": [_c("x", 4, 75.0)], "Difficulty level": [_c("1", 4, 0.0)]},
        "by_answer_type": [_c("single", 6, 100.0), _c("multi", 1, 0.0)],
        "by_n_options": [_c("5", 7, 100.0)],
    }
    # Common: Disease Group/x (25 → 75: +50) and single (50 → 100: +50); "y", Difficulty, multi
    # and by_n_options are on one side only → no row.
    assert category_deltas(a, b) == [
        {"group": "by_annotation/Disease Group", "value": "x", "n_a": 4, "acc_a": 25.0, "n_b": 4,
         "acc_b": 75.0, "delta": 50.0},
        {"group": "by_answer_type", "value": "single", "n_a": 6, "acc_a": 50.0, "n_b": 6,
         "acc_b": 100.0, "delta": 50.0},
    ]


# Two eval dirs, as `medtune evaluate` leaves them. Paired ids p1..p9:
#   p1        A right, B wrong  → the one loss          (b = 1)
#   p2..p7    A wrong, B right  → six wins              (c = 6)
#   p8        both right; p9 both wrong
# plus "a-extra" only in A and "b-extra1", "b-extra2" only in B (unmatched: 1 and 2).
# McNemar as in test_mcnemar_by_hand: p = 0.125, χ²cc = 16/7 = 2.286.
# Disease Group: p1..p4 循环系统疾病, p5..p9 呼吸系统疾病 (on the paired rows):
#   循环: A right p1 → 1/4 = 25.00; B right p2 p3 p4 → 3/4 = 75.00; Δ = +50.00
#   呼吸: A right p8 → 1/5 = 20.00; B right p5 p6 p7 p8 → 4/5 = 80.00; Δ = +60.00
OPTS = {"A": "胸肌劳损", "B": "流行性胸痛", "C": "颈椎病", "D": "带状疱疹"}
A_RIGHT = {"p1", "p8", "a-extra"}
B_RIGHT = {"p2", "p3", "p4", "p5", "p6", "p7", "p8", "b-extra1"}


def _scored(id_, right):
    parsed = "D" if right else "B"
    group = "循环系统疾病" if id_ in {"p1", "p2", "p3", "p4"} else "呼吸系统疾病"
    return {
        "id": id_, "question": f"哪种病变沿肋间神经分布？({id_})", "options": OPTS, "answer": "D",
        "explanation": "带状疱疹沿神经分布", "annotations": {"Disease Group": group, "Difficulty level": 2},
        "template": "qa", "prompt": "…答案：", "output": f"{parsed}\n理由：output of {id_}",
        "parsed": parsed, "correct": right, "explanation_scored": f"output of {id_}",
    }


def _results(n, n_right):
    return {
        "accuracy": 100 * n_right / n, "f1": 50.0, "bleu_1": 10.0, "bleu_4": 1.0, "rouge_1": 20.0,
        "rouge_2": 5.0, "rouge_l": 15.0, "n": n, "n_no_answer": 0, "n_explanations_scored": n,
        "n_explanations_excluded": 0, "n_unscorable": 0, "accuracy_single": 100 * n_right / n,
        "n_single": n, "accuracy_multi": None, "n_multi": 0, "parser": "robust",
        "tokenizer": "characters", "templates": ["qa"], "predictions": "predictions.jsonl",
    }


@pytest.fixture
def eval_dirs(tmp_path):
    paired = [f"p{i}" for i in range(1, 10)]
    runs = {"base": (paired + ["a-extra"], A_RIGHT), "tuned": (["b-extra1", "b-extra2"] + paired, B_RIGHT)}
    dirs = []
    for name, (ids, right) in runs.items():
        d = tmp_path / name
        rows = [_scored(i, i in right) for i in ids]
        write_jsonl(d / "scored.jsonl", rows)
        atomic_write_json(d / "results.json", _results(len(rows), sum(r["correct"] for r in rows)))
        dirs.append(d)
    return dirs


def test_pick_examples_deterministic_and_capped(eval_dirs):
    from medtune.io import read_jsonl

    pairs = pair_rows(read_jsonl(eval_dirs[0] / "scored.jsonl"), read_jsonl(eval_dirs[1] / "scored.jsonl"))
    got = pick_examples(list(reversed(pairs)), k=2)  # input order must not matter: sorted by id
    assert [ex["id"] for ex in got["wins"]] == ["p2", "p3"]
    assert [ex["id"] for ex in got["losses"]] == ["p1"]
    win = got["wins"][0]
    assert win["answer"] == "D" and win["options"] == OPTS
    assert win["a"] == {"output": "B\n理由：output of p2", "parsed": "B"}
    assert win["b"] == {"output": "D\n理由：output of p2", "parsed": "D"}


def test_compare_runs_writes_json_and_markdown(eval_dirs, tmp_path):
    out = tmp_path / "cmp"
    got = compare_runs(eval_dirs, out)
    assert got == json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    assert [r["label"] for r in got["runs"]] == ["base", "tuned"]
    assert got["baseline"] == "base"
    (cmp,) = got["comparisons"]
    assert (cmp["a"], cmp["b"], cmp["n_paired"]) == ("base", "tuned", 9)
    assert (cmp["n_unmatched_a"], cmp["n_unmatched_b"]) == (1, 2)
    assert cmp["mcnemar"]["a_only"] == 1 and cmp["mcnemar"]["b_only"] == 6
    assert cmp["mcnemar"]["p_value"] == pytest.approx(0.125)
    deltas = {(d["group"], d["value"]): d for d in cmp["category_deltas"]}
    assert deltas[("by_annotation/Disease Group", "循环系统疾病")]["delta"] == pytest.approx(50.0)
    assert deltas[("by_annotation/Disease Group", "呼吸系统疾病")]["delta"] == pytest.approx(60.0)
    # Paired rows only: 9 questions on both sides, not 10 and 11.
    assert deltas[("by_answer_type", "single")]["n_a"] == deltas[("by_answer_type", "single")]["n_b"] == 9
    # 2/9 = 22.22 → 7/9 = 77.78: +55.56
    assert deltas[("by_answer_type", "single")]["delta"] == pytest.approx(500 / 9)

    md = (out / "comparison.md").read_text(encoding="utf-8")
    # (a) the metrics table with both runs and the paper rows; accuracy over each run's own rows:
    # base p1 p8 a-extra = 3/10 = 30.00, tuned p2..p8 b-extra1 = 8/11 = 72.73.
    assert "| run | n | Acc | F1 |" in md
    assert "| base | 10 | 30.00 |" in md
    assert "| tuned | 11 | 72.73 |" in md
    assert "*paper: GPT-4*" in md
    # (b) McNemar numbers and the one-sentence reading.
    assert "Paired questions: 9 (only in base: 1, only in tuned: 2" in md
    assert ("tuned fixes 6 questions base got wrong and breaks 1 it got right; p = 0.125 (exact McNemar); "
            "accuracy on the 9 questions both runs scored (matched by id; no answer counts as wrong): 22.22 → 77.78.") in md
    assert "| 1 | 1 | 6 | 1 | 0.125 | 2.286 |" in md  # both, only A, only B, neither, p, χ²cc
    # A delta row.
    assert "| by_annotation/Disease Group | 循环系统疾病 | 4 | 25.00 | 75.00 | +50.00 |" in md
    # Before/after examples: a win and a loss.
    assert "### Questions fixed by tuned (base wrong, tuned right): 6 of 6" in md
    assert "### Questions broken by tuned (base right, tuned wrong): 1 of 1" in md
    assert "**p2** 哪种病变沿肋间神经分布？(p2)" in md
    assert "before (base): parsed `B`; output: B ⏎ 理由：output of p2" in md
    assert "after (tuned): parsed `D`; output: D ⏎ 理由：output of p2" in md
    assert "**p1**" in md and "after (tuned): parsed `B`; output: B ⏎ 理由：output of p1" in md


def test_compare_runs_labels_and_single_run(eval_dirs, tmp_path):
    got = compare_runs(eval_dirs, tmp_path / "c2", labels=["Qwen base", "Qwen + LoRA"])
    assert got["comparisons"][0]["reading"].startswith("Qwen + LoRA fixes 6 questions Qwen base got wrong")
    assert "| Qwen + LoRA | 11 |" in (tmp_path / "c2" / "comparison.md").read_text(encoding="utf-8")

    one = compare_runs(eval_dirs[:1], tmp_path / "c1")
    assert one["comparisons"] == [] and one["baseline"] is None
    md = (tmp_path / "c1" / "comparison.md").read_text(encoding="utf-8")
    assert "| base | 10 |" in md and "McNemar" not in md

    with pytest.raises(ValueError, match="labels"):
        compare_runs(eval_dirs, tmp_path / "c3", labels=["only one"])
    with pytest.raises(ValueError, match="at least one"):
        compare_runs([], tmp_path / "c4")


def test_compare_runs_needs_scored_rows(eval_dirs, tmp_path):
    (eval_dirs[1] / "scored.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="scored.jsonl"):
        compare_runs(eval_dirs, tmp_path / "c")


def test_compare_runs_on_real_evaluate_output(tmp_path):
    # The contract with evaluate(): its scored.jsonl/results.json are what compare_runs reads.
    base = {"question": "下列属于脂溶性维生素的是", "options": {"A": "维生素A", "B": "维生素C", "C": "维生素D"},
            "explanation": "维生素A、D为脂溶性", "annotations": {"Difficulty level": 1}, "template": "qa",
            "prompt": ""}
    preds = {
        "before": [{**base, "id": "v1", "answer": "A", "output": "B\n理由：错"},
                   {**base, "id": "v2", "answer": "AC", "output": "AC\n理由：维生素A、D为脂溶性"}],
        "after": [{**base, "id": "v1", "answer": "A", "output": "A\n理由：维生素A为脂溶性"},
                  {**base, "id": "v2", "answer": "AC", "output": "A\n理由：维生素A"}],
    }
    dirs = []
    for name, rows in preds.items():
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        evaluate(tmp_path / f"{name}.jsonl", tmp_path / name)
        dirs.append(tmp_path / name)
    got = compare_runs(dirs, tmp_path / "cmp")
    test = got["comparisons"][0]["mcnemar"]
    # v1 fixed, v2 broken: b = c = 1 → p = 1 (all of Bin(2, ½)), χ²cc = (0 − 1)²/2 = 0.5
    assert (test["a_only"], test["b_only"], test["p_value"], test["chi2_cc"]) == (1, 1, 1.0, 0.5)
    groups = {(d["group"], d["value"]) for d in got["comparisons"][0]["category_deltas"]}
    assert groups == {("by_annotation/Difficulty level", "1"), ("by_answer_type", "single"),
                      ("by_answer_type", "multi"), ("by_n_options", "3")}


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (0, 5), (2, 5), (3, 6), (7, 20), (0, 30), (12, 13),
                                      (480, 1000), (4_700, 10_000), (0, 2_000), (31_990, 68_000)])
def test_sign_test_p_value_equals_scipy_binomtest(k, n):
    from scipy.stats import binomtest  # the reference; medtune compare does not import scipy

    from medtune.evaluation.compare import sign_test_p_value

    expected = binomtest(k, n, 0.5).pvalue
    assert sign_test_p_value(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert sign_test_p_value(n - k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_sign_test_hand_values():
    from medtune.evaluation.compare import sign_test_p_value

    assert sign_test_p_value(0, 5) == pytest.approx(2 / 32)  # 2 × (1/2)^5
    assert sign_test_p_value(1, 6) == pytest.approx(2 * 7 / 64)  # 2 × (1 + 6)/64
    assert sign_test_p_value(3, 6) == 1.0
    with pytest.raises(ValueError, match="0 <= k <= n"):
        sign_test_p_value(4, 3)
