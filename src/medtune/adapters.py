"""Parameter-efficient methods: one small spec per method → a peft config; AdaLoRA's rank schedule.

The base model's weights are never modified by adapter training; the adapter is saved on its own
and merged only by an explicit export (``medtune export``).

Which method works with which architecture
------------------------------------------

"Measured" means exercised by ``tests/test_methods.py`` on the tiny Llama model (CPU, fp32,
transformers 5 / peft 0.21); everything else is what the peft and model documentation state and
has *not* been run here.

============  ====================================  ==================================================
method        measured (tiny Llama, GQA 4q/2kv)      other architectures (from docs, not measured)
============  ====================================  ==================================================
lora          trains, merges, exports               any model with the ``TARGET_MODULES`` names
                                                    (Qwen2/3, Mistral, InternLM2, ChatGLM, GLM-4,
                                                    Baichuan's fused ``W_pack``) or ``all-linear``
adalora       trains, ranks move, merges            as lora
qlora         CPU: refused before loading weights   as lora, on CUDA with bitsandbytes (4-bit NF4)
prompt        trains, generates (batched, cached)    any decoder: only the input embeddings are used
prefix        trains, generates; needs              needs the model to accept ``past_key_values`` as
              gradient_checkpointing off            a transformers ``Cache``; peft sizes the prefix by
                                                    ``num_key_value_heads`` (GQA). ChatGLM-6B/GLM
                                                    remote code ships its own P-tuning v2
                                                    (``pre_seq_len``), which peft does not drive;
                                                    Baichuan remote code expects tuple caches
full          trains (no adapter)                   any
============  ====================================  ==================================================

prefix and prompt adapters add virtual tokens instead of a weight delta, so they cannot be merged
into the base weights: export them with ``--adapter-only``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

from medtune.config import AdapterConfig, ConfigError, TrainConfig

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


# Methods whose adapter is a weight delta that ``merge_and_unload`` can fold into the base weights.
MERGEABLE_METHODS = ("lora", "adalora", "qlora")
# peft types (adapter_config.json ``peft_type``) that add virtual tokens and so cannot be merged.
VIRTUAL_TOKEN_PEFT_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")


def peft_config_for(
    spec: AdapterConfig,
    model_type: str,
    total_steps: int | None = None,
    *,
    hidden_size: int | None = None,
    prompt_init_text: str | None = None,
    tokenizer_name_or_path: str | None = None,
) -> Any:
    """Build the peft config for ``spec``; ``None`` for full fine-tuning.

    Args:
        spec: The run's adapter section.
        model_type: ``config.model_type`` of the base model (picks the LoRA targets).
        total_steps: Optimiser steps of the run (AdaLoRA's schedule needs them).
        hidden_size: The model's hidden size. With ``prefix_projection`` it becomes the width of
            the prefix MLP, as in ChatGLM's P-tuning v2 encoder; when ``None`` peft uses the KV
            width (``num_key_value_heads * head_dim``), which is narrower for GQA models.
        prompt_init_text: Prompt tuning only: initialise the virtual tokens from the embeddings
            of this text (e.g. ``"请回答下面的医学考试题"``) instead of at random; an init close to
            real token embeddings usually converges faster than random soft tokens.
        tokenizer_name_or_path: The tokenizer that splits ``prompt_init_text`` (required with it).

    Returns:
        A peft ``PeftConfig``, or ``None`` for ``method: full``.

    Raises:
        ValueError: Unknown method, or missing inputs the method needs.
    """
    from peft import AdaLoraConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    if spec.method == "full":
        return None
    if spec.method in ("prefix", "prompt"):
        if spec.num_virtual_tokens <= 0:
            raise ValueError(f"adapter.num_virtual_tokens must be > 0, got {spec.num_virtual_tokens}")
        if spec.method == "prefix":
            # P-tuning v2: trainable key/value prefixes in every layer. peft derives num_layers and
            # the (GQA-aware) KV width from the model config when get_peft_model runs.
            kwargs: dict[str, Any] = {}
            if spec.prefix_projection and hidden_size:
                kwargs["encoder_hidden_size"] = hidden_size
            return PrefixTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=spec.num_virtual_tokens,
                prefix_projection=spec.prefix_projection,
                **kwargs,
            )
        if prompt_init_text:
            if not tokenizer_name_or_path:
                raise ValueError("prompt_init_text needs tokenizer_name_or_path to split it into tokens")
            return PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=spec.num_virtual_tokens,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text=prompt_init_text,
                tokenizer_name_or_path=tokenizer_name_or_path,
            )
        # Random soft tokens: no tokenizer needed, and the tiny/test models have no meaningful
        # embeddings to start from anyway.
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=spec.num_virtual_tokens,
            prompt_tuning_init="RANDOM",
        )

    targets = target_modules_for(model_type, spec.target_modules)
    if spec.method in ("lora", "qlora"):
        # QLoRA is plain LoRA on top of 4-bit base weights; the quantised loading lives in
        # models.load_for_training, so the adapter config is the same.
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


def linear_layer_names(model: Any) -> list[str]:
    """Sorted distinct names (last part) of the model's linear layers: what ``target_modules`` can name.

    ``nn.Linear`` and its subclasses (bitsandbytes' 4-bit layers included) and transformers'
    ``Conv1D`` (GPT-2 style models); LoRA layers already in the model are reported by the name of
    the layer they wrap.
    """
    import torch

    names = set()
    for name, module in model.named_modules():
        if not name or "lora_" in name:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            leaf = name.rsplit(".", 1)[-1]
            names.add(name.rsplit(".", 2)[-2] if leaf == "base_layer" and "." in name else leaf)
    return sorted(names)


def check_target_modules(model: Any, peft_config: Any, spec: AdapterConfig) -> None:
    """Refuse ``target_modules`` that name no module of ``model``, before peft is asked to adapt it.

    Each name given in ``adapter.target_modules`` must match a module (as peft matches: the full
    name or its last parts); a typo would otherwise adapt only the other modules, or fail inside
    peft with a traceback that does not name the setting. Defaults from ``TARGET_MODULES`` are
    refused only when none matches (peft's own rule), since not every variant of an architecture
    has every default module. ``all-linear`` and methods without target modules are not checked.

    Args:
        model: The loaded base model.
        peft_config: From :func:`peft_config_for` (``None`` for full fine-tuning).
        spec: The run's adapter section.

    Raises:
        ConfigError: Naming ``adapter.target_modules``, the model type and the linear layers there are.
    """
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    targets = getattr(peft_config, "target_modules", None)
    if not targets or targets == "all-linear":
        return
    if isinstance(targets, str):
        groups = [targets]  # a regular expression, matched against whole module names
    else:
        groups = [[t] for t in sorted(targets)] if spec.target_modules else [sorted(targets)]
    keys = [name for name, _ in model.named_modules() if name]
    missing = []
    for group in groups:
        probe = SimpleNamespace(target_modules=group, exclude_modules=None, modules_to_save=None,
                                target_parameters=None)
        if not any(check_target_module_exists(probe, key) for key in keys):
            missing += [group] if isinstance(group, str) else group
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
        given = "" if spec.target_modules else f" (the default for model_type {model_type})"
        raise ConfigError(
            f"adapter.target_modules: {', '.join(missing)} not found in the model{given}; model_type {model_type} "
            f"has the linear layers {', '.join(linear_layer_names(model))} (or use all-linear)"
        )


def check_method_compatibility(spec: AdapterConfig, train: TrainConfig) -> None:
    """Refuse method/training combinations known to fail, before any data or weights are loaded.

    Call this first thing in a training stage: the errors it raises are cheaper than a crash
    minutes into loading a 7B model.

    Args:
        spec: The run's adapter section.
        train: The run's train section.

    Raises:
        ConfigError: ``prefix`` with ``train.gradient_checkpointing`` (a ``ValueError``, so the
            CLI prints it as one line and exits with code 2).
        medtune.models.GPURequired: ``qlora`` on a machine without a CUDA GPU.
    """
    if spec.method == "prefix" and train.gradient_checkpointing:
        # Gradient checkpointing makes the decoder layers drop past_key_values ("Caching is
        # incompatible with gradient checkpointing ... Setting past_key_values=None"), which is
        # exactly where prefix tuning puts its virtual key/values; the attention mask still counts
        # them, so attention fails with a size mismatch of num_virtual_tokens (STACK.md section 3).
        raise ConfigError(
            "adapter.method=prefix does not work with train.gradient_checkpointing=true: checkpointed "
            "layers drop past_key_values, where prefix tuning stores its virtual key/values. "
            "Set train.gradient_checkpointing=false (or use adapter.method=prompt or lora)."
        )
    if spec.method == "qlora":
        import torch

        from medtune.models import GPURequired

        if not torch.cuda.is_available():
            raise GPURequired("QLoRA (adapter.method: qlora) needs a CUDA GPU; none is visible. "
                              "Use adapter.method: lora on this machine.")


def trainable_parameter_counts(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model`` (a peft model or a plain one).

    bitsandbytes' ``Params4bit`` packs two 4-bit values per byte of its storage dtype, so its
    ``numel()`` under-counts; it is scaled back the way ``PeftModel.get_nb_trainable_parameters``
    does, so QLoRA totals are the real parameter count.
    """
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if n == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 shards leave empty tensors
            n = param.ds_numel
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * (param.element_size() if hasattr(param, "element_size") else 1)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


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
