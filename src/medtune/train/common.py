"""Steps every training stage shares: run directory, env record, metrics log, resume, seeding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from medtune.config import RunConfig
from medtune.io import atomic_write_json, read_jsonl_tolerant, write_jsonl

log = logging.getLogger(__name__)

PACKAGES = ("medtune", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (data provenance in env.json)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_hash() -> str | None:
    """Commit of the current working directory's git checkout, if any."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(seed: int, data_files: list[str]) -> dict[str, Any]:
    """What is needed to reproduce a run: versions, git hash, seed, data hashes, hardware."""
    import torch

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git": git_hash(),
        "seed": seed,
        "data": {f: file_sha256(f) for f in data_files if f and os.path.exists(f)},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda_devices": torch.cuda.device_count(),
        "torch_threads": torch.get_num_threads(),
    }


def prepare_run_dir(cfg: RunConfig, resume: bool = True) -> tuple[Path, str | None]:
    """Create the run directory or find the checkpoint to resume from.

    A rerun with the same config resumes from the last checkpoint; a different config in an
    existing run directory is an error (resuming it would mix two experiments).
    """
    run_dir = Path(cfg.train.output_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        with open(saved, encoding="utf-8") as fh:
            previous = yaml.safe_load(fh)
        if previous != cfg.to_dict():
            diff = _diff(previous, cfg.to_dict())
            raise RunDirError(
                f"{run_dir} holds a run with a different config ({diff}); "
                "choose another train.output_dir or delete that directory"
            )
    env_path = run_dir / "env.json"
    if env_path.exists():
        with open(env_path, encoding="utf-8") as fh:
            recorded = json.load(fh).get("data", {})
        for path, digest in recorded.items():
            if os.path.exists(path) and file_sha256(path) != digest:
                raise RunDirError(
                    f"{run_dir} was trained on a different version of {path} (SHA-256 changed); "
                    "choose another train.output_dir or delete that directory"
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = last_complete_checkpoint(run_dir) if resume else None
    return run_dir, checkpoint


def last_complete_checkpoint(run_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` that finished writing (has its trainer state).

    A process killed while saving leaves a checkpoint folder without ``trainer_state.json``
    (the Trainer writes it after the weights); resuming from that would fail, so it is skipped.
    """
    found = []
    for path in run_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit() and (path / "trainer_state.json").exists():
            found.append((int(suffix), path))
    return str(max(found)[1]) if found else None


def _diff(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} → {b!r}"


def trim_metrics_log(path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint being resumed, so a rerun doesn't duplicate them."""
    rows = read_jsonl_tolerant(path)
    kept = [r for r in rows if r.get("step", 0) <= last_step]
    if len(kept) != len(rows) or (path.exists() and not path.read_bytes().endswith(b"\n")):
        write_jsonl(path, kept)


def checkpoint_step(checkpoint: str | None) -> int:
    """Global step of a ``checkpoint-N`` folder (0 for none)."""
    if not checkpoint:
        return 0
    with open(Path(checkpoint) / "trainer_state.json", encoding="utf-8") as fh:
        return int(json.load(fh)["global_step"])


class MetricsLogCallback(TrainerCallback):
    """Append every Trainer log (loss, lr, eval loss, ...) to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        """Write one JSON line per log event."""
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def tensorboard_callback(run_dir: Path) -> Any:
    """TensorBoard logging into ``RUN_DIR/tensorboard`` (instead of a dated folder under runs/)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard")))


def save_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (alias kept short for stage scripts)."""
    atomic_write_json(path, obj)


class EarlyStopOnEvalLoss(TrainerCallback):
    """Stop training after ``patience`` evaluations without a lower validation loss.

    transformers' ``EarlyStoppingCallback`` needs ``load_best_model_at_end``, which forces
    checkpoints onto the evaluation schedule (every epoch); we keep step checkpoints for resuming,
    so this callback only watches ``eval_loss`` and asks the trainer to stop.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best: float | None = None
        self.bad = 0

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        """Count evaluations that did not improve on the best loss so far."""
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if self.best is None or loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                log.info("early stopping: eval_loss has not improved for %d evaluations", self.bad)
                control.should_training_stop = True


def training_arguments(cfg: RunConfig, run_dir: Path, has_val: bool) -> dict[str, Any]:
    """Keyword arguments for ``TrainingArguments`` (or a TRL config, which subclasses it).

    Every stage maps ``cfg.train`` to the trainer the same way; stage-specific arguments are
    added by the stage.
    """
    import torch

    return dict(
        output_dir=str(run_dir),
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        learning_rate=cfg.train.learning_rate,
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.eval_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        warmup_steps=cfg.train.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        lr_scheduler_type=cfg.train.lr_scheduler,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        eval_strategy="epoch" if has_val else "no",
        logging_steps=cfg.train.logging_steps,
        logging_first_step=True,
        seed=cfg.train.seed,
        # TRL configs default to bf16 and gradient checkpointing on; both fail or slow down on
        # CPU, so both always come from our config.
        bf16=cfg.train.bf16,
        fp16=cfg.train.fp16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        report_to="none",  # TensorBoard is attached by standard_callbacks, inside the run dir
        dataloader_pin_memory=False,
        optim=cfg.train.optim or ("paged_adamw_8bit" if cfg.adapter.method == "qlora" else "adamw_torch"),
    )


def standard_callbacks(cfg: RunConfig, run_dir: Path, has_val: bool) -> list[Any]:
    """Metrics log, TensorBoard, AdaLoRA's rank schedule and early stopping, as configured."""
    from medtune.adapters import AdaLoraRankCallback

    callbacks: list[Any] = [MetricsLogCallback(run_dir / "metrics.jsonl")]
    if "tensorboard" in cfg.train.report_to:
        callbacks.append(tensorboard_callback(run_dir))
    if cfg.adapter.method == "adalora":
        callbacks.append(AdaLoraRankCallback())
    if cfg.train.early_stopping_patience and has_val:
        callbacks.append(EarlyStopOnEvalLoss(cfg.train.early_stopping_patience))
    return callbacks


def record_run(cfg: RunConfig, run_dir: Path, template: Any, data_files: list[str] | None = None) -> None:
    """Write what this run is before training starts: config.yaml, template.yaml, env.json.

    ``template`` is anything with ``save(path)`` (exam template, conversation format), or a dict
    written as YAML (stages without a prompt template still get the file).
    """
    cfg.save(run_dir / "config.yaml")
    if isinstance(template, dict):
        from medtune.io import atomic_write_text

        atomic_write_text(run_dir / "template.yaml", yaml.safe_dump(template, allow_unicode=True, sort_keys=False))
    else:
        template.save(run_dir / "template.yaml")
    files = data_files if data_files is not None else [cfg.data.train, cfg.data.validation or ""]
    save_json(run_dir / "env.json", environment(cfg.train.seed, files))


def note_resume(run_dir: Path, checkpoint: str | None) -> None:
    """When resuming, drop log lines past the checkpoint (the steps will be redone)."""
    if checkpoint:
        trim_metrics_log(run_dir / "metrics.jsonl", checkpoint_step(checkpoint))
        log.info("resuming from %s", checkpoint)


def save_trained(trainer: Any, tokenizer: Any, run_dir: Path, adapter: bool) -> Path:
    """Save ``adapter/`` (PEFT) or ``model/`` (full tuning) with the tokenizer, and the trainer state."""
    out = run_dir / ("adapter" if adapter else "model")
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    trainer.save_state()
    return out
