"""SFT example building: prompt masking, exact token layout, truncation and skipping."""

from __future__ import annotations

import dataclasses

import pytest

from medtune.data.sft import IGNORE_INDEX, build_sft_examples, encode_prompt, encode_target
from medtune.records import ExamRecord
from medtune.templates import get_template

OPTIONS = {"A": "胸肌劳损", "B": "流行性胸痛", "C": "颈椎病", "D": "带状疱疹", "E": "皮下蜂窝组织炎"}


@pytest.fixture
def short() -> ExamRecord:
    return ExamRecord("short", "下列哪种病变引起的胸痛常沿一侧肋间神经分布", dict(OPTIONS), "D",
                      "带状疱疹沿神经分布。").validate()


@pytest.fixture
def long_explanation(sample_records) -> ExamRecord:
    rec = sample_records[0]
    assert rec.answer == "D" and rec.options["D"] == "带状疱疹" and len(rec.explanation) > 150
    return rec


def _split(example):
    labels = example["labels"]
    n_masked = sum(1 for x in labels if x == IGNORE_INDEX)
    return n_masked, labels[n_masked:]


@pytest.mark.parametrize("name", ["qa", "analysis_first", "instructed", "cmexam_paper", "chat"])
def test_prompt_masked_and_target_exact(name, tiny_tokenizer, short, sample_records):
    tok = tiny_tokenizer
    tpl = get_template(name)
    records = [short, *sample_records[1:4]]
    build = build_sft_examples(records, tpl, tok, max_length=4096)
    assert build.truncated == [] and build.skipped == []
    assert len(build.examples) == len(records)
    for rec, ex in zip(records, build.examples, strict=True):
        prompt = tpl.render_prompt(rec, tok)
        prompt_ids = encode_prompt(tok, prompt, tpl)
        target_ids = encode_target(tok, tpl.render_target(rec))
        n_masked, unmasked = _split(ex)
        assert n_masked == len(prompt_ids)
        # -100 only on the prompt: the response labels contain none.
        assert IGNORE_INDEX not in unmasked
        assert ex["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert unmasked == target_ids
        assert unmasked[-1] == tok.eos_token_id
        assert ex["input_ids"] == prompt_ids + target_ids
        assert len(ex["input_ids"]) == len(ex["labels"])
        assert tok.decode(unmasked[:-1]) == tpl.render_target(rec)
        # Train-time prompt tokens are what the tokenizer gives for the prompt alone.
        assert ex["input_ids"][: len(prompt_ids)] == tok(prompt, add_special_tokens=not tpl.chat)["input_ids"]


def test_chat_prompt_gets_no_extra_special_tokens(tiny_tokenizer, short):
    tpl = get_template("chat")
    ex = build_sft_examples([short], tpl, tiny_tokenizer, 4096).examples[0]
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ex["input_ids"][0] == im_start
    assert ex["input_ids"].count(im_start) == 3  # system, user, assistant: none added twice


def test_no_bpe_merge_across_prompt_target_boundary(tiny_tokenizer, short):
    """"正确" ending the prompt + "答案" starting the target merge when tokenised as one string."""
    tok = tiny_tokenizer
    tpl = get_template("cmexam_paper")
    rec = dataclasses.replace(short, options={**OPTIONS, "E": "以上都正确"})
    prompt = tpl.render_prompt(rec)
    prompt_ids = tok(prompt)["input_ids"]
    joint = tok(prompt + tpl.render_target(rec))["input_ids"]
    assert joint[: len(prompt_ids)] != prompt_ids  # the merge this guards against really happens here
    ex = build_sft_examples([rec], tpl, tok, 4096).examples[0]
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert ex["labels"].count(IGNORE_INDEX) == len(prompt_ids)
    assert tok.decode(ex["input_ids"][len(prompt_ids):-1]) == tpl.render_target(rec)


@pytest.mark.parametrize("name", ["qa", "analysis_first"])
def test_long_explanation_is_shortened_not_dropped(name, tiny_tokenizer, long_explanation):
    tok = tiny_tokenizer
    tpl = get_template(name)
    rec = long_explanation
    n_prompt = len(encode_prompt(tok, tpl.render_prompt(rec), tpl))
    max_length = n_prompt + 22
    assert n_prompt + len(encode_target(tok, tpl.render_target(rec))) > max_length

    build = build_sft_examples([rec], tpl, tok, max_length)
    assert build.skipped == []
    assert len(build.truncated) == 1 and len(build.examples) == 1
    info = build.truncated[0]
    assert info["id"] == rec.id
    assert info["explanation_chars"] == len(rec.explanation)
    assert 0 < info["kept_chars"] < info["explanation_chars"]

    ex = build.examples[0]
    assert len(ex["input_ids"]) <= max_length
    n_masked, unmasked = _split(ex)
    assert n_masked == n_prompt
    assert unmasked[-1] == tok.eos_token_id
    kept = rec.explanation[: info["kept_chars"]]
    expected = tpl.render_target(dataclasses.replace(rec, explanation=kept))
    assert tok.decode(unmasked[:-1]) == expected
    # The longest prefix that fits: one more character would not.
    longer = dataclasses.replace(rec, explanation=rec.explanation[: info["kept_chars"] + 1])
    assert n_prompt + len(encode_target(tok, tpl.render_target(longer))) > max_length
    if name == "qa":
        assert expected == "D\n理由：" + kept.strip()
    else:
        assert "正确选项：D." in tok.decode(unmasked[:-1])
        assert expected == kept.strip() + "\n正确选项：D.带状疱疹"


def test_too_long_prompt_is_skipped_and_counts_are_exact(tiny_tokenizer, short, long_explanation):
    tok = tiny_tokenizer
    tpl = get_template("qa")
    huge = dataclasses.replace(short, id="huge", question=short.question * 20)
    n_prompt_long = len(encode_prompt(tok, tpl.render_prompt(long_explanation), tpl))
    max_length = n_prompt_long + 22
    n_short = len(encode_prompt(tok, tpl.render_prompt(short), tpl)) + len(
        encode_target(tok, tpl.render_target(short)))
    assert n_short <= max_length
    assert len(encode_prompt(tok, tpl.render_prompt(huge), tpl)) > max_length

    n_huge = len(encode_prompt(tok, tpl.render_prompt(huge), tpl)) + len(encode_target(tok, tpl.render_target(huge)))

    build = build_sft_examples([short, huge, long_explanation], tpl, tok, max_length)
    assert build.summary() == {"records": 3, "examples": 2, "whole": 1, "truncated": 1, "dropped": 1}
    assert build.skipped == [
        {"id": "huge", "reason": f"prompt + target {n_huge} tokens > data.max_length={max_length} "
                                 "(an exam prompt is never cut, an answer never shortened)"}
    ]
    assert [t["id"] for t in build.truncated] == [long_explanation.id]
    # Kept examples stay in record order; the short one is untouched.
    assert build.examples[0]["input_ids"] == encode_prompt(tok, tpl.render_prompt(short), tpl) + encode_target(
        tok, tpl.render_target(short))
    assert all(len(ex["input_ids"]) <= max_length for ex in build.examples)


def test_prompt_fits_but_answer_does_not_is_skipped(tiny_tokenizer, short):
    tok = tiny_tokenizer
    tpl = get_template("qa")
    n_prompt = len(encode_prompt(tok, tpl.render_prompt(short), tpl))
    # The bare answer "D" + EOS is two tokens; one token of room is not enough.
    assert len(encode_target(tok, "D")) == 2
    n_full = n_prompt + len(encode_target(tok, tpl.render_target(short)))
    build = build_sft_examples([short], tpl, tok, n_prompt + 1)
    assert build.summary() == {"records": 1, "examples": 0, "whole": 0, "truncated": 0, "dropped": 1}
    assert build.skipped[0]["id"] == "short"
    # Exactly room for the bare answer: kept with an empty explanation.
    build = build_sft_examples([short], tpl, tok, n_prompt + 2)
    assert build.summary() == {"records": 1, "examples": 1, "whole": 0, "truncated": 1, "dropped": 0}
    assert build.truncated == [{"id": "short", "explanation_chars": 10, "kept_chars": 0,
                                "reason": f"prompt + target {n_full} tokens > data.max_length={n_prompt + 2}"}]
    assert tok.decode(_split(build.examples[0])[1][:-1]) == "D"
