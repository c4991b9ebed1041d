"""What produced a prediction file: model, adapters, run, template, generation settings.

A predictions file is resumable (a rerun skips the ids already written), so it must never mix
outputs of different producers: a before/after comparison would otherwise compare a model with
itself. ``predict`` writes the description built here beside the file (``NAME.meta.json``), stamps
every line with its short key, and refuses to resume when anything differs.

Identity is cheap and conservative:

* an adapter (small) is identified by the SHA-256 of its weights and config;
* a base model (possibly many GB) by its path, the SHA-256 of ``config.json``, and the name,
  size and modification time of each weight file — copying or rebuilding the folder counts as a
  different model, which at worst asks for ``--overwrite`` when nothing really changed;
* a hub id by the id itself (no network is used);
* a run directory by its path and the optimiser step it finished at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def model_identity(name_or_path: str) -> dict[str, Any]:
    """``{"path", "fingerprint"}`` of a base model folder (see the module docstring), or ``{"id"}``."""
    path = Path(name_or_path)
    if not path.is_dir():
        return {"id": name_or_path}
    files = []
    for item in sorted(path.iterdir()):
        if item.suffix in _WEIGHT_SUFFIXES:
            stat = item.stat()
            files.append([item.name, stat.st_size, stat.st_mtime_ns])
    config = path / "config.json"
    listing = {"config": file_sha256(config) if config.exists() else None, "weights": files}
    return {"path": str(path.resolve()), "fingerprint": _short(listing)}


def adapter_identity(path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256"}`` of a peft adapter folder: its config and weight files' bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    for item in sorted(path.iterdir()):
        if item.name == "adapter_config.json" or item.name.startswith("adapter_model"):
            digest.update(item.name.encode())
            digest.update(file_sha256(item).encode())
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def run_identity(run_dir: str | Path) -> dict[str, Any]:
    """``{"dir", "global_step"}`` of a finished run directory."""
    run_dir = Path(run_dir)
    step = None
    for name in ("train_results.json", "trainer_state.json"):
        if (run_dir / name).exists():
            step = json.loads((run_dir / name).read_text(encoding="utf-8")).get("global_step")
            break
    return {"dir": str(run_dir.resolve()), "global_step": step}


def model_source(model_path: str, adapter_path: str | None = None, merge_first: list[str] | tuple[str, ...] = (),
                 dtype: str = "auto", backend: str = "hf", run: str | Path | None = None) -> dict[str, Any]:
    """Everything about the model side of a prediction: base, adapters in order, run, dtype, backend.

    ``model_path`` may be a run directory itself (a chain), which is resolved to its base first.
    """
    from medtune.models import previous_run

    chained = previous_run(model_path)
    base, earlier = chained if chained else (model_path, [])
    adapters = [*earlier, *merge_first, *([adapter_path] if adapter_path else [])]
    if backend == "hf":  # what "auto" means on this machine, so --model and --run compare like for like
        from medtune.models import resolve_dtype

        dtype = str(resolve_dtype(dtype)).removeprefix("torch.")
    source: dict[str, Any] = {
        "model": model_identity(base),
        "adapters": [adapter_identity(a) for a in adapters],
        "dtype": dtype,
        "backend": backend,
    }
    if run is not None:
        source["run"] = run_identity(run)
    return source


def template_identity(template: Any) -> dict[str, Any]:
    """``{"name", "version", "sha256"}`` of an exam template or conversation format."""
    data = dataclasses.asdict(template)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return {"name": template.name, "version": getattr(template, "version", None), "sha256": digest}


def prediction_source(model: dict[str, Any] | None, template: Any, params: Any, kind: str) -> dict[str, Any]:
    """The full description stored in ``NAME.meta.json``; ``key`` is stamped on every line.

    Args:
        model: :func:`model_source` (None when the caller passes a bare backend, e.g. a test's
            fake: then only its name is recorded).
        template: The template the prompts are rendered with.
        params: The ``GenerationParams``.
        kind: ``exam`` or ``conversation``.
    """
    source = {
        **(model or {}),
        "template": template_identity(template),
        "generation": dataclasses.asdict(params),
        "kind": kind,
    }
    source = json.loads(json.dumps(source, ensure_ascii=False))  # as it reads back from the file (tuples → lists)
    return {**source, "key": _short(source)}


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"path: old → new"`` for every leaf that differs between two descriptions (``key`` ignored)."""
    out = []
    for name in sorted(set(old) | set(new)):
        if name == "key" and not prefix:
            continue
        a, b = old.get(name, "(absent)"), new.get(name, "(absent)")
        where = f"{prefix}{name}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, where + ".")
        elif a != b:
            out.append(f"{where}: {_show(a)} → {_show(b)}")
    return out


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
