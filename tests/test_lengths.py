"""Lengths and what gets dropped: source/target limits, truncation sides, per-task counts, the whole-task refusal."""

from __future__ import annotations

from importlib import resources

import pytest

from medtune.config import ConfigError, load_config
from medtune.data.conversations import build_conversation_examples, cut_prompt, segments
from medtune.data.exam import load_conversations
from medtune.data.sft import IGNORE_INDEX, LengthLimits, build_sft_examples, encode_target
from medtune.templates import get_template

PCB_TRAIN = resources.files("medtune") / "examples" / "promptcblue" / "train.json"


@pytest.fixture(scope="module")
def pcb():
    records, rejects = load_conversations(PCB_TRAIN)
    assert len(records) == 80 and not rejects
    return records


# ---- the rules, as pure functions -------------------------------------------------------------------

@pytest.mark.parametrize("limits, lengths, kept", [
    (LengthLimits(100), (40, 30), (40, 30)),            # fits: nothing cut
    (LengthLimits(100), (300, 4), (96, 4)),             # short answer after a long prompt: answer whole
    (LengthLimits(100), (20, 200), (20, 80)),           # short prompt: the reply takes the rest
    (LengthLimits(100), (300, 80), (50, 50)),           # both long: the prompt keeps half
    (LengthLimits(101), (300, 80), (50, 51)),
    (LengthLimits(100), (60, 60), (50, 50)),
    (LengthLimits(100, max_target_length=30), (300, 80), (70, 30)),
    (LengthLimits(100, max_target_length=70), (300, 80), (30, 70)),  # the user's split, not half
    (LengthLimits(100, max_source_length=40), (300, 10), (40, 10)),
    (LengthLimits(100, max_source_length=40, max_target_length=30), (300, 80), (40, 30)),
])
def test_fit_table(limits, lengths, kept):
    assert limits.fit(*lengths) == kept
    assert sum(kept) <= limits.max_length


def test_exceeded_names_each_setting():
    limits = LengthLimits(100, max_source_length=40, max_target_length=30, truncation="drop")
    assert limits.exceeded(40, 30) == []
    assert limits.exceeded(41, 60) == ["prompt 41 tokens > data.max_source_length=40",
                                      "target 60 tokens > data.max_target_length=30",
                                      "prompt + target 101 tokens > data.max_length=100"]
    assert limits.describe() == ("data.max_length=100, data.max_source_length=40, data.max_target_length=30, "
                                 "data.truncation=drop")


@pytest.mark.parametrize("kwargs, message", [
    ({"truncation": "right"}, r"data.truncation: expected one of \['middle', 'left', 'drop'\]"),
    ({"max_source_length": 100}, r"data.max_source_length: expected 1 <= x < data.max_length \(100\), got 100"),
    ({"max_target_length": 0}, "data.max_target_length"),
])
def test_limits_refuse_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LengthLimits(100, **kwargs)


def test_cut_prompt_left_middle_and_bos():
    ids = list(range(1, 11))
    labels = [IGNORE_INDEX] * 8 + [9, 10]  # an earlier reply (trained) inside a multi-turn prompt
    assert cut_prompt(ids, labels, 5, "middle") == ([1, 2, 8, 9, 10], [IGNORE_INDEX] * 3 + [9, 10])
    assert cut_prompt(ids, labels, 4, "left") == ([7, 8, 9, 10], [IGNORE_INDEX] * 2 + [9, 10])
    assert cut_prompt(ids, labels, 4, "left", bos_token_id=1) == ([1, 8, 9, 10], [IGNORE_INDEX] * 2 + [9, 10])
    assert cut_prompt(ids, labels, 10, "middle") == (ids, labels)
    assert cut_prompt(ids, labels, 0, "left") == ([], [])


# ---- the shipped PromptCBLUE sample with the tiny tokenizer ------------------------------------------

DROPPED_AT_192 = {"CHIP-CDEE": 2, "CHIP-CTC": 2, "CHIP-MDCFNPC": 5, "CMeIE": 2, "IMCS-V2-MRG": 5, "IMCS-V2-SR": 1,
                  "MedDG": 4}


def test_promptcblue_at_192_tokens_before_and_after(pcb, tiny_tokenizer):
    # before: dropping whole examples loses 21 of 80 (26%), and two tasks entirely
    drop = build_conversation_examples(pcb, "plain", tiny_tokenizer, 192, truncation="drop")
    assert {k: v for k, v in drop.summary().items() if k != "tasks"} == {
        "records": 80, "examples": 59, "whole": 59, "truncated": 0, "dropped": 21}
    assert {t: c["dropped"] for t, c in drop.summary()["tasks"].items() if c["dropped"]} == DROPPED_AT_192
    assert drop.dropped_tasks() == {"CHIP-MDCFNPC": 5, "IMCS-V2-MRG": 5}
    assert {s["task"] for s in drop.skipped} == set(DROPPED_AT_192)
    assert drop.summary_line("train") == (
        "train: 80 records → 59 examples (59 whole, 0 truncated), 21 dropped; whole/truncated/dropped per task: "
        "CHIP-CDEE 3/0/2, CHIP-CTC 3/0/2, CHIP-MDCFNPC 0/0/5, CMeIE 3/0/2, IMCS-V2-MRG 0/0/5, IMCS-V2-SR 4/0/1, "
        "MedDG 1/0/4; the other 9 tasks whole")
    # after: the same 21 are cut to fit instead, every task is kept
    for side in ("middle", "left"):
        cut = build_conversation_examples(pcb, "plain", tiny_tokenizer, 192, truncation=side)
        assert {k: v for k, v in cut.summary().items() if k != "tasks"} == {
            "records": 80, "examples": 80, "whole": 59, "truncated": 21, "dropped": 0}
        assert {t: c["truncated"] for t, c in cut.summary()["tasks"].items() if c["truncated"]} == DROPPED_AT_192
        assert cut.dropped_tasks() == {} and cut.skipped == []
        assert sorted(t["id"] for t in cut.truncated) == sorted(s["id"] for s in drop.skipped)
        assert max(len(ex["input_ids"]) for ex in cut.examples) == 192
        assert all(len(ex["input_ids"]) == len(ex["labels"]) <= 192 for ex in cut.examples)
        assert cut.summary_line("train") == (
            "train: 80 records → 80 examples (59 whole, 21 truncated), 0 dropped; whole/truncated/dropped per "
            "task: CHIP-CDEE 3/2/0, CHIP-CTC 3/2/0, CHIP-MDCFNPC 0/5/0, CMeIE 3/2/0, IMCS-V2-MRG 0/5/0, "
            "IMCS-V2-SR 4/1/0, MedDG 1/4/0; the other 9 tasks whole")


@pytest.mark.parametrize("side", ["middle", "left"])
def test_truncation_keeps_the_answer(pcb, tiny_tokenizer, side):
    tok = tiny_tokenizer
    build = build_conversation_examples(pcb, "plain", tok, 192, truncation=side)
    by_id = {r.id: r for r in pcb}
    examples = dict(zip([r.id for r in pcb], build.examples, strict=True))  # nothing dropped: same order
    n_whole_answers = 0
    for info in build.truncated:
        rec, ex = by_id[info["id"]], examples[info["id"]]
        (prompt, _), (reply, _) = segments(rec.messages, "plain", tok)
        prompt_ids = tok(prompt)["input_ids"]
        reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
        n = info["kept_prompt_tokens"]
        assert (info["prompt_tokens"], info["reply_tokens"]) == (len(prompt_ids), len(reply_ids))
        assert ex["labels"][:n] == [IGNORE_INDEX] * n and IGNORE_INDEX not in ex["labels"][n:]
        kept = prompt_ids[-n:] if side == "left" else prompt_ids[: n // 2] + prompt_ids[len(prompt_ids) - (n - n // 2):]
        assert ex["input_ids"][:n] == kept
        # the reply is cut from the right only (the 96-token reply share of 192), never its start
        assert ex["input_ids"][n:] == reply_ids[: info["kept_reply_tokens"]]
        if info["reply_tokens"] <= 96:
            n_whole_answers += 1
            assert ex["input_ids"][n:] == reply_ids and tok.decode(ex["input_ids"][n:]) == rec.reply + "<|im_end|>"
            assert n + len(reply_ids) == 192  # the prompt gave way first, exactly as much as needed
    # 13 answers kept whole; 8 replies over 96 tokens (2 CHIP-CDEE, 3 CHIP-MDCFNPC, 2 IMCS-V2-MRG, 1 CMeIE)
    # share the 192 tokens half and half with their prompts
    assert n_whole_answers == 13
    assert sorted(t["task"] for t in build.truncated if t["kept_reply_tokens"] < t["reply_tokens"]) == [
        "CHIP-CDEE", "CHIP-CDEE", "CHIP-MDCFNPC", "CHIP-MDCFNPC", "CHIP-MDCFNPC", "CMeIE", "IMCS-V2-MRG", "IMCS-V2-MRG"]
    assert {(t["kept_prompt_tokens"], t["kept_reply_tokens"]) for t in build.truncated
            if t["kept_reply_tokens"] < t["reply_tokens"]} == {(96, 96)}
    ctc = next(t for t in build.truncated if t["id"] == "train-43897")  # a CHIP-CTC question: 3-token answer
    assert ctc == {"id": "train-43897", "task": "CHIP-CTC", "prompt_tokens": 211, "kept_prompt_tokens": 189,
                   "reply_tokens": 3, "kept_reply_tokens": 3, "reason": "prompt + target 214 tokens > data.max_length=192"}


def test_max_target_length_cuts_replies_from_the_right(pcb, tiny_tokenizer):
    build = build_conversation_examples(pcb, "plain", tiny_tokenizer, 192, max_target_length=32)
    assert {k: v for k, v in build.summary().items() if k != "tasks"} == {
        "records": 80, "examples": 80, "whole": 42, "truncated": 38, "dropped": 0}
    assert all(t["kept_reply_tokens"] == min(32, t["reply_tokens"]) for t in build.truncated)
    assert all(sum(lab != IGNORE_INDEX for lab in ex["labels"]) <= 32 for ex in build.examples)


# ---- the whole-task refusal in a training run ---------------------------------------------------------

def _cfg(tiny_model_dir, tmp_path, *extra):
    return load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.train={PCB_TRAIN}",
                              f"train.output_dir={tmp_path / 'run'}", "data.max_length=192", "train.report_to=none",
                              *extra])


def test_run_dropping_a_whole_task_is_refused_naming_it(tiny_model_dir, tmp_path, capsys):
    from medtune.train import sft

    with pytest.raises(ConfigError) as exc:
        sft.run(_cfg(tiny_model_dir, tmp_path, "data.truncation=drop"))
    assert str(exc.value) == (
        "data: every training example of task(s) CHIP-MDCFNPC (5), IMCS-V2-MRG (5) would be dropped (e.g. "
        "prompt + target 550 tokens > data.max_length=192); raise data.max_length, set data.truncation=middle "
        "or left, or set data.allow_dropped_tasks=true to train without them")
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "train: 80 records → 59 examples (59 whole, 0 truncated), 21 dropped; ")


def test_allow_dropped_tasks_and_truncation_pass_the_check(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from medtune.train import common, sft

    class Reached(Exception):
        pass

    def stop(run_dir):
        raise Reached

    monkeypatch.setattr(common, "create_run_dir", stop)  # the next step after the data checks
    for extra in ("data.truncation=drop", "data.allow_dropped_tasks=true"), ("data.truncation=middle",):
        with pytest.raises(Reached):
            sft.run(_cfg(tiny_model_dir, tmp_path, *extra))
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("train: 80 records → 80 examples (59 whole, 21 truncated), 0 dropped; ")


# ---- exam records: the explanation limit and the token limits ------------------------------------------

def test_max_explanation_chars_drop_or_cut(sample_records, tiny_tokenizer):
    tpl, records = get_template("qa"), sample_records[:40]
    n_long = sum(len(r.explanation) > 150 for r in records)
    assert n_long == 26
    dropped = build_sft_examples(records, tpl, tiny_tokenizer, 256, max_explanation_chars=150)
    assert dropped.summary() == {"records": 40, "examples": 14, "whole": 14, "truncated": 0, "dropped": 26}
    assert dropped.skipped[0] == {"id": records[0].id,
                                  "reason": "explanation 191 characters > data.max_explanation_chars=150"}
    cut = build_sft_examples(records, tpl, tiny_tokenizer, 256, max_explanation_chars=150, on_long_explanation="cut")
    assert cut.summary() == {"records": 40, "examples": 40, "whole": 14, "truncated": 26, "dropped": 0}
    assert cut.truncated[0] == {"id": records[0].id, "explanation_chars": 191, "kept_chars": 150,
                                "reason": "explanation 191 characters > data.max_explanation_chars=150"}
    target = cut.examples[0]["input_ids"][cut.examples[0]["labels"].count(IGNORE_INDEX):]
    assert tiny_tokenizer.decode(target) == f"{records[0].answer}\n理由：{records[0].explanation[:150]}<|im_end|>"


def test_exam_token_limits_and_truncation_drop(sample_records, tiny_tokenizer):
    tpl, records = get_template("qa"), sample_records[:40]
    shortened = build_sft_examples(records, tpl, tiny_tokenizer, 256)
    assert shortened.summary() == {"records": 40, "examples": 40, "whole": 25, "truncated": 15, "dropped": 0}
    dropped = build_sft_examples(records, tpl, tiny_tokenizer, 256, truncation="drop")
    assert dropped.summary() == {"records": 40, "examples": 25, "whole": 25, "truncated": 0, "dropped": 15}
    assert [s["id"] for s in dropped.skipped] == [t["id"] for t in shortened.truncated]
    # max_target_length shortens the explanation only: the answer letters stay first
    capped = build_sft_examples(records, tpl, tiny_tokenizer, 256, max_target_length=40)
    assert capped.summary() == {"records": 40, "examples": 40, "whole": 0, "truncated": 40, "dropped": 0}
    for rec, ex in zip(records, capped.examples, strict=True):
        target = ex["input_ids"][ex["labels"].count(IGNORE_INDEX):]
        assert len(target) <= 40 and target[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(target).startswith(rec.answer + "\n理由：")
    # an exam prompt is never cut: over max_source_length the record is dropped
    n_prompt = len(tiny_tokenizer(tpl.render_prompt(records[0]))["input_ids"])
    over = build_sft_examples(records[:1], tpl, tiny_tokenizer, 256, max_source_length=n_prompt - 1)
    assert over.summary()["dropped"] == 1 and over.skipped[0]["reason"].startswith(
        f"prompt {n_prompt} tokens > data.max_source_length={n_prompt - 1}")
    assert len(encode_target(tiny_tokenizer, "A")) == 2


# ---- config ---------------------------------------------------------------------------------------------

BASE = ["model.name_or_path=m", "data.train=t.jsonl"]


@pytest.mark.parametrize("overrides, message", [
    (["data.truncation=right"], r"data.truncation: expected one of \['middle', 'left', 'drop'\]"),
    (["data.max_source_length=512"], r"data.max_source_length: expected null or 1 <= x < data.max_length \(512\)"),
    (["data.max_target_length=0"], "data.max_target_length"),
    # ChatGLM P-tuning v2's lengths, with max_length left at its default: say what to set
    (["data.max_source_length=700", "data.max_target_length=196"],
     r"data.max_source_length: expected null or 1 <= x < data.max_length \(512\), got 700; for prompts up to 700 "
     r"and targets up to 196 tokens set data.max_length=896"),
    (["data.on_long_explanation=keep"], r"data.on_long_explanation: expected one of \['drop', 'cut'\]"),
    (["data.max_explanation_chars=-1"], "data.max_explanation_chars: expected null"),
    (["data.conversation_format=alpacca"], "data.conversation_format: expected a shipped conversation template "
                                           r"\(alpaca \| chat \| instruct_zh \| plain\) or a template .yaml path"),
    (["stage=dpo", "data.max_target_length=64"], "data.max_target_length: only stage sft uses it"),
])
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + overrides)


def test_config_accepts():
    cfg = load_config(None, BASE + ["data.conversation_format=alpaca", "data.max_source_length=384",
                                    "data.max_target_length=128", "data.truncation=left", "data.allow_dropped_tasks=true",
                                    "data.max_explanation_chars=500", "data.on_long_explanation=cut"])
    d = cfg.data
    assert (d.conversation_format, d.max_source_length, d.max_target_length, d.truncation) == ("alpaca", 384, 128, "left")
    assert (d.allow_dropped_tasks, d.max_explanation_chars, d.on_long_explanation) == (True, 500, "cut")
    assert load_config(None, BASE + ["data.conversation_format=my/triage.yaml"]).data.conversation_format == \
        "my/triage.yaml"
    defaults = load_config(None, BASE).data
    assert (defaults.truncation, defaults.allow_dropped_tasks, defaults.on_long_explanation) == ("middle", False, "drop")
