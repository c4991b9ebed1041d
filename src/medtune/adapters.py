"""Parameter-efficient methods: one small spec per method → a peft config; AdaLoRA's rank schedule.

The base model's weights are never modified by lora/adalora training; the adapter is saved on its
own and merged only by an explicit export.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

from medtune.config import AdapterConfig

log = logging.getLogger(__name__)

# Default LoRA targets per architecture (config.model_type). Attention and MLP projections:
# adapting the MLP too matters for knowledge-heavy domains such as medicine.
TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "internlm2": ["wqkv", "wo", "w1", "w2", "w3"],
    "chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "baichuan": ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def target_modules_for(model_type: str, override: list[str] | str | None = None) -> list[str] | str:
    """The LoRA target modules: the override if given, else the table, else ``all-linear``."""
    if override:
        return override
    if model_type in TARGET_MODULES:
        return TARGET_MODULES[model_type]
    log.info("no default LoRA targets for model_type=%s; using all-linear", model_type)
    return "all-linear"


def peft_config_for(spec: AdapterConfig, model_type: str, total_steps: int | None = None) -> Any:
    """Build the peft config for ``spec``; ``None`` for full fine-tuning."""
    from peft import AdaLoraConfig, LoraConfig, TaskType

    targets = target_modules_for(model_type, spec.target_modules)
    if spec.method == "full":
        return None
    if spec.method == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=targets,
        )
    if spec.method == "adalora":
        if not total_steps or total_steps < 3:
            raise ValueError(f"AdaLoRA needs the run's total optimiser steps (>= 3), got {total_steps}")
        tinit, tfinal = adalora_schedule(spec, total_steps)
        return AdaLoraConfig(
            task_type=TaskType.CAUSAL_LM,
            init_r=spec.init_r,
            target_r=spec.target_r,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=spec.delta_t,
            total_step=total_steps,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=targets,
        )
    raise ValueError(f"unknown adapter method {spec.method!r}")


def adalora_schedule(spec: AdapterConfig, total_steps: int) -> tuple[int, int]:
    """``(tinit, tfinal)``: defaults to 10% warm-up and 10% final phase, leaving room to prune."""
    tinit = spec.tinit if spec.tinit is not None else total_steps // 10
    tfinal = spec.tfinal if spec.tfinal is not None else total_steps // 10
    if tinit + tfinal >= total_steps:
        raise ValueError(
            f"adapter.tinit ({tinit}) + adapter.tfinal ({tfinal}) must be < total steps ({total_steps}), "
            "or AdaLoRA never reallocates ranks"
        )
    return tinit, tfinal


def total_optimizer_steps(n_examples: int, batch_size: int, grad_accum: int, epochs: float,
                          max_steps: int, world_size: int = 1) -> int:
    """Optimiser steps the Trainer will run (same rounding as transformers' Trainer)."""
    if max_steps > 0:
        return max_steps
    batches = math.ceil(n_examples / (batch_size * world_size))
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    return math.ceil(epochs * per_epoch)


class AdaLoraRankCallback(TrainerCallback):
    """Call AdaLoRA's ``update_and_allocate`` after every optimiser step.

    Neither transformers' Trainer nor TRL does this; without it AdaLoRA's rank budget never moves
    and it is plain LoRA with extra cost. ``on_optimizer_step`` runs after ``optimizer.step()`` and
    before ``zero_grad()``, so the gradients AdaLoRA's importance scores need are still there.
    """

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Reallocate ranks for the step that was just taken."""
        peft_model = getattr(model, "module", model)  # unwrap DDP
        # Trainer increments global_step after this hook, so the step just taken is global_step + 1.
        peft_model.base_model.update_and_allocate(state.global_step + 1)


def adalora_ranks(model: Any) -> dict[str, int]:
    """Effective rank per AdaLoRA module: the number of non-zero singular values in ``lora_E``."""
    ranks = {}
    for name, param in model.named_parameters():
        if "lora_E" in name:
            ranks[name] = int((param.detach().abs() > 0).sum())
    return ranks
