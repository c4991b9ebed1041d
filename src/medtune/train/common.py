"""Steps every training stage shares: run directory, env record, metrics log, resume, seeding."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from medtune.config import ConfigError, RunConfig
from medtune.io import atomic_write_json, read_jsonl_tolerant, write_jsonl

log = logging.getLogger(__name__)

PACKAGES = ("medtune", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked."""


class TrainingDiverged(RuntimeError):
    """The loss or the trainable weights stopped being finite; training stopped before saving them."""


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


def check_run_dir(cfg: RunConfig, resume: bool = True) -> tuple[Path, str | None]:
    """``(run directory, checkpoint to resume from)``, refusing a directory this run must not use.

    Nothing is created: stages call this first, validate their data, and only then
    ``create_run_dir``, so a run refused for its settings or data leaves no directory behind.
    A rerun with the same config resumes from the last checkpoint; a different config (or changed
    training data) in an existing run directory is an error, since resuming would mix two experiments.
    """
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"train.output_dir: {run_dir} is a file; expected a directory for the run")
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
    checkpoint = last_complete_checkpoint(run_dir) if resume and run_dir.is_dir() else None
    return run_dir, checkpoint


def create_run_dir(run_dir: Path) -> None:
    """Create the run directory (once the run's settings and data have been checked)."""
    run_dir.mkdir(parents=True, exist_ok=True)


def prepare_run_dir(cfg: RunConfig, resume: bool = True) -> tuple[Path, str | None]:
    """``check_run_dir`` and ``create_run_dir`` in one call (for stages that check nothing in between)."""
    run_dir, checkpoint = check_run_dir(cfg, resume)
    create_run_dir(run_dir)
    return run_dir, checkpoint


def discard_unfinished_run_dir(run_dir: Path) -> bool:
    """Remove a run directory that a failed run created and that holds nothing to resume from.

    Called only for a directory that did not exist before the run started. With a complete
    checkpoint inside (e.g. the last good one before training diverged) it is kept.

    Returns:
        Whether the directory was removed.
    """
    if not run_dir.is_dir() or last_complete_checkpoint(run_dir) is not None:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


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


# ---- checks before anything is written or loaded ------------------------------------------------

# What huggingface_hub accepts as a repo id: "name" or "namespace/name" (no leading dot or slash).
_HUB_ID = re.compile(r"^(?![./~])[\w.-]+(/[\w.-]+)?$")


def check_model_source(name_or_path: str) -> None:
    """Refuse a ``model.name_or_path`` that can be neither a local model folder nor a hub id.

    Without this a missing folder surfaces as a hub error about repo id syntax, after the run
    directory was made.

    Raises:
        ConfigError: Naming ``model.name_or_path`` and what was expected.
    """
    path = Path(name_or_path).expanduser()
    expected = "a model folder (with config.json), a medtune run directory, or a hub id such as Qwen/Qwen2.5-0.5B"
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "config.yaml").exists():
            raise ConfigError(f"model.name_or_path: {path} holds no config.json or config.yaml; expected {expected}")
        return
    if path.exists():
        raise ConfigError(f"model.name_or_path: {path} is a file; expected {expected}")
    if not _HUB_ID.match(name_or_path) or ".." in name_or_path or "--" in name_or_path:
        raise ConfigError(f"model.name_or_path: no such folder: {name_or_path} (expected {expected})")


def load_training_tokenizer(cfg: RunConfig) -> Any:
    """The run's tokenizer, with load failures reported against ``model.name_or_path``.

    The model source is checked first (see ``check_model_source``); this is the first thing a
    stage loads, so a wrong path or unreachable hub id fails here, before the run directory exists.
    """
    from medtune.models import training_tokenizer

    check_model_source(cfg.model.name_or_path)
    try:
        return training_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        if Path(cfg.model.name_or_path).expanduser().exists():
            raise ConfigError(f"model.name_or_path: {exc}") from exc
        raise ConfigError(f"model.name_or_path: {cfg.model.name_or_path!r} is not a local folder, and loading "
                          f"it as a hub id failed: {exc}") from exc


def check_trainer_names(cfg: RunConfig) -> None:
    """``train.lr_scheduler`` and ``train.optim`` are names transformers knows (else it fails after loading)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    schedulers = [s.value for s in SchedulerType]
    if cfg.train.lr_scheduler not in schedulers:
        raise ConfigError(f"train.lr_scheduler: expected one of {schedulers}, got {cfg.train.lr_scheduler!r}")
    optimizers = [o.value for o in OptimizerNames]
    if cfg.train.optim is not None and cfg.train.optim not in optimizers:
        close = [o for o in optimizers if o.startswith(cfg.train.optim)][:3] or difflib.get_close_matches(
            cfg.train.optim, optimizers, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(f"train.optim: unknown optimiser {cfg.train.optim!r}; {hint}expected null (adamw_torch) "
                          "or a transformers optimiser name (transformers.training_args.OptimizerNames)")


def planned_steps(cfg: RunConfig, n_train: int, unit: str, accounting: list[tuple[str, int]]) -> int:
    """Optimiser steps the run will take; refuses a run that would take none.

    Called once the training data is built and before the model is loaded, so a run with nothing
    to learn from fails in seconds and leaves no run directory (or untrained "result") behind.

    Args:
        cfg: The run config.
        n_train: Training examples (pairs, blocks, prompts) after every filter.
        unit: What ``n_train`` counts, for the message ("examples", "preference pairs", ...).
        accounting: ``(what, how many)`` explaining where the rows went; the first entry is
            always shown, the others when non-zero.

    Returns:
        The number of optimiser steps (as transformers' Trainer computes it).

    Raises:
        ValueError: When the run would make no optimiser step.
    """
    from medtune.adapters import total_optimizer_steps

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    steps = 0
    if n_train > 0:
        steps = total_optimizer_steps(n_train, cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                                      cfg.train.epochs, cfg.train.max_steps, world_size)
    if steps < 1:
        shown = [f"{count} {what}" for i, (what, count) in enumerate(accounting) if i == 0 or count]
        raise ValueError(
            f"data.train: {cfg.data.train} leaves {n_train} training {unit} ({', '.join(shown)}), "
            f"so the run would make {steps} optimiser steps; check the file and the data.* settings"
        )
    return steps


# ---- callbacks -------------------------------------------------------------------------------------


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


def _first_non_finite(named: list[tuple[str, Any]]) -> tuple[str, str, int] | None:
    """``(name, "nan" or "inf", how many tensors are bad)`` for tensors holding NaN/inf, else None.

    One max-abs reduction per tensor (NaN propagates through it) and a single device sync for all.
    """
    import torch

    # DeepSpeed ZeRO-3 leaves empty placeholders for parameters held by other processes
    named = [(n, t) for n, t in named if t.numel() > 0]
    if not named:
        return None
    device = named[0][1].device
    peaks = torch.stack([torch.linalg.vector_norm(t.detach(), ord=math.inf).float().to(device) for _, t in named])
    finite = torch.isfinite(peaks)
    if bool(finite.all()):
        return None
    first = int((~finite).nonzero()[0])
    kind = "nan" if bool(torch.isnan(peaks[first])) else "inf"
    return named[first][0], kind, int((~finite).sum())


class NonFiniteGuard(TrainerCallback):
    """Stop training the moment the loss or the trainable weights stop being finite.

    A diverged run otherwise keeps going and saves an all-NaN adapter as its result (the Trainer
    even hides NaN losses from its logs by default). Checked at every optimiser step, before the
    Trainer can save a checkpoint of that step (it saves after ``on_step_end``), so every checkpoint
    on disk passed the check and the last one is the last good state:

    - ``on_pre_optimizer_step``: the (clipped) gradients. A NaN/inf loss gives non-finite gradients,
      caught here before the optimiser writes them into the weights. Skipped with fp16, whose
      gradient scaler skips overflowing steps by design.
    - ``on_step_end``: the trainable weights after the update.
    - ``on_log``: the logged training loss (``logging_nan_inf_filter`` is off, so NaN shows there).

    Stopping raises ``TrainingDiverged`` (the CLI prints its one-line message), so the stage never
    reaches the step that saves the result.
    """

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Refuse non-finite gradients before the optimiser applies them."""
        if args.fp16 or model is None:
            return
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        bad = _first_non_finite(grads)
        if bad:
            name, kind, count = bad
            self._stop(args, state.global_step + 1,
                       f"the loss or its gradients became {kind} ({count} of {len(grads)} trainable tensors, "
                       f"first {name})")

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Refuse non-finite weights before this step can be checkpointed."""
        if model is None:
            return
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        bad = _first_non_finite(params)
        if bad:
            name, kind, count = bad
            self._stop(args, state.global_step,
                       f"the trainable weights became {kind} ({count} of {len(params)} tensors, first {name})")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        """Refuse a non-finite logged training loss (logging comes before saving in the Trainer)."""
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)) and not math.isfinite(loss) and not args.fp16:
            self._stop(args, state.global_step, f"the training loss became {loss}")

    @staticmethod
    def _stop(args: Any, step: int, what: str) -> None:
        run_dir = Path(args.output_dir)
        checkpoint = last_complete_checkpoint(run_dir) if run_dir.is_dir() else None
        if checkpoint:
            kept = (f"the last good checkpoint, {checkpoint}, is kept; train into a new train.output_dir "
                    "(or delete this one)")
        else:
            kept = f"no checkpoint had been saved yet (train.save_steps={args.save_steps}), so nothing is kept"
        clip = "; keep train.max_grad_norm > 0 (now 0: no clipping)" if not args.max_grad_norm else ""
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}. The model was not saved as the run's result; {kept}. "
            f"Lower train.learning_rate (now {args.learning_rate:g}){clip} and train again."
        )


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
        # By default the Trainer replaces NaN/inf step losses by the running mean in its logs, which
        # hides a diverging run; NonFiniteGuard stops one, and the logs must show what it saw.
        logging_nan_inf_filter=False,
        dataloader_pin_memory=False,
        optim=cfg.train.optim or ("paged_adamw_8bit" if cfg.adapter.method == "qlora" else "adamw_torch"),
    )


def standard_callbacks(cfg: RunConfig, run_dir: Path, has_val: bool) -> list[Any]:
    """Divergence guard, metrics log, TensorBoard, AdaLoRA's rank schedule and early stopping, as configured."""
    from medtune.adapters import AdaLoraRankCallback

    callbacks: list[Any] = [MetricsLogCallback(run_dir / "metrics.jsonl")]
    if "tensorboard" in cfg.train.report_to:
        callbacks.append(tensorboard_callback(run_dir))
    if cfg.adapter.method == "adalora":
        callbacks.append(AdaLoraRankCallback())
    if cfg.train.early_stopping_patience and has_val:
        callbacks.append(EarlyStopOnEvalLoss(cfg.train.early_stopping_patience))
    # last, so the logs above have recorded a non-finite loss before the guard stops the run
    callbacks.append(NonFiniteGuard())
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
