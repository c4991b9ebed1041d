"""Named, versioned prompt templates for exam questions.

Templates are YAML data files in this folder (one per name). A training run saves the template it
used as ``template.yaml`` in the run directory; prediction, chat and the demo reload that file, so
the prompt a model is trained on and the prompt it is asked with are the same string.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medtune.records import ExamRecord


class TemplateError(ValueError):
    """A template file or name is invalid."""


@dataclass(frozen=True)
class ExamTemplate:
    """How an exam record becomes a prompt (model input) and a target (what it should write).

    ``answer_marker``/``explanation_marker`` tell evaluation where the answer and the explanation
    sit in a generated output; ``None`` means "at the start of the output" (the cue ends the prompt).
    """

    name: str
    version: int
    prompt: str
    target: str
    target_without_explanation: str
    description: str = ""
    option_format: str = "{letter}: {text}"
    option_separator: str = "\n"
    answer_marker: str | None = None
    explanation_marker: str | None = None
    chat: bool = False
    system: str | None = None
    kind: str = "exam"

    def render_options(self, options: dict[str, str]) -> str:
        """Render the options block (``A: text`` lines by default)."""
        return self.option_separator.join(
            self.option_format.format(letter=k, text=v) for k, v in options.items()
        )

    def render_prompt(self, record: ExamRecord, tokenizer: Any = None) -> str:
        """The model input for ``record``; chat templates need the tokenizer."""
        text = self.prompt.format(question=record.question, options=self.render_options(record.options))
        if not self.chat:
            return text
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"template '{self.name}' uses the model's chat template, but the tokenizer has none; "
                "choose a plain template such as 'qa'"
            )
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render_target(self, record: ExamRecord) -> str:
        """What the model should write for ``record`` (without the end-of-sequence token)."""
        fmt = self.target if record.explanation.strip() else self.target_without_explanation
        return fmt.format(
            letters=record.answer,
            answer_text=record.answer_text(),
            explanation=record.explanation.strip(),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for YAML."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write as YAML (atomically), e.g. ``RUN_DIR/template.yaml``."""
        from medtune.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), allow_unicode=True, sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ExamTemplate:
        """Validate and build; unknown or missing keys raise ``TemplateError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TemplateError(f"{source}: unknown template key(s) {unknown}")
        for key in ("name", "version", "prompt", "target", "target_without_explanation"):
            if key not in data:
                raise TemplateError(f"{source}: missing template key '{key}'")
        tpl = cls(**data)
        for key, fmt, fields in (
            ("prompt", tpl.prompt, {"question", "options"}),
            ("target", tpl.target, {"letters", "answer_text", "explanation"}),
            ("target_without_explanation", tpl.target_without_explanation, {"letters", "answer_text"}),
        ):
            try:
                fmt.format(**{f: "" for f in fields})
            except (KeyError, IndexError, ValueError) as exc:
                raise TemplateError(
                    f"{source}: template key '{key}' uses an unknown placeholder or bad braces: {exc}; "
                    f"allowed: {sorted(fields)}"
                ) from None
        return tpl

    @classmethod
    def load(cls, path: str | Path) -> ExamTemplate:
        """Load a template YAML file (e.g. a run's ``template.yaml``)."""
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        if not isinstance(data, dict):
            raise TemplateError(f"{path}: expected a mapping")
        return cls.from_dict(data, source=str(path))


def available() -> list[str]:
    """Names of the shipped templates."""
    folder = resources.files(__package__)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def get_template(name_or_path: str | Path) -> ExamTemplate:
    """A shipped template by name, or a template YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return ExamTemplate.load(path)
    name = str(name_or_path)
    if name not in available():
        raise TemplateError(f"unknown template '{name}'; available: {', '.join(available())}")
    with resources.as_file(resources.files(__package__) / f"{name}.yaml") as p:
        return ExamTemplate.load(p)


@dataclass(frozen=True)
class ConversationTemplate:
    """How a conversation becomes tokens: ``plain`` (no markup) or ``chat`` (the model's template).

    See ``medtune.data.conversations`` for the exact rendering.
    """

    name: str = "plain"
    version: int = 1
    kind: str = "conversation"
    description: str = ""

    def save(self, path: str | Path) -> None:
        """Write as YAML (atomically), e.g. ``RUN_DIR/template.yaml``."""
        from medtune.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(self), allow_unicode=True, sort_keys=False))


CONVERSATION_FORMATS = {
    "plain": "no chat markup: single turn = prompt then reply; multi-turn = 用户：/助手： transcript",
    "chat": "the model's own chat template (tokenizer.chat_template)",
}


def conversation_template(name: str) -> ConversationTemplate:
    """The conversation format ``name`` (plain or chat)."""
    if name not in CONVERSATION_FORMATS:
        raise TemplateError(f"unknown conversation format '{name}'; available: {', '.join(CONVERSATION_FORMATS)}")
    return ConversationTemplate(name=name, description=CONVERSATION_FORMATS[name])


def load_template_file(path: str | Path) -> ExamTemplate | ConversationTemplate:
    """A run's ``template.yaml``: an exam template or a conversation format."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if isinstance(data, dict) and data.get("kind") == "conversation":
        return conversation_template(str(data.get("name")))
    return ExamTemplate.load(path)
