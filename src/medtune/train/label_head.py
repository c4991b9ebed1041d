"""A Trainer that runs the LM head only where there are labels.

Prompt tokens are masked out of the SFT loss (label -100), yet a causal LM computes a vocabulary
distribution at every position: for exam data about a third of that work is thrown away. This
trainer runs the decoder, then the LM head and cross-entropy on the label positions only — the
same loss (mean over label tokens, or the sum over ``num_items_in_batch`` under gradient
accumulation, as transformers computes it) for less compute.

Used only where it is provably the same computation: one process (DDP needs its own forward to
synchronise gradients), plain or LoRA-adapted decoders of the architectures below (no logit
soft-capping or scaling), and not AdaLoRA (whose forward adds an orthogonality penalty).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral"}
IGNORE_INDEX = -100


def label_head_applies(model: Any, method: str) -> bool:
    """Whether ``LabelHeadTrainer`` computes exactly what the model's own loss would."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (
        int(os.environ.get("WORLD_SIZE", "1")) == 1
        and method in ("lora", "full")
        and getattr(base.config, "model_type", None) in SUPPORTED_MODEL_TYPES
        and hasattr(base, "get_decoder")
        and base.get_output_embeddings() is not None
    )


def label_head_loss(model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
    """Next-token cross-entropy computed on the labelled positions only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = inputs["labels"]
    # Through the peft wrapper's modules: LoRA layers live inside the decoder, so calling the
    # decoder of the (adapted) base model applies them.
    hidden = base.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    total = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / keep.sum().clamp(min=1)


class LabelHeadTrainer(Trainer):
    """``transformers.Trainer`` with ``label_head_loss`` as the loss."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The loss (outputs are not needed by SFT; evaluation gets the loss only)."""
        loss = label_head_loss(model, inputs, num_items_in_batch)
        return (loss, {}) if return_outputs else loss  # evaluation reads outputs as a dict
