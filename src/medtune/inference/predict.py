"""Batch prediction, appended line by line so an interrupted run resumes — only as itself.

A predictions file records what produced it (``NAME.meta.json``: model, adapters and their
hashes, run and step, template and its hash, generation settings; see
:mod:`medtune.inference.provenance`) and every line carries that producer's key. A rerun into an
existing file continues it only when all of that is the same and every line already there has
the prompt the data and template give now; anything else is refused, naming the difference
(``overwrite=True`` / ``--overwrite`` starts over). ``NAME.lock`` keeps a second process out.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from medtune.inference.base import Backend, GenerationParams
from medtune.inference.provenance import differences, prediction_source
from medtune.io import JsonlAppender, atomic_write_json, read_jsonl_tolerant
from medtune.records import ExamRecord
from medtune.templates import ConversationTemplate, ExamTemplate, get_template, load_template_file

log = logging.getLogger(__name__)


@dataclass
class RunArtifacts:
    """What prediction needs from a training run directory."""

    model_path: str
    adapter_path: str | None
    template: ExamTemplate | ConversationTemplate
    trust_remote_code: bool
    dtype: str
    merge_first: list[str] = field(default_factory=list)  # earlier stages' adapters, merged in order


def resolve_run(run_dir: str | Path) -> RunArtifacts:
    """Base model, adapter (or full model) and saved template of a run directory."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    with open(cfg_path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    template = load_template_file(run_dir / "template.yaml")
    model = cfg["model"]
    trust, dtype = model.get("trust_remote_code", False), model.get("dtype", "auto")
    if (run_dir / "model").is_dir():
        return RunArtifacts(str(run_dir / "model"), None, template, trust, dtype)
    if (run_dir / "adapter").is_dir():
        from medtune.models import previous_run

        base, chain = previous_run(str(run_dir))
        # the run's own adapter stays separate (switchable); earlier stages' are merged first
        return RunArtifacts(base, chain[-1], template, trust, dtype, merge_first=chain[:-1])
    raise FileNotFoundError(f"{run_dir}: training has not finished (no adapter/ or model/ folder)")


def prediction_row(rec: ExamRecord, template: ExamTemplate, prompt: str, output: str) -> dict[str, Any]:
    """One line of predictions.jsonl (``predict`` adds ``source``, the producer's key)."""
    return {
        "id": rec.id,
        "question": rec.question,
        "options": rec.options,
        "answer": rec.answer,
        "explanation": rec.explanation,
        "annotations": rec.annotations,
        "template": template.name,
        "prompt": prompt,
        "output": output,
    }


class PredictionFileError(RuntimeError):
    """An existing predictions file cannot be continued (other producer, other data, in use)."""


def meta_path(out_path: str | Path) -> Path:
    """Where the description of a predictions file's producer lives: ``NAME.meta.json`` beside it."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.meta.json")


@contextlib.contextmanager
def _exclusive(out_path: Path) -> Iterator[None]:
    """Hold ``NAME.lock`` for the block; a second writer fails at once with a clear message.

    ``flock`` is released by the kernel when the process dies, so a crash never leaves a stale
    lock behind (the empty lock file itself stays; it is harmless).
    """
    import fcntl
    import os

    lock = out_path.with_name(f"{out_path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise PredictionFileError(
                f"{out_path} is being written by another process (pid {holder}, lock {lock}); "
                "wait for it to finish or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_AGAIN = "pass --overwrite to predict everything again, or choose another --out"


def _check_producer(out_path: Path, n_rows: int, source: dict[str, Any]) -> None:
    """Refuse to continue ``out_path`` (holding ``n_rows`` lines) unless ``source`` produced it."""
    meta = meta_path(out_path)
    if not meta.exists():
        raise PredictionFileError(
            f"{out_path} already has {n_rows} predictions but no {meta.name} saying what produced them "
            f"(an older medtune or another tool wrote it); {_AGAIN}")
    changed = differences(json.loads(meta.read_text(encoding="utf-8")), source)
    if changed:
        raise PredictionFileError(
            f"{out_path} was produced by something else, resuming it would mix two producers' outputs: "
            + "; ".join(changed) + f"; {_AGAIN}")


def check_resumable(out_path: str | Path, source: dict[str, Any], overwrite: bool = False) -> None:
    """Fail fast (before a model is loaded) when ``out_path`` could not be continued by ``source``.

    ``source`` is a :func:`medtune.inference.provenance.prediction_source`; ``predict`` checks
    again, line by line, once it runs.
    """
    rows = [] if overwrite else read_jsonl_tolerant(out_path)
    if rows:
        _check_producer(Path(out_path), len(rows), source)


def _resume_state(out_path: Path, source: dict[str, Any], prompts: dict[str, str],
                  overwrite: bool) -> set[str]:
    """Ids already predicted by this same producer; refuses anything else (see module docs)."""
    meta = meta_path(out_path)
    if overwrite:
        for path in (out_path, meta):
            path.unlink(missing_ok=True)
    rows = read_jsonl_tolerant(out_path)
    if not rows:
        atomic_write_json(meta, source)
        return set()
    _check_producer(out_path, len(rows), source)
    foreign = [i for i, row in enumerate(rows, start=1) if row.get("source") != source["key"]]
    if foreign:
        raise PredictionFileError(
            f"{out_path}: {len(foreign)} line(s) (first: line {foreign[0]}) were not written by the producer "
            f"{meta.name} describes; {_AGAIN}")
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=1):
        if row.get("id") in seen:
            raise PredictionFileError(f"{out_path}: id {row.get('id')!r} is on lines {seen[row['id']]} and {line}; "
                                      f"{_AGAIN}")
        seen[row.get("id")] = line
        expected = prompts.get(row.get("id"))
        if expected is not None and row.get("prompt") != expected:
            raise PredictionFileError(
                f"{out_path}, line {line}: id {row.get('id')!r} was predicted from a different prompt than "
                f"the data and template give now (the question or the template changed); {_AGAIN}")
    return set(seen)


def _unique_ids(records: list[Any]) -> None:
    positions: dict[str, list[int]] = {}
    for i, rec in enumerate(records, start=1):
        positions.setdefault(rec.id, []).append(i)
    repeated = {k: v for k, v in positions.items() if len(v) > 1}
    if repeated:
        shown = ", ".join(f"{k!r} (records {', '.join(map(str, v))})" for k, v in list(repeated.items())[:3])
        raise ValueError(f"{len(repeated)} id(s) occur more than once: {shown}; each id is predicted once and "
                         "matched back by id (predict --dedupe keeps the first of identical repeats)")


def _over_context(records: list[Any], prompts: dict[str, str], backend: Backend, params: GenerationParams,
                  add_special_tokens: bool) -> set[str]:
    """Ids whose prompt plus ``max_new_tokens`` exceeds the model's context; warns once, loudly.

    Such outputs are not refused (one long question should not stop a 7,000-question run), but
    they are marked ``over_context`` in their prediction line, and the warning says how many.
    """
    limit = getattr(backend, "context_length", None)
    if not limit:
        return set()
    extra = getattr(backend, "virtual_tokens", 0) + params.max_new_tokens
    need = {r.id: backend.count_tokens(prompts[r.id], add_special_tokens=add_special_tokens) + extra for r in records}
    over = {i for i, n in need.items() if n > limit}
    if over:
        first = max(over, key=need.__getitem__)
        log.warning("%d of %d prompts plus up to %d new tokens exceed the model's context of %d tokens (longest: id "
                    "%r, %d tokens); their outputs are unreliable and are marked over_context", len(over),
                    len(records), params.max_new_tokens, limit, first, need[first])
    return over


def _run(
    records: list[Any],
    prompts: dict[str, str],
    make_row: Any,
    backend: Backend,
    out_path: str | Path,
    params: GenerationParams,
    add_special_tokens: bool,
    source: dict[str, Any],
    batch_size: int,
    progress: bool,
    overwrite: bool,
    unit: str,
) -> dict[str, int]:
    """The resumable loop shared by exam and conversation prediction."""
    _unique_ids(records)
    out_path = Path(out_path)
    with _exclusive(out_path):
        done = _resume_state(out_path, source, prompts, overwrite)
        todo = sorted((r for r in records if r.id not in done), key=lambda r: len(prompts[r.id]))
        too_long = _over_context(todo, prompts, backend, params, add_special_tokens)
        with JsonlAppender(out_path) as sink, tqdm(
            total=len(records), initial=len(records) - len(todo), desc="predict", unit=unit, disable=not progress
        ) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                outputs = backend.generate([prompts[r.id] for r in batch], params,
                                           add_special_tokens=add_special_tokens)
                for rec, output in zip(batch, outputs, strict=True):
                    flag = {"over_context": True} if rec.id in too_long else {}
                    sink.write({**make_row(rec, output), "source": source["key"], **flag})
                bar.update(len(batch))
    return {"total": len(records), "already_done": len(records) - len(todo), "predicted": len(todo)}


def predict(
    records: list[ExamRecord],
    backend: Backend,
    template: ExamTemplate | str,
    out_path: str | Path,
    params: GenerationParams | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Generate an output for every record not yet in ``out_path`` and append it there.

    Items are batched by prompt length (less padding); each finished batch is flushed to disk, so
    a crash loses at most one batch and a rerun skips every id already written — but only when
    the rerun has the same producer: ``source`` (:func:`medtune.inference.provenance.model_source`;
    None records only the backend's name), the template and ``params`` are written to
    ``NAME.meta.json`` and any difference is refused (``overwrite=True`` starts over). A lock
    file stops a second process writing the same file.

    Raises:
        ValueError: Two records share an id.
        PredictionFileError: The existing file cannot be continued (the message says why).
    """
    template = get_template(template) if isinstance(template, str) else template
    params = params or GenerationParams()
    prompts = {r.id: template.render_prompt(r, tokenizer) for r in records}
    full = prediction_source(source or {"backend": getattr(backend, "name", type(backend).__name__)},
                             template, params, "exam")
    return _run(records, prompts, lambda rec, output: prediction_row(rec, template, prompts[rec.id], output),
                backend, out_path, params, not template.chat, full, batch_size, progress, overwrite, "q")


def predict_conversations(
    records: list,
    backend: Backend,
    template: ConversationTemplate,
    out_path: str | Path,
    params: GenerationParams | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Generate the final assistant reply of each conversation, resumably (like ``predict``).

    Each line: ``id, messages`` (the prompt messages), ``reference`` (the record's reply, if any),
    ``meta``, ``template``, ``prompt``, ``output`` and ``source``.
    """
    from medtune.data.conversations import conversation_prompt

    params = params or GenerationParams()
    prompts = {r.id: conversation_prompt(r.prompt_messages, template.name, tokenizer)[0] for r in records}
    full = prediction_source(source or {"backend": getattr(backend, "name", type(backend).__name__)},
                             template, params, "conversation")

    def row(rec: Any, output: str) -> dict[str, Any]:
        return {"id": rec.id, "messages": rec.prompt_messages, "reference": rec.reply, "meta": rec.meta,
                "template": template.name, "prompt": prompts[rec.id], "output": output}

    return _run(records, prompts, row, backend, out_path, params, template.name == "plain", full,
                batch_size, progress, overwrite, "item")
