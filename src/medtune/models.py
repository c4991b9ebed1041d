"""The one place that loads models and tokenizers, and builds the tiny local model.

Everything else (train, predict, chat, server, demo) calls these functions, so dtype, device,
``trust_remote_code`` and padding rules are decided here once.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# peft 0.21 checks a loaded config's rank_pattern against the LoRA modules it injects and warns that
# AdaLoRA's keys ("...q_proj.lora_E") "did not match any targeted module and were ignored". They are
# not LoRA rank overrides: AdaLoRA applies them itself when loading, resizing each module to its kept
# ranks (tests/test_adalora.py loads them with the ranks of the checkpoint). medtune sets rank_pattern
# only for AdaLoRA, so the warning is always this false alarm; every adapter load goes through here.
warnings.filterwarnings("ignore", message=r"The following rank_pattern keys did not match any targeted module",
                        category=RuntimeWarning)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ChatML, the format Qwen and many Chinese chat models use; the tiny model ships it so the `chat`
# template works end to end without a downloaded model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """Map a config dtype name to torch; ``auto`` is bf16 on GPUs that support it, else fp32."""
    if name == "auto":
        device = device or default_device()
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPU: fp32 is the fast and exact path for matmuls here
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer; give it a pad token (eos) when it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{name_or_path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Load any Hugging Face causal LM from a local folder or hub id (safetensors preferred)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype, device),
        "trust_remote_code": trust_remote_code,
        "use_safetensors": _has_safetensors(name_or_path),
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    return model.to(device)


def _has_safetensors(name_or_path: str) -> bool | None:
    """True for a local folder with safetensors; None (let transformers decide) for hub ids."""
    path = Path(name_or_path)
    if path.is_dir():
        return any(path.glob("*.safetensors")) or None
    return None


def load_for_inference(
    model_path: str,
    adapter_path: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    merge_first: list[str] | tuple[str, ...] = (),
    sequence_classification: bool = False,
) -> tuple[Any, Any]:
    """Base model (+ optional peft adapter) and tokenizer, in eval mode.

    ``merge_first`` are earlier stages' adapters merged into the weights before ``adapter_path``
    is applied (unmerged, so it can be switched off for base-vs-tuned comparisons). The tokenizer
    comes from the adapter folder when it has one (training saves it there), else from the base.
    ``sequence_classification`` loads the one-score head a reward model (stage rm) is built on
    instead of the language-model head.

    Raises:
        ValueError: ``model_path`` is a reward model and a language model was asked for.
    """
    if not sequence_classification:
        reason = reward_model_reason(model_path)
        if reason:
            raise ValueError(f"{model_path} {reason}: a reward model scores text, it does not generate")
    chained = previous_run(model_path)  # a run directory given as the model: rebuild it
    base, merged = chained if chained else (model_path, [])
    merged = [*merged, *merge_first]
    if sequence_classification:
        model = _load_sequence_classifier(base, dtype, trust_remote_code,
                                          torch.device(device) if device is not None else default_device())
    else:
        model = load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    tok_source = base
    model = merge_adapters(model, merged)
    if adapter_path:
        from peft import PeftModel

        from medtune.inference.virtual_tokens import use_virtual_token_generation

        # prefix/prompt tuning: peft's own generate loses the virtual tokens (see that module)
        model = use_virtual_token_generation(PeftModel.from_pretrained(model, adapter_path))
        if (Path(adapter_path) / "tokenizer_config.json").exists():
            tok_source = adapter_path
    tokenizer = load_tokenizer(tok_source, trust_remote_code=trust_remote_code)
    if sequence_classification and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    model.eval()
    return model, tokenizer


def _load_sequence_classifier(name_or_path: str, dtype: str, trust_remote_code: bool, device: torch.device) -> Any:
    """A model with a one-output score head (a reward model's shape) on ``device``."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=1, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code,
        use_safetensors=_has_safetensors(name_or_path))
    return model.to(device)


def build_tiny_model(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    vocab_size: int = 3000,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_positions: int = 1024,
    seed: int = 0,
    initializer_range: float = 0.1,
    arch: str = "llama",
    tokenizer: Any = "ours",
) -> Path:
    """Build a random-weight model + tokenizer in ``out_dir`` (see ``medtune.tiny_models``).

    The default is the tiny model medtune has always used: the Llama architecture with ChatML
    and a byte-level BPE tokenizer trained on ``texts``. ``arch`` picks another architecture
    (``qwen2``, ``glm4``, ``gemma3``, ``qwen3_moe``, ...: ``medtune.tiny_models.ARCHITECTURES``)
    with its own config class and chat template; ``tokenizer`` is ``ours``, a real vocabulary
    (``qwen2.5``, ``deepseek``), a tokenizer folder or object. It loads offline with
    ``AutoModelForCausalLM``/``AutoTokenizer`` like any hub model, with the ids it was built with.
    """
    from medtune.tiny_models import build_tiny_model as build

    return build(out_dir, texts, arch=arch, tokenizer=tokenizer, vocab_size=vocab_size, hidden_size=hidden_size,
                 num_layers=num_layers, num_heads=num_heads, max_positions=max_positions, seed=seed,
                 initializer_range=initializer_range)


def tokenizer_corpus(records: Iterable[Any]) -> list[str]:
    """Text to train the tiny tokenizer on: each record rendered with every plain shipped template.

    Rendering through the templates puts their markers (答案：, 理由：, 正确选项：, 解释:) in the
    vocabulary, so the tiny model sees them as the few tokens a real tokenizer would.
    """
    from medtune.templates import available, get_template

    templates = [t for t in (get_template(n) for n in available()) if not t.chat]
    return [t.render_prompt(r) + t.render_target(r) for r in records for t in templates]


class GPURequired(RuntimeError):
    """A feature that needs a CUDA GPU was asked for on a machine without one."""


def _run_config(path: Path) -> dict[str, Any] | None:
    """A run directory's saved ``config.yaml``, or None when ``path`` is not a run directory."""
    import yaml

    cfg_path = path / "config.yaml"
    if not (path.is_dir() and cfg_path.exists()):
        return None
    with open(cfg_path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def reward_model_reason(name_or_path: str) -> str | None:
    """Why ``name_or_path`` is a reward model, as words after its name; None when it is not one.

    A run directory of stage rm, or a folder whose ``config.json`` names only sequence-classification
    architectures (what ``medtune export`` makes of an rm run). Such a model has a score head and
    no language-model head: loading it as a causal LM would invent a random one.
    """
    path = Path(name_or_path)
    cfg = _run_config(path)
    if cfg is not None:
        return "is a reward model (stage rm)" if cfg.get("stage") == "rm" else None
    config = path / "config.json"
    if path.is_dir() and config.exists():
        import json

        try:
            archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError):
            return None  # not ours to judge: loading it will say what is wrong
        if archs and all(str(a).endswith("ForSequenceClassification") for a in archs):
            return f"is a sequence-classification model ({archs[0]}, e.g. an exported reward model)"
    return None


def previous_run(name_or_path: str) -> tuple[str, list[str]] | None:
    """``(base model, [adapter folders])`` when ``name_or_path`` is a medtune run directory.

    Follows chains (a run trained on top of another run) down to the real base model. The
    adapters are in training order; applying them one after another (each merged) rebuilds the
    run's model. A run that kept training the previous run's adapter (``previous_adapter: stack``)
    replaces that adapter in the chain instead of adding one.

    Raises:
        FileNotFoundError: A run in the chain has not finished.
        ValueError: A run in the chain was trained on top of a reward model (which no stage
            allows: its weights cannot be rebuilt as a language model).
    """
    path = Path(name_or_path)
    cfg = _run_config(path)
    if cfg is None:
        return None
    model_cfg = cfg["model"]
    if (path / "model").is_dir():  # full fine-tune: the run's own weights are the model
        return str(path / "model"), []
    if not (path / "adapter").is_dir():
        raise FileNotFoundError(f"{path}: the run has not finished (no adapter/ or model/ folder)")
    parent = model_cfg["name_or_path"]
    reason = reward_model_reason(parent)
    if reason:
        raise ValueError(f"{path} was trained on top of {parent}, which {reason}; that chain cannot be rebuilt")
    inner = previous_run(parent)
    base, earlier = inner if inner else (parent, [])
    if earlier and model_cfg.get("previous_adapter") == "stack":
        earlier = earlier[:-1]
    return base, [*earlier, str(path / "adapter")]


#: peft types (adapter_config.json ``peft_type``) that add virtual tokens instead of a weight delta,
#: so they cannot be merged. Here, not in medtune.adapters, because the code that reads and merges
#: saved adapters lives here (and medtune.adapters already imports this module: no cycle).
VIRTUAL_TOKEN_PEFT_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")


def _peft_type(adapter: str) -> str | None:
    """``peft_type`` of an adapter folder's ``adapter_config.json`` (None when unreadable)."""
    import json

    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError):
        return None


def check_mergeable(adapters: list[str] | tuple[str, ...]) -> None:
    """Refuse adapters that add virtual tokens (prefix/prompt tuning) where they would have to be merged.

    They have no weight delta to merge into the weights under another stage's adapter, and peft
    cannot load a saved one as trainable either, so no stage can be trained on top of such a run.

    Raises:
        ValueError: Naming the adapter and what to do instead.
    """
    for adapter in adapters:
        kind = _peft_type(adapter)
        if kind in VIRTUAL_TOKEN_PEFT_TYPES:
            run = Path(adapter).parent
            cfg = _run_config(run) or {}
            start = (cfg.get("model") or {}).get("name_or_path")
            raise ValueError(
                f"{run} was trained with {kind} (virtual tokens, not a weight delta): it cannot be merged into the "
                "weights under another stage's adapter, and peft cannot train a saved one further; train the next "
                f"stage from {start or 'the model that run started from'}, or retrain {run.name} with "
                "adapter.method=lora")


def merge_adapters(model: Any, adapters: list[str] | tuple[str, ...]) -> Any:
    """Apply each adapter and merge it into the weights, in order.

    Each adapter is loaded as a bare weight delta (peft's task type cleared): a LoRA trained on a
    causal LM changes the same decoder weights under a reward model's score head, and peft's
    task-specific wrappers would expect the head the adapter was trained with (a causal-LM
    wrapper on a sequence classifier fails with ``prepare_inputs_for_generation``).
    """
    from peft import PeftConfig, PeftModel

    check_mergeable(adapters)
    for adapter in adapters:
        config = PeftConfig.from_pretrained(adapter)
        config.task_type = None
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    return model


def _refuse_reward_model_base(name_or_path: str) -> None:
    """Refuse to train on top of a reward model (called before anything is loaded)."""
    reason = reward_model_reason(name_or_path)
    if reason:
        cfg = _run_config(Path(name_or_path))
        start = f", or train from the model it started from ({cfg['model']['name_or_path']})" if cfg else ""
        raise ValueError(f"{name_or_path} {reason}: a reward model scores text, it does not generate, so no stage "
                         f"can train on top of it; use it as rl.reward_model (rl.reward=model){start}")


def training_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer for training on ``name_or_path`` (a base model or a previous run directory).

    It is the first thing a stage loads, so a starting point no stage can train on is refused
    here, before a run directory exists: a reward model, or a run whose chain holds a
    prefix/prompt-tuning adapter (see :func:`check_mergeable`).
    """
    _refuse_reward_model_base(name_or_path)
    chained = previous_run(name_or_path)
    if chained is None:
        return load_tokenizer(name_or_path, trust_remote_code)
    base, adapters = chained
    check_mergeable(adapters)  # merged (previous_adapter=merge) or trained further (stack): neither works
    with_tok = [a for a in adapters if (Path(a) / "tokenizer_config.json").exists()]
    return load_tokenizer(with_tok[-1] if with_tok else base, trust_remote_code)


def load_for_training(
    name_or_path: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    previous_adapter: str = "merge",
    quantize_4bit: bool = False,
    sequence_classification: bool = False,
) -> tuple[Any, Any, bool]:
    """Model and tokenizer to train, from a base model or a previous stage's run directory.

    Returns ``(model, tokenizer, stacked)``; ``stacked`` is True when the previous run's adapter
    is kept trainable (``previous_adapter="stack"``), so the caller must not add another one.
    ``quantize_4bit`` loads NF4 weights with double quantisation (QLoRA; CUDA only).
    ``sequence_classification`` puts a fresh one-output score head on the decoder (stage rm).

    Raises:
        ValueError: ``name_or_path`` is a reward model or a chain with a prefix/prompt-tuning
            adapter (see ``training_tokenizer``); ``previous_adapter="stack"`` for a reward model
            (it needs an adapter of its own, which trains the score head).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = training_tokenizer(name_or_path, trust_remote_code)  # refuses a reward model first
    chained = previous_run(name_or_path)
    base, adapters = chained if chained else (name_or_path, [])
    if adapters and previous_adapter == "stack" and sequence_classification:
        raise ValueError(f"model.previous_adapter=stack: a reward model needs an adapter of its own, which trains its "
                         f"score head; {name_or_path}'s adapter is a language-model adapter; use "
                         "model.previous_adapter=merge")
    device = default_device()
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device), "trust_remote_code": trust_remote_code,
                              "use_safetensors": _has_safetensors(base)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        if not torch.cuda.is_available():
            # Checked before any weights are read: bitsandbytes' CPU path is slow and unsupported.
            raise GPURequired("QLoRA (adapter.method: qlora) needs a CUDA GPU; none is visible. "
                              "Use adapter.method: lora on this machine.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"] if kwargs["dtype"] != torch.float32 else torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    cls = AutoModelForSequenceClassification if sequence_classification else AutoModelForCausalLM
    if sequence_classification:
        kwargs["num_labels"] = 1
    model = cls.from_pretrained(base, **kwargs)
    if sequence_classification and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # reward models read the last non-pad token
    if not quantize_4bit:
        model = model.to(device)
    stacked = False
    if adapters:
        from peft import PeftModel

        if previous_adapter == "stack":  # keep training the last adapter; earlier ones are merged
            model = merge_adapters(model, adapters[:-1])
            model = PeftModel.from_pretrained(model, adapters[-1], is_trainable=True)
            stacked = True
        else:
            model = merge_adapters(model, adapters)
    if quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model, tokenizer, stacked
