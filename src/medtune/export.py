"""Export a training run as a standalone model folder (adapter merged) or as its adapter alone.

A merged export loads with plain ``AutoModelForCausalLM.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)``: no medtune, no peft. It also carries the run's
``template.yaml`` (the prompt format the model was trained on) and ``medtune_export.json``
(what was exported, from which base, with which config).

Every kind of run exports (the run is opened by the one resolver,
:func:`medtune.inference.loading.resolve_source`): pt, sft, dpo and rl runs as causal LMs, and a
reward model (stage rm) as a sequence-classification model with its trained score head, which
loads with ``AutoModelForSequenceClassification.from_pretrained(out)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from medtune.inference.loading import EXPORT_INFO  # one name for the file, where exports are read back

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The run cannot be exported as asked (the message says what to do instead)."""


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter_only: bool = False,
    overwrite: bool = False,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Export ``run_dir`` to ``out_dir`` and return ``out_dir``.

    Args:
        run_dir: A finished medtune run directory (``config.yaml`` + ``adapter/`` or ``model/``).
        out_dir: Destination folder. It is written in a temporary folder beside it and renamed
            into place at the end, so an interrupted export never leaves a half-written model.
        adapter_only: Copy the adapter folder instead of merging it into the base weights
            (the only option for prefix/prompt tuning, whose virtual tokens have no weight delta).
        overwrite: Replace a non-empty ``out_dir``; without it that is an error.
        dtype: dtype of the saved weights (``float32``/``bfloat16``/``float16``). ``None``: the base
            model's own dtype from its config, so a bf16 7B model stays bf16. The merge itself is
            computed in float32 on the CPU, so rounding happens once, at the end.
        trust_remote_code: Allow the base model's own Python code (``--trust-remote-code``). A run
            trained with ``model.trust_remote_code: true`` is refused without it: the run's
            config never turns it on by itself.

    Returns:
        The export folder.

    Raises:
        ExportError: Prefix/prompt adapter without ``adapter_only``; ``adapter_only`` on a full
            fine-tune; a non-empty ``out_dir`` without ``overwrite``.
        FileNotFoundError: ``run_dir`` is not a finished run.
    """
    from medtune.inference.loading import resolve_source

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    # The one resolver: config.yaml, adapter/ or model/, the chain, the run kind, and the refusal of
    # a run that asks for remote code without --trust-remote-code, all before any heavy work.
    try:
        art = resolve_source(run=str(run_dir), trust_remote_code=trust_remote_code, kind=None, use="export")
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    with open(run_dir / "config.yaml", encoding="utf-8") as fh:
        run_cfg = yaml.safe_load(fh)
    adapter_cfg = _adapter_config(art.adapter_path)
    peft_type = adapter_cfg.get("peft_type") if adapter_cfg else None
    _check_destination(run_dir, out_dir, overwrite)
    if adapter_only and art.adapter_path is None:
        raise ExportError(f"{run_dir} is a full fine-tune (model/ folder, no adapter); "
                          "export it without --adapter-only")
    if adapter_only and art.merge_first:
        # The run's adapter was trained on the base with the earlier stages' adapters merged in; on
        # the bare base model it computes something else, silently (0 of 48 answers reproduced).
        earlier = ", ".join(str(Path(a).parent) for a in art.merge_first)
        raise ExportError(
            f"{run_dir} was trained on top of earlier stages ({earlier}), whose adapters are merged into the base "
            "first; its adapter alone on the base model would not reproduce the run. Export it merged (without "
            f"--adapter-only), or export the previous stage merged (medtune export {Path(art.merge_first[-1]).parent} "
            "--out BASE) and load this run's adapter on BASE")
    if not adapter_only and peft_type in _virtual_token_types():
        raise ExportError(
            f"{run_dir} was trained with {peft_type} (adapter.method={run_cfg['adapter']['method']}), "
            "which adds virtual tokens rather than a weight delta, so it cannot be merged into the base "
            "model; export it with --adapter-only and load it with peft (PeftModel.from_pretrained)"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the export is an ordinary shared folder
    try:
        if adapter_only:
            shutil.copytree(art.adapter_path, tmp, dirs_exist_ok=True)
            if not (tmp / "tokenizer_config.json").exists():  # older runs: tokenizer only in the base
                from medtune.models import load_tokenizer

                load_tokenizer(_tokenizer_source(art.model_path), art.trust_remote_code).save_pretrained(tmp)
            saved_dtype = None
        else:
            saved_dtype = _save_merged(art, tmp, dtype)
        shutil.copy2(run_dir / "template.yaml", tmp / "template.yaml")
        info = _export_info(run_dir, art, run_cfg, peft_type, adapter_only, saved_dtype)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s → %s", run_dir, out_dir)
    return out_dir


def _virtual_token_types() -> tuple[str, ...]:
    from medtune.models import VIRTUAL_TOKEN_PEFT_TYPES

    return VIRTUAL_TOKEN_PEFT_TYPES


def _adapter_config(adapter_path: str | None) -> dict[str, Any] | None:
    if adapter_path is None:
        return None
    path = Path(adapter_path) / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{adapter_path}: no adapter_config.json (not a peft adapter folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_destination(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents:
        # overwrite would delete the run being exported (or write inside it)
        raise ExportError(f"--out {out_dir} must not be the run directory or inside it")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"--out {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not overwrite:
            raise ExportError(f"--out {out_dir} is not empty; choose another folder or pass --overwrite")


def _tokenizer_source(model_path: str) -> str:
    """The base folder behind ``model_path`` (which may itself be a previous run directory)."""
    from medtune.models import previous_run

    chained = previous_run(model_path)
    return chained[0] if chained else model_path


def _save_merged(art: Any, out: Path, dtype: str | None) -> str:
    """Load base (+ chain) + adapter, merge, save safetensors + tokenizer; return the saved dtype."""
    import torch

    from medtune.models import load_for_inference, resolve_dtype

    # float32 on CPU: merging W + BA in bf16 would round twice, and an export should not need a GPU.
    model, tokenizer = load_for_inference(art.model_path, art.adapter_path, dtype="float32",
                                          trust_remote_code=art.trust_remote_code, device="cpu",
                                          merge_first=art.merge_first,
                                          # a reward model keeps its score head (peft modules_to_save)
                                          sequence_classification=art.run_kind == "rm")
    if art.adapter_path is not None:
        model = model.merge_and_unload()
    target = resolve_dtype(dtype, torch.device("cpu")) if dtype else _native_dtype(model)
    model = model.to(target)
    model.config.dtype = target
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(target).removeprefix("torch.")


def _native_dtype(model: Any) -> Any:
    """The dtype the base checkpoint declares (``config.dtype``), else float32."""
    import torch

    declared = _config_dtype(model.config)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def _config_dtype(config: Any) -> Any:
    # transformers 5 names it ``dtype``; older checkpoints' config.json say ``torch_dtype``.
    return getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)


def _export_info(run_dir: Path, art: Any, run_cfg: dict[str, Any], peft_type: str | None,
                 adapter_only: bool, saved_dtype: str | None) -> dict[str, Any]:
    reward_model = art.run_kind == "rm"
    auto = "AutoModelForSequenceClassification" if reward_model else "AutoModelForCausalLM"
    head = ", num_labels=1" if reward_model else ""
    try:
        from importlib.metadata import version

        medtune_version = version("medtune")
    except Exception:  # noqa: BLE001 - an uninstalled checkout has no metadata; not worth failing for
        medtune_version = None
    return {
        "format": "adapter" if adapter_only else "merged",
        "run_dir": str(run_dir.resolve()),
        "base_model": art.model_path,
        # A run trained on top of an earlier run's adapter: that adapter was merged into the base
        # before this run's adapter was trained, so an adapter-only export needs it merged first.
        "previous_adapters": art.merge_first,
        "adapter": art.adapter_path,
        "method": run_cfg.get("adapter", {}).get("method"),
        "peft_type": peft_type,
        "dtype": saved_dtype,
        "template": "template.yaml",
        "medtune_version": medtune_version,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_config": run_cfg,
        "run_kind": art.run_kind,
        "load": (f"PeftModel.from_pretrained({auto}.from_pretrained(base_model{head}), OUT)"
                 if adapter_only else f"{auto}.from_pretrained(OUT)"),
    }


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` is removed only after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
