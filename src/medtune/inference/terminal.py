"""Interactive terminal chat: streamed replies, history, /reset, /compare, /exit, and exam mode.

Turns are rendered as the run was trained (:func:`medtune.inference.chat.reply_prompt`): an exam
run chats freely and answers exam questions with ``--exam``; a conversation run (sft on
conversations, dpo, rl) uses its conversation format; a pt run continues each line as raw text.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

from medtune.inference.base import GenerationParams
from medtune.inference.chat import (
    EMPTY_REPLY,
    answer_exam,
    keeps_history,
    parse_exam_text,
    reply_prompt,
    reply_stops,
)

COMMANDS_HELP = "commands: /reset clears the history · /compare TEXT asks base and tuned model · /exit quits"
HELP = COMMANDS_HELP + "\nexam mode: paste the question, then one option per line (A 胸肌劳损 …), then an empty line"
TEXT_HELP = """raw-text model (stage pt): each line you type is continued as text; no history is kept
commands: /compare TEXT asks base and tuned model · /exit quits"""


class TerminalChat:
    """The chat loop, with input and output injectable so it can be tested without a terminal."""

    def __init__(self, backend: Any, template: Any, params: GenerationParams, exam: bool = False,
                 system: str | None = None, read: Callable[[str], str] = input, out: TextIO = sys.stdout):
        """Set up the loop.

        Args:
            backend: The model's backend (its ``base()`` view, when it has an adapter, answers /compare).
            template: The run's template (exam template, conversation format or raw text); it
                decides how turns are rendered.
            params: Decoding settings.
            exam: Exam mode (needs an exam template).
            system: A system message put before the conversation (not for raw text).
            read: Reads one line given a prompt (``input``).
            out: Where replies are written.

        Raises:
            ValueError: Exam mode without an exam template; a system message for raw text.
        """
        if exam and getattr(template, "kind", "exam") != "exam":
            raise ValueError(f"exam mode needs an exam template; this model's is {template.name} "
                             f"({template.kind} data)")
        if system and not keeps_history(template):
            raise ValueError("--system: a raw-text (pt) model continues text and has no place for a system message")
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
        exam_run = getattr(self.template, "kind", "exam") == "exam"  # conversation runs have no exam mode
        self.say(TEXT_HELP if not keeps_history(self.template) else HELP if exam_run else COMMANDS_HELP)
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
        prompt, special = reply_prompt(messages, self.template, getattr(backend, "tokenizer", None))
        params = replace(self.params, stop=(*self.params.stop, *reply_stops(self.template, special)))
        self.say(f"{label}> ", end="")
        reply = ""
        for piece in backend.stream(prompt, params, add_special_tokens=special):
            reply += piece
            self.say(piece, end="")
        self.say("" if reply.strip() else EMPTY_REPLY)
        # /compare answers do not enter the conversation; raw-text continuation has none
        if backend is self.backend and keeps_history(self.template):
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
