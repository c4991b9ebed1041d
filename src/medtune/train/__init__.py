"""Training stages on top of transformers/TRL trainers; shared run-directory steps in ``common``."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from medtune.config import RunConfig

STAGES = {"pt": "medtune.train.pt", "sft": "medtune.train.sft", "rm": "medtune.train.rm",
          "dpo": "medtune.train.dpo", "rl": "medtune.train.rl"}


def run(cfg: RunConfig, resume: bool = True) -> Path:
    """Run the stage named by ``cfg.stage`` and return its run directory."""
    return import_module(STAGES[cfg.stage]).run(cfg, resume=resume)
