"""Resolve what to run (a run directory or a model + adapter) into a backend and a template.

Predict, evaluate, chat, the server and the web demo all go through ``load_backend``, so they
load models the same way and use the run's saved template. ``resolve_source`` is its cheap first
half (paths, template, provenance, refusals; no weights read), so a command can refuse early.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.templates import ConversationTemplate, ExamTemplate, conversation_template, get_template


@dataclass
class Resolved:
    """What ``load_backend`` will load, decided without loading anything."""

    model_path: str
    adapter_path: str | None
    merge_first: list[str]  # earlier stages' adapters, merged in order before ``adapter_path``
    template: ExamTemplate | ConversationTemplate
    name: str
    dtype: str
    trust_remote_code: bool
    backend: str
    source: dict[str, Any] = field(default_factory=dict)  # provenance.model_source


@dataclass
class Loaded:
    """A ready backend, the template to build exam prompts with, and a display name."""

    backend: Any
    template: ExamTemplate | ConversationTemplate
    name: str
    model_path: str
    adapter_path: str | None
    source: dict[str, Any] = field(default_factory=dict)  # provenance.model_source: what was loaded


def resolve_source(
    run: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    template: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    backend: str = "hf",
    kind: str = "exam",
) -> Resolved:
    """Model, adapters, template and provenance of ``run`` or ``model`` (+ ``adapter``); reads no weights.

    With ``model``, ``template`` names an exam template (``kind="exam"``, default qa) or a
    conversation format (``kind="conversation"``, default plain).

    ``trust_remote_code`` comes from the caller (the command line) only: a run trained with
    ``model.trust_remote_code: true`` is refused without it, never trusted because its
    ``config.yaml`` says so. ``dtype="auto"`` uses the run's dtype.

    Raises:
        ValueError: Both or neither of run/model, a template with a run, a run that needs remote
            code without ``trust_remote_code``, a run of the other data kind, an unknown backend.
        FileNotFoundError: ``run`` is not a finished run directory.
    """
    from medtune.inference.predict import resolve_run
    from medtune.inference.provenance import model_source

    if bool(run) == bool(model):
        raise ValueError("give either a run directory or a model path")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown backend {backend!r}; expected hf or vllm")
    if run:
        if template:
            raise ValueError("a template conflicts with a run directory (the run's saved template is used)")
        art = resolve_run(run)
        model_path, adapter_path, tpl = art.model_path, art.adapter_path, art.template
        merge_first = art.merge_first
        if art.trust_remote_code and not trust_remote_code:
            # A run directory may come from someone else: it may choose a template, never run code.
            raise ValueError(
                f"{run} was trained with model.trust_remote_code=true: loading it runs Python code from "
                f"{model_path}; pass --trust-remote-code if you trust that code")
        dtype = art.dtype if dtype == "auto" else dtype
        name = Path(run).name
        if tpl.kind != kind:
            raise ValueError(f"{run} was trained on {tpl.kind} data, but this data is {kind} data")
    else:
        tpl = (conversation_template(template or "plain") if kind == "conversation"
               else get_template(template or "qa"))
        model_path, adapter_path, merge_first = model, adapter, []
        name = Path(model).name + (f"+{Path(adapter).name}" if adapter else "")
    if backend == "vllm" and merge_first:
        raise ValueError("vLLM serves one adapter on a base model; export this chained run first "
                         "(medtune export RUN --out DIR) and serve the export")
    source = model_source(model_path, adapter_path, merge_first, dtype=dtype, backend=backend, run=run)
    return Resolved(model_path, adapter_path, list(merge_first), tpl, name, dtype, trust_remote_code, backend,
                    source)


def load_backend(
    run: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    template: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    backend: str = "hf",
    kind: str = "exam",
    resolved: Resolved | None = None,
) -> Loaded:
    """Load from ``run`` (model, adapter and template saved by training) or from ``model``.

    The arguments are those of :func:`resolve_source`; pass ``resolved`` instead when it was
    already called (e.g. to refuse before loading).
    """
    r = resolved or resolve_source(run, model, adapter, template, dtype, trust_remote_code, backend, kind)
    if r.backend == "vllm":
        from medtune.inference.vllm import VLLMBackend

        engine = VLLMBackend(r.model_path, r.adapter_path, dtype=r.dtype, trust_remote_code=r.trust_remote_code)
    else:
        from medtune.inference.hf import HFBackend
        from medtune.models import load_for_inference

        m, tok = load_for_inference(r.model_path, r.adapter_path, dtype=r.dtype,
                                    trust_remote_code=r.trust_remote_code, merge_first=r.merge_first)
        engine = HFBackend(m, tok)
    return Loaded(engine, r.template, r.name, r.model_path, r.adapter_path, r.source)
