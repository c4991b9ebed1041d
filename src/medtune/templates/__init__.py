"""Named, versioned prompt templates: exam questions and conversations.

Templates are YAML data files: exam templates in this folder (one per name), conversation templates
in ``conversation/``. A training run saves the template it used as ``template.yaml`` in the run
directory; prediction, chat and the demo reload that file (``load_template_file``), so the prompt a
model is trained on and the prompt it is asked with are the same string.
"""

from __future__ import annotations

import dataclasses
import functools
import string
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


def available(kind: str = "exam") -> list[str]:
    """Names of the shipped templates of ``kind`` (``exam`` or ``conversation``)."""
    if kind not in ("exam", "conversation"):
        raise TemplateError(f"unknown template kind {kind!r}; expected exam or conversation")
    return list(_shipped_names(kind))


@functools.cache
def _shipped_names(kind: str) -> tuple[str, ...]:
    # cached: every conversation rendered by name looks its template up here
    folder = resources.files(__package__)
    if kind == "conversation":
        folder = folder / _CONVERSATION_DIR
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


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


# ---- conversation templates ---------------------------------------------------------------------

_CONVERSATION_DIR = "conversation"

# Rendering key → (placeholders it may use, placeholders it must use).
_CONVERSATION_PLACEHOLDERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "system_format": (frozenset({"system"}), frozenset({"system"})),
    "instruction_format": (frozenset({"instruction", "user"}), frozenset({"instruction", "user"})),
    "user_format": (frozenset({"user"}), frozenset({"user"})),
    "multi_turn_user_format": (frozenset({"user"}), frozenset({"user"})),
    "assistant_format": (frozenset({"reply"}), frozenset({"reply"})),
}
# Keys only the markup-free renderer reads: with ``chat: true`` the model's chat template writes
# the turns, so a value here would be silently ignored; it is refused instead.
_MARKUP_KEYS = ("system_format", "user_format", "multi_turn_user_format", "assistant_format", "turn_separator")
# What a run's template.yaml held before conversation templates had rendering fields.
_LEGACY_KEYS = frozenset({"name", "version", "kind", "description"})


@dataclass(frozen=True)
class ConversationTemplate:
    """How a conversation (system, user and assistant messages) becomes the text a model sees.

    Two renderers, chosen by ``chat``:

    - ``chat: false`` — this template's own markup: the system text written with
      ``system_format``; each user message with ``user_format`` when the conversation has one user
      message, with ``multi_turn_user_format`` when it has several (``None``: ``user_format``
      too); each reply with ``assistant_format`` followed by the tokenizer's EOS token (trained on,
      so the model learns to stop); ``turn_separator`` before every user message but the first.
    - ``chat: true`` — the model's own chat template (``tokenizer.chat_template``) writes the turns.

    Both first put ``system`` as the system message when the conversation has none of its own,
    and write ``instruction`` (the user's own task text) into the first user message with
    ``instruction_format``. The defaults are the shipped ``plain`` template.
    ``medtune.data.conversations`` turns a template into exact token ids and loss masks.
    """

    name: str = "plain"
    version: int = 1
    kind: str = "conversation"
    description: str = ""
    chat: bool = False
    system: str | None = None
    instruction: str | None = None
    instruction_format: str = "{instruction}\n{user}"
    system_format: str = "{system}\n"
    user_format: str = "{user}"
    multi_turn_user_format: str | None = "用户：{user}\n助手："
    assistant_format: str = "{reply}"
    turn_separator: str = "\n"

    def apply(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """``messages`` with this template's system text and instruction added (copies; input untouched).

        A conversation's own system message wins over ``system``: it is part of the data.
        """
        out = [dict(m) for m in messages]
        if self.instruction:
            first_user = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
            if first_user is not None:
                out[first_user]["content"] = self.instruction_format.format(
                    instruction=self.instruction, user=out[first_user]["content"])
        if self.system and not (out and out[0]["role"] == "system"):
            out.insert(0, {"role": "system", "content": self.system})
        return out

    @property
    def reply_end(self) -> str:
        """Text this template writes after every reply, before EOS (e.g. a newline and ``### 结束``); ``""`` for none."""
        return self.assistant_format.format(reply="")

    def clean_output(self, text: str) -> str:
        """A generated reply without the template's end marker and whatever follows it.

        The marker is trained as part of each reply (so the model learns where a reply ends), but
        it is markup, not answer: metrics and users should see the text before it.
        """
        end = self.reply_end
        if not end.strip():
            return text
        cut = text.find(end)
        if cut >= 0:
            return text[:cut]
        cut = text.find(end.strip())  # the model may vary the whitespace before the marker
        return text[:cut].rstrip() if cut >= 0 else text

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for YAML."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write as YAML (atomically), e.g. ``RUN_DIR/template.yaml``."""
        from medtune.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), allow_unicode=True, sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ConversationTemplate:
        """Validate and build; every problem raises ``TemplateError`` naming the key.

        A run's ``template.yaml`` written before templates had rendering fields (only ``name``,
        ``version``, ``kind``, ``description``) is read as the shipped template of that name and
        version, which is how it was rendered.
        """
        if not isinstance(data, dict):
            raise TemplateError(f"{source}: expected a mapping")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TemplateError(f"{source}: unknown conversation template key(s) {unknown}; known: {names}")
        for key in ("name", "version"):
            if key not in data:
                raise TemplateError(f"{source}: missing template key '{key}'")
        if data.get("kind", "conversation") != "conversation":
            raise TemplateError(f"{source}: kind must be 'conversation', got {data['kind']!r}")
        if set(data) <= _LEGACY_KEYS and data["name"] in available("conversation"):
            shipped = _shipped_conversation(data["name"])
            if shipped.version != data["version"]:
                raise TemplateError(f"{source}: conversation template '{data['name']}' version {data['version']} "
                                    f"is not shipped (this medtune has version {shipped.version})")
            return shipped
        _check_types(data, source)
        tpl = cls(**{**data, "kind": "conversation"})
        for key, (allowed, required) in _CONVERSATION_PLACEHOLDERS.items():
            fmt = getattr(tpl, key)
            if fmt is None:
                continue
            used = _placeholders(fmt, key, source)
            if not used <= allowed or not required <= used:
                raise TemplateError(
                    f"{source}: template key '{key}' must use the placeholder(s) {sorted(required)} and no "
                    f"other; found {sorted(used)} (write a literal brace as {{{{ or }}}})")
        if not tpl.assistant_format.startswith("{reply}") or tpl.assistant_format.count("{reply}") != 1:
            # the prompt ends where the model's output starts: a cue before the reply belongs at the
            # end of user_format, where inference puts it into the prompt
            raise TemplateError(f"{source}: template key 'assistant_format' must start with {{reply}} (once); "
                                "put a cue such as '答：' at the end of user_format instead")
        if tpl.chat:
            default = cls()
            changed = [k for k in _MARKUP_KEYS if getattr(tpl, k) != getattr(default, k)]
            if changed:
                raise TemplateError(f"{source}: {changed} are not used with chat: true (the model's chat template "
                                    "writes the turns); remove them or set chat: false")
        return tpl

    @classmethod
    def load(cls, path: str | Path) -> ConversationTemplate:
        """Load a conversation template YAML file (e.g. a run's ``template.yaml``)."""
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        return cls.from_dict(data, source=str(path))


def _placeholders(fmt: str, key: str, source: str) -> set[str]:
    """Field names of a ``str.format`` string (``{user}`` → ``user``; ``{}`` → ``""``)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    except ValueError as exc:
        raise TemplateError(f"{source}: template key '{key}' has bad braces ({exc}); "
                            "write a literal brace as {{ or }}") from None


def _check_types(data: dict[str, Any], source: str) -> None:
    """YAML gives any type; a wrong one would fail later, far from the file, or render 'None'."""
    for key, value in data.items():
        if key == "version":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            want = "an integer >= 1"
        elif key == "chat":
            ok, want = isinstance(value, bool), "true or false"
        elif key in ("system", "instruction", "multi_turn_user_format"):
            ok, want = value is None or isinstance(value, str), "text or null"
        elif key == "name":
            ok, want = isinstance(value, str) and bool(value.strip()), "a non-empty text"
        else:
            ok, want = isinstance(value, str), "text"
        if not ok:
            raise TemplateError(f"{source}: template key '{key}' must be {want}, got {value!r}")


@functools.cache
def _shipped_conversation(name: str) -> ConversationTemplate:
    # cached: conversations are rendered one by one, each naming its template; the object is frozen
    with resources.as_file(resources.files(__package__) / _CONVERSATION_DIR / f"{name}.yaml") as p:
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    if set(data) <= _LEGACY_KEYS:
        raise TemplateError(f"shipped conversation template '{name}' has no rendering keys")  # would recurse
    return ConversationTemplate.from_dict(data, source=f"shipped template {name}.yaml")


def conversation_template(name_or_path: str | Path) -> ConversationTemplate:
    """A shipped conversation template by name (``plain``, ``chat``, …), or a template YAML file by path.

    A file may not reuse a shipped template's name for a different rendering: inference finds a
    run's template by name in places, and the same name must mean the same text.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TemplateError(f"conversation template file not found: {path}")
        tpl = ConversationTemplate.load(path)
        if tpl.name in available("conversation"):
            shipped = _shipped_conversation(tpl.name)
            if dataclasses.replace(tpl, description=shipped.description) != shipped:
                raise TemplateError(f"{path}: '{tpl.name}' is the name of a shipped conversation template that "
                                    "renders differently; give your template another name")
        return tpl
    name = str(name_or_path)
    shipped_names = available("conversation")
    if name not in shipped_names:
        raise TemplateError(f"unknown conversation template '{name}'; available: {', '.join(shipped_names)}, "
                            "or the path of a template .yaml file")
    return _shipped_conversation(name)


def as_conversation_template(template: str | Path | ConversationTemplate) -> ConversationTemplate:
    """``template`` itself, or the conversation template that name or path gives."""
    return template if isinstance(template, ConversationTemplate) else conversation_template(template)


def load_template_file(path: str | Path) -> ExamTemplate | ConversationTemplate:
    """A run's ``template.yaml``: an exam template or a conversation template (``kind: conversation``)."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if isinstance(data, dict) and data.get("kind") == "conversation":
        return ConversationTemplate.from_dict(data, source=str(path))
    return ExamTemplate.load(path)


# ---- converters' instruction texts ----------------------------------------------------------------

#: Converter task → placeholders its instruction text must contain.
PROMPT_TASKS: dict[str, tuple[str, ...]] = {"summary": ("{dialogue}",), "question_generation": ()}


def prompt_text(task: str, lang: str = "zh", path: str | Path | None = None) -> str:
    """The instruction text a converter wraps each record in: the user's file, or the shipped one.

    Shipped texts are ``templates/{task}/{lang}.txt``. A language without one is an error (never a
    silent fall-back to another language's instruction).

    Args:
        task: ``summary`` (must contain ``{dialogue}``) or ``question_generation`` (may contain
            ``{n}``, the number of questions, and ``{passage}``).
        lang: Language of the shipped text; ignored when ``path`` is given.
        path: A UTF-8 text file of your own.

    Returns:
        The text, without the line break(s) an editor leaves at the end of a file.

    Raises:
        TemplateError: Unknown task, no shipped text for ``lang``, an unreadable file, or a required
            placeholder missing.
    """
    if task not in PROMPT_TASKS:
        raise TemplateError(f"unknown prompt task {task!r}; expected one of {sorted(PROMPT_TASKS)}")
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")  # -sig: tolerate a Windows editor's BOM
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"prompt file {source}: cannot read it as UTF-8 text ({exc})") from None
    else:
        source, text = f"templates/{task}/{lang}.txt", _shipped_prompt(task, lang)
    text = text.rstrip("\r\n")
    missing = [p for p in PROMPT_TASKS[task] if p not in text]
    if missing or not text.strip():
        raise TemplateError(f"{source}: a {task} prompt must contain {' and '.join(missing) or 'text'} "
                            "(where the record's text goes)")
    return text


@functools.cache
def _shipped_prompt(task: str, lang: str) -> str:
    # cached: converters without a prompt of their own ask for it once per row
    folder = resources.files(__package__) / task
    shipped = sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))
    if lang not in shipped:
        raise TemplateError(f"no shipped {task} prompt for language {lang!r} (shipped: {', '.join(shipped)}); "
                            "write your own and pass it with --prompt FILE")
    return (folder / f"{lang}.txt").read_text(encoding="utf-8")
