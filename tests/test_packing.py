"""Padding-free packing (transformers' DataCollatorWithFlattening) trains on the same loss.

Several examples laid end to end in one row, with position_ids restarting at 0 for each, must give
exactly the loss of running them separately: transformers' masking_utils turns the restarting
position_ids into a block-diagonal causal mask. These tests pin that down, and pin the trap found
while checking it: with a KV cache (use_cache=True, the model config's default outside the
Trainer) the packed-sequence check is skipped and packed examples silently attend to each other.
"""

from __future__ import annotations

import pytest
import torch

N_EXAMPLES = 4


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir, tiny_tokenizer, sample_records):
    from medtune.data.sft import build_sft_examples
    from medtune.models import load_causal_lm
    from medtune.templates import get_template

    model = load_causal_lm(str(tiny_model_dir), dtype="float32")
    model.eval()
    examples = build_sft_examples(sample_records[:N_EXAMPLES], get_template("qa"), tiny_tokenizer, 256).examples
    features = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    assert len({len(f["input_ids"]) for f in features}) > 1, "need examples of different lengths"
    return model, features


def _separate_loss(model, features) -> float:
    """Token-weighted mean loss of each example run on its own (what a padded batch computes)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for f in features:
            labels = torch.tensor([f["labels"]])
            n = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
            total += model(input_ids=torch.tensor([f["input_ids"]]), labels=labels).loss.item() * n
            count += n
    return total / count


def test_packed_loss_equals_separate_loss(model_and_examples):
    from transformers import DataCollatorWithFlattening

    model, features = model_and_examples
    packed = DataCollatorWithFlattening(separator_id=-100)(features)
    assert packed["input_ids"].shape[0] == 1  # one row, no padding
    with torch.no_grad():
        loss = model(**packed, use_cache=False).loss.item()
    assert loss == pytest.approx(_separate_loss(model, features), abs=1e-5)


def test_packed_logits_equal_separate_logits(model_and_examples):
    """Stronger than the loss: every position of every packed example sees only its own example."""
    from transformers import DataCollatorWithFlattening

    model, features = model_and_examples
    packed = DataCollatorWithFlattening(separator_id=-100)(features)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for f in features:
            alone = model(input_ids=torch.tensor([f["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[start : start + len(f["input_ids"])], alone, atol=1e-4, rtol=1e-4)
            start += len(f["input_ids"])


def test_packing_with_kv_cache_leaks_across_examples(model_and_examples):
    """Why packing requires use_cache=False (the Trainer's default): with a cache it is wrong."""
    from transformers import DataCollatorWithFlattening

    model, features = model_and_examples
    packed = DataCollatorWithFlattening(separator_id=-100)(features)
    with torch.no_grad():
        leaky = model(**packed, use_cache=True).loss.item()
    assert abs(leaky - _separate_loss(model, features)) > 1e-3


def test_label_masks_survive_packing(model_and_examples):
    from transformers import DataCollatorWithFlattening

    _, features = model_and_examples
    packed = DataCollatorWithFlattening(separator_id=-100)(features)
    labels = packed["labels"][0]
    # The collator writes -100 over each example's first label; that label is the prompt's first
    # token (already -100), and a causal LM never predicts position 0 anyway.
    assert all(f["labels"][0] == -100 for f in features)
    assert int((labels != -100).sum()) == sum(sum(1 for t in f["labels"] if t != -100) for f in features)
    # ...and they are the same tokens in the same places, not just the same count
    assert labels.tolist() == [t for f in features for t in f["labels"]]
    # position ids restart at 0 for each example: that is what marks the boundaries
    starts = [i for i, p in enumerate(packed["position_ids"][0].tolist()) if p == 0]
    lengths = [len(f["input_ids"]) for f in features]
    assert starts == [sum(lengths[:k]) for k in range(len(lengths))]


def test_trainer_turns_the_cache_off(tiny_model_dir, tmp_path):
    """The Trainer copies TrainingArguments.use_cache (False) into the model config, which packing relies on."""
    from transformers import Trainer, TrainingArguments

    from medtune.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), dtype="float32")
    model.config.use_cache = True
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert model.config.use_cache is False
