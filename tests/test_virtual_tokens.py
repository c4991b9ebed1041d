"""Prefix (P-tuning v2) and prompt tuning at generation time, called the way TRL calls it.

``tests/test_behaviour_matrix.py`` checks every medtune entry point with trained adapters; this
module checks the generation fix itself on freshly initialised adapters (random virtual tokens
already change the output), through ``model.generate(input_ids=..., attention_mask=...,
generation_config=...)`` as TRL's GRPO/RLOO trainers sample from the policy.
"""

from __future__ import annotations

import pytest
import torch

from medtune.config import AdapterConfig


def _model(tiny_model_dir, method: str):
    from peft import get_peft_model

    from medtune.adapters import peft_config_for
    from medtune.inference.virtual_tokens import use_virtual_token_generation
    from medtune.models import load_causal_lm

    torch.manual_seed(0)
    base = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    model = get_peft_model(base, peft_config_for(AdapterConfig(method=method, num_virtual_tokens=6), "llama"))
    if method == "prefix":  # peft initialises prefixes near zero; make them matter
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    return use_virtual_token_generation(model.eval())


def _greedy_by_forward(model, ids: torch.Tensor, n: int) -> list[int]:
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_trl_style_generate_uses_the_virtual_tokens(tiny_model_dir, tiny_tokenizer, method):
    from transformers import GenerationConfig

    model = _model(tiny_model_dir, method)
    texts = ["问题：发热恶寒，无汗而喘，治宜选用\n答案：", "问题：胸痛\n答案："]
    enc = tiny_tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    config = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id,
                              eos_token_id=None)
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=config)
    width = enc["input_ids"].shape[1]
    assert torch.equal(out[:, :width], enc["input_ids"])  # prompt ids first, as TRL slices them off
    for row, text in enumerate(texts):
        ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
        assert out[row, width:].tolist() == _greedy_by_forward(model, ids, 5)
        with model.disable_adapter():  # switched off: the base model's continuation, not the tuned one
            base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            assert base[0, ids.shape[1]:].tolist() == _greedy_by_forward(model, ids, 5)
        assert base[0, ids.shape[1]:].tolist() != out[row, width:].tolist()


def test_without_the_fix_peft_generate_ignores_the_prefix(tiny_model_dir, tiny_tokenizer):
    """Documents why the fix exists: if this starts failing, peft/transformers fixed it upstream."""
    from peft import PeftModel

    model = _model(tiny_model_dir, "prefix")
    ids = tiny_tokenizer("问题：胸痛\n答案：", return_tensors="pt")["input_ids"]
    plain = PeftModel.generate(model, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                               do_sample=False, eos_token_id=None, pad_token_id=tiny_tokenizer.pad_token_id)
    with model.disable_adapter():
        base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                              eos_token_id=None, pad_token_id=tiny_tokenizer.pad_token_id)
    assert plain[0].tolist() == base[0].tolist()
    assert plain[0, ids.shape[1]:].tolist() != _greedy_by_forward(model, ids, 5)
