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
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from medtune.config import ConfigError, RunConfig, eval_metric_key
from medtune.io import atomic_write_json, read_jsonl_tolerant, write_jsonl

log = logging.getLogger(__name__)

PACKAGES = ("medtune", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked."""


class TrainingDiverged(RuntimeError):
    """The loss or the trainable weights stopped being finite; training stopped before saving them."""


class ParallelismError(RuntimeError):
    """The processes of a multi-process run are not working together as the launch asked."""


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


# The run directory that ``medtune train --overwrite`` asked to start over in. A context variable
# rather than a parameter so that every stage gets it through check_run_dir/create_run_dir, the
# two calls they already make, without each stage passing a flag along.
_OVERWRITE: ContextVar[Path | None] = ContextVar("medtune_overwrite_run_dir", default=None)


@contextmanager
def overwriting(run_dir: str | os.PathLike) -> Iterator[None]:
    """Within this block, a training run into ``run_dir`` starts over instead of resuming or refusing.

    ``check_run_dir`` then skips the same-config and same-data checks and resumes nothing (but
    still refuses a directory that is not a medtune run directory), and ``create_run_dir`` deletes
    the old run's files: only once the new run's settings and data have been checked, so a new
    run refused for those leaves the old run as it was.
    """
    token = _OVERWRITE.set(Path(run_dir).resolve())
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def _overwrite_requested(run_dir: Path) -> bool:
    wanted = _OVERWRITE.get()
    return wanted is not None and wanted == run_dir.resolve()


def check_overwritable(run_dir: Path) -> None:
    """Refuse to start over in a directory that is not (only) a medtune run.

    ``--overwrite`` deletes the whole directory, so it must be one that a training run made:
    missing, empty, or holding the ``config.yaml`` of a run. Never the working directory or a
    folder above it.

    Raises:
        RunDirError: Naming ``train.output_dir`` and why it is not replaced.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"train.output_dir: {run_dir} is a file; expected a directory for the run")
    resolved = run_dir.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise RunDirError(f"train.output_dir: {run_dir} is the working directory or holds it; --overwrite "
                          "will not delete it. Choose a run directory of its own")
    if not any(run_dir.iterdir()):
        return
    saved = run_dir / "config.yaml"
    try:
        previous = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else None
    except (OSError, yaml.YAMLError):
        previous = None
    if not (isinstance(previous, dict) and "stage" in previous and "train" in previous):
        raise RunDirError(f"train.output_dir: {run_dir} is not a medtune run directory (no run config.yaml), so "
                          "--overwrite will not delete it; choose another train.output_dir or empty it yourself")


def clear_run_dir(run_dir: Path) -> None:
    """Delete a previous run's directory (after ``check_overwritable``), so a new run starts clean."""
    check_overwritable(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
        log.info("removed the previous run in %s (--overwrite)", run_dir)


def check_run_dir(cfg: RunConfig, resume: bool = True) -> tuple[Path, str | None]:
    """``(run directory, checkpoint to resume from)``, refusing a directory this run must not use.

    Nothing is created: stages call this first, validate their data, and only then
    ``create_run_dir``, so a run refused for its settings or data leaves no directory behind.
    A rerun with the same config resumes from the last checkpoint; a different config (or changed
    training data) in an existing run directory is an error, since resuming would mix two experiments.
    Inside ``overwriting(run_dir)`` (``medtune train --overwrite``) the old run is to be replaced:
    nothing is compared or resumed.
    """
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"train.output_dir: {run_dir} is a file; expected a directory for the run")
    if _overwrite_requested(run_dir):
        check_overwritable(run_dir)
        return run_dir, None
    saved = run_dir / "config.yaml"
    if saved.exists():
        with open(saved, encoding="utf-8") as fh:
            previous = _compared(yaml.safe_load(fh))
        if previous != _compared(cfg.to_dict()):
            diff = _diff(previous, _compared(cfg.to_dict()))
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


# Settings a resumed run may change: they decide how the processes wait for each other, not what
# is trained (a run that timed out must be resumable with a longer train.ddp_timeout). A run
# directory saved before a key existed lacks it, which compares equal too.
_NOT_COMPARED = {"train": ("ddp_timeout",)}


def _compared(config: Any) -> Any:
    """``config`` (a run's config as a dict) without the settings that resuming may change."""
    if not isinstance(config, dict):
        return config
    config = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for section, keys in _NOT_COMPARED.items():
        for key in keys:
            if isinstance(config.get(section), dict):
                config[section].pop(key, None)
    return config


def create_run_dir(run_dir: Path) -> None:
    """Create the run directory (once the run's settings and data have been checked).

    Under ``overwriting(run_dir)`` the previous run in it is deleted first, exactly once.
    """
    if _overwrite_requested(run_dir):
        clear_run_dir(run_dir)
        _OVERWRITE.set(None)  # a stage that calls this again must not delete its own new files
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
        ConfigError: ``train.warmup_steps`` covers the whole run (the learning rate would never
            reach ``train.learning_rate``).
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
    if cfg.train.warmup_steps >= steps:
        raise ConfigError(f"train.warmup_steps: {cfg.train.warmup_steps} warm-up steps, but the run makes {steps} "
                          f"optimiser steps, so the learning rate would never reach train.learning_rate="
                          f"{cfg.train.learning_rate:g}; use fewer warm-up steps")
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


class EarlyStopOnMetric(TrainerCallback):
    """Stop training after ``patience`` evaluations without a better validation metric.

    transformers' ``EarlyStoppingCallback`` needs ``load_best_model_at_end``, which ties
    checkpoints to the evaluation schedule; early stopping works here without it (checkpoints stay
    on ``train.save_steps`` for resuming), so this callback only watches the metric and asks the
    trainer to stop.

    Args:
        patience: Evaluations in a row without improvement before stopping.
        metric: The metric's key (``eval_loss``, ``eval_accuracy``, ...).
        greater_is_better: Whether a higher value is an improvement (accuracy) or a lower one (loss).
    """

    def __init__(self, patience: int, metric: str = "eval_loss", greater_is_better: bool = False):
        self.patience = patience
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.best: float | None = None
        self.bad = 0

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        """Count evaluations that did not improve on the best value so far."""
        value = (metrics or {}).get(self.metric)
        if value is None:
            return
        better = self.best is None or (value > self.best if self.greater_is_better else value < self.best)
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                log.info("early stopping: %s has not improved for %d evaluations", self.metric, self.bad)
                control.should_training_stop = True


EarlyStopOnEvalLoss = EarlyStopOnMetric  # the name before it could watch other metrics


class RequireEvalMetric(TrainerCallback):
    """Refuse, at the first evaluation, a ``train.metric_for_best_model`` that the stage does not log.

    transformers would raise a bare ``KeyError`` from inside its training loop; this names the
    setting and the metrics there are. Evaluations under another prefix (pt's ``before_*``) are
    not checked.
    """

    def __init__(self, metric: str):
        self.metric = metric

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        """Check that the metric is among this evaluation's metrics."""
        metrics = metrics or {}
        if any(k.startswith("eval_") for k in metrics) and self.metric not in metrics:
            available = sorted(k for k in metrics if k.startswith("eval_") and not k.endswith(
                ("_runtime", "_per_second")))
            raise ConfigError(f"train.metric_for_best_model: {self.metric!r} is not among this stage's evaluation "
                              f"metrics {available}")


class TrainableParametersCallback(TrainerCallback):
    """Print ``trainable / total / %`` parameters when training starts (every run, resumed ones too).

    Printed (not logged): the CLI shows only warnings from loggers, and this is the one number
    that says whether the adapter is what was intended (e.g. 0.1% for LoRA, 100% for full).
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Count and print on the main process."""
        from medtune.adapters import trainable_parameter_counts

        if model is None or not state.is_world_process_zero:
            return
        trainable, total = trainable_parameter_counts(model)
        print(format_trainable(trainable, total), flush=True)


def format_trainable(trainable: int, total: int) -> str:
    """``trainable parameters: 1,234 of 5,678 (21.7330%)``."""
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable parameters: {trainable:,} of {total:,} ({share:.4f}%)"


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


class ParallelRunCheck(TrainerCallback):
    """Refuse, before the first step, a multi-process run that is not working as asked.

    - The launcher asked for FSDP or DeepSpeed (``accelerate launch`` with such a config sets
      ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``) and the Trainer does not use it.
      accelerate 1.15 applies both on GPUs only: on CPU an FSDP config trains as plain DDP
      without a word (docs/DISTRIBUTED.md).
    - The processes start from different steps: some resumed a checkpoint that the others cannot
      see, because ``train.output_dir`` is not one directory shared by all of them (machines each
      with a disk of their own). They would train different states of the model together.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Compare the strategy applied with the one asked for, and every process's starting step."""
        import torch.distributed as dist

        asked = [name for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"))
                 if os.environ.get(env, "false").lower() == "true"]
        if asked:
            from accelerate.state import AcceleratorState

            applied = AcceleratorState().distributed_type.value
            if applied != asked[0]:
                raise ParallelismError(
                    f"the launcher asked for {asked[0]} (an accelerate config with distributed_type: {asked[0]}), but "
                    f"accelerate set up {applied}: accelerate applies FSDP and DeepSpeed on GPUs only, so this run would "
                    f"not shard anything. Launch without --accelerate-config (plain DDP) here; see docs/DISTRIBUTED.md")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            steps: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(steps, state.global_step)
            if len(set(steps)) > 1:
                raise RunDirError(
                    f"the processes start from different steps ({', '.join(f'rank {r}: {s}' for r, s in enumerate(steps))}): "
                    f"they do not all see the same checkpoints in train.output_dir ({args.output_dir}). Every process "
                    "must use one shared directory (on several machines: a shared filesystem); see docs/DISTRIBUTED.md")


def use_local_gpu() -> None:
    """In a multi-process run on GPUs, make this process's own GPU (``LOCAL_RANK``) the current device.

    The Trainer chooses each process's GPU only once it starts, after the model is loaded; loaded
    before that, every process's copy lands on GPU 0 (``cuda`` means the current device). QLoRA's
    4-bit model would stay there (it is placed with ``device_map`` and cannot be moved), and the
    others would all pass through GPU 0's memory. ``medtune.train.run`` calls this before any
    stage loads its model.
    """
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        # as accelerate assigns devices: local process index modulo the GPUs visible
        torch.cuda.set_device(int(local_rank) % torch.cuda.device_count())


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
        # transformers 5 has one argument: a number >= 1 is a count of steps, a float < 1 a ratio
        # of the total (config validation allows only one of the two to be set)
        warmup_steps=cfg.train.warmup_steps or cfg.train.warmup_ratio,
        lr_scheduler_type=cfg.train.lr_scheduler,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        **evaluation_arguments(cfg, has_val),
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
        # how long a process waits in a collective for the others (the process group's timeout)
        ddp_timeout=cfg.train.ddp_timeout,
    )


def evaluation_arguments(cfg: RunConfig, has_val: bool) -> dict[str, Any]:
    """The Trainer's evaluation schedule and best-checkpoint settings for ``cfg.train``.

    Evaluation runs every ``train.eval_steps`` optimiser steps (and after the last step), or once
    per epoch when that is null. With ``train.load_best_model_at_end`` it runs at every checkpoint
    (``eval_steps`` is then null or equal to ``save_steps``; see ``RunConfig``), so every evaluation
    has saved weights to load.

    Raises:
        ConfigError: ``train.load_best_model_at_end`` or ``train.eval_steps`` without validation
            examples (e.g. a ``data.val_fraction`` too small for the data).
    """
    t = cfg.train
    if not has_val:
        for key, wanted in (("train.load_best_model_at_end", t.load_best_model_at_end),
                            ("train.eval_steps", t.eval_steps is not None)):
            if wanted:
                raise ConfigError(f"{key}: the run has no validation examples to evaluate on (check "
                                  "data.validation / data.val_fraction against the data)")
        return {"eval_strategy": "no"}
    every = t.eval_steps or (t.save_steps if t.load_best_model_at_end else None)
    args: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": every} if every else {"eval_strategy": "epoch"}
    if t.load_best_model_at_end:
        metric = eval_metric_key(t.metric_for_best_model)
        args.update(load_best_model_at_end=True, metric_for_best_model=metric,
                    greater_is_better=not metric.endswith("loss"))
    return args


def standard_callbacks(cfg: RunConfig, run_dir: Path, has_val: bool, *,
                       answer_accuracy: TrainerCallback | None = None) -> list[Any]:
    """The callbacks every stage uses, as configured.

    Answer scoring (when given), metrics log, TensorBoard, trainable-parameter count, AdaLoRA's
    rank schedule, the metric check and early stopping, the divergence guard, and the multi-process check.

    Args:
        cfg: The run config.
        run_dir: The run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
        has_val: Whether the run evaluates on validation examples.
        answer_accuracy: A callback that adds ``eval_accuracy`` to each evaluation's logs
            (``medtune.train.answer_accuracy``). It goes first, so the metrics log, TensorBoard,
            early stopping and the best-checkpoint choice all see the accuracy.
    """
    from medtune.adapters import AdaLoraRankCallback

    callbacks: list[Any] = [answer_accuracy] if answer_accuracy is not None and has_val else []
    callbacks.append(MetricsLogCallback(run_dir / "metrics.jsonl"))
    if "tensorboard" in cfg.train.report_to:
        callbacks.append(tensorboard_callback(run_dir))
    callbacks.append(TrainableParametersCallback())
    if cfg.adapter.method == "adalora":
        callbacks.append(AdaLoraRankCallback())
    metric = eval_metric_key(cfg.train.metric_for_best_model)
    if has_val and (cfg.train.load_best_model_at_end or cfg.train.early_stopping_patience):
        callbacks.append(RequireEvalMetric(metric))
    if cfg.train.early_stopping_patience and has_val:
        callbacks.append(EarlyStopOnMetric(cfg.train.early_stopping_patience, metric,
                                           greater_is_better=not metric.endswith("loss")))
    # last, so the logs above have recorded a non-finite loss before the guard stops the run
    callbacks.append(NonFiniteGuard())
    callbacks.append(ParallelRunCheck())  # nothing to check in one process without an accelerate config
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
        if int(os.environ.get("RANK", "0")) == 0:  # once, not once per process
            # said on the console: a rerun after a crash must not look like a fresh start
            print(f"resuming from {checkpoint} (step {checkpoint_step(checkpoint)}); the steps after it are redone")


def save_trained(trainer: Any, tokenizer: Any, run_dir: Path, adapter: bool) -> Path:
    """Save ``adapter/`` (PEFT) or ``model/`` (full tuning) with the tokenizer, and the trainer state.

    Call it in every process of a multi-process run: with FSDP or DeepSpeed ZeRO-3 each process
    holds a shard of the weights, and ``save_model`` gathers them in a collective that all must join
    (called on rank 0 alone it waits for the others until ``train.ddp_timeout``). Only the main
    process writes files.
    """
    out = run_dir / ("adapter" if adapter else "model")
    trainer.save_model(str(out))  # every process gathers; the Trainer writes on the main one only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        trainer.save_state()
    return out
