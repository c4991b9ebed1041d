"""Read PromptCBLUE JSON lines into validated ``Conversation`` records.

PromptCBLUE (Zhu et al., 2023) casts 16 (v1) or 18 (later releases) Chinese medical NLP tasks as
prompt → answer text. Each line of ``train.json`` / ``dev.json`` / ``test.json`` is::

    {"input": prompt, "target": answer text, "answer_choices": [labels] | null,
     "task_type": "ner", "task_dataset": "CMeEE-V2", "sample_id": "dev-39492"}

Each line becomes::

    Conversation(id=sample_id,
                 messages=[{"role": "user", "content": input},
                           {"role": "assistant", "content": target}],
                 meta={"task_dataset": ..., "task_type": ..., "answer_choices": ...})

Accepted variations, all seen in the wild:

* the dataset field is ``task_dataset`` (the data files) or ``type`` (the benchmark README); the
  record's ``meta`` always calls it ``task_dataset``. When ``task_dataset`` names the dataset,
  ``type`` is the task *type* (``cls``, ``ner``, …, what the data files call ``task_type``) and is
  stored as ``task_type`` (``task_type`` itself wins when both are given);
* ``answer_choices`` is a list of labels, or one string (see :func:`parse_answer_choices`):
  the labels joined by ``，`` as the prompts list them, or a JSON array written as text;
* the relation task is ``CMeIE`` (v1) or ``CMeIE-V2`` (later releases); the name is kept as given;
* the test split has empty targets. Such a line becomes a conversation with the user message
  only. With ``require_target=True`` (the default) an empty target is an error, *unless every*
  line of the file has an empty target: that is a test file, and it is accepted as one.

Missing values follow the rule every converter shares (``medtune.io.is_missing``): ``null``, blank
text and the texts ``nan``/``None``/``null`` in any case count as absent. A missing target is an
empty target (so a test split whose targets all read ``null`` or ``nan`` is still a test file); a
missing ``input``, ``sample_id`` or task name rejects the line naming that field; a missing
``task_type`` is stored as ``None``.

Row numbers are 1-based physical line numbers (blank lines are skipped but counted), so an error
message points at the line an editor shows. Every non-blank line ends up either as a record or
as a reject; nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.io import DataFileError, convert_file, is_missing, json_safe, missing_note
from medtune.records import Conversation, RecordError

__all__ = [
    "PROMPTCBLUE_TASKS",
    "PromptCBLUEResult",
    "convert_promptcblue",
    "parse_answer_choices",
    "read_promptcblue",
    "task_name",
]

#: Every task name of the v1 (16 tasks, ``CMeIE``) and later (18 tasks, ``CMeIE-V2``) releases.
PROMPTCBLUE_TASKS = (
    "CMeEE-V2",
    "CMeIE",
    "CMeIE-V2",
    "CHIP-CDN",
    "CHIP-CDEE",
    "CHIP-STS",
    "CHIP-CTC",
    "CHIP-MDCFNPC",
    "KUAKE-IR",
    "KUAKE-QIC",
    "KUAKE-QQR",
    "KUAKE-QTR",
    "MedDG",
    "IMCS-V2-MRG",
    "IMCS-V2-NER",
    "IMCS-V2-DAC",
    "IMCS-V2-SR",
    "Text2DT",
    "CMedCausal",
)
_ON_INVALID = ("error", "skip")
# A comma between labels: full-width always; half-width unless between two ASCII digits, where it
# is part of a term (CHIP-CDN's standard terms include names like "1,25-二羟维生素D3").
_CHOICE_SEPARATOR = re.compile(r"，|(?<![0-9]),|,(?![0-9])")


def parse_answer_choices(value: Any) -> list[str] | None:
    """The labels of an ``answer_choices`` value, in order, or None when it has none.

    Accepted: null (or a missing-value text such as ``"nan"``); a list of strings; a JSON array of
    strings written as text (``'["是的", "不是"]'``, as CSV exports store lists); or one string of
    labels separated by commas, the way the prompts list them (``"是的，不是"``). A comma is
    full-width ``，``, or half-width ``,`` unless it stands between two ASCII digits (then it is
    part of a term). Labels of a string are stripped and empty ones dropped; a blank string has no
    labels (None). List items are kept as they are: the scorer strips them itself.

    Args:
        value: The field's value.

    Returns:
        The labels, or None.

    Raises:
        ValueError: Any other type, or a list with a non-string item.
    """
    if value is None or (isinstance(value, str) and is_missing(value)):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                decoded = json.loads(text)
            except json.JSONDecodeError:
                decoded = None  # a label that merely starts with "[": read as separated labels
            if isinstance(decoded, list):
                value = decoded
        if isinstance(value, str):
            labels = [label.strip() for label in _CHOICE_SEPARATOR.split(text)]
            return [label for label in labels if label] or None
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return list(value)
    raise ValueError(f"expected a list of strings, labels in one string separated by '，', or null; "
                     f"got {json.dumps(value, ensure_ascii=False)[:80]}")


def task_name(obj: dict[str, Any]) -> tuple[str | None, Any]:
    """``(field, value)`` naming a row's dataset: ``task_dataset``, else ``type`` if it names one.

    ``type`` is the dataset field of the benchmark README, but the task type (``cls``…) in files
    that also have ``task_dataset``; so ``type`` counts only when there is no ``task_dataset``.
    ``(None, None)`` when neither field is there.
    """
    if "task_dataset" in obj:
        return "task_dataset", obj["task_dataset"]
    if "type" in obj:
        return "type", obj["type"]
    return None, None


@dataclass
class PromptCBLUEResult:
    """Outcome of reading one PromptCBLUE file (the shape of CMExam's ``ConvertResult``).

    Attributes:
        records: Valid records, in file order.
        rejects: One dict per invalid line: ``{"row", "field", "reason", "raw"}`` (only filled
            with ``on_invalid="skip"``).
        n_rows: Non-blank lines read; always ``len(records) + len(rejects)``.
        n_without_target: Records whose target was empty (they have no assistant message).
        test_file: True when every line had an empty target, so empty targets were accepted
            even with ``require_target=True``.
    """

    records: list[Conversation]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    n_rows: int = 0
    n_without_target: int = 0
    test_file: bool = False

    @property
    def task_counts(self) -> dict[str, int]:
        """Records per task name, in first-seen order."""
        return dict(Counter(r.meta["task_dataset"] for r in self.records))


class _RowError(Exception):
    """A line-level problem; ``field`` names the offending JSON field (None: the whole line)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def read_promptcblue(
    path: str | os.PathLike,
    on_invalid: str = "error",
    require_target: bool = True,
) -> PromptCBLUEResult:
    """Read a PromptCBLUE JSON-lines file into validated ``Conversation`` records.

    Args:
        path: A PromptCBLUE split (``train.json``, ``dev.json``, ``test.json``; JSON lines
            despite the extension).
        on_invalid: ``"error"`` raises on the first invalid line; ``"skip"`` collects invalid
            lines in ``rejects`` and carries on.
        require_target: Whether an empty ``target`` is an error. Ignored (treated as False) when
            every line's target is empty, i.e. for a test split.

    Returns:
        The records, the rejects and counts.

    Raises:
        DataFileError: With ``on_invalid="error"``, for the first invalid line; the message names
            the file, the 1-based line and the field. In both modes, for an undecodable file.
        ValueError: ``on_invalid`` is not ``"error"`` or ``"skip"``.
    """
    if on_invalid not in _ON_INVALID:
        raise ValueError(f"on_invalid must be one of {_ON_INVALID}, got {on_invalid!r}")
    path = Path(path)
    lines = _read_lines(path)

    # Two passes: whether empty targets are allowed depends on the whole file (a test split has
    # no targets at all), and that must be known before the first line is judged.
    parsed: list[tuple[int, Any, _RowError | None]] = []
    for lineno, line in lines:
        try:
            parsed.append((lineno, json.loads(line), None))
        except json.JSONDecodeError as exc:
            parsed.append((lineno, {"line": line}, _RowError(None, f"invalid JSON: {exc.msg}")))
    targets = [obj.get("target") for _, obj, err in parsed if err is None and isinstance(obj, dict)]
    test_file = bool(targets) and all(is_missing(t) for t in targets)
    allow_empty = test_file or not require_target

    records: list[Conversation] = []
    rejects: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, obj, error in parsed:
        try:
            if error is not None:
                raise error
            record = _to_record(obj, allow_empty)
            if record.id in seen:
                # Predictions are joined to gold by sample_id; two lines with one id would collide.
                raise _RowError("sample_id", f"duplicate sample_id {record.id!r} (first at line {seen[record.id]})")
        except (_RowError, RecordError) as exc:
            if on_invalid == "error":
                raise DataFileError(path, lineno, exc.field, exc.reason) from None
            rejects.append({"row": lineno, "field": exc.field, "reason": exc.reason, "raw": json_safe(obj)})
            continue
        seen[record.id] = lineno
        records.append(record)

    # Not a bare ``assert``: this guard must survive ``python -O``.
    if len(parsed) != len(records) + len(rejects):
        raise AssertionError(f"row accounting broke: {len(parsed)} rows != {len(records)} + {len(rejects)}")
    return PromptCBLUEResult(
        records=records,
        rejects=rejects,
        n_rows=len(parsed),
        n_without_target=sum(1 for r in records if r.messages[-1]["role"] != "assistant"),
        test_file=test_file,
    )


def convert_promptcblue(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    on_invalid: str = "error",
    rejects_path: str | os.PathLike | None = None,
    require_target: bool = True,
) -> PromptCBLUEResult:
    """Convert a PromptCBLUE file into a records file (one ``Conversation.to_dict()`` a line).

    Both files are written atomically. With ``on_invalid="error"`` nothing is written when any
    line is invalid.

    Args:
        input_path: PromptCBLUE JSON-lines file.
        out_path: Records output (JSON lines).
        on_invalid: ``"error"`` or ``"skip"``, as in ``read_promptcblue``.
        rejects_path: Where rejects go when there are any; default
            ``default_rejects_path(out_path)`` (``<out stem>.rejects.jsonl``). When there are
            none, a rejects file left at this path by an earlier run is removed so it cannot be
            mistaken for this run's.
        require_target: As in ``read_promptcblue``.

    Returns:
        The ``PromptCBLUEResult`` of reading ``input_path``.

    Raises:
        DataFileError: As ``read_promptcblue``.
        ValueError: The output would overwrite the input, or records and rejects share a path.
    """
    return convert_file(input_path, out_path, rejects_path, lambda path: read_promptcblue(path, on_invalid=on_invalid, require_target=require_target))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        # utf-8-sig: a BOM left by an editor would otherwise make line 1 invalid JSON.
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise DataFileError(path, None, None, f"not UTF-8 ({exc.reason}); re-save the file as UTF-8") from None
    # split("\n"), not splitlines(): the latter also breaks at U+2028 etc., which JSON written
    # with ensure_ascii=False may carry inside strings.
    return [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _to_record(obj: Any, allow_empty_target: bool) -> Conversation:
    if not isinstance(obj, dict):
        raise _RowError(None, "expected a JSON object")

    task_field, task = task_name(obj)
    if task_field is None:
        raise _RowError("task_dataset", "missing (expected 'task_dataset' or 'type')")
    if is_missing(task):
        raise _RowError(task_field, "missing task name" + missing_note(task)
                        + f"; expected one of {list(PROMPTCBLUE_TASKS)}")
    if not isinstance(task, str) or task.strip() not in PROMPTCBLUE_TASKS:
        # Scoring dispatches on the task name, so an unknown name would fail only much later.
        hint = (" ('type' is the task type when 'task_dataset' names the dataset; this line has no "
                "'task_dataset')" if task_field == "type" else "")
        raise _RowError(task_field, f"unknown task {task!r}; expected one of {list(PROMPTCBLUE_TASKS)}{hint}")

    sample_id = obj.get("sample_id")
    if is_missing(sample_id) or isinstance(sample_id, (dict, list, bool)) or not str(sample_id).strip():
        raise _RowError("sample_id", "missing or empty" + missing_note(sample_id))

    prompt = obj.get("input")
    if "input" in obj and is_missing(prompt):
        raise _RowError("input", "missing or empty prompt" + missing_note(prompt))
    if not isinstance(prompt, str):
        raise _RowError("input", "missing or not a string")

    raw_target = obj.get("target", "")
    if not (is_missing(raw_target) or isinstance(raw_target, str)):
        raise _RowError("target", "not a string")
    target = "" if is_missing(raw_target) else raw_target
    if not target and not allow_empty_target:
        raise _RowError(
            "target", f"empty target{missing_note(raw_target)} while other lines have one: a line without a "
            "target can be predicted, not trained on; fill it in, or leave such lines out "
            "(data.on_invalid=skip in train, --on-invalid skip in convert)"
        )

    try:
        choices = parse_answer_choices(obj.get("answer_choices"))
    except ValueError as exc:
        raise _RowError("answer_choices", str(exc)) from None

    # "type" is the task type when "task_dataset" named the dataset (see the module docstring).
    type_field = "task_type" if not is_missing(obj.get("task_type")) or task_field == "type" else "type"
    task_type = None if is_missing(obj.get(type_field)) else obj.get(type_field)
    if task_type is not None and not isinstance(task_type, str):
        raise _RowError(type_field, "expected a string or null")

    messages = [{"role": "user", "content": prompt}]
    has_target = bool(target.strip())
    if has_target:
        messages.append({"role": "assistant", "content": target})
    record = Conversation(
        id=str(sample_id).strip(),
        messages=messages,
        meta={"task_dataset": task.strip(), "task_type": task_type, "answer_choices": choices},
    )
    return record.validate(require_reply=has_target)
