"""Batch prediction, appended line by line so an interrupted run resumes — only as itself.

A predictions file records what produced it (``NAME.meta.json``: model, adapters and their
hashes, run and step, template and its hash, generation settings; see
:mod:`medtune.inference.provenance`) and every line carries that producer's key. A rerun into an
existing file continues it only when all of that is the same and every line already there has
the prompt the data and template give now; anything else is refused, naming the difference
(``overwrite=True`` / ``--overwrite`` starts over). ``NAME.lock`` keeps a second process out.

Also here:

* **Prompt wrapping** (:class:`PromptWrapping`; ``predict --instruction/--system``): texts given
  once that wrap every input, in the spirit of other toolkits' ``--with-prompt``. They are built
  into the template (:func:`wrap_template`), so the prompts and the template's recorded hash carry
  them, and they are recorded by name in the producer description: a rerun with another text is
  refused.
* **Question lists** (:func:`read_question_lines`): a ``.txt`` file of one free-text question
  per line. Questions have no options, so they are predicted as conversations (one user turn) in
  the model's conversation format: a run's saved one, or ``plain``/``chat`` given as the template.
  Ids are ``line-N`` (N the 1-based line in the file, blank lines counted, so an id names the line
  an editor shows); blank lines are skipped and counted.
* **CSV copies** (:func:`write_predictions_csv`, ``predict --format csv``): the JSON lines stay
  the resumable source of truth; the CSV is rewritten from them, atomically, at the end of each
  run (columns in :data:`CSV_COLUMNS`). Cells a spreadsheet would run as a formula get a leading
  ``'`` (:func:`csv_safe_cell`); the JSON lines keep the text as generated.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medtune.inference.base import Backend, GenerationParams
from medtune.inference.provenance import differences, prediction_source
from medtune.io import (
    DataFileError,
    JsonlAppender,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    read_jsonl_tolerant,
)
from medtune.records import Conversation, ExamRecord
from medtune.templates import ConversationTemplate, ExamTemplate, get_template

log = logging.getLogger(__name__)


def prediction_row(rec: ExamRecord, template: ExamTemplate, prompt: str, output: str) -> dict[str, Any]:
    """One line of predictions.jsonl (``predict`` adds ``source``, the producer's key)."""
    return {
        "id": rec.id,
        "question": rec.question,
        "options": rec.options,
        "answer": rec.answer,
        "explanation": rec.explanation,
        "annotations": rec.annotations,
        "template": template.name,
        "prompt": prompt,
        "output": output,
    }


# ---- instructions ----------------------------------------------------------------------------------

#: Where an instruction puts each input; an instruction without it goes before the input.
INPUT_PLACEHOLDER = "{input}"


@dataclass(frozen=True)
class PromptWrapping:
    """Texts given once (on the command line) that wrap every input; see :func:`wrap_template`.

    Attributes:
        instruction: Written into each input. With ``{input}`` it is the whole wrapper and the input
            takes that place; without, it goes on its own line before the input.
        system: A system text: the system message of a chat rendering, a first line of its own
            in a plain one.
    """

    instruction: str | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        for name in ("instruction", "system"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                # it would change the producer description and nothing else
                raise ValueError(f"the {name} is empty; leave it out, or give the text that should wrap each input")

    def record(self) -> dict[str, str]:
        """What the producer description records: only the texts given (none for no wrapping)."""
        return {k: v for k, v in (("instruction", self.instruction), ("system", self.system)) if v is not None}


def _literal(text: str) -> str:
    # for str.format templates: a brace in the user's text is text
    return text.replace("{", "{{").replace("}", "}}")


def wrap_template(template: ExamTemplate | ConversationTemplate,
                  wrapping: PromptWrapping | None) -> ExamTemplate | ConversationTemplate:
    """``template`` with the wrapping built in, so the template (and its recorded hash) says it all.

    Conversation templates carry ``instruction`` and ``system`` themselves: the instruction is
    written into the first user message with the template's ``instruction_format`` (with
    ``{input}``: the instruction is that format, the message taking the place of ``{input}``);
    the system text becomes the template's ``system``, which a conversation's own system message
    overrides (it is part of the data).

    Exam templates: the instruction wraps the question block the template renders (with
    ``{input}``), else comes on the line before it; the system text becomes a chat template's
    system message (before any the template has), or the first line of a plain prompt.
    """
    if wrapping is None or not wrapping.record():
        return template
    instruction, system = wrapping.instruction, wrapping.system
    if isinstance(template, ConversationTemplate):
        changes: dict[str, Any] = {}
        if instruction is not None:
            changes["instruction"] = instruction
            if INPUT_PLACEHOLDER in instruction:
                changes["instruction_format"] = _literal(instruction).replace("{{input}}", "{user}")
        if system is not None:
            changes["system"] = system
        return dataclasses.replace(template, **changes)
    prompt = template.prompt
    if instruction is not None:
        prompt = (_literal(instruction).replace("{{input}}", prompt) if INPUT_PLACEHOLDER in instruction
                  else f"{_literal(instruction)}\n{prompt}")
    if system is not None and template.chat:
        joined = f"{system}\n{template.system}" if template.system else system
        return dataclasses.replace(template, prompt=prompt, system=joined)
    if system is not None:
        prompt = f"{_literal(system)}\n{prompt}"
    return dataclasses.replace(template, prompt=prompt)


def describe_producer(model: dict[str, Any] | None, template: ExamTemplate | ConversationTemplate,
                      params: GenerationParams, kind: str,
                      wrapping: PromptWrapping | None = None) -> dict[str, Any]:
    """The producer description ``predict`` records (and checks a rerun against).

    ``template`` is the template as given; the wrapping is built into it here, as ``predict``
    does, and its texts are also recorded by name (``instruction``, ``system``), only when
    given, so that files written without any keep their description.
    """
    model = {**(model or {}), **(wrapping.record() if wrapping else {})}
    return prediction_source(model, wrap_template(template, wrapping), params, kind)


# ---- question lists (.txt) ------------------------------------------------------------------------


@dataclass
class QuestionLines:
    """The questions of a ``.txt`` question list.

    Attributes:
        records: One single-turn conversation per non-blank line (id ``line-N``, meta ``{"line": N}``).
        n_lines: Lines in the file (a final newline does not start another line).
        n_blank: Blank (empty or whitespace-only) lines, skipped.
    """

    records: list[Conversation]
    n_lines: int
    n_blank: int


def read_question_lines(path: str | Path) -> QuestionLines:
    """Read a free-text question list: one question per line, UTF-8 (a BOM is allowed).

    Each question is stripped. Lines end at a line feed only (a carriage return before it goes
    with the stripping), so a question may contain any other character, U+2028 included.

    Raises:
        DataFileError: The file is not UTF-8, or it has no question at all.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFileError(path, None, None, f"not UTF-8 ({exc.reason}); re-save the file as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start another
    records = [
        Conversation(id=f"line-{n}", messages=[{"role": "user", "content": line.strip()}], meta={"line": n})
        for n, line in enumerate(lines, start=1) if line.strip()
    ]
    if not records:
        raise DataFileError(path, None, None, f"no questions: all {len(lines)} lines are blank" if lines
                            else "no questions: the file is empty")
    return QuestionLines(records, n_lines=len(lines), n_blank=len(lines) - len(records))


# ---- CSV copies ------------------------------------------------------------------------------------

#: Columns of the CSV copy, by kind of predictions file.
#: exam: ``id``; ``question``; ``options``, one ``LETTER TEXT`` line per option (CMExam's cell
#: format); ``answer``, the gold letters ("" when the data has none); ``output``, the model's text.
#: conversation: ``id``; ``input``, the last user message as the data gave it (before any template
#: or instruction); ``reference``, the data's reply ("" when none); ``output``.
CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "exam": ("id", "question", "options", "answer", "output"),
    "conversation": ("id", "input", "reference", "output"),
}


def default_csv_path(out_path: str | Path) -> Path:
    """Where the CSV copy of ``out_path`` goes: the same name with ``.csv``.

    Raises:
        ValueError: ``out_path`` itself ends in ``.csv`` (the copy would replace the JSON lines).
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() == ".csv":
        raise ValueError(f"{out_path}: the predictions file is JSON lines (resumable; give it a .jsonl name); "
                         "the CSV copy is written beside it with the same name and .csv")
    return out_path.with_suffix(".csv")


#: First characters that make Excel, LibreOffice and Google Sheets read a cell as a formula (or,
#: for tab and carriage return, that they skip before finding one): OWASP's "CSV injection" list.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe_cell(value: str) -> str:
    """``value`` as a spreadsheet shows it as text: a leading ``'`` when it would start a formula.

    Model outputs (and data texts) are untrusted: a cell such as ``=HYPERLINK("http://x","y")``
    or ``-1+2`` is evaluated when a grader opens the CSV in a spreadsheet program, which can
    leak data or run commands through DDE. OWASP's remedy is to prefix such cells with a single
    quote, which spreadsheets take as "text follows" and do not display. Every other cell is
    written unchanged; the JSON lines always keep the exact generated text.

    Args:
        value: A cell's text.

    Returns:
        ``"'" + value`` when ``value`` starts with one of :data:`FORMULA_TRIGGERS`, else ``value``.
    """
    return "'" + value if value.startswith(FORMULA_TRIGGERS) else value


def _csv_row(row: dict[str, Any], kind: str) -> list[str]:
    if kind == "exam":
        options = row.get("options") or {}
        cells = [str(row.get("id", "")), row.get("question") or "",
                 "\n".join(f"{k} {v}" for k, v in options.items()), row.get("answer") or "", row.get("output") or ""]
    else:
        users = [m.get("content", "") for m in row.get("messages") or [] if m.get("role") == "user"]
        cells = [str(row.get("id", "")), users[-1] if users else "", row.get("reference") or "",
                 row.get("output") or ""]
    # Every cell, not only the output: questions and references come from data files of any origin.
    return [csv_safe_cell(str(cell)) for cell in cells]


def write_predictions_csv(out_path: str | Path, csv_path: str | Path | None = None,
                          order: list[str] | None = None) -> tuple[Path, int]:
    """Write the CSV copy of a predictions file (columns: :data:`CSV_COLUMNS`), atomically.

    Rows follow ``order`` (ids, e.g. the data file's), then any other rows in file order. The
    file is UTF-8 with a byte-order mark, so spreadsheet programs show Chinese text correctly,
    with CRLF row ends and quoting as RFC 4180 has it (a cell may span lines).

    The copy is meant to be opened in a spreadsheet, so it is neutralised against formula
    ("CSV") injection: a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
    return gets a leading ``'`` (:func:`csv_safe_cell`), so ``=HYPERLINK(...)`` or ``-1+2`` in a
    model output is shown as text instead of being run. Such cells therefore differ from the
    JSON lines by that one character; read the JSON lines for the exact text.

    Args:
        out_path: The predictions JSON lines.
        csv_path: Where to write; default :func:`default_csv_path`.
        order: Ids in the order the rows should appear.

    Returns:
        The CSV path and the number of rows written.
    """
    out_path = Path(out_path)
    csv_path = Path(csv_path) if csv_path is not None else default_csv_path(out_path)
    rows = read_jsonl(out_path)
    kind = "exam" if rows and "options" in rows[0] else "conversation"
    position = {row_id: i for i, row_id in enumerate(order or [])}
    ranked = sorted(enumerate(rows), key=lambda ir: (position.get(str(ir[1].get("id")), len(position)), ir[0]))
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # excel dialect: "\r\n", minimal quoting
    writer.writerow(CSV_COLUMNS[kind])
    writer.writerows(_csv_row(row, kind) for _, row in ranked)
    atomic_write_text(csv_path, "\ufeff" + buffer.getvalue())
    return csv_path, len(rows)


class PredictionFileError(RuntimeError):
    """An existing predictions file cannot be continued (other producer, other data, in use)."""


def meta_path(out_path: str | Path) -> Path:
    """Where the description of a predictions file's producer lives: ``NAME.meta.json`` beside it."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.meta.json")


@contextlib.contextmanager
def _exclusive(out_path: Path) -> Iterator[None]:
    """Hold ``NAME.lock`` for the block; a second writer fails at once with a clear message.

    ``flock`` is released by the kernel when the process dies, so a crash never leaves a stale
    lock behind (the empty lock file itself stays; it is harmless).
    """
    import fcntl
    import os

    lock = out_path.with_name(f"{out_path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise PredictionFileError(
                f"{out_path} is being written by another process (pid {holder}, lock {lock}); "
                "wait for it to finish or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_AGAIN = "pass --overwrite to predict everything again, or choose another --out"


def _check_producer(out_path: Path, n_rows: int, source: dict[str, Any]) -> None:
    """Refuse to continue ``out_path`` (holding ``n_rows`` lines) unless ``source`` produced it."""
    meta = meta_path(out_path)
    if not meta.exists():
        raise PredictionFileError(
            f"{out_path} already has {n_rows} predictions but no {meta.name} saying what produced them "
            f"(an older medtune or another tool wrote it); {_AGAIN}")
    changed = differences(json.loads(meta.read_text(encoding="utf-8")), source)
    if changed:
        raise PredictionFileError(
            f"{out_path} was produced by something else, resuming it would mix two producers' outputs: "
            + "; ".join(changed) + f"; {_AGAIN}")


def check_resumable(out_path: str | Path, source: dict[str, Any], overwrite: bool = False) -> None:
    """Fail fast (before a model is loaded) when ``out_path`` could not be continued by ``source``.

    ``source`` is a :func:`medtune.inference.provenance.prediction_source`; ``predict`` checks
    again, line by line, once it runs.
    """
    rows = [] if overwrite else read_jsonl_tolerant(out_path)
    if rows:
        _check_producer(Path(out_path), len(rows), source)


def _resume_state(out_path: Path, source: dict[str, Any], prompts: dict[str, str],
                  overwrite: bool, csv_path: Path | None = None) -> set[str]:
    """Ids already predicted by this same producer; refuses anything else (see module docs)."""
    meta = meta_path(out_path)
    if overwrite:
        # the CSV copy goes too: until this run ends, an old copy would describe other predictions
        for path in (out_path, meta, csv_path):
            if path is not None:
                path.unlink(missing_ok=True)
    rows = read_jsonl_tolerant(out_path)
    if not rows:
        atomic_write_json(meta, source)
        return set()
    _check_producer(out_path, len(rows), source)
    foreign = [i for i, row in enumerate(rows, start=1) if row.get("source") != source["key"]]
    if foreign:
        raise PredictionFileError(
            f"{out_path}: {len(foreign)} line(s) (first: line {foreign[0]}) were not written by the producer "
            f"{meta.name} describes; {_AGAIN}")
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=1):
        if row.get("id") in seen:
            raise PredictionFileError(f"{out_path}: id {row.get('id')!r} is on lines {seen[row['id']]} and {line}; "
                                      f"{_AGAIN}")
        seen[row.get("id")] = line
        expected = prompts.get(row.get("id"))
        if expected is not None and row.get("prompt") != expected:
            raise PredictionFileError(
                f"{out_path}, line {line}: id {row.get('id')!r} was predicted from a different prompt than "
                f"the data and template give now (the question or the template changed); {_AGAIN}")
    return set(seen)


def _unique_ids(records: list[Any]) -> None:
    positions: dict[str, list[int]] = {}
    for i, rec in enumerate(records, start=1):
        positions.setdefault(rec.id, []).append(i)
    repeated = {k: v for k, v in positions.items() if len(v) > 1}
    if repeated:
        shown = ", ".join(f"{k!r} (records {', '.join(map(str, v))})" for k, v in list(repeated.items())[:3])
        raise ValueError(f"{len(repeated)} id(s) occur more than once: {shown}; each id is predicted once and "
                         "matched back by id (predict --dedupe keeps the first of identical repeats)")


def _over_context(records: list[Any], prompts: dict[str, str], backend: Backend, params: GenerationParams,
                  add_special_tokens: bool) -> set[str]:
    """Ids whose prompt plus ``max_new_tokens`` exceeds the model's context; warns once, loudly.

    Such outputs are not refused (one long question should not stop a 7,000-question run), but
    they are marked ``over_context`` in their prediction line, and the warning says how many.
    """
    limit = getattr(backend, "context_length", None)
    if not limit:
        return set()
    extra = getattr(backend, "virtual_tokens", 0) + params.max_new_tokens
    need = {r.id: backend.count_tokens(prompts[r.id], add_special_tokens=add_special_tokens) + extra for r in records}
    over = {i for i, n in need.items() if n > limit}
    if over:
        first = max(over, key=need.__getitem__)
        log.warning("%d of %d prompts plus up to %d new tokens exceed the model's context of %d tokens (longest: id "
                    "%r, %d tokens); their outputs are unreliable and are marked over_context", len(over),
                    len(records), params.max_new_tokens, limit, first, need[first])
    return over


def _run(
    records: list[Any],
    prompts: dict[str, str],
    make_row: Any,
    backend: Backend,
    out_path: str | Path,
    params: GenerationParams,
    add_special_tokens: bool,
    source: dict[str, Any],
    batch_size: int,
    progress: bool,
    overwrite: bool,
    unit: str,
    csv_path: str | Path | None = None,
) -> dict[str, int]:
    """The resumable loop shared by exam and conversation prediction."""
    _unique_ids(records)
    out_path = Path(out_path)
    csv_path = Path(csv_path) if csv_path is not None else None
    with _exclusive(out_path):
        done = _resume_state(out_path, source, prompts, overwrite, csv_path)
        todo = sorted((r for r in records if r.id not in done), key=lambda r: len(prompts[r.id]))
        too_long = _over_context(todo, prompts, backend, params, add_special_tokens)
        with JsonlAppender(out_path) as sink, tqdm(
            total=len(records), initial=len(records) - len(todo), desc="predict", unit=unit, disable=not progress
        ) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                outputs = backend.generate([prompts[r.id] for r in batch], params,
                                           add_special_tokens=add_special_tokens)
                for rec, output in zip(batch, outputs, strict=True):
                    flag = {"over_context": True} if rec.id in too_long else {}
                    sink.write({**make_row(rec, output), "source": source["key"], **flag})
                bar.update(len(batch))
        if csv_path is not None:
            # still under the lock: no other writer can be appending while the copy is read
            write_predictions_csv(out_path, csv_path, order=[r.id for r in records])
    return {"total": len(records), "already_done": len(records) - len(todo), "predicted": len(todo)}


def predict(
    records: list[ExamRecord],
    backend: Backend,
    template: ExamTemplate | str,
    out_path: str | Path,
    params: GenerationParams | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
    wrapping: PromptWrapping | None = None,
    csv_path: str | Path | None = None,
) -> dict[str, int]:
    """Generate an output for every record not yet in ``out_path`` and append it there.

    Items are batched by prompt length (less padding); each finished batch is flushed to disk, so
    a crash loses at most one batch and a rerun skips every id already written — but only when
    the rerun has the same producer: ``source`` (:func:`medtune.inference.provenance.model_source`;
    None records only the backend's name), the template, ``params`` and ``wrapping`` are written
    to ``NAME.meta.json`` and any difference is refused (``overwrite=True`` starts over). A lock
    file stops a second process writing the same file.

    Args:
        records: Exam records, each id once.
        backend: What generates (``medtune.inference.base.Backend``).
        template: Exam template or its name.
        out_path: The predictions JSON lines (created or continued).
        params: Decoding settings; default greedy ``GenerationParams()``.
        batch_size: Prompts per ``generate`` call.
        tokenizer: Needed by chat templates to render prompts.
        progress: Show a progress bar.
        source: The model side of the producer description.
        overwrite: Start ``out_path`` over instead of continuing it.
        wrapping: Instruction/system texts wrapping every input, built into the template (:func:`wrap_template`).
        csv_path: Also write a CSV copy there at the end (:func:`write_predictions_csv`).

    Returns:
        ``{"total", "already_done", "predicted"}`` counts.

    Raises:
        ValueError: Two records share an id.
        PredictionFileError: The existing file cannot be continued (the message says why).
    """
    template = get_template(template) if isinstance(template, str) else template
    params = params or GenerationParams()
    full = describe_producer(source or {"backend": getattr(backend, "name", type(backend).__name__)},
                             template, params, "exam", wrapping)
    template = wrap_template(template, wrapping)
    prompts = {r.id: template.render_prompt(r, tokenizer) for r in records}
    return _run(records, prompts, lambda rec, output: prediction_row(rec, template, prompts[rec.id], output),
                backend, out_path, params, not template.chat, full, batch_size, progress, overwrite, "q",
                csv_path)


def predict_conversations(
    records: list,
    backend: Backend,
    template: ConversationTemplate,
    out_path: str | Path,
    params: GenerationParams | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
    wrapping: PromptWrapping | None = None,
    csv_path: str | Path | None = None,
) -> dict[str, int]:
    """Generate the final assistant reply of each conversation, resumably (like ``predict``).

    Each line: ``id, messages`` (the prompt messages as the data gave them), ``reference`` (the
    record's reply, if any), ``meta``, ``template``, ``prompt`` (as rendered, wrapping
    included), ``output`` (cut at the template's end marker; ``raw_output`` keeps the text as
    generated when that cut anything) and ``source``. ``wrapping`` and ``csv_path`` are as in ``predict``.
    """
    from medtune.data.conversations import conversation_prompt, uses_special_tokens

    params = params or GenerationParams()
    full = describe_producer(source or {"backend": getattr(backend, "name", type(backend).__name__)},
                             template, params, "conversation", wrapping)
    # the template object itself, not its name: a run's own or a wrapped template renders differently
    # from the shipped one of the same name
    template = wrap_template(template, wrapping)
    prompts = {r.id: conversation_prompt(r.prompt_messages, template, tokenizer)[0] for r in records}

    def row(rec: Any, output: str) -> dict[str, Any]:
        # The template's end marker (e.g. "### 结束") is trained markup, not answer: it and whatever
        # the model wrote after it are cut, and the text as generated is kept beside when they differ.
        cleaned = template.clean_output(output) if hasattr(template, "clean_output") else output
        line = {"id": rec.id, "messages": rec.prompt_messages, "reference": rec.reply, "meta": rec.meta,
                "template": template.name, "prompt": prompts[rec.id], "output": cleaned}
        return line if cleaned == output else {**line, "raw_output": output}

    return _run(records, prompts, row, backend, out_path, params, uses_special_tokens(template), full,
                batch_size, progress, overwrite, "item", csv_path)
