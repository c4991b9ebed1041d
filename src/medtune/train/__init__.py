"""Training stages on top of transformers/TRL trainers; shared run-directory steps in ``common``."""

from __future__ import annotations

import logging
import os
from importlib import import_module
from pathlib import Path

from medtune.config import RunConfig

log = logging.getLogger(__name__)

STAGES = {"pt": "medtune.train.pt", "sft": "medtune.train.sft", "rm": "medtune.train.rm",
          "dpo": "medtune.train.dpo", "rl": "medtune.train.rl"}


def run(cfg: RunConfig, resume: bool = True) -> Path:
    """Run the stage named by ``cfg.stage`` and return its run directory.

    If the stage fails and the run directory is one it created, the directory is removed unless
    it holds a complete checkpoint: a half-made directory (config.yaml but no result) would
    otherwise block a corrected rerun ("holds a run with a different config") while holding
    nothing worth keeping. Stages validate settings and data before creating the directory;
    this catches what can only fail later (loading the model, a run diverging before its first
    checkpoint).
    """
    from medtune.train import common

    run_dir = Path(cfg.train.output_dir)
    existed = run_dir.exists()
    common.use_local_gpu()  # before a stage loads its model: each process on its own GPU
    try:
        return import_module(STAGES[cfg.stage]).run(cfg, resume=resume)
    except Exception:
        # one process cleans up; in a multi-process run the others may still be writing
        if not existed and int(os.environ.get("RANK", "0")) == 0 and common.discard_unfinished_run_dir(run_dir):
            log.info("removed %s: the run failed before saving a checkpoint", run_dir)
        raise
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down the multi-process group before the interpreter exits.

    Left to interpreter shutdown, gloo's threads can still be running when the process ends, and
    a rank then aborts with "terminate called without an active exception" (SIGABRT) after a run
    that finished: torchrun reports the whole run as failed. Seen once in a 2-process test run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
