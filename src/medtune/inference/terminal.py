"""Interactive terminal chat: streamed replies, history, /reset, /compare, /exit, and exam mode."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from medtune.inference.base import GenerationParams
from medtune.inference.chat import answer_exam, chat_prompt, parse_exam_text
from medtune.templates import ExamTemplate

HELP = """commands: /reset clears the history · /compare TEXT asks base and tuned model · /exit quits
exam mode: paste the question, then one option per line (A 胸肌劳损 …), then an empty line"""


class TerminalChat:
    """The chat loop, with input and output injectable so it can be tested without a terminal."""

    def __init__(self, backend: Any, template: ExamTemplate, params: GenerationParams, exam: bool = False,
                 system: str | None = None, read: Callable[[str], str] = input, out: TextIO = sys.stdout):
        self.backend = backend
        self.base = backend.base() if getattr(backend, "has_adapter", False) else None
        self.template = template
        self.params = params
        self.exam = exam
        self.system = system
        self.read = read
        self.out = out
        self.history: list[dict[str, str]] = []

    def say(self, text: str = "", end: str = "\n") -> None:
        """Write and flush (streamed pieces must appear at once)."""
        self.out.write(text + end)
        self.out.flush()

    def run(self) -> int:
        """Loop until /exit or end of input; returns the exit code."""
        self.say(HELP)
        while True:
            try:
                line = self.read_message()
            except (EOFError, KeyboardInterrupt):
                self.say()
                return 0
            if line is None:
                continue
            if line == "/exit":
                return 0
            if line == "/reset":
                self.history.clear()
                self.say("(history cleared)")
                continue
            if line.startswith("/compare"):
                self.compare(line[len("/compare"):].strip())
                continue
            if line.startswith("/"):
                self.say(f"unknown command {line.split()[0]}; {HELP}")
                continue
            self.respond(line, self.backend)

    def read_message(self) -> str | None:
        """One chat line, or in exam mode the lines up to an empty one."""
        first = self.read("你> ").strip()
        if not first:
            return None
        if not self.exam or first.startswith("/"):
            return first
        lines = [first]
        while True:
            more = self.read("... ").strip()
            if not more:
                return "\n".join(lines)
            lines.append(more)

    def respond(self, text: str, backend: Any, label: str = "模型") -> None:
        """Answer ``text``: an exam question (exam mode) or the next chat turn (streamed)."""
        if self.exam:
            self.answer_exam(text, backend, label)
            return
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [
            {"role": "user", "content": text}
        ]
        prompt, special = chat_prompt(messages, getattr(backend, "tokenizer", None))
        self.say(f"{label}> ", end="")
        reply = ""
        for piece in backend.stream(prompt, self.params, add_special_tokens=special):
            reply += piece
            self.say(piece, end="")
        self.say()
        if backend is self.backend:  # /compare answers do not enter the conversation
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]

    def answer_exam(self, text: str, backend: Any, label: str) -> None:
        """Parse the pasted question, answer it with the run's template, show what was read."""
        try:
            question, options = parse_exam_text(text)
        except ValueError as exc:
            self.say(f"(not an exam question: {exc})")
            return
        ans = answer_exam(backend, self.template, question, options, self.params)
        self.say(f"[{label}] 答案: {ans.letters or '—（无法解析）'}")
        self.say(f"[{label}] 解释: {ans.explanation}")

    def compare(self, text: str) -> None:
        """The same input answered by the base model and by the tuned model."""
        if self.base is None:
            self.say("(/compare needs a model with an adapter: start with --run or --adapter)")
            return
        if not text:
            if not self.exam:
                self.say("(usage: /compare 问题)")
                return
            self.say("(paste the question and options; base and tuned model will both answer)")
            text = self.read_message() or ""
        self.respond(text, self.base, "基座 base")
        self.respond(text, self.backend, "微调 tuned")
