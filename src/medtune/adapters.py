"""Parameter-efficient methods: one small spec per method → a peft config; AdaLoRA's rank schedule.

The base model's weights are never modified by adapter training; the adapter is saved on its own
and merged only by an explicit export (``medtune export``).

Which method works with which architecture
------------------------------------------

Measured, not taken from documentation: ``tests/test_arch_matrix.py`` trains every method (lora,
adalora, prefix, prompt, full) on a tiny random model of each architecture ``medtune.tiny_models``
builds (Llama, Llama-3, Qwen2/3, GLM-4, Phi-2, Phi-3, Mistral, Gemma 2/3, InternLM3, Qwen3-MoE,
DeepSeek-V3) and checks generation, log-likelihood, export and the server on each; the README's
"Architectures" table is its result. Refused before loading, with the reason: prefix tuning on
multi-head latent attention (:func:`architecture_reason`), QLoRA without a CUDA GPU, prefix with
gradient checkpointing. Remote-code checkpoints (ChatGLM-6B, Baichuan, InternLM2) are not run here:
their ``TARGET_MODULES`` come from the peft documentation, and ChatGLM ships its own P-tuning v2
(``pre_seq_len``), which peft does not drive.

prefix and prompt adapters add virtual tokens instead of a weight delta, so they cannot be merged
into the base weights: export them with ``--adapter-only``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from transformers import TrainerCallback

from medtune.config import AdapterConfig, ConfigError, TrainConfig

log = logging.getLogger(__name__)

# Default LoRA targets per architecture (config.model_type): every attention and MLP projection,
# i.e. every linear layer but the LM head (and MoE routers, which are not nn.Linear); adapting the
# MLP too matters for knowledge-heavy domains such as medicine. tests/test_architectures.py counts
# them against the linear layers of a model of each architecture medtune.tiny_models builds.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "internlm3": _LLAMA_LIKE,
    "internlm2": ["wqkv", "wo", "w1", "w2", "w3"],
    "chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],  # fused gate+up
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],  # Phi-2: dense is the attention output
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # fused qkv and gate+up
    "baichuan": ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    # MoE: the attention projections as modules, the routed experts through TARGET_PARAMETERS.
    # Not gate_proj/up_proj/down_proj, although DeepSeek-V3's dense layers and shared experts (and
    # Qwen3-MoE's mlp_only_layers) are nn.Linear layers of those names: peft 0.21 rewrites those
    # names in a LoRA config for these model types into the fused experts' target_parameters (its
    # conversion of transformers-v4 adapters) and drops them as modules, so no LoRA config can adapt
    # them (tests/test_architectures.py pins this); naming them would only double the experts' rank.
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # DeepSeek-V3 multi-head latent attention: low-rank q (q_a/q_b; q_proj when q_lora_rank is null)
    # and kv (kv_a_proj_with_mqa/kv_b_proj)
    "deepseek_v3": ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}
# transformers 5 stores each MoE layer's routed experts as 3-D parameters (one slice per expert), not
# as nn.Linear modules; peft's LoRA adapts them with ``target_parameters`` (AdaLoRA cannot).
TARGET_PARAMETERS: dict[str, list[str]] = {
    "qwen3_moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "deepseek_v3": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
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
# (The peft types of saved adapters that cannot be merged are medtune.models.VIRTUAL_TOKEN_PEFT_TYPES,
# next to the code that reads and merges saved adapters.)
MERGEABLE_METHODS = ("lora", "adalora", "qlora")


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
        ConfigError: A method the architecture cannot take (:func:`architecture_reason`), or LoRA
            dropout with the routed experts of an MoE model as targets.
    """
    from peft import AdaLoraConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    reason = architecture_reason(spec.method, model_type)
    if reason:
        raise ConfigError(reason)
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
    # expert weights only with the default targets: a user's own target_modules say what to adapt
    parameters = TARGET_PARAMETERS.get(model_type) if not spec.target_modules else None
    if spec.method in ("lora", "qlora"):
        if parameters and spec.dropout:
            # peft's ParamWrapper: "does not work with lora_dropout != 0" (x cannot be factored out
            # of lora_B(lora_A(dropout(x))) for a 3-D weight), raised only after the weights are loaded
            raise ConfigError(
                f"adapter.dropout={spec.dropout}: the routed experts of model_type {model_type} are 3-D weights that "
                "LoRA adapts through peft's target_parameters, which cannot apply dropout; set adapter.dropout=0, "
                f"or name adapter.target_modules (e.g. {','.join(targets)}) to leave the experts frozen")
        # QLoRA is plain LoRA on top of 4-bit base weights; the quantised loading lives in
        # models.load_for_training, so the adapter config is the same.
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=targets,
            **({"target_parameters": parameters} if parameters else {}),
        )
    if parameters:
        log.warning("adalora: peft's AdaLoRA cannot adapt the routed experts of model_type %s (3-D weights, "
                    "only LoRA's target_parameters can); they stay frozen, only %s are adapted",
                    model_type, ", ".join(targets))
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
    parameters = getattr(peft_config, "target_parameters", None) or []
    names = [name for name, _ in model.named_parameters()]
    absent = [p for p in parameters if not any(n == p or n.endswith("." + p) for n in names)]
    if absent:  # a variant without routed experts in every layer still has them somewhere; none at all is wrong
        model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
        raise ConfigError(f"LoRA target_parameters {', '.join(absent)} (the expert weights of model_type {model_type}) "
                          "not found in the model; name adapter.target_modules to adapt the other layers only")


def latent_attention(model_type: str) -> bool:
    """Whether ``model_type`` uses multi-head latent attention (its config has ``kv_lora_rank``).

    DeepSeek-V2/V3 and the models built on their attention (GLM-4-MoE-Lite, MiniCPM3, Kimi, ...):
    the cache holds one compressed latent per token, not per-head keys and values.
    """
    from transformers import CONFIG_MAPPING

    try:
        return hasattr(CONFIG_MAPPING[model_type](), "kv_lora_rank")
    except Exception:  # unknown or remote-code model types: nothing known against them
        return False


def architecture_reason(method: str, model_type: str | None) -> str | None:
    """Why ``method`` cannot train a model of ``model_type``; ``None`` when nothing is known against it."""
    if method == "prefix" and model_type and latent_attention(model_type):
        # measured (transformers 5.24, peft 0.21) on deepseek_v3, deepseek_v2, glm4_moe_lite and
        # minicpm3: "RuntimeError: Sizes of tensors must match except in dimension 2. Expected size
        # 4 but got size 1" in DynamicLayer.update, at the first training step
        return (f"adapter.method=prefix does not work with model_type {model_type}: its multi-head latent attention "
                "caches one compressed latent per token instead of per-head keys and values, and peft's prefix "
                "tuning fills that cache with per-head key/value prefixes, whose shapes cannot match; use "
                "adapter.method=prompt or lora")
    return None


def model_type_of(name_or_path: str) -> str | None:
    """``model_type`` of a local model folder or medtune run directory (its base model); ``None`` if unknown.

    Reads ``config.json`` only (no weights, no network): hub ids give ``None``.
    """
    import json
    from pathlib import Path

    from medtune.models import previous_run

    try:
        chained = previous_run(name_or_path)
    except (OSError, ValueError):
        return None  # not ours to judge here: loading the model says what is wrong
    config = Path(chained[0] if chained else name_or_path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def check_method_compatibility(spec: AdapterConfig, train: TrainConfig, model: str | None = None) -> None:
    """Refuse method/training combinations known to fail, before any data or weights are loaded.

    Call this first thing in a training stage: the errors it raises are cheaper than a crash
    minutes into loading a 7B model.

    Args:
        spec: The run's adapter section.
        train: The run's train section.
        model: ``model.name_or_path``: with it, methods that cannot work on the model's
            architecture (:func:`architecture_reason`) are refused too, from its ``config.json``.
            (:func:`peft_config_for` refuses them anyway, once the model is loaded.)

    Raises:
        ConfigError: ``prefix`` with ``train.gradient_checkpointing``, or a method the model's
            architecture cannot take (a ``ValueError``, so the CLI prints it as one line and
            exits with code 2).
        medtune.models.GPURequired: ``qlora`` on a machine without a CUDA GPU.
    """
    if model is not None:
        reason = architecture_reason(spec.method, model_type_of(model))
        if reason:
            raise ConfigError(reason)
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
    """Run AdaLoRA's rank schedule inside the Trainer, and make its checkpoints resumable.

    Neither transformers' Trainer nor TRL calls ``update_and_allocate``; without it AdaLoRA's rank
    budget never moves and it is plain LoRA with extra cost. ``on_optimizer_step`` runs after
    ``optimizer.step()`` and before ``zero_grad()``, so the gradients AdaLoRA's importance scores
    need are still there.

    Checkpoints: once ranks are reallocated, peft saves an adapter trimmed to its ``rank_pattern``
    and, on loading into a model that already has the adapter, shrinks that model's modules to the
    *current* pattern first. Resuming (a full-rank model meets a trimmed checkpoint) and
    ``load_best_model_at_end`` (the final pattern meets an earlier checkpoint's) both failed with
    "size mismatch for ...lora_A". So during training the pattern lives here, not in the peft
    config: checkpoints hold the full-rank tensors (pruned ranks are zeros in ``lora_E``, which the
    mask sets in place), and ``adalora_state.safetensors``/``adalora_rank_pattern.json`` beside them
    hold the pattern and the importance averages, which resuming restores. At the end of training
    the pattern of the weights the model holds (the best checkpoint's, if one was loaded) goes back
    into the config, so the final adapter is saved trimmed and loads with ``PeftModel.from_pretrained``.
    """

    STATE_FILE = "adalora_state.safetensors"
    PATTERN_FILE = "adalora_rank_pattern.json"

    def __init__(self) -> None:
        self.pattern: dict[str, list[bool]] | None = None

    @staticmethod
    def _parts(model: Any) -> tuple[Any, Any]:
        peft_model = getattr(model, "module", model)  # unwrap DDP
        tuner = peft_model.base_model
        return tuner, peft_model.peft_config[tuner.trainable_adapter_name]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Take the pattern out of the config; when resuming, restore the checkpoint's schedule state."""
        tuner, config = self._parts(model)
        self.pattern, config.rank_pattern = config.rank_pattern, None
        if state.global_step > 0:  # resumed: the Trainer has loaded checkpoint-<global_step>
            self._restore(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), tuner)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Reallocate ranks for the step that was just taken."""
        tuner, config = self._parts(model)
        config.rank_pattern = self.pattern
        try:
            # Trainer increments global_step after this hook, so the step just taken is global_step + 1.
            tuner.update_and_allocate(state.global_step + 1)
            self.pattern = config.rank_pattern
        finally:
            config.rank_pattern = None

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Write the pattern and the importance averages beside the checkpoint just saved."""
        if not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        from medtune.io import atomic_write_text

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        allocator = self._parts(model)[0].rankallocator
        tensors = {f"{kind}/{name}": value.detach().contiguous().cpu()
                   for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
                   for name, value in getattr(allocator, kind).items()}
        save_file(tensors, os.path.join(folder, self.STATE_FILE))
        atomic_write_text(os.path.join(folder, self.PATTERN_FILE), json.dumps(self.pattern))

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Put back the pattern of the weights the model now holds, for the final save."""
        _, config = self._parts(model)
        pattern = self.pattern
        if args.load_best_model_at_end and state.best_model_checkpoint:
            pattern = self._read_pattern(state.best_model_checkpoint, pattern)
        config.rank_pattern = pattern

    def _read_pattern(self, folder: str, default: Any) -> Any:
        path = os.path.join(folder, self.PATTERN_FILE)
        if not os.path.exists(path):
            return default
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)

    def _restore(self, folder: str, tuner: Any) -> None:
        from safetensors.torch import load_file

        self.pattern = self._read_pattern(folder, self.pattern)
        path = os.path.join(folder, self.STATE_FILE)
        if not os.path.exists(path):
            log.warning("%s: no %s, so AdaLoRA's importance averages restart from zero", folder, self.STATE_FILE)
            return
        allocator = tuner.rankallocator
        device = next(p.device for p in tuner.model.parameters())
        for key, value in load_file(path).items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = value.to(device)


def adalora_ranks(model: Any) -> dict[str, int]:
    """Effective rank per AdaLoRA module: the number of non-zero singular values in ``lora_E``."""
    ranks = {}
    for name, param in model.named_parameters():
        if "lora_E" in name:
            ranks[name] = int((param.detach().abs() > 0).sum())
    return ranks
