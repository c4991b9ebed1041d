"""Resolve what to run (a run directory or a model + adapter) into a backend and a template.

Predict, evaluate, chat, the server and the web demo all go through ``load_backend``, so they
load models the same way and use the run's saved template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medtune.templates import ConversationTemplate, ExamTemplate, conversation_template, get_template


@dataclass
class Loaded:
    """A ready backend, the template to build exam prompts with, and a display name."""

    backend: Any
    template: ExamTemplate | ConversationTemplate
    name: str
    model_path: str
    adapter_path: str | None


def load_backend(
    run: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    template: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    backend: str = "hf",
    kind: str = "exam",
) -> Loaded:
    """Load from ``run`` (model, adapter and template saved by training) or from ``model``.

    With ``model``, ``template`` names an exam template (``kind="exam"``, default qa) or a
    conversation format (``kind="conversation"``, default plain).
    """
    from pathlib import Path

    from medtune.inference.predict import resolve_run

    if bool(run) == bool(model):
        raise ValueError("give either a run directory or a model path")
    if run:
        if template:
            raise ValueError("a template conflicts with a run directory (the run's saved template is used)")
        art = resolve_run(run)
        model_path, adapter_path, tpl = art.model_path, art.adapter_path, art.template
        merge_first = art.merge_first
        dtype, trust_remote_code = art.dtype, art.trust_remote_code
        name = Path(run).name
        if tpl.kind != kind:
            raise ValueError(f"{run} was trained on {tpl.kind} data, but this data is {kind} data")
    else:
        tpl = (conversation_template(template or "plain") if kind == "conversation"
               else get_template(template or "qa"))
        model_path, adapter_path, merge_first = model, adapter, []
        name = Path(model).name + (f"+{Path(adapter).name}" if adapter else "")
    if backend == "vllm":
        from medtune.inference.vllm import VLLMBackend

        if merge_first:
            raise ValueError("vLLM serves one adapter on a base model; export this chained run first "
                             "(medtune export RUN --out DIR) and serve the export")
        engine = VLLMBackend(model_path, adapter_path, dtype=dtype, trust_remote_code=trust_remote_code)
    elif backend == "hf":
        from medtune.inference.hf import HFBackend
        from medtune.models import load_for_inference

        m, tok = load_for_inference(model_path, adapter_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                    merge_first=merge_first)
        engine = HFBackend(m, tok)
    else:
        raise ValueError(f"unknown backend {backend!r}; expected hf or vllm")
    return Loaded(engine, tpl, name, model_path, adapter_path)
