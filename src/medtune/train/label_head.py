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


#: Label positions per piece of the LM head: a piece's logits ([4096, 151,936] fp32 is 2.5 GB at
#: Qwen2.5's vocabulary; 512 rows is 311 MB) live only while that piece is scored.
CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, a piece of rows at a time.

    The full ``[label positions, vocabulary]`` logits and their gradient never exist at once: each
    piece's logits are made, scored, turned into their gradient (softmax − one-hot) and folded
    into the gradients of ``hidden`` (and of ``weight``/``bias`` when they train: full fine-tuning,
    tied embeddings) right away, in the forward pass; backward only scales what was kept by the
    incoming gradient. The same arithmetic as ``cross_entropy(linear(hidden))`` with no
    recomputation (the approach of fused linear cross-entropy kernels, in plain PyTorch);
    tests/test_label_head.py compares loss and gradients with the model's own.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # Every pass over a piece's logits (311 MB at 512 × 151,936 in fp32) goes to memory, so they
        # are few: the product is written into one buffer reused by every piece (a fresh one per
        # piece cost a page-faulted allocation, a third of the product's time on CPU), turned into
        # log-probabilities in place by log_softmax's row-at-a-time kernel (where logsumexp, a
        # subtraction and an exp each made a pass of their own), then into the softmax in place.
        # Measured for one 512-row piece at the Qwen2.5 vocabulary, 1 CPU thread: 1.54 s -> 1.02 s.
        # Not under autocast: an out= product is not autocast, so the buffer would silently compute
        # in fp32 what train.bf16 asked to compute in bf16.
        fp32 = (hidden.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
                and not torch.is_autocast_enabled(hidden.device.type))
        buffer = (torch.empty((min(chunk, hidden.shape[0]), weight.shape[0]), dtype=torch.float32,
                              device=hidden.device) if fp32 else None)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            if buffer is not None:
                logits = buffer[: len(t)]
                if bias is None:
                    torch.mm(h, weight.T, out=logits)
                else:
                    torch.addmm(bias, h, weight.T, out=logits)
            else:  # bf16/fp16 weights or autocast: the product in their dtype, then fp32
                logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).float()
            log_probs = torch.log_softmax(logits, dim=-1, out=logits)
            rows = torch.arange(len(t), device=t.device)
            total -= log_probs[rows, t].sum()
            if need_h or need_w or need_b:
                grad = log_probs.exp_()  # softmax, in place
                grad[rows, t] -= 1
                if need_h:
                    grad_h[start : start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += grad.T @ h.float()
                if need_b:
                    grad_b += grad.sum(dim=0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.kept = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.kept
        grad_h = next(saved) * grad_out.to(ctx.dtypes[0]) if need_h else None
        grad_w = (next(saved) * grad_out).to(ctx.dtypes[1]) if need_w else None
        grad_b = (next(saved) * grad_out).to(ctx.dtypes[2]) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                             chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """``cross_entropy(head(hidden), targets, reduction="sum")`` without the whole logits matrix (see above)."""
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)


def label_head_loss(model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None,
                    chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Next-token cross-entropy computed on the labelled positions only, a piece of them at a time."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = inputs["labels"]
    # Through the peft wrapper's modules: LoRA layers live inside the decoder, so calling the
    # decoder of the (adapted) base model applies them.
    hidden = base.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    total = linear_cross_entropy_sum(hidden[:, :-1][keep], base.get_output_embeddings(), targets[keep], chunk)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / keep.sum().clamp(min=1)


class LabelHeadTrainer(Trainer):
    """``transformers.Trainer`` with ``label_head_loss`` as the loss."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The loss (outputs are not needed by SFT; evaluation gets the loss only)."""
        # accelerate applies bf16/fp16 autocast by wrapping model.forward, which this path does not
        # call: without its context here, train.bf16 was silently ignored (a bit-identical fp32 loss)
        with self.accelerator.autocast():
            loss = label_head_loss(model, inputs, num_items_in_batch)
        return (loss, {}) if return_outputs else loss  # evaluation reads outputs as a dict
