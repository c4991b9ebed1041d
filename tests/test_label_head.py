"""The label-only LM head gives the model's own loss and gradients, for less compute."""

from __future__ import annotations

import pytest
import torch

from medtune.train.label_head import label_head_applies, label_head_loss


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from medtune.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    return model


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 500, (3, 40))
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # right padding on the last row
    labels = ids.clone()
    labels[:, :15] = -100  # the prompt
    labels[2, 30:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_same_loss_and_gradients_as_the_model(lora_model):
    batch = _batch()
    expected = lora_model(**batch).loss
    expected.backward()
    want = {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    lora_model.zero_grad()
    got = label_head_loss(lora_model, batch)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    for name, param in lora_model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, want[name], atol=1e-6), name


def test_gradient_accumulation_normaliser(lora_model):
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert label_head_loss(lora_model, batch, num_items_in_batch=2 * n).item() == pytest.approx(
        label_head_loss(lora_model, batch).item() / 2, abs=1e-6)


def test_applies_only_where_exact(lora_model, monkeypatch):
    assert label_head_applies(lora_model, "lora")
    assert not label_head_applies(lora_model, "adalora")  # its forward adds an orthogonality penalty
    assert not label_head_applies(lora_model, "prefix")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not label_head_applies(lora_model, "lora")  # DDP must run its own forward
