"""The one resolver: what a command runs (a run directory, or a model + adapter) and may do with it.

Predict, evaluate, chat, the server, the web demo and export all go through ``resolve_source``
(and ``load_backend`` for the weights), so they load models the same way, use the run's saved
template, and refuse the same things with the same words. ``resolve_source`` is the cheap first
half (paths, template, run kind, provenance, refusals; no weights read), so a command can refuse
before loading anything. ``resolve_run`` reads what a run directory holds (``config.yaml``,
``template.yaml``, the adapter chain) and refuses nothing but an unfinished run.

What each kind of run can do (``Resolved.run_kind``):

===================  ==========================  =======================================================
run kind             template.yaml               commands
===================  ==========================  =======================================================
sft-exam, rl-exam    exam template               everything; chat/serve/webui also chat freely
sft-conversation,    conversation format         predict on conversations; chat, serve, webui render
dpo, rl-conversation                             turns in the run's format; exam-only commands refused
pt                   none (raw text)             chat/serve continue text as it is; exam or
                                                 conversation commands refused (no prompt template:
                                                 ``--model RUN --template NAME`` tries one zero-shot)
rm                   conversation format         no generation, no log-likelihood: a reward model
                                                 scores text; use it as ``rl.reward_model``, or export
===================  ==========================  =======================================================

Every kind exports, and every kind but rm can be the ``model.name_or_path`` of a next stage
(``medtune.models.load_for_training`` refuses an rm there, and prefix/prompt adapters that would
have to be merged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtune.templates import (
    ConversationTemplate,
    ExamTemplate,
    conversation_template,
    get_template,
    load_template_file,
)

#: What a command asks of a run: generate text, score exam options by log-likelihood, or export
#: its weights (every kind of run exports).
USES = ("generate", "loglik", "export")


@dataclass(frozen=True)
class RawText:
    """The "template" of a pt run: none. Prompts are plain text, continued as they are."""

    name: str = "raw-text"
    version: int = 1
    kind: str = "text"
    description: str = "continued pretraining on raw text: no prompt template; prompts are continued as they are"


Template = ExamTemplate | ConversationTemplate | RawText

#: What ``medtune export`` writes beside the weights (here, where exports are read back).
EXPORT_INFO = "medtune_export.json"


@dataclass
class RunArtifacts:
    """What a training run directory holds, read from its files (no weights loaded).

    ``template`` is the run's ``template.yaml``: an exam template, a conversation format, or
    :class:`RawText` for a pt run (raw text has no prompt template).
    """

    model_path: str
    adapter_path: str | None
    template: Template
    trust_remote_code: bool
    dtype: str
    merge_first: list[str] = field(default_factory=list)  # earlier stages' adapters, merged in order
    stage: str = "sft"  # pt | sft | rm | dpo | rl (config.yaml)
    method: str = "lora"  # adapter.method (config.yaml)

    @property
    def data_kind(self) -> str:
        """What the run was trained on: ``exam``, ``conversation`` or ``text`` (pt)."""
        return self.template.kind

    @property
    def run_kind(self) -> str:
        """``pt``, ``rm``, ``dpo``, or ``sft``/``rl`` with the data kind (``sft-exam``, ``rl-conversation``)."""
        return self.stage if self.stage in ("pt", "rm", "dpo") else f"{self.stage}-{self.data_kind}"


def _read_template(run_dir: Path, stage: str) -> Template:
    """The run's ``template.yaml``; a pt run's placeholder (``kind: none``) becomes ``RawText``."""
    path = run_dir / "template.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no template.yaml (not a finished medtune run directory)")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if stage == "pt" or (isinstance(data, dict) and data.get("kind") in ("none", "text")):
        return RawText()
    return load_template_file(path)


def resolve_run(run_dir: str | Path) -> RunArtifacts:
    """Base model, adapter chain (or full model), saved template and kind of a run directory.

    Nothing is loaded and nothing is refused here beyond an unfinished run; what a command may do
    with the run is decided by :func:`resolve_source`.

    Raises:
        FileNotFoundError: No config.yaml, no template.yaml, or neither adapter/ nor model/.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    with open(cfg_path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh) or {}
    stage = cfg.get("stage", "sft")
    method = (cfg.get("adapter") or {}).get("method", "lora")
    template = _read_template(run_dir, stage)
    model = cfg["model"]
    trust, dtype = model.get("trust_remote_code", False), model.get("dtype", "auto")
    if (run_dir / "model").is_dir():
        return RunArtifacts(str(run_dir / "model"), None, template, trust, dtype, stage=stage, method=method)
    if (run_dir / "adapter").is_dir():
        from medtune.models import previous_run

        base, chain = previous_run(str(run_dir))
        # the run's own adapter stays separate (switchable); earlier stages' are merged first
        return RunArtifacts(base, chain[-1], template, trust, dtype, merge_first=chain[:-1], stage=stage,
                            method=method)
    raise FileNotFoundError(f"{run_dir}: training has not finished (no adapter/ or model/ folder)")


@dataclass
class Resolved:
    """What ``load_backend`` will load, decided without loading anything."""

    model_path: str
    adapter_path: str | None
    merge_first: list[str]  # earlier stages' adapters, merged in order before ``adapter_path``
    template: Template
    name: str
    dtype: str
    trust_remote_code: bool
    backend: str
    source: dict[str, Any] = field(default_factory=dict)  # provenance.model_source
    run_kind: str = "model"  # see the module docstring; "model" for --model (+ --adapter)

    @property
    def data_kind(self) -> str:
        """What prompts look like: ``exam``, ``conversation`` or ``text`` (raw continuation)."""
        return self.template.kind


@dataclass
class Loaded:
    """A ready backend, the template to build prompts with, and a display name."""

    backend: Any
    template: Template
    name: str
    model_path: str
    adapter_path: str | None
    source: dict[str, Any] = field(default_factory=dict)  # provenance.model_source: what was loaded
    run_kind: str = "model"


def reward_model_refusal(where: str, reason: str, use: str = "generate") -> str:
    """The one-line refusal for a reward model asked to generate (or to score exam options)."""
    extra = (", and it has no language-model head to score answer options with" if use == "loglik" else "")
    # a run directory can be exported; a model folder (e.g. an export) already loads that way
    load = (f"export it (medtune export {where} --out DIR) to load it with AutoModelForSequenceClassification"
            if (Path(where) / "config.yaml").exists() else "load it with AutoModelForSequenceClassification")
    return (f"{where} {reason}: a reward model scores text, it does not generate{extra}; use it as rl.reward_model "
            f"of an rl stage (rl.reward=model), or {load}")


def pt_refusal(where: str, kind: str, use: str = "generate") -> str:
    """The one-line refusal for a pt run asked for something that needs a prompt template."""
    task = ("score exam answers by log-likelihood" if use == "loglik"
            else {"exam": "answer exam questions", "conversation": "reply to conversations"}.get(kind, kind))
    example = "plain" if kind == "conversation" and use != "loglik" else "qa"
    return (f"{where} is a continued-pretraining run (stage pt): it was trained on raw text and has no prompt "
            f"template, so it has no trained way to {task}; train an sft stage on it (model.name_or_path={where}), "
            f"try it zero-shot with a template you choose (--model {where} --template {example}), or continue "
            "text with medtune chat/serve")


def kind_refusal(where: str, data_kind: str, kind: str) -> str:
    """The one-line refusal for a run trained on one kind of data asked about another."""
    return f"{where} was trained on {data_kind} data, but this data is {kind} data"


def _check_use(where: str, run_kind: str, data_kind: str, kind: str | None, use: str) -> None:
    """Refuse what a run of ``run_kind`` cannot do for a command of ``use`` on ``kind`` data."""
    if use == "export":
        return
    if run_kind == "rm":
        raise ValueError(reward_model_refusal(where, "is a reward model (stage rm)", use))
    if use == "loglik":
        kind = "exam"  # log-likelihood scoring ranks exam options
    if kind is None:
        return  # chat, serve, webui: the run decides how prompts are rendered
    if data_kind == "text":
        raise ValueError(pt_refusal(where, kind, use))
    if data_kind != kind:
        raise ValueError(kind_refusal(where, data_kind, kind))


def _adapter_task(adapter: str) -> str | None:
    """The peft ``task_type`` of an adapter folder (None when it has no readable config)."""
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
    except (OSError, ValueError):
        return None


def resolve_source(
    run: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    template: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    backend: str = "hf",
    kind: str | None = "exam",
    use: str = "generate",
) -> Resolved:
    """Model, adapters, template, run kind and provenance of ``run`` or ``model`` (+ ``adapter``); reads no weights.

    Args:
        run: A training run directory (model, adapter chain and template come from it).
        model: A base model folder or hub id, or a run directory whose weights are wanted with a
            template of the caller's choosing (e.g. a pt run tried zero-shot).
        adapter: A peft adapter folder to put on ``model``.
        template: With ``model``: an exam template (default qa) or, for ``kind="conversation"``,
            a conversation format (default plain). Not allowed with ``run``.
        dtype: ``auto`` uses the run's dtype.
        trust_remote_code: From the caller (the command line) only: a run trained with
            ``model.trust_remote_code: true`` is refused without it, never trusted because its
            ``config.yaml`` says so.
        backend: ``hf`` or ``vllm``.
        kind: The data the command feeds (``exam``/``conversation``), or None when the run
            decides how prompts are rendered (chat, serve, webui, export).
        use: ``generate``, ``loglik`` (scoring exam options) or ``export`` (any run kind).

    Raises:
        ValueError: Both or neither of run/model, a template with a run, a run that needs remote
            code without ``trust_remote_code``, a run that cannot serve this use (a reward model;
            a pt run for exam or conversation data; a run of the other data kind), an unknown
            backend or use. Each message is one line saying why and what to do instead.
        FileNotFoundError: ``run`` is not a finished run directory.
    """
    from medtune.inference.provenance import model_source
    from medtune.models import reward_model_reason

    if bool(run) == bool(model):
        raise ValueError("give either a run directory or a model path")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown backend {backend!r}; expected hf or vllm")
    if use not in USES:
        raise ValueError(f"unknown use {use!r}; expected one of {', '.join(USES)}")
    run_kind = "model"
    if run:
        if template:
            raise ValueError("a template conflicts with a run directory (the run's saved template is used)")
        art = resolve_run(run)
        model_path, adapter_path, tpl = art.model_path, art.adapter_path, art.template
        merge_first, run_kind = art.merge_first, art.run_kind
        _check_trust(run, art.trust_remote_code, trust_remote_code, model_path)
        _check_use(run, run_kind, art.data_kind, kind, use)
        dtype = art.dtype if dtype == "auto" else dtype
        name = Path(run).name
    else:
        reason = reward_model_reason(model)
        if reason is None and adapter and _adapter_task(adapter) == "SEQ_CLS":
            model, reason = adapter, "is a reward-model adapter (peft task SEQ_CLS)"
        if reason:
            raise ValueError(reward_model_refusal(model, reason, use))
        exported = None if template else _exported_template(adapter or model, kind)
        if exported is not None:  # a medtune export keeps its run's template: the run's prompts, not a default's
            tpl = exported
        else:
            tpl = (conversation_template(template or "plain") if kind == "conversation"
                   else get_template(template or "qa"))
        model_path, adapter_path, merge_first = model, adapter, []
        if (Path(model) / "config.yaml").exists():  # a run directory's weights, with the caller's template
            if adapter:
                raise ValueError(f"--adapter goes on a base model; {model} is a run directory (its adapters are "
                                 "applied already)")
            art = resolve_run(model)
            _check_trust(model, art.trust_remote_code, trust_remote_code, art.model_path)
            # as --run loads it: earlier stages merged, the run's own adapter (prefix/prompt too) on top
            model_path, adapter_path, merge_first = art.model_path, art.adapter_path, art.merge_first
            dtype = art.dtype if dtype == "auto" else dtype
        name = Path(model).name + (f"+{Path(adapter).name}" if adapter else "")
    if backend == "vllm" and merge_first:
        raise ValueError("vLLM serves one adapter on a base model; export this chained run first "
                         "(medtune export RUN --out DIR) and serve the export")
    source = model_source(model_path, adapter_path, merge_first, dtype=dtype, backend=backend, run=run)
    return Resolved(model_path, adapter_path, list(merge_first), tpl, name, dtype, trust_remote_code, backend,
                    source, run_kind)


def _exported_template(folder: str, kind: str | None) -> Template | None:
    """The ``template.yaml`` a ``medtune export`` folder carries, when it fits ``kind``; else ``None``.

    Without it, ``predict --model EXPORT`` prompted with the default template instead of the one the
    run was trained with (6 of 8 answers of an exported chat run changed).
    """
    path = Path(folder)
    if not (path / EXPORT_INFO).exists() or not (path / "template.yaml").exists():
        return None
    saved = _read_template(path, "sft")
    if isinstance(saved, RawText) or (kind is not None and saved.kind != kind):
        return None  # a pt export, or data of another kind: the caller's default applies, as for any model
    return saved


def _check_trust(where: str, wanted: bool, given: bool, model_path: str) -> None:
    """A run directory may come from someone else: it may choose a template, never run code."""
    if wanted and not given:
        raise ValueError(
            f"{where} was trained with model.trust_remote_code=true: loading it runs Python code from "
            f"{model_path}; pass --trust-remote-code if you trust that code")


def load_backend(
    run: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    template: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    backend: str = "hf",
    kind: str | None = "exam",
    resolved: Resolved | None = None,
    use: str = "generate",
) -> Loaded:
    """Load from ``run`` (model, adapter and template saved by training) or from ``model``.

    The arguments are those of :func:`resolve_source`; pass ``resolved`` instead when it was
    already called (e.g. to refuse before loading).
    """
    r = resolved or resolve_source(run, model, adapter, template, dtype, trust_remote_code, backend, kind, use)
    if r.backend == "vllm":
        from medtune.inference.vllm import VLLMBackend

        engine = VLLMBackend(r.model_path, r.adapter_path, dtype=r.dtype, trust_remote_code=r.trust_remote_code)
    else:
        from medtune.inference.hf import HFBackend
        from medtune.inference.lm_head import use_decoding_lm_head
        from medtune.models import load_for_inference

        m, tok = load_for_inference(r.model_path, r.adapter_path, dtype=r.dtype,
                                    trust_remote_code=r.trust_remote_code, merge_first=r.merge_first)
        use_decoding_lm_head(m)  # faster decoding on CPUs at large vocabularies
        engine = HFBackend(m, tok)
    return Loaded(engine, r.template, r.name, r.model_path, r.adapter_path, r.source, r.run_kind)
