"""Run configuration: YAML + ``key=value`` overrides → small typed configs, one per concern.

Unknown keys and wrong types raise ``ConfigError`` naming the key (``train.learning_rate``).
The resolved config is saved in the run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    name_or_path: str = ""  # local folder or hub id of any causal LM, or a previous run directory
    # When name_or_path is a run directory with an adapter: merge it into the base weights before
    # adding this stage's adapter (merge), or keep training on top of it as a second adapter (stack).
    previous_adapter: str = "merge"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False  # only when you trust the model repository's code
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2


@dataclass
class DataConfig:
    """Training data and how it becomes prompts."""

    train: str = ""  # records JSON lines (medtune convert) or a raw CMExam file
    validation: str | None = None  # optional; else `val_fraction` of train is held out
    val_fraction: float = 0.0
    template: str = "qa"  # exam data: a shipped template name or a template YAML path
    # conversation data: a shipped conversation template (plain | chat | alpaca | instruct_zh) or a
    # template YAML path; saved as the run's template.yaml, so inference renders prompts the same way
    conversation_format: str = "plain"
    max_length: int = 512  # tokens of prompt + target (see data.truncation)
    max_source_length: int | None = None  # tokens of the prompt (null: only max_length limits it)
    max_target_length: int | None = None  # tokens of the target, EOS included (null: likewise)
    # over a limit: middle | left — cut the prompt there (exam prompts are never cut: their
    # explanation is shortened), the target from the right; drop — leave the example out whole
    truncation: str = "middle"
    # refuse a run in which every example of a task (PromptCBLUE's task_dataset) is dropped
    allow_dropped_tasks: bool = False
    max_explanation_chars: int | None = None  # exam data: explanations longer than this ...
    on_long_explanation: str = "drop"  # ... drop the record (as the CMExam workflow does) | cut the explanation
    max_samples: int | None = None  # use only the first N training records (quick runs)
    on_invalid: str = "error"  # for raw CMExam input: error | skip


@dataclass
class AdapterConfig:
    """Parameter-efficient method and its knobs."""

    method: str = "lora"  # lora | adalora | full | qlora | prefix | prompt
    r: int = 8  # as peft's LoraConfig
    alpha: int = 16  # peft's default is 8; 2 x r is the usual LoRA choice (scale alpha / r = 2)
    dropout: float = 0.05  # peft's default is 0.0
    # None: chosen per architecture (adapters.TARGET_MODULES); "all-linear"; a regex string; or a
    # list of module names, in YAML or on the command line as q_proj,v_proj or [q_proj,v_proj]
    target_modules: list[str] | str | None = None
    # AdaLoRA: the rank budget falls from init_r to target_r between step tinit and
    # total_steps - tfinal (None: 10% of the run each), reallocating every delta_t steps.
    # init_r and target_r are peft's AdaLoraConfig defaults (12 and 8).
    init_r: int = 12
    target_r: int = 8
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int = 1
    # prefix (P-tuning v2) and prompt tuning: trainable virtual tokens (like ChatGLM's pre_seq_len)
    num_virtual_tokens: int = 16
    prefix_projection: bool = False  # P-tuning v2: reparameterise the prefix through an MLP


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging."""

    output_dir: str = "runs/sft"
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    batch_size: int = 4
    eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0  # fraction of total steps (must be < 1); or use warmup_steps, not both
    warmup_steps: int = 0  # learning rate rises linearly from 0 over this many optimiser steps
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_steps: int = 50  # checkpoint every N optimiser steps; a rerun resumes from the last one
    save_total_limit: int | None = 2
    logging_steps: int = 5
    seed: int = 42
    bf16: bool = False  # CPU autocast or GPU bf16; off by default so CPU runs "just work"
    fp16: bool = False
    gradient_checkpointing: bool = False
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    group_by_length: bool = True  # batch similar lengths together: less padding (1.46x tokens/s measured)
    # transformers optimiser name; None: adamw_torch, or paged_adamw_8bit for qlora (bitsandbytes,
    # GPU) so optimizer state spikes page to CPU memory instead of running out of GPU memory
    optim: str | None = None
    # Evaluation on the validation set: every eval_steps optimiser steps; None: once per epoch
    # (with load_best_model_at_end: at every checkpoint, i.e. every save_steps).
    eval_steps: int | None = None
    # At the end, load the checkpoint with the best metric_for_best_model (the saved adapter or
    # model is then that one, not the last). A checkpoint is saved at every evaluation.
    load_best_model_at_end: bool = False
    # eval_loss (lower is better) | eval_accuracy (needs eval_accuracy; higher is better) | for
    # rm/dpo any metric their trainer logs; a name ending in "loss" is minimised, others maximised.
    # Also what early_stopping_patience watches.
    metric_for_best_model: str = "eval_loss"
    # sft on exam data: at each evaluation also score the validation questions and log eval_accuracy
    # (a fraction, 0-1, like the other in-training accuracies) beside eval_loss. none | loglik (the
    # most likely answer letters after the answer cue: one forward pass per question, cheap) |
    # generate (greedy generation, read by the robust reader as medtune evaluate reads it).
    eval_accuracy: str = "none"
    eval_max_new_tokens: int = 32  # eval_accuracy=generate: tokens generated per question
    early_stopping_patience: int | None = None  # stop after N evaluations without a better metric_for_best_model
    # Multi-process runs: seconds a process waits in a collective (all-reduce, barrier, gathering
    # weights to save) for the others before the run fails with a timeout. It must cover the longest
    # time one process works alone while the rest wait (rank 0 writing a checkpoint or the final
    # model to a slow disk); 1800 is transformers' own default.
    ddp_timeout: int = 1800


@dataclass
class PTConfig:
    """Continued pretraining."""

    block_size: int = 512  # texts are concatenated and cut into blocks of this many tokens


@dataclass
class PreferenceConfig:
    """Reward modelling and DPO."""

    beta: float = 0.1  # DPO: strength of the pull towards the reference model
    loss_type: str = "sigmoid"  # DPO loss: sigmoid (DPO) | ipo | hinge | robust | ... (TRL's DPOConfig)
    max_prompt_length: int = 256


@dataclass
class RLConfig:
    """Online RL (TRL's GRPO / RLOO)."""

    algorithm: str = "grpo"  # grpo | rloo
    reward: str = "exam"  # exam: 1 when the parsed answer equals the gold letters (+ format bonus); model
    reward_model: str | None = None  # reward: model — a run directory of stage rm
    format_bonus: float = 0.1  # exam reward: added when the output has the template's answer format
    num_generations: int = 4  # completions sampled per prompt
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.0  # KL penalty towards the reference model (0: none, TRL's default for GRPO)


@dataclass
class RunConfig:
    """A whole training run."""

    stage: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pt: PTConfig = field(default_factory=PTConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def validate(self) -> RunConfig:
        """Check values that types alone don't catch."""
        _choice("stage", self.stage, ["pt", "sft", "rm", "dpo", "rl"])
        _choice("model.previous_adapter", self.model.previous_adapter, ["merge", "stack"])
        _choice("rl.algorithm", self.rl.algorithm, ["grpo", "rloo"])
        _choice("rl.reward", self.rl.reward, ["exam", "model"])
        if self.rl.reward == "model" and self.stage == "rl" and not self.rl.reward_model:
            raise ConfigError("rl.reward_model: required when rl.reward is model (a run directory of stage rm)")
        _choice("model.dtype", self.model.dtype, ["auto", "float32", "bfloat16", "float16"])
        _choice("adapter.method", self.adapter.method, ["lora", "adalora", "full", "qlora", "prefix", "prompt"])
        _choice("data.on_invalid", self.data.on_invalid, ["error", "skip"])
        self._validate_data()
        if not self.model.name_or_path:
            raise ConfigError("model.name_or_path: required (a local folder or hub id)")
        if not self.data.train:
            raise ConfigError("data.train: required (a records .jsonl file or a CMExam file)")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: expected 0 <= x < 1, got {self.data.val_fraction}")
        self._validate_numbers()
        self._validate_evaluation()
        if self.train.bf16 and self.train.fp16:
            raise ConfigError("train.bf16 and train.fp16: choose one")
        if self.adapter.target_modules is not None and not self.adapter.target_modules:
            raise ConfigError(f"adapter.target_modules: empty ({self.adapter.target_modules!r}); write null for the "
                              "architecture's defaults, all-linear, or module names such as [q_proj,v_proj]")
        return self

    def _validate_data(self) -> None:
        """Data settings: template names, length limits and the choices that go with them."""
        from medtune.templates import available

        d = self.data
        shipped = available("conversation")
        # a path is checked when training loads it (like data.template); a typo'd name fails here
        if d.conversation_format not in shipped and not d.conversation_format.endswith((".yaml", ".yml")):
            raise ConfigError(f"data.conversation_format: expected a shipped conversation template "
                              f"({' | '.join(shipped)}) or a template .yaml path, got {d.conversation_format!r}")
        _choice("data.truncation", d.truncation, ["middle", "left", "drop"])
        _choice("data.on_long_explanation", d.on_long_explanation, ["drop", "cut"])
        for key, value in (("data.max_source_length", d.max_source_length),
                           ("data.max_target_length", d.max_target_length)):
            # a part as long as the whole would leave the other part no token
            if value is not None and not 1 <= value < d.max_length:
                # scripts that take only source and target lengths (ChatGLM's P-tuning v2) mean their sum
                both = (d.max_source_length or 0) + (d.max_target_length or 0)
                hint = (f"; for prompts up to {d.max_source_length} and targets up to {d.max_target_length} "
                        f"tokens set data.max_length={both}") if d.max_source_length and d.max_target_length else ""
                raise ConfigError(f"{key}: expected null or 1 <= x < data.max_length ({d.max_length}), "
                                  f"got {value}{hint}")
        if d.max_explanation_chars is not None and d.max_explanation_chars < 0:
            raise ConfigError(f"data.max_explanation_chars: expected null (no limit) or a number >= 0, "
                              f"got {d.max_explanation_chars}")
        if self.stage != "sft":
            # only SFT builds examples this way; a setting another stage would ignore is refused
            for key, value in (("max_source_length", d.max_source_length),
                               ("max_target_length", d.max_target_length),
                               ("max_explanation_chars", d.max_explanation_chars)):
                if value is not None:
                    raise ConfigError(f"data.{key}: only stage sft uses it (this is stage {self.stage}); remove it")

    def _validate_numbers(self) -> None:
        """Numeric knobs outside their domain: each would train nonsense or crash deep in a trainer.

        Non-finite floats (``nan``, ``inf``) are already refused when the value is read.
        """
        t = self.train
        for key, value in (
            ("train.learning_rate", t.learning_rate),
            ("train.batch_size", t.batch_size),
            ("train.eval_batch_size", t.eval_batch_size),
            ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
            ("train.save_steps", t.save_steps),
            ("train.logging_steps", t.logging_steps),
            ("data.max_length", self.data.max_length),
            ("adapter.r", self.adapter.r),
            ("adapter.alpha", self.adapter.alpha),  # 0 scales the adapter's output to nothing
            ("adapter.init_r", self.adapter.init_r),
            ("adapter.target_r", self.adapter.target_r),
            ("adapter.delta_t", self.adapter.delta_t),
            ("adapter.num_virtual_tokens", self.adapter.num_virtual_tokens),
            ("pt.block_size", self.pt.block_size),
            ("preference.beta", self.preference.beta),  # 0 makes the DPO loss constant
            ("preference.max_prompt_length", self.preference.max_prompt_length),
            ("rl.max_completion_length", self.rl.max_completion_length),
            ("rl.temperature", self.rl.temperature),
            ("train.eval_max_new_tokens", t.eval_max_new_tokens),
            ("train.ddp_timeout", t.ddp_timeout),
        ):
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        # transformers reads max_steps <= 0 as "no limit" only when negative: 0 runs zero steps.
        if t.max_steps == 0 or t.max_steps < -1:
            raise ConfigError(f"train.max_steps: expected a number of optimiser steps >= 1, or -1 to train "
                              f"for train.epochs, got {t.max_steps}")
        if t.epochs < 0 or (t.epochs == 0 and t.max_steps < 0):
            raise ConfigError(f"train.epochs: must be > 0 (or set train.max_steps >= 1), got {t.epochs}")
        if not 0.0 <= t.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio: expected 0 <= x < 1 (a fraction of the steps), got {t.warmup_ratio}")
        if t.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps: expected a number of optimiser steps >= 0, got {t.warmup_steps}")
        if t.warmup_steps and t.warmup_ratio:
            # transformers takes one warmup_steps argument (a count, or a ratio when < 1): both
            # set would silently drop one of them
            raise ConfigError(f"train.warmup_steps ({t.warmup_steps}) and train.warmup_ratio ({t.warmup_ratio}): "
                              "choose one")
        for key, value in (
            ("train.weight_decay", t.weight_decay),
            ("train.max_grad_norm", t.max_grad_norm),  # 0 turns gradient clipping off
            ("rl.beta", self.rl.beta),
        ):
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
        for key, optional in (
            ("train.save_total_limit", t.save_total_limit),
            ("train.early_stopping_patience", t.early_stopping_patience),
            ("data.max_samples", self.data.max_samples),  # 0 would silently mean "all"
        ):
            if optional is not None and optional < 1:
                raise ConfigError(f"{key}: expected null (no limit) or a number >= 1, got {optional}")
        if not 0 <= t.seed < 2**32:  # numpy's seed range, which transformers' set_seed uses
            raise ConfigError(f"train.seed: expected 0 <= seed < 2**32, got {t.seed}")
        if not 0.0 <= self.adapter.dropout < 1.0:
            raise ConfigError(f"adapter.dropout: expected 0 <= x < 1, got {self.adapter.dropout}")
        for key, optional in (("adapter.tinit", self.adapter.tinit), ("adapter.tfinal", self.adapter.tfinal)):
            if optional is not None and optional < 0:
                raise ConfigError(f"{key}: expected null or a number of steps >= 0, got {optional}")
        if self.adapter.method == "adalora" and self.adapter.target_r > self.adapter.init_r:
            raise ConfigError(f"adapter.target_r: must be <= adapter.init_r ({self.adapter.init_r}) for adalora, "
                              f"got {self.adapter.target_r}")
        if self.rl.num_generations < 2:
            # GRPO/RLOO score each completion against the others sampled for the same prompt
            raise ConfigError(f"rl.num_generations: must be >= 2, got {self.rl.num_generations}")

    def _validate_evaluation(self) -> None:
        """Evaluation schedule, best-checkpoint loading and answer scoring: combinations that can work.

        What can only be known from the data (e.g. a validation split that came out empty) is
        checked by the stages; these are the combinations no data can rescue.
        """
        t = self.train
        _choice("train.eval_accuracy", t.eval_accuracy, ["none", "loglik", "generate"])
        if t.eval_steps is not None and t.eval_steps < 1:
            raise ConfigError(f"train.eval_steps: expected null (once per epoch) or a number of optimiser steps "
                              f">= 1, got {t.eval_steps}")
        # pt always holds out blocks (a default fraction); rl never evaluates
        has_validation = bool(self.data.validation) or self.data.val_fraction > 0 or self.stage == "pt"
        where = "set data.validation or data.val_fraction > 0"
        for key, wanted in (("train.eval_steps", t.eval_steps is not None),
                            ("train.load_best_model_at_end", t.load_best_model_at_end),
                            ("train.eval_accuracy", t.eval_accuracy != "none")):
            if not wanted:
                continue
            if self.stage == "rl":
                raise ConfigError(f"{key}: stage rl does not evaluate on a validation set")
            if not has_validation:
                raise ConfigError(f"{key}: needs a validation set to evaluate on; {where}")
        if t.eval_accuracy != "none" and self.stage != "sft":
            raise ConfigError(f"train.eval_accuracy: scores answers to exam questions, so stage sft only "
                              f"(got stage {self.stage})")
        if t.load_best_model_at_end and t.eval_steps is not None and t.eval_steps != t.save_steps:
            # transformers can only load an evaluation's weights if a checkpoint was saved at that
            # step; with checkpoints rarer than evaluations, a best evaluation between two
            # checkpoints is recorded as best but never loadable, and an older checkpoint is loaded.
            raise ConfigError(f"train.load_best_model_at_end: needs a checkpoint at every evaluation; set "
                              f"train.save_steps equal to train.eval_steps (now {t.save_steps} and {t.eval_steps}), "
                              "or leave train.eval_steps null to evaluate at every checkpoint")
        metric = eval_metric_key(t.metric_for_best_model)
        known = {"sft": ["eval_loss", "eval_accuracy"], "pt": ["eval_loss"]}.get(self.stage)
        if known is not None and metric not in known:
            raise ConfigError(f"train.metric_for_best_model: stage {self.stage} logs {known}, got "
                              f"{t.metric_for_best_model!r}")
        if metric == "eval_accuracy" and self.stage == "sft" and t.eval_accuracy == "none":
            raise ConfigError("train.metric_for_best_model: eval_accuracy is logged only with "
                              "train.eval_accuracy=loglik or generate")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (atomically)."""
        from medtune.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), allow_unicode=True, sort_keys=False))


def eval_metric_key(name: str) -> str:
    """The key an evaluation metric has in the trainer's metrics: ``accuracy`` → ``eval_accuracy``."""
    return name if name.startswith("eval_") else f"eval_{name}"


def _choice(key: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {allowed}, got {value!r}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` to the annotated type ``hint`` or raise naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        if any(typing.get_origin(a) is list for a in args):
            value = _bracket_list(key, value)  # [q_proj,v_proj] is a list, not the string "[q_proj"
        if isinstance(value, str) and str in args and "," not in value:
            return value  # e.g. target_modules: all-linear stays a string, not ["all-linear"]
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        value = _bracket_list(key, value)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(key, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string; accept it as a number
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            # no setting means anything with nan or inf: an inf learning rate trains an all-NaN model
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _bracket_list(key: str, value: Any) -> Any:
    """An override written in YAML flow form, ``[a, b]`` or ``['a', "b"]``, as a list; else ``value``.

    Overrides arrive as strings; without this ``[q_proj,v_proj]`` would be split on the comma into
    the names ``[q_proj`` and ``v_proj]``.
    """
    if not (isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]")):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read {value!r} as a list: {' '.join(str(exc).split())}") from exc
    if not isinstance(parsed, list) or any(isinstance(v, (list, dict)) or v is None for v in parsed):
        raise ConfigError(f"{key}: expected a list of names such as [q_proj,v_proj], got {value!r}")
    return parsed


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {names}"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return cls(**kwargs)


def _section_keys() -> dict[str, list[str]]:
    """Leaf key → sections that have it (for short overrides like ``learning_rate=1e-4``)."""
    out: dict[str, list[str]] = {}
    for f in dataclasses.fields(RunConfig):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            for sub in dataclasses.fields(f.default_factory):
                out.setdefault(sub.name, []).append(f.name)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or unambiguous ``key=value``) overrides to a raw dict."""
    sections = _section_keys()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] not in ("stage",):
            owners = sections.get(parts[0], [])
            if len(owners) != 1:
                where = f"it is in {owners}" if owners else "no section has it"
                raise ConfigError(f"override {key!r}: write it as section.key ({where})")
            parts = [owners[0], parts[0]]
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part} is not a section")
        # Values stay strings here; _coerce converts them to each field's type.
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply overrides, validate types and values."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    data = apply_overrides(data, overrides or [])
    cfg = _build(RunConfig, data, "").validate()
    # Local paths become absolute, so a run directory's config.yaml works from any folder
    # (predict --run, export). Hub ids and missing paths are left as written.
    for section, key in (("model", "name_or_path"), ("data", "train"), ("data", "validation")):
        value = getattr(getattr(cfg, section), key)
        if value and Path(value).exists():
            setattr(getattr(cfg, section), key, str(Path(value).resolve()))
    return cfg
