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
