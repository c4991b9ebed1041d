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
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def _cuda_available() -> bool:
    """Whether the children will see a GPU (torch is imported lazily: the CLI starts fast)."""
    import torch

    return torch.cuda.is_available()


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
    if not _cuda_available():
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
    cmd = launch_command(config_path, overrides, nproc, accelerate_config, extra_train_args=extra_train_args)
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        return subprocess.run(cmd, env=launch_env(env), check=False).returncode
    except KeyboardInterrupt:  # the launcher got the same Ctrl-C and stops its children
        return 130
