"""Read instruction, dialogue and preference data into ``Conversation`` / ``PreferencePair`` records.

Shapes, by the name ``detect_format`` gives them:

* ``"alpaca"`` — ``{"instruction", "input", "output"}`` with optional ``"system"`` and
  ``"history"`` (a list of ``[user, assistant]`` pairs of earlier turns). The user message is
  the instruction, a newline and the input when ``input`` is non-empty, else the instruction.
* ``"sharegpt"`` — ``{"conversations": [{"from": ..., "value": ...}]}`` with optional
  ``"system"``; multi-turn dialogues are kept whole. Roles: ``human``/``user``,
  ``gpt``/``assistant``/``chatgpt``/``bot``/``model``, ``system`` (first turn only).
* ``"messages"`` — ``{"messages": [{"role": ..., "content": ...}]}`` (OpenAI style); medtune's own
  ``Conversation`` lines (``{"id", "messages", "meta"}``) are this shape too.
* ``"qa"`` — ``{"question", "answer"}`` (e.g. MedicalGPT's GRPO sample), optional ``"system"``.
* ``"preference"`` — ``{"prompt", "chosen", "rejected"}`` where the prompt is a string or a list of
  messages; or ShareGPT-style ``{"conversations", "chosen", "rejected"}``; or TRL's implicit-prompt
  shape where ``chosen``/``rejected`` are whole conversations sharing the prompt. A reply may be a
  string, one message dict or a list of messages. MedicalGPT's reward-model keys ``question``,
  ``response_chosen``, ``response_rejected`` are accepted as aliases. medtune's own
  ``PreferencePair`` lines are this shape too.

Every message list may use either ``from``/``value`` or ``role``/``content`` keys.

The per-row converters (``alpaca_to_conversation`` …) are pure: one dict and an id in, one validated
record out, or ``RecordError`` whose ``field`` is the path inside the input row (for example
``conversations[2].from``), so the file readers can report file, line and field. Keys a shape does
not use are kept in the record's ``meta`` (they never enter the prompt); a ``meta`` object in the
row is merged into it.

Missing values follow the rule every converter shares (``medtune.io.is_missing``): ``null``, blank
text and the texts ``nan``/``None``/``null`` in any case count as absent — such an ``input`` or
``system`` is no input or no system prompt, such a message, instruction or reply is empty (and the
row is rejected naming the field, with the value found), such an ``id`` is generated, and such a
value of a key kept in ``meta`` is stored as ``null``.

File readers take JSON lines (row = 1-based physical line; blank lines are skipped but counted) or,
for ``.json`` files, one JSON array (row = 1-based position). Ids are the row's ``id`` when it has a
non-empty one, else ``f"{file_stem}-{row:05d}"``; a repeated id makes the later row invalid. With
``on_invalid="skip"`` every input row ends up either as a record or as a reject.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.data.detect import iter_json_rows
from medtune.io import DataFileError, convert_file, is_missing, json_safe, missing_note
from medtune.records import Conversation, PreferencePair, RecordError

__all__ = [
    "CONVERSATION_FORMATS",
    "FORMATS",
    "ROLE_ALIASES",
    "ReadResult",
    "SummaryResult",
    "alpaca_to_conversation",
    "convert_instructions",
    "convert_row",
    "convert_summaries",
    "detect_format",
    "messages_to_conversation",
    "preference_to_pair",
    "qa_to_conversation",
    "read_instructions",
    "read_preferences",
    "sharegpt_to_conversation",
    "summary_instruction",
    "summary_to_conversation",
]

#: Shapes that become ``Conversation`` records.
CONVERSATION_FORMATS = ("alpaca", "sharegpt", "messages", "qa", "summary")
#: Every shape ``detect_format`` can return.
FORMATS = (*CONVERSATION_FORMATS, "preference")

#: Speaker names found in the wild → medtune roles. Case and surrounding spaces are ignored.
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",  # Gemini's name for the assistant
}
_ON_INVALID = ("error", "skip")

# Keys each SFT shape reads; everything else in a row goes to ``meta``. (Preference rows name the
# keys they used per row, since the prompt may come from one of several keys.)
_USED_KEYS = {
    "alpaca": {"id", "meta", "instruction", "input", "output", "system", "history"},
    "sharegpt": {"id", "meta", "conversations", "system"},
    "messages": {"id", "meta", "messages", "system"},
    "qa": {"id", "meta", "question", "answer", "system"},
    "summary": {"id", "meta", "dialogue", "summary"},
}


@dataclass
class ReadResult:
    """Outcome of reading one instruction or preference file.

    Attributes:
        records: Valid records in file order (``Conversation`` or ``PreferencePair`` objects).
        rows: The source row of each record (same order as ``records``).
        rejects: One dict per invalid row: ``{"row", "field", "reason", "raw"}``, ``raw`` being the
            row as read (``{"line": text}`` for a line that is not valid JSON).
        n_rows: Rows read; always ``len(records) + len(rejects)``.
        format: The shape the rows were read as (one of ``FORMATS``).
    """

    records: list[Any]
    rows: list[int] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    n_rows: int = 0
    format: str = ""


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------


def detect_format(first_row: Mapping[str, Any]) -> str:
    """Name the shape of a data set from one of its rows.

    Preference data is checked first because its ShareGPT-style rows also carry
    ``conversations``. The rules live in ``medtune.data.detect`` (``instruction_format``), the one
    place where data shapes are told apart, so a file is placed the same way here and by every
    command.

    Args:
        first_row: A decoded row (usually the file's first).

    Returns:
        One of ``FORMATS``.

    Raises:
        ValueError: The keys match no known shape (the message lists the keys found), or the row
            is an exam question (``options``), which ``medtune.data.cmexam`` reads instead.
    """
    from medtune.data.detect import instruction_format

    return instruction_format(first_row)


# --------------------------------------------------------------------------------------------
# Row converters (pure)
# --------------------------------------------------------------------------------------------


def alpaca_to_conversation(row: Mapping[str, Any], record_id: str) -> Conversation:
    """Convert one alpaca row ``{instruction, input, output[, system, history]}``.

    Args:
        row: The decoded row.
        record_id: Id for the record (the reader passes the row's ``id`` or a generated one).

    Returns:
        The validated conversation: optional system, the history turns, then the instruction
        (plus input) as the user's message and ``output`` as the reply.

    Raises:
        RecordError: ``field`` names the offending key, e.g. ``output`` or ``history[1][0]``.
    """
    instruction = _string(row, "instruction", required=True)
    user_input = _string(row, "input")
    output = _string(row, "output", required=True)
    system = _string(row, "system")

    turns: list[_Turn] = []
    if system.strip():
        turns.append(_Turn("system", system, "system", "system"))
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise RecordError("history", "expected a list of [user, assistant] pairs")
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RecordError(f"history[{i}]", "expected a [user, assistant] pair")
            for j, role in enumerate(("user", "assistant")):
                if not isinstance(pair[j], str):
                    raise RecordError(f"history[{i}][{j}]", f"expected a string, got {type(pair[j]).__name__}")
                text, note = _content(pair[j])
                turns.append(_Turn(role, text, f"history[{i}]", f"history[{i}][{j}]", note))

    # An empty instruction with a non-empty input still makes a prompt; joining would start it
    # with a stray newline, so the input is used alone.
    if user_input.strip():
        user = f"{instruction}\n{user_input}" if instruction.strip() else user_input
        user_field = "instruction" if instruction.strip() else "input"
    else:
        user, user_field = instruction, "instruction"
    turns.append(_Turn("user", user, user_field, user_field, _note(row, user_field)))
    turns.append(_Turn("assistant", output, "output", "output", _note(row, "output")))
    _check_turns(turns, list_field="history", require_reply=True)
    return _conversation(record_id, turns, _meta(row, _USED_KEYS["alpaca"]))


def sharegpt_to_conversation(row: Mapping[str, Any], record_id: str) -> Conversation:
    """Convert one ShareGPT row ``{conversations: [{from, value}], [system]}``.

    Args:
        row: The decoded row.
        record_id: Id for the record.

    Returns:
        The validated conversation with every turn kept in order.

    Raises:
        RecordError: ``field`` names the offending key, e.g. ``conversations[2].from`` for an
            unknown role or ``conversations[1].value`` for an empty reply.
    """
    turns = _parse_messages(row.get("conversations"), "conversations")
    turns = _with_system(turns, row, "conversations")
    _check_turns(turns, list_field="conversations", require_reply=True)
    return _conversation(record_id, turns, _meta(row, _USED_KEYS["sharegpt"]))


def messages_to_conversation(row: Mapping[str, Any], record_id: str) -> Conversation:
    """Convert one ``{messages: [{role, content}], [system, meta]}`` row (medtune records included).

    Args:
        row: The decoded row.
        record_id: Id for the record.

    Returns:
        The validated conversation.

    Raises:
        RecordError: ``field`` names the offending key, e.g. ``messages[0].role``.
    """
    turns = _parse_messages(row.get("messages"), "messages")
    turns = _with_system(turns, row, "messages")
    _check_turns(turns, list_field="messages", require_reply=True)
    return _conversation(record_id, turns, _meta(row, _USED_KEYS["messages"]))


def qa_to_conversation(row: Mapping[str, Any], record_id: str) -> Conversation:
    """Convert one ``{question, answer, [system]}`` row into a user → assistant exchange.

    Args:
        row: The decoded row.
        record_id: Id for the record.

    Returns:
        The validated conversation.

    Raises:
        RecordError: ``field`` is ``question``, ``answer`` or ``system``.
    """
    question = _string(row, "question", required=True)
    answer = _string(row, "answer", required=True)
    system = _string(row, "system")
    turns = [_Turn("system", system, "system", "system")] if system.strip() else []
    turns += [
        _Turn("user", question, "question", "question", _note(row, "question")),
        _Turn("assistant", answer, "answer", "answer", _note(row, "answer")),
    ]
    _check_turns(turns, list_field="question", require_reply=True)
    return _conversation(record_id, turns, _meta(row, _USED_KEYS["qa"]))


def summary_instruction(lang: str = "zh", path: str | os.PathLike | None = None) -> str:
    """The dialogue-summarisation prompt, with a ``{dialogue}`` placeholder.

    Args:
        lang: ``zh`` or ``en``: the shipped ``templates/summary/{lang}.txt``.
        path: A prompt file of your own instead (UTF-8, must contain ``{dialogue}``).

    Raises:
        medtune.templates.TemplateError: No shipped prompt for ``lang``, or the file is unusable.
    """
    from medtune.templates import prompt_text

    return prompt_text("summary", lang, path)


def _dialogue_text(dialogue: Any, lang: str) -> str:
    """A ``dialogue`` value as text: turn objects become ``speaker：text`` lines (``speaker: text`` in English)."""
    if not isinstance(dialogue, list):
        return dialogue
    colon = ": " if lang == "en" else "："
    lines = []
    for i, turn in enumerate(dialogue):
        if isinstance(turn, str):
            lines.append(turn)
        elif isinstance(turn, Mapping):
            who = turn.get("speaker") or turn.get("role") or turn.get("from") or ""
            text = turn.get("text") or turn.get("content") or turn.get("value")
            if not isinstance(text, str):
                raise RecordError(f"dialogue[{i}]", "a turn needs text/content/value as a string")
            lines.append(f"{who}{colon}{text}" if who else text)
        else:
            raise RecordError(f"dialogue[{i}]", "a turn must be a string or an object")
    return "\n".join(lines)


def summary_to_conversation(row: Mapping[str, Any], record_id: str, prompt: str | None = None,
                            lang: str = "zh") -> Conversation:
    """Convert one ``{dialogue, summary}`` row into instruction + dialogue → summary.

    ``dialogue`` is a string, or a list of turns: strings, or ``{speaker|role|from, text|content|value}``
    objects rendered as ``说话人：内容`` lines (``speaker: text`` with ``lang="en"``).

    Args:
        row: The decoded row.
        record_id: Id for the record.
        prompt: The prompt text with ``{dialogue}`` (``summary_instruction``); default: the shipped
            prompt of ``lang``.
        lang: Language of the dialogues (``zh`` or ``en``).

    Raises:
        RecordError: ``field`` is ``dialogue`` or ``summary``.
    """
    dialogue = _dialogue_text(row.get("dialogue"), lang)
    if not isinstance(dialogue, str) or is_missing(dialogue):
        raise RecordError("dialogue", "expected a non-empty string or list of turns" + missing_note(dialogue))
    summary = _string(row, "summary", required=True)
    # str.replace, not str.format: a prompt of the user's own may contain other braces
    text = (summary_instruction(lang) if prompt is None else prompt).replace("{dialogue}", dialogue.strip())
    turns = [
        _Turn("user", text, "dialogue", "dialogue"),
        _Turn("assistant", summary, "summary", "summary", _note(row, "summary")),
    ]
    _check_turns(turns, list_field="dialogue", require_reply=True)
    return _conversation(record_id, turns, _meta(row, _USED_KEYS["summary"]))


def _looks_like(text: str) -> str:
    """``zh`` when a text has at least as many CJK characters as Latin letters, else ``en``."""
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    latin = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return "zh" if cjk >= latin else "en"


@dataclass
class SummaryResult:
    """What ``convert_summaries`` did.

    Attributes:
        read: Records, rejects and counts, as for every instruction file.
        lang: The prompt language asked for.
        other_language: Ids of records whose dialogue looks like the other language (a Chinese
            prompt around English dialogues is what an ignored ``--lang en`` used to produce).
    """

    read: ReadResult
    lang: str
    other_language: list[str] = field(default_factory=list)


def convert_summaries(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    lang: str = "zh",
    prompt_path: str | os.PathLike | None = None,
    on_invalid: str = "error",
    rejects_path: str | os.PathLike | None = None,
) -> SummaryResult:
    """Convert a ``{dialogue, summary}`` file into conversation records with the prompt of ``lang``.

    Args:
        input_path: JSON lines (or a ``.json`` array) of ``{dialogue, summary}`` rows.
        out_path: Records output (JSON lines).
        lang: ``zh`` or ``en``: the shipped prompt and the ``speaker：`` / ``speaker: `` turn format.
        prompt_path: A prompt file of your own (must contain ``{dialogue}``) instead of the shipped one.
        on_invalid: ``error`` or ``skip``, as in ``read_instructions``.
        rejects_path: As in ``convert_instructions``.

    Returns:
        The read result and the ids of dialogues that look like the other language.

    Raises:
        medtune.templates.TemplateError: No shipped prompt for ``lang``, or an unusable prompt file
            (before anything is read or written).
        DataFileError: As ``read_instructions``.
    """
    prompt = summary_instruction(lang, prompt_path)
    other: list[str] = []

    def convert(row: Mapping[str, Any], record_id: str) -> Conversation:
        conversation = summary_to_conversation(row, record_id, prompt=prompt, lang=lang)
        dialogue = row.get("dialogue")
        if _looks_like(dialogue if isinstance(dialogue, str) else _dialogue_text(dialogue, lang)) != lang:
            other.append(record_id)
        return conversation

    read = convert_file(input_path, out_path, rejects_path,
                        lambda path: _read(path, "summary", on_invalid, allowed=("summary",), converter=convert))
    return SummaryResult(read, lang, other)


def preference_to_pair(row: Mapping[str, Any], record_id: str) -> PreferencePair:
    """Convert one preference row into a ``PreferencePair``.

    The prompt comes from the first of ``prompt``, ``conversations``, ``messages``, ``question``
    present (string or message list); without any of them ``chosen`` and ``rejected`` must be whole
    conversations that share everything but their last (assistant) message. A top-level
    ``system`` is put first unless the prompt already has a system message.

    Args:
        row: The decoded row.
        record_id: Id for the record.

    Returns:
        The validated pair; its prompt ends with the user's message.

    Raises:
        RecordError: ``field`` names the offending key: the prompt field (or a message in it),
            ``chosen``/``rejected`` for an empty or malformed reply, ``rejected`` when both replies
            are the same.
    """
    # MedicalGPT's reward-model names are used only when the usual ones are absent, so a missing
    # reply is reported under the usual name.
    chosen_key = "response_chosen" if "chosen" not in row and "response_chosen" in row else "chosen"
    rejected_key = "response_rejected" if "rejected" not in row and "response_rejected" in row else "rejected"
    for key in (chosen_key, rejected_key):
        if key not in row:
            raise RecordError(key, "missing")

    prompt_key = next((k for k in ("prompt", "conversations", "messages", "question") if k in row), None)
    if prompt_key is None:
        # TRL's implicit-prompt shape: both replies are whole conversations with a shared prefix.
        chosen_turns = _parse_messages(row[chosen_key], chosen_key)
        rejected_turns = _parse_messages(row[rejected_key], rejected_key)
        if len(chosen_turns) < 2:
            raise RecordError(chosen_key, "without a 'prompt' field, chosen must hold the prompt's messages and the reply")
        prompt = chosen_turns[:-1]
        if _plain(rejected_turns[:-1]) != _plain(prompt):
            raise RecordError(rejected_key, "chosen and rejected continue different prompts")
        prompt_field = chosen_key
    else:
        prompt_field = prompt_key
        value = row[prompt_key]
        if isinstance(value, str):
            text, note = _content(value)
            prompt = [_Turn("user", text, prompt_key, prompt_key, note)]
        else:
            prompt = _parse_messages(value, prompt_key)
    prompt = _with_system(prompt, row, prompt_field)
    _check_turns(prompt, list_field=prompt_field, require_reply=False)
    if prompt[-1].role != "user":
        raise RecordError(prompt[-1].role_field, "the prompt must end with the user's message")

    chosen = _reply(row[chosen_key], chosen_key, prompt)
    rejected = _reply(row[rejected_key], rejected_key, prompt)
    if chosen.strip() == rejected.strip():
        raise RecordError(rejected_key, "chosen and rejected replies are identical")
    used = {"id", "meta", "system", prompt_field, chosen_key, rejected_key}
    pair = PreferencePair(record_id, [t.message() for t in prompt], chosen, rejected, _meta(row, used))
    return _revalidate(pair.validate, prompt_field)


#: Shape name → row converter.
CONVERTERS: dict[str, Callable[[Mapping[str, Any], str], Any]] = {
    "alpaca": alpaca_to_conversation,
    "sharegpt": sharegpt_to_conversation,
    "messages": messages_to_conversation,
    "qa": qa_to_conversation,
    "summary": summary_to_conversation,
    "preference": preference_to_pair,
}


def convert_row(row: Mapping[str, Any], fmt: str, record_id: str) -> Conversation | PreferencePair:
    """Convert one row of shape ``fmt`` (see ``FORMATS``).

    Args:
        row: The decoded row.
        fmt: Shape name.
        record_id: Id for the record.

    Returns:
        The validated record.

    Raises:
        RecordError: The row is invalid for that shape.
        ValueError: ``fmt`` is not a known shape.
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(row, Mapping):
        raise RecordError("row", f"expected a JSON object, got {type(row).__name__}")
    return CONVERTERS[fmt](row, record_id)


# --------------------------------------------------------------------------------------------
# File readers
# --------------------------------------------------------------------------------------------


def read_instructions(path: str | os.PathLike, fmt: str = "auto", on_invalid: str = "error") -> ReadResult:
    """Read an SFT data file (alpaca, ShareGPT, messages or question/answer) into conversations.

    Args:
        path: JSON lines, or a ``.json`` file holding one array.
        fmt: ``"auto"`` (``detect_format`` on the first row that is a JSON object) or one of
            ``CONVERSATION_FORMATS``.
        on_invalid: ``"error"`` raises on the first invalid row; ``"skip"`` collects invalid rows in
            ``ReadResult.rejects`` and carries on.

    Returns:
        The conversations, their rows, the rejects and the counts.

    Raises:
        DataFileError: An invalid row with ``on_invalid="error"`` (names file, row and field), or a
            file-level problem in either mode: not UTF-8, no rows, an undetectable shape, or
            preference data (use ``read_preferences``).
        ValueError: ``fmt`` or ``on_invalid`` is not an accepted value.
    """
    return _read(path, fmt, on_invalid, allowed=CONVERSATION_FORMATS)


def read_preferences(path: str | os.PathLike, fmt: str = "auto", on_invalid: str = "error") -> ReadResult:
    """Read a preference (reward model / DPO) data file into ``PreferencePair`` records.

    Args:
        path: JSON lines, or a ``.json`` file holding one array.
        fmt: ``"auto"`` or ``"preference"``.
        on_invalid: ``"error"`` or ``"skip"``, as in ``read_instructions``.

    Returns:
        The pairs, their rows, the rejects and the counts.

    Raises:
        DataFileError: As ``read_instructions``; also when the file is not preference data.
        ValueError: ``fmt`` or ``on_invalid`` is not an accepted value.
    """
    return _read(path, fmt, on_invalid, allowed=("preference",))


def convert_instructions(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    fmt: str = "auto",
    on_invalid: str = "error",
    rejects_path: str | os.PathLike | None = None,
) -> ReadResult:
    """Convert an instruction or preference file into a medtune records file.

    SFT shapes are written as ``Conversation.to_dict()`` lines, preference data as
    ``PreferencePair.to_dict()`` lines. Both outputs are written atomically; with
    ``on_invalid="error"`` nothing is written when any row is invalid.

    Args:
        input_path: Data file in any shape of ``FORMATS``.
        out_path: Records output (JSON lines).
        fmt: ``"auto"`` or one of ``FORMATS``.
        on_invalid: ``"error"`` or ``"skip"``.
        rejects_path: Where rejects go when there are any; default
            ``default_rejects_path(out_path)``. With none, a rejects file left there by an earlier
            run is removed so it cannot be mistaken for this run's.

    Returns:
        The ``ReadResult`` of reading ``input_path``.

    Raises:
        DataFileError: As ``read_instructions``.
        ValueError: The output would overwrite the input, or records and rejects share a path.
    """
    return convert_file(input_path, out_path, rejects_path, lambda path: _read(path, fmt, on_invalid, allowed=FORMATS))


def _read(path: str | os.PathLike, fmt: str, on_invalid: str, allowed: tuple[str, ...],
          converter: Callable[[Mapping[str, Any], str], Any] | None = None) -> ReadResult:
    # ``converter`` replaces ``convert_row`` for one shape read with settings (e.g. a summary prompt)
    if on_invalid not in _ON_INVALID:
        raise ValueError(f"on_invalid must be one of {_ON_INVALID}, got {on_invalid!r}")
    if fmt != "auto" and fmt not in allowed:
        raise ValueError(f"format must be 'auto' or one of {allowed}, got {fmt!r}")
    path = Path(path)
    rows = list(iter_json_rows(path))  # one JSON reader for every command (medtune.data.detect)
    if not rows:
        raise DataFileError(path, None, None, "empty file: no JSON rows")

    if fmt == "auto":
        first = next((r for r in rows if r.error is None), None)
        if first is None:
            raise DataFileError(path, rows[0].row, None, f"no row is a JSON object ({rows[0].error})")
        try:
            fmt = detect_format(first.obj)
        except ValueError as exc:
            raise DataFileError(path, first.row, None, str(exc)) from None
        if fmt not in allowed:
            hint = "read_preferences" if fmt == "preference" else "read_instructions"
            raise DataFileError(path, first.row, None, f"this is {fmt} data; read it with {hint}")

    result = ReadResult(records=[], format=fmt)
    seen: dict[str, int] = {}
    for raw_row in rows:
        result.n_rows += 1
        try:
            if raw_row.error is not None:
                raise RecordError("row", raw_row.error)
            record_id = _row_id(raw_row.obj, path.stem, raw_row.row)
            if record_id in seen:
                # Two records with one id would collide in every later join (predictions, splits).
                raise RecordError("id", f"duplicate id {record_id!r} (first used at row {seen[record_id]})")
            record = converter(raw_row.obj, record_id) if converter else convert_row(raw_row.obj, fmt, record_id)
        except RecordError as exc:
            # A whole-row problem (bad JSON, not an object) has no field to name.
            fld = None if exc.field == "row" else exc.field
            if on_invalid == "error":
                raise DataFileError(path, raw_row.row, fld, exc.reason) from None
            raw = json_safe(raw_row.obj) if raw_row.error is None else {"line": raw_row.text}
            result.rejects.append({"row": raw_row.row, "field": fld, "reason": exc.reason, "raw": raw})
            continue
        seen[record.id] = raw_row.row
        result.records.append(record)
        result.rows.append(raw_row.row)

    # Not a bare ``assert``: this guard must survive ``python -O``.
    if result.n_rows != len(result.records) + len(result.rejects):
        raise AssertionError("row accounting broke: rows != records + rejects")
    return result


def _row_id(obj: Mapping[str, Any], stem: str, row: int) -> str:
    value = obj.get("id")
    if not is_missing(value) and not isinstance(value, (dict, list)):
        return str(value).strip()
    return f"{stem}-{row:05d}"


# --------------------------------------------------------------------------------------------
# Helpers shared by the converters
# --------------------------------------------------------------------------------------------


@dataclass
class _Turn:
    """One message plus where it came from in the input row, for error messages."""

    role: str
    content: str
    role_field: str
    content_field: str
    note: str = ""  # " ('nan' counts as missing)" when the content was a missing marker

    def message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _string(row: Mapping[str, Any], key: str, required: bool = False) -> str:
    """``row[key]`` as text: absent or null → ``""`` (or an error when required).

    A value ``is_missing`` judges missing ("nan", "None", NaN, blank) is ``""``, so the turn
    checks report it as empty; ``_note`` says what the value was.
    """
    value = row.get(key)
    if value is None:
        if required:
            raise RecordError(key, "missing")
        return ""
    if is_missing(value):
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(key, f"expected a string, got {type(value).__name__}")
    # Numbers appear as answers in QA data ("answer": 42); their text is the answer.
    return value if isinstance(value, str) else str(value)


def _note(row: Mapping[str, Any], key: str) -> str:
    """``missing_note`` for ``row[key]``: what the value was when it counts as missing."""
    return missing_note(row.get(key))


def _content(value: str) -> tuple[str, str]:
    """Message text and its note: a missing marker ("nan", "None", …) becomes ``""``."""
    return ("", missing_note(value)) if is_missing(value) else (value, "")


def _parse_messages(items: Any, list_field: str) -> list[_Turn]:
    """Turns from a ``[{from, value}]`` or ``[{role, content}]`` list, roles mapped to medtune's."""
    if isinstance(items, dict):
        items = [items]  # a single message where a list was expected (seen in chosen/rejected)
    if not isinstance(items, list) or not items:
        raise RecordError(list_field, "expected a non-empty list of messages")
    turns = []
    for i, item in enumerate(items):
        where = f"{list_field}[{i}]"
        if not isinstance(item, dict):
            raise RecordError(where, f"expected a message object, got {type(item).__name__}")
        role_key = "from" if "from" in item else "role"
        content_key = "value" if "value" in item else "content"
        raw_role = item.get(role_key)
        if raw_role is None:
            raise RecordError(f"{where}.{role_key}", "missing role")
        role = ROLE_ALIASES.get(str(raw_role).strip().casefold())
        if role is None:
            raise RecordError(
                f"{where}.{role_key}", f"unknown role {raw_role!r}; expected one of {sorted(ROLE_ALIASES)}"
            )
        content = item.get(content_key)
        if content is None:
            raise RecordError(f"{where}.{content_key}", "missing content")
        if not isinstance(content, str) and not is_missing(content):
            raise RecordError(f"{where}.{content_key}", f"expected a string, got {type(content).__name__}")
        text, note = _content(content)
        turns.append(_Turn(role, text, f"{where}.{role_key}", f"{where}.{content_key}", note))
    return turns


def _with_system(turns: list[_Turn], row: Mapping[str, Any], list_field: str) -> list[_Turn]:
    """Put a top-level ``system`` field first; drop empty system messages."""
    system = _string(row, "system")
    if system.strip():
        if turns and turns[0].role == "system":
            if turns[0].content.strip() != system.strip():
                raise RecordError("system", f"differs from the system message in {list_field}[0]")
        else:
            turns = [_Turn("system", system, "system", "system"), *turns]
    # An empty system prompt means "none"; keeping it would only add template tokens.
    return [t for t in turns if t.role != "system" or t.content.strip()]


def _check_turns(turns: list[_Turn], list_field: str, require_reply: bool) -> None:
    """Turn-order and emptiness checks, naming the input field (``Conversation.validate`` can't)."""
    for i, turn in enumerate(turns):
        if turn.role == "system" and i != 0:
            raise RecordError(turn.role_field, "a system message may only come first")
    dialogue = [t for t in turns if t.role != "system"]
    if not dialogue:
        raise RecordError(list_field, "no user or assistant messages")
    if dialogue[0].role != "user":
        raise RecordError(dialogue[0].role_field, f"the first message must be the user's, got {dialogue[0].role}")
    for previous, turn in zip(dialogue, dialogue[1:], strict=False):
        if previous.role == turn.role:
            raise RecordError(turn.role_field, f"two {turn.role} messages in a row; turns must alternate")
    for turn in dialogue:
        # An empty turn anywhere in a dialogue teaches the model to answer with nothing (or to
        # answer nothing), so it is rejected, not only an empty final reply.
        if not turn.content.strip():
            what = "reply" if turn.role == "assistant" else "user message"
            raise RecordError(turn.content_field, f"empty {what}{turn.note}")
    if require_reply and dialogue[-1].role != "assistant":
        raise RecordError(list_field, "the last message must be the assistant's reply")


def _conversation(record_id: str, turns: list[_Turn], meta: dict[str, Any]) -> Conversation:
    conversation = Conversation(record_id, [t.message() for t in turns], meta)
    return _revalidate(conversation.validate, "messages")


def _revalidate(validate: Callable[[], Any], fld: str) -> Any:
    # The converters' own checks should catch everything; the record's validate() is the final
    # guard, and its field name ("messages") is mapped to the input's.
    try:
        return validate()
    except RecordError as exc:
        raise RecordError(fld if exc.field in ("messages", "prompt") else exc.field, exc.reason) from None


def _reply(value: Any, fld: str, prompt: list[_Turn]) -> str:
    """Reply text from a string, one assistant message, or a list ending with one."""
    if isinstance(value, str):
        text, note = _content(value)
    elif isinstance(value, (dict, list)):
        turns = _parse_messages(value, fld)
        if len(turns) > 1:
            # TRL's conversational shape repeats the prompt before the reply; accept exactly that.
            head = _plain(turns[:-1])
            if head not in (_plain(prompt), _plain([t for t in prompt if t.role != "system"])):
                raise RecordError(
                    fld, "a reply list must be one assistant message, or the prompt's messages followed by it"
                )
        if turns[-1].role != "assistant":
            raise RecordError(turns[-1].role_field, f"the reply must be the assistant's, got {turns[-1].role}")
        text, note = turns[-1].content, turns[-1].note
    elif value is None:
        raise RecordError(fld, "missing")
    else:
        raise RecordError(fld, f"expected a string or message(s), got {type(value).__name__}")
    if not text.strip():
        raise RecordError(fld, "empty reply" + note)
    return text


def _plain(turns: list[_Turn]) -> list[tuple[str, str]]:
    return [(t.role, t.content.strip()) for t in turns]


def _meta(row: Mapping[str, Any], used: set[str]) -> dict[str, Any]:
    meta_value = row.get("meta")
    if meta_value is not None and not isinstance(meta_value, dict):
        raise RecordError("meta", f"expected an object, got {type(meta_value).__name__}")
    meta = dict(meta_value or {})
    # Source fields the shape does not use (PromptCBLUE's task_dataset, a data set's own labels)
    # are kept for filtering and reporting; they never enter the prompt.
    for key, value in row.items():
        if key not in used:
            # A kept label reading "nan" would be mistaken for the label "nan" when filtering.
            meta.setdefault(str(key), None if is_missing(value) else value)
    return meta
