"""Batch prediction over exam records, appended line by line so an interrupted run resumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from medtune.inference.base import Backend, GenerationParams
from medtune.io import JsonlAppender, read_jsonl_tolerant
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
    """One line of predictions.jsonl."""
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


def predict(
    records: list[ExamRecord],
    backend: Backend,
    template: ExamTemplate | str,
    out_path: str | Path,
    params: GenerationParams | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate an output for every record not yet in ``out_path`` and append it there.

    Items are batched by prompt length (less padding); each finished batch is flushed to disk, so
    a crash loses at most one batch and a rerun skips every id already written.
    """
    template = get_template(template) if isinstance(template, str) else template
    params = params or GenerationParams()
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("record ids are not unique; predictions could not be resumed safely")
    done = {row["id"] for row in read_jsonl_tolerant(out_path)}
    todo = [r for r in records if r.id not in done]
    prompts = {r.id: template.render_prompt(r, tokenizer) for r in todo}
    todo.sort(key=lambda r: len(prompts[r.id]))
    with JsonlAppender(out_path) as sink, tqdm(
        total=len(records), initial=len(records) - len(todo), desc="predict", unit="q", disable=not progress
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            outputs = backend.generate(
                [prompts[r.id] for r in batch], params, add_special_tokens=not template.chat
            )
            for rec, output in zip(batch, outputs, strict=True):
                sink.write(prediction_row(rec, template, prompts[rec.id], output))
            bar.update(len(batch))
    return {"total": len(records), "already_done": len(records) - len(todo), "predicted": len(todo)}


def predict_conversations(
    records: list,
    backend: Backend,
    template: ConversationTemplate,
    out_path: str | Path,
    params: GenerationParams | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate the final assistant reply of each conversation, resumably (like ``predict``).

    Each line: ``id, messages`` (the prompt messages), ``reference`` (the record's reply, if any),
    ``meta``, ``template``, ``prompt`` and ``output``.
    """
    from medtune.data.conversations import conversation_prompt

    params = params or GenerationParams()
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("record ids are not unique; predictions could not be resumed safely")
    done = {row["id"] for row in read_jsonl_tolerant(out_path)}
    todo = [r for r in records if r.id not in done]
    prompts = {r.id: conversation_prompt(r.prompt_messages, template.name, tokenizer) for r in todo}
    todo.sort(key=lambda r: len(prompts[r.id][0]))
    special = template.name == "plain"
    with JsonlAppender(out_path) as sink, tqdm(
        total=len(records), initial=len(records) - len(todo), desc="predict", unit="item", disable=not progress
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            outputs = backend.generate([prompts[r.id][0] for r in batch], params, add_special_tokens=special)
            for rec, output in zip(batch, outputs, strict=True):
                sink.write({"id": rec.id, "messages": rec.prompt_messages, "reference": rec.reply,
                            "meta": rec.meta, "template": template.name, "prompt": prompts[rec.id][0],
                            "output": output})
            bar.update(len(batch))
    return {"total": len(records), "already_done": len(records) - len(todo), "predicted": len(todo)}
