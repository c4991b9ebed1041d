"""Record types shared by every stage, with validation.

Records are plain dataclasses serialised as one JSON object per line. Validation raises
``RecordError`` naming the field, so converters can add file and row to the message.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGHIJ"
_LETTER_SET = re.compile(r"^[A-J]+$")


class RecordError(ValueError):
    """A record failed validation; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.reason = message


def normalise_letters(answer: str, options: dict[str, str] | None = None) -> str:
    """Return the answer letters deduplicated and in option order (``"DA"`` → ``"AD"``)."""
    order = list(options) if options else list(LETTERS)
    chosen = set(answer)
    return "".join(letter for letter in order if letter in chosen)


@dataclass
class ExamRecord:
    """One multiple-choice exam question (CMExam and similar).

    ``options`` maps letter → text in display order; ``answer`` is the gold letters in option
    order (``"ACD"``); ``annotations`` holds optional labels such as ``Disease Group``.
    """

    id: str
    question: str
    options: dict[str, str]
    answer: str
    explanation: str = ""
    annotations: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ExamRecord:
        """Check the record's invariants; raise ``RecordError`` naming the field."""
        if not str(self.id).strip():
            raise RecordError("id", "empty id")
        if not self.question.strip():
            raise RecordError("question", "empty question")
        if len(self.options) < 2:
            raise RecordError("options", f"expected at least 2 options, got {len(self.options)}")
        for letter, text in self.options.items():
            if len(letter) != 1 or letter not in LETTERS:
                raise RecordError("options", f"option key {letter!r} is not a letter A-J")
            if not str(text).strip():
                raise RecordError("options", f"option {letter} has no text")
        if not self.answer:
            raise RecordError("answer", "no answer")
        if not _LETTER_SET.match(self.answer):
            raise RecordError("answer", f"answer {self.answer!r} is not a string of letters A-J")
        missing = [letter for letter in self.answer if letter not in self.options]
        if missing:
            raise RecordError(
                "answer",
                f"answer letter(s) {''.join(missing)} not among the options {''.join(self.options)}",
            )
        self.answer = normalise_letters(self.answer, self.options)
        return self

    @property
    def is_multi(self) -> bool:
        """True when more than one option is correct."""
        return len(self.answer) > 1

    def answer_text(self, sep: str = "；") -> str:
        """Text of the correct option(s), joined with ``sep``."""
        return sep.join(self.options[letter] for letter in self.answer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExamRecord:
        """Build and validate from a dict (e.g. one JSON line); unknown keys are rejected."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise RecordError(sorted(unknown)[0], f"unknown field(s) {sorted(unknown)}")
        for required in ("id", "question", "options", "answer"):
            if required not in data:
                raise RecordError(required, "missing")
        if not isinstance(data["options"], dict):
            raise RecordError("options", "expected an object mapping letter to text")
        return cls(
            id=str(data["id"]),
            question=str(data["question"]),
            options={str(k): str(v) for k, v in data["options"].items()},
            answer=str(data["answer"]),
            explanation=str(data.get("explanation") or ""),
            annotations=dict(data.get("annotations") or {}),
        ).validate()


ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """Instruction, dialogue or prompt→response data (alpaca, ShareGPT, messages, PromptCBLUE, …).

    ``messages`` are ``{"role": system|user|assistant, "content": str}`` in order. For training the
    last message is the assistant's reply; ``meta`` keeps source fields that never enter the
    prompt (e.g. PromptCBLUE's ``task_dataset`` and ``answer_choices``).
    """

    id: str
    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, require_reply: bool = True) -> Conversation:
        """Check roles, contents and turn order; raise ``RecordError`` naming the field."""
        if not str(self.id).strip():
            raise RecordError("id", "empty id")
        if not self.messages:
            raise RecordError("messages", "no messages")
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise RecordError("messages", f"message {i}: role must be one of {ROLES}, got {m!r}")
            if not isinstance(m.get("content"), str):
                raise RecordError("messages", f"message {i}: content must be a string")
            if m["role"] == "system" and i != 0:
                raise RecordError("messages", f"message {i}: a system message may only come first")
        turns = [m for m in self.messages if m["role"] != "system"]
        if not turns or turns[0]["role"] != "user":
            raise RecordError("messages", "the first non-system message must be the user's")
        for a, b in zip(turns, turns[1:], strict=False):
            if a["role"] == b["role"]:
                raise RecordError("messages", f"two {a['role']} messages in a row; turns must alternate")
        if require_reply:
            if turns[-1]["role"] != "assistant":
                raise RecordError("messages", "the last message must be the assistant's reply")
            if not turns[-1]["content"].strip():
                raise RecordError("messages", "the assistant's reply is empty")
        if not any(m["content"].strip() for m in turns if m["role"] == "user"):
            raise RecordError("messages", "every user message is empty")
        return self

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """All messages before the final assistant reply."""
        return self.messages[:-1] if self.messages[-1]["role"] == "assistant" else list(self.messages)

    @property
    def reply(self) -> str:
        """The final assistant reply ("" when the conversation ends with the user)."""
        return self.messages[-1]["content"] if self.messages[-1]["role"] == "assistant" else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], require_reply: bool = True) -> Conversation:
        """Build and validate from a records line."""
        for key in ("id", "messages"):
            if key not in data:
                raise RecordError(key, "missing")
        unknown = set(data) - {"id", "messages", "meta"}
        if unknown:
            raise RecordError(sorted(unknown)[0], f"unknown field(s) {sorted(unknown)}")
        if not isinstance(data["messages"], list):
            raise RecordError("messages", "expected a list of {role, content} objects")
        return cls(str(data["id"]), list(data["messages"]), dict(data.get("meta") or {})).validate(require_reply)


@dataclass
class PreferencePair:
    """A prompt (messages ending with the user's turn) with a preferred and a rejected reply."""

    id: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> PreferencePair:
        """Check the prompt's turns and that both replies are non-empty and differ."""
        Conversation(self.id, self.prompt).validate(require_reply=False)
        if self.prompt[-1]["role"] != "user":
            raise RecordError("prompt", "the prompt must end with the user's message")
        for name in ("chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RecordError(name, "empty reply")
        if self.chosen.strip() == self.rejected.strip():
            raise RecordError("rejected", "chosen and rejected replies are identical")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreferencePair:
        """Build and validate from a records line."""
        for key in ("id", "prompt", "chosen", "rejected"):
            if key not in data:
                raise RecordError(key, "missing")
        return cls(str(data["id"]), list(data["prompt"]), data["chosen"], data["rejected"],
                   dict(data.get("meta") or {})).validate()
