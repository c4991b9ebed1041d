"""Conversation and exam-question helpers shared by the terminal chat, the server and the demo."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from medtune.evaluation.extract import AnswerReading, read_answer
from medtune.inference.base import GenerationParams
from medtune.records import ExamRecord
from medtune.templates import ExamTemplate

_OPTION_LINE = re.compile(r"^\s*([A-Ja-jＡ-Ｊ])\s*[.．、:：)）]?\s*(.+?)\s*$")


def check_messages(messages: list[dict[str, str]]) -> None:
    """Refuse messages that are not ``{"role": system|user|assistant, "content": str}``."""
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"bad message {m!r}: need role system/user/assistant and string content")


def chat_prompt(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, bool]:
    """``(prompt, add_special_tokens)`` for a list of ``{"role", "content"}`` messages.

    Uses the model's chat template when it has one; otherwise a plain 用户/助手 transcript (base
    models without a chat template still continue it sensibly).
    """
    check_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    lines = []
    for m in messages:
        prefix = {"system": "", "user": "用户：", "assistant": "助手："}[m["role"]]
        lines.append(prefix + m["content"])
    return "\n".join(lines) + "\n助手：", True


def reply_prompt(messages: list[dict[str, str]], template: Any, tokenizer: Any) -> tuple[str, bool]:
    """``(prompt, add_special_tokens)`` for the next assistant reply, rendered as the run was trained.

    * a conversation run (``template.kind == "conversation"``): the run's conversation template
      (its saved ``template.yaml``: plain, the model's chat template, or its own markup), exactly as
      SFT/DPO/RL rendered the prompts (``medtune.data.conversations.conversation_prompt``);
    * a pt run (``kind == "text"``): the last user message as plain text to continue — raw-text
      training has no notion of turns, so earlier messages and system prompts are not sent;
    * an exam run, or no template (``--model``): free chat through :func:`chat_prompt` (the
      model's chat template, else a 用户/助手 transcript).

    Raises:
        ValueError: A malformed message, or no user message for a pt run to continue.
    """
    kind = getattr(template, "kind", "exam")
    if kind == "conversation":
        from medtune.data.conversations import conversation_prompt

        check_messages(messages)
        return conversation_prompt(messages, template, tokenizer)
    if kind == "text":
        check_messages(messages)
        users = [m for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("a raw-text (pt) model continues text: send the text as a user message")
        return users[-1]["content"], True
    return chat_prompt(messages, tokenizer)


# Without a chat template, free chat is a 用户/助手 transcript, and a base model happily writes the
# user's next turn too; the reply ends where that turn would start.
PLAIN_CHAT_STOP = "\n用户："
#: Shown (not stored in the history) when a reply has no visible text, by the terminal chat and the web demo
#: alike: an empty line would look like a hang or a display fault.
EMPTY_REPLY = "（模型没有生成文字 · the model produced no text）"


def reply_stops(template: Any, add_special_tokens: bool) -> tuple[str, ...]:
    r"""Where a chat reply ends besides EOS, for a prompt from :func:`reply_prompt`.

    A conversation template whose replies end with a marker (``reply_end``, e.g. ``"\n### 结束"``)
    was trained to write it before EOS: the reply is the text before it. Free chat as a plain
    transcript (no chat template) stops where the user's next turn would start. Raw-text
    continuation has no turns to stop at.
    """
    kind = getattr(template, "kind", "exam")
    if kind == "conversation":
        end = getattr(template, "reply_end", "")
        return (end,) if end.strip() else ()
    if kind == "text":
        return ()
    return (PLAIN_CHAT_STOP,) if add_special_tokens else ()


def keeps_history(template: Any) -> bool:
    """Whether earlier turns are part of the next prompt (not for raw-text continuation)."""
    return getattr(template, "kind", "exam") != "text"


def parse_exam_text(text: str) -> tuple[str, dict[str, str]]:
    """Split pasted text into the question and its options (lines like ``A 原发病`` / ``B. …``)."""
    question_lines, options = [], {}
    for line in text.strip().splitlines():
        m = _OPTION_LINE.match(line)
        if m and (options or question_lines):
            options[unicodedata.normalize("NFKC", m.group(1)).upper()] = m.group(2)
        elif not options:
            question_lines.append(line.strip())
        else:
            raise ValueError(f"line {line!r} after the options is not an option (expected e.g. 'C 颈椎病')")
    question = " ".join(q for q in question_lines if q)
    if not question:
        raise ValueError("no question text before the options")
    if len(options) < 2:
        raise ValueError("need at least two options, one per line, e.g. 'A 胸肌劳损'")
    return question, options


@dataclass
class ExamAnswer:
    """What the model said to one exam question, and what medtune read from it."""

    prompt: str
    output: str
    letters: str  # parsed answer, "" when none could be read
    explanation: str
    ambiguous: bool = False  # conflicting answers or a hedge (see medtune.evaluation.extract)


def exam_prompt(question: str, options: dict[str, str], template: ExamTemplate, tokenizer: Any) -> str:
    """The run's template applied to a question typed by a user (no gold answer needed)."""
    record = ExamRecord(id="interactive", question=question, options=options, answer="")
    return template.render_prompt(record, tokenizer)


def read_exam_answer(output: str, options: dict[str, str], template: ExamTemplate) -> AnswerReading:
    """The full reading of a generated output, exactly as evaluation's robust parser reads it.

    Args:
        output: The generated completion.
        options: Option letter → option text of the question.
        template: The exam template the prompt was rendered with (its markers locate the
            answer region and the explanation).

    Returns:
        Letters, explanation, ambiguity flag, deciding step and whether the letters came from
        the answer region (:class:`medtune.evaluation.extract.AnswerReading`).
    """
    return read_answer(output, options, template.answer_marker, template.explanation_marker)


def read_exam_output(output: str, options: dict[str, str], template: ExamTemplate) -> tuple[str, str]:
    """``(letters, explanation)`` from a generated output, as evaluation reads it."""
    reading = read_exam_answer(output, options, template)
    return reading.letters, reading.explanation


def answer_exam(
    backend: Any, template: ExamTemplate, question: str, options: dict[str, str], params: GenerationParams
) -> ExamAnswer:
    """Ask one exam question through ``backend`` with ``template``."""
    prompt = exam_prompt(question, options, template, getattr(backend, "tokenizer", None))
    output = backend.generate([prompt], params, add_special_tokens=not template.chat)[0]
    reading = read_exam_answer(output, options, template)
    return ExamAnswer(prompt, output, reading.letters, reading.explanation, reading.ambiguous)


def option_scores(backend: Any, template: ExamTemplate, question: str, options: dict[str, str]) -> dict[str, float] | None:
    """Probability of each option letter after the template's answer cue (None if the backend can't score)."""
    import math

    if not hasattr(backend, "loglikelihood") or getattr(backend, "tokenizer", None) is None:
        return None
    from medtune.evaluation.loglik import build_requests

    record = ExamRecord(id="interactive", question=question, options=options, answer="A")
    requests, (cands,) = build_requests([record], template, backend.tokenizer)
    (scores,) = backend.loglikelihood(requests)
    total = sum(math.exp(s) for s in scores)
    return {c: math.exp(s) / total for c, s in zip(cands, scores, strict=True)}
