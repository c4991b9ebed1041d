"""Log-likelihood scoring on a model whose logits are set by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medtune.evaluation.loglik import answer_cue, build_requests, candidates, pick
from medtune.inference.hf import continuation_logprobs
from medtune.records import ExamRecord
from medtune.templates import get_template


class TableModel(torch.nn.Module):
    """Next-token logits depend only on the current token: logits[t] = table[input_ids[t]]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def _table():
    t = torch.zeros(5, 5)
    t[1, 2] = math.log(3)  # after token 1: p(2) = 3/7, every other token 1/7
    t[2, 4] = math.log(4)  # after token 2: p(4) = 4/8, every other token 1/8
    return t


def test_single_token_continuations_read_off_one_position():
    model = TableModel(_table())
    scores = continuation_logprobs(model, [([0, 1], [[2], [3]]), ([1], [[2]])], pad_id=0)
    assert scores[0] == pytest.approx([math.log(3 / 7), math.log(1 / 7)])
    assert scores[1] == pytest.approx([math.log(3 / 7)])  # shorter context, left-padded in the batch


def test_multi_token_continuation_sums_its_tokens():
    model = TableModel(_table())
    (scores,) = continuation_logprobs(model, [([0, 1], [[2, 4], [3]])], pad_id=0)
    # [2, 4]: p(2 | 1) · p(4 | 2) = 3/7 · 1/2 = 3/14;  [3]: p(3 | 1) = 1/7
    assert scores == pytest.approx([math.log(3 / 14), math.log(1 / 7)])


def test_batching_does_not_change_scores():
    model = TableModel(_table())
    reqs = [([0, 1], [[2, 4], [3]]), ([3, 3, 3, 1], [[2], [4]]), ([2], [[4, 1], [0]])]
    together = continuation_logprobs(model, reqs, pad_id=0, batch_size=8)
    alone = [continuation_logprobs(model, [r], pad_id=0, batch_size=1)[0] for r in reqs]
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want)


REC = ExamRecord("q1", "问题", {"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": "戊"}, "B")
MULTI = ExamRecord("q2", "问题", {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}, "AC")


def test_candidates_and_cues():
    assert candidates(REC) == ["A", "B", "C", "D", "E"]
    multi = candidates(MULTI)
    assert len(multi) == 11 and multi[:3] == ["AB", "AC", "AD"] and multi[-1] == "ABCD"  # C(4,2)+C(4,3)+1
    assert answer_cue(get_template("qa")) == ""
    assert answer_cue(get_template("analysis_first")) == "正确选项："
    assert answer_cue(get_template("cmexam_paper")) == "答案: "


def test_requests_share_the_cue_in_the_context(tiny_tokenizer):
    tpl = get_template("analysis_first")
    (req,), (cands,) = build_requests([REC], tpl, tiny_tokenizer)
    ctx, conts = req
    prompt = tiny_tokenizer(tpl.render_prompt(REC), add_special_tokens=True)["input_ids"]
    cue = tiny_tokenizer("正确选项：", add_special_tokens=False)["input_ids"]
    assert ctx == prompt + cue
    assert conts == [tiny_tokenizer(c, add_special_tokens=False)["input_ids"] for c in cands]
    assert all(len(c) == 1 for c in conts)  # letters are single tokens: one forward pass per question


def test_pick_raw_and_length_normalised():
    rec = ExamRecord("q", "问题", {"A": "甲", "B": "乙乙乙乙"}, "B")
    (p,) = pick([rec], [["A", "B"]], [[-2.0, -3.0]], choices="text")
    assert p["parsed"] == "A"  # -2 > -3
    assert p["parsed_norm"] == "B"  # -2/1 < -3/4
    assert p["option_scores_norm"] == {"A": -2.0, "B": -0.75}


def test_evaluate_loglik_with_the_fake_backend(tmp_path, tiny_tokenizer):
    """The scoring path is backend-agnostic: the fake backend's scores decide the picks."""
    import json

    from medtune.evaluation.evaluate import evaluate_loglik
    from medtune.inference.base import FakeBackend

    rec = ExamRecord("q1", "问题", {"A": "甲", "B": "乙"}, "A").validate()
    res = evaluate_loglik([rec], FakeBackend(), tiny_tokenizer, get_template("qa"), tmp_path)
    # fake score = -len - 0.1·sum(ids): the letter with the smaller token id wins
    ids = {c: tiny_tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "AB"}
    expected = min(ids, key=ids.get)
    row = json.loads((tmp_path / "scored.jsonl").read_text())
    assert row["parsed"] == expected and res["accuracy"] == (100.0 if expected == "A" else 0.0)
    assert row["option_scores"] == pytest.approx({c: -1 - 0.1 * i for c, i in ids.items()})
