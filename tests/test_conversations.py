"""Conversation SFT: exact loss masks, prompt/training token agreement, and a PromptCBLUE run."""

from __future__ import annotations

import json

import pytest

from medtune.data.conversations import (
    build_conversation_examples,
    conversation_prompt,
    encode_segments,
    segments,
)
from medtune.data.sft import IGNORE_INDEX
from medtune.records import Conversation

MULTI = Conversation("m", [
    {"role": "system", "content": "你是医生"},
    {"role": "user", "content": "头痛怎么办"}, {"role": "assistant", "content": "多休息"},
    {"role": "user", "content": "还有呢"}, {"role": "assistant", "content": "多喝水"},
]).validate()
SINGLE = Conversation("s", [{"role": "user", "content": "头痛怎么办？答："},
                            {"role": "assistant", "content": "多休息"}]).validate()


def test_plain_segments_exact():
    assert segments(SINGLE.messages, "plain", None) == [("头痛怎么办？答：", False), ("多休息", True)]
    assert segments(MULTI.messages, "plain", None) == [
        ("你是医生\n", False), ("用户：头痛怎么办\n助手：", False), ("多休息", True),
        ("\n用户：还有呢\n助手：", False), ("多喝水", True)]


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_loss_only_on_every_assistant_reply(fmt, tiny_tokenizer):
    ids, labels = encode_segments(tiny_tokenizer, segments(MULTI.messages, fmt, tiny_tokenizer), fmt)
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    expected = "多休息<|im_end|>多喝水<|im_end|>" if fmt == "plain" else "多休息<|im_end|>\n多喝水<|im_end|>\n"
    assert tiny_tokenizer.decode(trained) == expected
    n_reply = sum(len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])
                  for t, is_reply in segments(MULTI.messages, fmt, tiny_tokenizer) if is_reply)
    assert sum(lab != IGNORE_INDEX for lab in labels) == n_reply
    # the inference prompt for the last reply is exactly the training prefix
    text, special = conversation_prompt(MULTI.prompt_messages, fmt, tiny_tokenizer)
    prompt_ids = tiny_tokenizer(text, add_special_tokens=special)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(lab != IGNORE_INDEX for lab in labels[len(prompt_ids):])  # the final reply is all trained


def test_over_long_conversation_is_listed_not_cut_with_truncation_drop(tiny_tokenizer):
    n_single = len(encode_segments(tiny_tokenizer, segments(SINGLE.messages, "plain", tiny_tokenizer), "plain")[0])
    ids, labels = encode_segments(tiny_tokenizer, segments(MULTI.messages, "plain", tiny_tokenizer), "plain")
    n_reply = len(tiny_tokenizer("多喝水<|im_end|>", add_special_tokens=False)["input_ids"])
    build = build_conversation_examples([SINGLE, MULTI], "plain", tiny_tokenizer, max_length=n_single,
                                        truncation="drop")
    assert build.skipped == [{"id": "m", "reason": f"prompt + target {len(ids)} tokens > data.max_length={n_single}"}]
    assert len(build.examples) == 1 and build.truncated == []
    assert build.summary() == {"records": 2, "examples": 1, "whole": 1, "truncated": 0, "dropped": 1}
    # the target of a multi-turn conversation is its last reply; earlier replies are prompt (still trained)
    assert sum(lab != IGNORE_INDEX for lab in labels) > n_reply


def test_chat_format_needs_a_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        segments(SINGLE.messages, "chat", None)


@pytest.mark.slow
def test_promptcblue_sft_predict_evaluate(tmp_path, tiny_model_dir):
    from importlib import resources

    from medtune.cli import main

    data = resources.files("medtune") / "examples" / "promptcblue"
    run = tmp_path / "run"
    assert main(["train", "src/medtune/configs/quickstart.yaml", f"model.name_or_path={tiny_model_dir}",
                 f"data.train={data / 'train.json'}", f"train.output_dir={run}", "data.max_length=512",
                 "train.epochs=3", "train.report_to=none"]) == 0
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["train"]["records"] == 80  # 16 tasks × 5
    # data.truncation=middle (the default): the 11 examples over 512 tokens are cut, none is dropped
    assert summary["train"] == {**summary["train"], "examples": 80, "whole": 69, "truncated": 11, "dropped": 0}
    assert len(summary["train"]["tasks"]) == 16
    assert "kind: conversation" in (run / "template.yaml").read_text()
    for name, extra in (("tuned", ["--run", str(run)]), ("base", ["--model", str(tiny_model_dir)])):
        assert main(["predict", *extra, "--data", str(data / "dev.json"), "--out", str(tmp_path / f"{name}.jsonl"),
                     "--max-new-tokens", "24", "--batch-size", "16"]) == 0
    assert main(["evaluate", str(tmp_path / "base.jsonl"), "--out", str(tmp_path / "eval-base")]) == 0
    assert main(["evaluate", str(tmp_path / "tuned.jsonl"), "--out", str(tmp_path / "eval-tuned"),
                 "--baseline", str(tmp_path / "eval-base")]) == 0
    res = json.loads((tmp_path / "eval-tuned" / "results.json").read_text())
    assert res["task"] == "promptcblue" and len(res["tasks"]) == 16 and res["n"] == 80
    assert res["overall"] == pytest.approx(sum(t["score"] for t in res["tasks"].values()) / 16)
    assert res["improvement"]["overall"] == pytest.approx(res["overall"] - res["baseline"]["overall"])
    line = json.loads((tmp_path / "tuned.jsonl").read_text().splitlines()[0])
    assert set(line) == {"id", "messages", "reference", "meta", "template", "prompt", "output", "source"}
    assert line["template"] == "plain" and line["meta"]["task_dataset"]
