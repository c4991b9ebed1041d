"""Every module imports with only the base dependencies (no optional backend needed)."""

from __future__ import annotations

import importlib
import pkgutil

import medtune


def test_import_every_module():
    names = [m.name for m in pkgutil.walk_packages(medtune.__path__, "medtune.")]
    assert "medtune.cli" in names and "medtune.evaluation.metrics" in names
    for name in names:
        importlib.import_module(name)
