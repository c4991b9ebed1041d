"""Run ``medtune train`` as several processes (data-parallel: DDP, or DeepSpeed/FSDP via accelerate).

The parent process only builds and runs a launcher command; each child is an ordinary
``python -m medtune.cli train CONFIG ...`` without ``--nproc``, so a child never launches again.
The Trainer inside each child reads the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR...)
and wraps the model itself; medtune's SFT code only has to keep file writes on rank 0.

CPU pitfalls this module avoids (docs/STACK.md §5):

- ``accelerate launch --cpu --num_processes 2`` silently starts ONE process;
- ``torchrun --nproc-per-node 2`` alone starts two independent single-process runs, each on
  all of the data. Only with ``ACCELERATE_USE_CPU=true`` (or ``use_cpu=True``) do they join one
  gloo process group. sft.run already sets ``use_cpu`` when there is no CUDA; the environment
  variable is set here too so the launch is right whatever the training stage does.

`check_launch` refuses, before any process starts, a launch that cannot work on this machine or
with this run config (FSDP/DeepSpeed without a GPU, more processes than GPUs, QLoRA with a
strategy that shards the model). Several machines: docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class LaunchError(ValueError):
    """A multi-process launch that cannot work here or with this run config; the message says why."""


def _gpu_count() -> int:
    """CUDA devices the children will see (torch is imported lazily: the CLI starts fast)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def accelerate_strategy(accelerate_config: str | os.PathLike) -> tuple[str, int, int | None]:
    """``(distributed_type, num_machines, ZeRO stage or None)`` of an accelerate config file.

    Read with accelerate's own loader, so a file accelerate would reject fails here the same way.
    ``distributed_type`` is accelerate's name: ``MULTI_GPU`` (DDP), ``FSDP``, ``DEEPSPEED``, ...
    """
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(accelerate_config))
    deepspeed = loaded.deepspeed_config or {}
    return str(getattr(loaded.distributed_type, "value", loaded.distributed_type)), int(loaded.num_machines), (
        int(deepspeed["zero_stage"]) if "zero_stage" in deepspeed else None)


def check_launch(cfg: Any, nproc: int, accelerate_config: str | os.PathLike | None = None, *,
                 gpus: int | None = None) -> None:
    """Refuse a multi-process launch that cannot work, before any process starts.

    Args:
        cfg: The run config (a ``medtune.config.RunConfig``).
        nproc: Processes asked for (``--nproc``); with an accelerate config of several machines,
            the total over all of them, as ``accelerate launch --num_processes`` counts.
        accelerate_config: The ``--accelerate-config`` file, if any.
        gpus: CUDA devices on this machine (default: counted with torch).

    Raises:
        LaunchError: Saying what cannot work and what to run instead:

            - FSDP or DeepSpeed without a GPU. accelerate 1.15 applies them on GPUs only: on CPU an
              FSDP2 config trains as plain DDP without a word (FSDP1 with sync_module_states fails:
              "There are currently no available devices found"), and DeepSpeed needs CUDA.
            - ``adapter.method=qlora`` with FSDP or ZeRO-3: medtune places the whole 4-bit model
              on each process's GPU (``device_map``) and does not set up the quantised storage
              those strategies need to shard it. DDP and ZeRO-2 keep one copy per GPU and work.
            - DeepSpeed not installed.
            - More processes on this machine than GPUs: each process trains on a GPU of its own
              (medtune never spreads one model over several GPUs inside a process).
            - A process count that the machines of the accelerate config do not divide.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    gpus = _gpu_count() if gpus is None else gpus
    strategy, machines, zero_stage = "DDP", 1, None
    where = "--nproc without --accelerate-config (DDP)"
    if accelerate_config is not None:
        strategy, machines, zero_stage = accelerate_strategy(accelerate_config)
        where = f"--accelerate-config {Path(accelerate_config).name} ({strategy})"
    if strategy in ("FSDP", "DEEPSPEED") and not gpus:
        raise LaunchError(
            f"{where} needs CUDA GPUs and none is visible: accelerate applies FSDP and DeepSpeed on GPUs only "
            "(on CPU an FSDP config silently trains as plain DDP). Leave out --accelerate-config to train with DDP "
            "over gloo on this machine; see docs/DISTRIBUTED.md")
    if cfg.adapter.method == "qlora" and (strategy == "FSDP" or zero_stage == 3):
        raise LaunchError(
            f"adapter.method=qlora: {where} shards the model, and medtune loads QLoRA's 4-bit model whole onto each "
            "process's GPU; use --nproc without --accelerate-config (DDP) or deepspeed_zero2.yaml, which keep one "
            "copy per GPU")
    if strategy == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"{where} needs DeepSpeed, which is not installed: pip install deepspeed")
    if nproc % machines:
        raise LaunchError(f"--nproc {nproc}: {where} has num_machines={machines}, and --nproc counts the processes "
                          f"of all machines together; use a multiple of {machines}")
    per_machine = nproc // machines
    if gpus and per_machine > gpus:
        raise LaunchError(
            f"--nproc {nproc}: {per_machine} processes on this machine but {gpus} GPU(s) visible; each process trains "
            "on a GPU of its own, so use at most one process per GPU")


def _launcher(name: str) -> list[str]:
    """The launcher executable next to this Python, else on PATH, else run as a module.

    Running ``python -m torch.distributed.run`` (what ``torchrun`` is) keeps the children on the
    same interpreter and virtual environment even when the venv's bin/ is not on PATH.
    """
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    module = {"torchrun": "torch.distributed.run", "accelerate": "accelerate.commands.launch"}[name]
    return [sys.executable, "-m", module]


def launch_command(
    config_path: str | os.PathLike,
    overrides: Sequence[str],
    nproc: int,
    accelerate_config: str | os.PathLike | None = None,
    *,
    extra_train_args: Sequence[str] = (),
) -> list[str]:
    """The command line that starts ``nproc`` training processes on this machine.

    Args:
        config_path: The YAML recipe, as given to ``medtune train``.
        overrides: ``key=value`` overrides passed on unchanged to every process.
        nproc: Processes to start (one per GPU; on CPU, each takes a share of the cores).
        accelerate_config: An accelerate config file (e.g. ``configs/accelerate/deepspeed_zero3.yaml``);
            when given, ``accelerate launch`` is used and that file decides the strategy, with
            ``--num_processes`` set from ``nproc``. Without it, ``torchrun --standalone`` gives
            plain DDP, which needs nothing but torch.
        extra_train_args: Further ``medtune train`` flags for every child (e.g. ``--no-resume``).

    Returns:
        The argument list for ``subprocess``; it never contains ``--nproc``, so children train.

    Raises:
        ValueError: ``nproc`` is below 1.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    child = ["-m", "medtune.cli", "train", str(config_path), *overrides, *extra_train_args]
    if accelerate_config is not None:
        # --num_processes on the command line wins over the file's value, so one file serves any count.
        return [*_launcher("accelerate"), "launch", "--config_file", str(accelerate_config),
                "--num_processes", str(nproc), *child]
    # --standalone: a rendezvous on a free local port, so two runs on one machine don't collide.
    return [*_launcher("torchrun"), "--standalone", "--nproc-per-node", str(nproc), *child]


def launch_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the launcher: ``base`` (default: this process's) plus the CPU switch.

    Without CUDA, ``ACCELERATE_USE_CPU=true`` is what makes the torchrun children form one gloo
    DDP group instead of training independently (docs/STACK.md §5).
    """
    env = dict(os.environ if base is None else base)
    if not _gpu_count():
        env["ACCELERATE_USE_CPU"] = "true"
    env.setdefault("PYTHONUNBUFFERED", "1")  # children's logs reach the terminal as they happen
    return env


def run_distributed(
    config_path: str | os.PathLike,
    overrides: Sequence[str],
    nproc: int,
    accelerate_config: str | os.PathLike | None = None,
    *,
    extra_train_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> int:
    """Launch ``nproc`` training processes, stream their output, return the launcher's exit code.

    Output is inherited rather than captured, so progress appears live and a long run cannot
    fill a pipe buffer. The exit code is non-zero if any process failed (torchrun and accelerate
    stop the others and report the failure).

    Args:
        config_path: The YAML recipe.
        overrides: ``key=value`` overrides.
        nproc: Processes to start.
        accelerate_config: Optional accelerate config file (see `launch_command`).
        extra_train_args: Further ``medtune train`` flags for every child.
        env: Base environment (default: this process's); the CPU switch is added to it.
    """
    from medtune.config import load_config
    from medtune.train.common import discard_unfinished_run_dir

    run_dir = Path(load_config(config_path, list(overrides)).train.output_dir)
    existed = run_dir.exists()
    cmd = launch_command(config_path, overrides, nproc, accelerate_config, extra_train_args=extra_train_args)
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        rc = subprocess.run(cmd, env=launch_env(env), check=False).returncode
    except KeyboardInterrupt:  # the launcher got the same Ctrl-C and stops its children
        return 130
    if rc and not existed:
        # Rank 0 removes a failed run's half-made directory, but another rank may create it again
        # a moment later (each process makes it on start): here, once all have exited, it is final.
        discard_unfinished_run_dir(run_dir)
    return rc
