"""A Trainer that runs the LM head only where there are labels.

Prompt tokens are masked out of the SFT loss (label -100), yet a causal LM computes a vocabulary
distribution at every position: for exam data about a third of that work is thrown away. This
trainer runs the decoder, then the LM head and cross-entropy on the label positions only — the
same loss (mean over label tokens, or the sum over ``num_items_in_batch`` under gradient
accumulation, as transformers computes it) for less compute.

Used only where it is provably the same computation (:func:`label_head_reason` says why not
elsewhere): one process (DDP needs its own forward to synchronise gradients), plain or LoRA-adapted
decoders (not AdaLoRA, whose forward adds an orthogonality penalty, nor prefix/prompt tuning, whose
virtual tokens the bare decoder call would not see), of an architecture whose loss and gradients
``tests/test_label_head.py`` compares with the model's own (``EXACT_MODEL_TYPES``), and whose
config adds nothing to the cross-entropy: no final logit soft-capping (Gemma-2) and no MoE router
load-balancing loss (``output_router_logits``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import Trainer

log = logging.getLogger(__name__)

# Architectures whose causal-LM loss is the plain cross-entropy of lm_head(decoder(x)), each proven
# by a loss-and-gradient equality test in tests/test_label_head.py (config-dependent extras are
# checked in label_head_reason). Gemma-2 is listed for configs without soft-capping; its real
# checkpoints all have it, so it falls back there.
EXACT_MODEL_TYPES = frozenset({
    "llama", "qwen2", "qwen3", "mistral", "glm4", "phi", "phi3", "gemma2", "gemma3_text", "internlm3",
    "qwen3_moe", "deepseek_v3",
})
IGNORE_INDEX = -100


def label_head_reason(model: Any, method: str) -> str | None:
    """Why ``LabelHeadTrainer`` would not compute exactly the model's own loss; ``None`` when it would."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return "distributed training: DDP must run the model's own forward to synchronise gradients"
    if method not in ("lora", "full"):
        return f"adapter.method={method}: its forward is not the bare decoder's (penalty or virtual tokens)"
    if model_type not in EXACT_MODEL_TYPES:
        return f"model_type {model_type}: not proven equal to the model's own loss"
    if getattr(config, "final_logit_softcapping", None):
        return (f"final_logit_softcapping={config.final_logit_softcapping}: the model's loss is on "
                "tanh-capped logits")
    if getattr(config, "output_router_logits", False):
        return "output_router_logits: the model adds the MoE router's load-balancing loss to the cross-entropy"
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return "no decoder/output-embedding split to call separately"
    return None


def label_head_applies(model: Any, method: str) -> bool:
    """Whether ``LabelHeadTrainer`` computes exactly what the model's own loss would."""
    reason = label_head_reason(model, method)
    if reason:
        log.info("LM head on all positions (the model's own loss): %s", reason)
    return reason is None


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
