"""The label-only LM head gives the model's own loss and gradients, for less compute.

Proven per architecture (``EXACT_MODEL_TYPES``) on the tiny models of ``medtune.tiny_models``
with every default LoRA target adapted (MoE expert weights included); where a config adds to the
cross-entropy (Gemma-2's final logit soft-capping, an MoE router's load-balancing loss) the tests
show the two losses differ and that the model's own loss is chosen instead.
"""

from __future__ import annotations

import pytest
import torch

from medtune.tiny_models import ARCHITECTURES
from medtune.train.label_head import EXACT_MODEL_TYPES, label_head_applies, label_head_loss, label_head_reason


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from medtune.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    return model


def _batch(vocab: int = 500):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (3, 40))
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # right padding on the last row
    labels = ids.clone()
    labels[:, :15] = -100  # the prompt
    labels[2, 30:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _losses_and_grads(model, batch):
    """(model's own loss, its gradients, label-head loss, its gradients) of the trainable parameters."""
    model.train()
    expected = model(**batch).loss
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    got = label_head_loss(model, batch, chunk=7)  # ~70 label positions: 10 pieces of the LM head
    got.backward()
    have = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return expected, want, got, have


def _assert_same(expected, want, got, have):
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    assert want.keys() == have.keys() and want
    for name, grad in want.items():
        torch.testing.assert_close(have[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_same_loss_and_gradients_as_the_model(lora_model):
    _assert_same(*_losses_and_grads(lora_model, _batch()))


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
    assert label_head_reason(lora_model, "lora").startswith("distributed training")


# ---- every architecture ----------------------------------------------------------------------------


def _adapted(path, **config_changes):
    """The tiny model at ``path`` with every default LoRA target adapted (random B, so LoRA counts)."""
    from peft import get_peft_model

    from medtune.adapters import peft_config_for
    from medtune.config import AdapterConfig
    from medtune.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(str(path), dtype="float32", device="cpu")
    for key, value in config_changes.items():
        setattr(model.config, key, value)
    config = peft_config_for(AdapterConfig(method="lora", r=4, dropout=0.0), model.config.model_type)
    config.init_lora_weights = False
    return get_peft_model(model, config)


def test_every_built_architecture_is_proven_here():
    # each model type the builder makes is either proven below or has a reason to fall back
    assert {a.model_type for a in ARCHITECTURES.values()} <= EXACT_MODEL_TYPES


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "gemma2"])
def test_same_loss_and_gradients_on_every_architecture(arch_model_dir, arch):
    model = _adapted(arch_model_dir(arch))
    assert label_head_reason(model, "lora") is None
    expected, want, got, have = _losses_and_grads(model, _batch(vocab=900))
    _assert_same(expected, want, got, have)
    if ARCHITECTURES[arch].model_type in ("qwen3_moe", "deepseek_v3"):  # the expert weights are trained too
        assert any("experts" in name for name in want)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3", "phi"])  # phi: its LM head has a bias
def test_same_loss_and_gradients_in_full_fine_tuning(arch_model_dir, arch):
    from medtune.models import load_causal_lm

    model = load_causal_lm(str(arch_model_dir(arch)), dtype="float32", device="cpu")
    assert label_head_reason(model, "full") is None
    _assert_same(*_losses_and_grads(model, _batch(vocab=900)))


def test_gemma2_soft_capping_falls_back_to_the_model_loss(arch_model_dir):
    model = _adapted(arch_model_dir("gemma2"))
    assert model.config.final_logit_softcapping == 30.0  # Gemma-2's own default, as its checkpoints have
    assert label_head_reason(model, "lora") == ("final_logit_softcapping=30.0: the model's loss is on "
                                                "tanh-capped logits")
    assert not label_head_applies(model, "lora")
    expected, _, got, _ = _losses_and_grads(model, _batch(vocab=900))
    # why: the uncapped head is not the model's loss (a random model's logits are far below the cap of 30,
    # so the difference is small here, 6e-4, yet 60 times the tolerance the exact cases meet)
    assert abs(expected.item() - got.item()) > 1e-4
    # without soft-capping the rest of Gemma-2 is exact
    uncapped = _adapted(arch_model_dir("gemma2"), final_logit_softcapping=None)
    assert label_head_reason(uncapped, "lora") is None
    _assert_same(*_losses_and_grads(uncapped, _batch(vocab=900)))


@pytest.mark.parametrize("arch", ["qwen3_moe"])
def test_moe_router_loss_falls_back_to_the_model_loss(arch_model_dir, arch):
    model = _adapted(arch_model_dir(arch), output_router_logits=True)
    assert label_head_reason(model, "lora") == ("output_router_logits: the model adds the MoE router's "
                                                "load-balancing loss to the cross-entropy")
    batch = _batch(vocab=900)
    model.train()
    out = model(**batch)
    # the model's loss is the cross-entropy the label head computes plus the weighted router loss
    coefficient = model.config.router_aux_loss_coef
    assert out.loss.item() == pytest.approx(label_head_loss(model, batch).item() + coefficient * out.aux_loss.item(),
                                            abs=1e-5)
    assert out.aux_loss.item() > 0


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "label_head"), [("gemma3", True), ("gemma2", False), ("qwen3_moe", True)])
def test_training_chooses_the_label_head_only_where_exact(arch_model_dir, records_file, tmp_path, monkeypatch,
                                                           arch, label_head):
    import medtune.train.label_head as module
    from medtune.config import load_config
    from medtune.train.sft import run

    calls = []
    original = module.label_head_loss
    monkeypatch.setattr(module, "label_head_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = load_config("src/medtune/configs/quickstart.yaml", [
        f"model.name_or_path={arch_model_dir(arch)}", f"data.train={records_file(8)}",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.report_to=none", "adapter.dropout=0"])
    run(cfg)
    assert bool(calls) is label_head


@pytest.mark.parametrize("chunk", [1, 5, 512])
def test_linear_cross_entropy_in_pieces_equals_the_whole(chunk):
    """Loss and gradients (hidden, weight, bias) of the piecewise head equal cross_entropy(linear(...))."""
    from medtune.train.label_head import linear_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    want = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum") * 0.37
    want.backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    got = linear_cross_entropy_sum(hidden, head, targets, chunk) * 0.37
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for have, grad in zip([hidden.grad, head.weight.grad, head.bias.grad], expected, strict=True):
        torch.testing.assert_close(have, grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation: the loss only, no gradient work
        assert linear_cross_entropy_sum(hidden, head, targets, chunk).item() == pytest.approx(want.item() / 0.37, rel=1e-6)


def test_linear_cross_entropy_under_autocast_computes_the_head_in_bf16():
    """Symptom: the reused fp32 logits buffer (an out= product, which autocast skips) made the head fp32 under bf16."""
    from medtune.train.label_head import linear_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300)
    hidden, targets = torch.randn(40, 64), torch.randint(0, 300, (40,))
    with torch.no_grad():
        fp32 = linear_cross_entropy_sum(hidden, head, targets, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = linear_cross_entropy_sum(hidden, head, targets, 16)
            bf16_logits = head(hidden).float()  # autocast's product: bf16, read in fp32
    want = torch.nn.functional.cross_entropy(bf16_logits, targets, reduction="sum")
    assert got.dtype == torch.float32 and got.item() != fp32.item()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_applies_the_runs_mixed_precision(lora_model, tmp_path, bf16):
    """Symptom: train.bf16=true gave a bit-identical fp32 loss: accelerate autocasts model.forward, which this path skips."""
    from transformers import TrainingArguments

    from medtune.train.label_head import LabelHeadTrainer

    args = TrainingArguments(output_dir=str(tmp_path), bf16=bf16, use_cpu=True, report_to="none")
    trainer = LabelHeadTrainer(model=lora_model, args=args)
    batch = _batch()
    with torch.no_grad():
        fp32 = label_head_loss(lora_model, batch).item()
        got = trainer.compute_loss(lora_model, batch).item()
    if bf16:
        assert got != fp32 and got == pytest.approx(fp32, rel=2e-2)  # bf16 matmuls, fp32 loss
    else:
        assert got == fp32
