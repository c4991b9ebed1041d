"""Tokenise exam records for supervised fine-tuning: prompt masked, loss on the response only.

The prompt and the response are tokenised separately and concatenated, so the prompt tokens a
model is trained on are exactly the tokens ``encode_prompt`` gives at prediction time (tokenising
the joined string would let BPE merge across the boundary and shift the first answer token).

Lengths, for exam records and conversations alike (``LengthLimits``): ``max_length`` caps prompt +
target tokens, ``max_source_length`` the prompt, ``max_target_length`` the target (EOS included).
With ``truncation`` ``middle``/``left`` an example over a limit is cut to fit; with ``drop`` it is
dropped whole. How each kind is cut:

* exam records: the explanation is shortened (characters from its end) until the target fits, so
  the answer is never cut off, whichever side of the explanation it sits on. The prompt is never
  cut — a question with part of it or of its options missing is a different question — so a record
  whose prompt, or prompt and bare answer, do not fit is dropped. ``max_explanation_chars`` drops
  the record or cuts the explanation to that many characters, before any tokenising.
* conversations (``medtune.data.conversations``): the prompt is cut from the left or in the middle,
  the target from the right.

Every shortened example is listed in ``SFTBuild.truncated`` and every dropped one in
``SFTBuild.skipped``, with the reason and, for PromptCBLUE-style data, its task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from medtune.records import ExamRecord
from medtune.templates import ExamTemplate

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)
TRUNCATIONS = ("middle", "left", "drop")
LONG_EXPLANATION = ("drop", "cut")


def encode_prompt(tokenizer: Any, prompt: str, template: ExamTemplate) -> list[int]:
    """Token ids of a rendered prompt, the same way for training and inference.

    Plain templates get the tokenizer's usual special tokens (e.g. BOS); chat templates already
    contain them in the rendered text, so none are added again.
    """
    return tokenizer(prompt, add_special_tokens=not template.chat)["input_ids"]


def encode_target(tokenizer: Any, target: str) -> list[int]:
    """Token ids of a response, ending with EOS so the model learns to stop."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def task_of(meta: dict[str, Any] | None) -> str | None:
    """The task a record belongs to (PromptCBLUE's ``meta.task_dataset``), or ``None``."""
    value = (meta or {}).get("task_dataset")
    return str(value) if value not in (None, "") else None


@dataclass(frozen=True)
class LengthLimits:
    """Token limits of one example and what happens to an example over them.

    Attributes:
        max_length: Prompt + target tokens.
        max_source_length: Prompt tokens (``None``: only ``max_length`` limits the prompt).
        max_target_length: Target tokens, EOS included (``None``: likewise).
        truncation: ``middle`` / ``left``: cut to fit (see ``fit``); ``drop``: drop the example.
    """

    max_length: int
    max_source_length: int | None = None
    max_target_length: int | None = None
    truncation: str = "middle"

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"data.truncation: expected one of {list(TRUNCATIONS)}, got {self.truncation!r}")
        if self.max_length < 1:
            raise ValueError(f"data.max_length: must be > 0, got {self.max_length}")
        for key, value in (("max_source_length", self.max_source_length),
                           ("max_target_length", self.max_target_length)):
            # a part as long as the whole would leave the other part no token
            if value is not None and not 1 <= value < self.max_length:
                raise ValueError(f"data.{key}: expected 1 <= x < data.max_length ({self.max_length}), got {value}")

    def exceeded(self, n_source: int, n_target: int) -> list[str]:
        """Each limit an example of these lengths is over, as text naming the setting (empty: fits)."""
        out = []
        if self.max_source_length is not None and n_source > self.max_source_length:
            out.append(f"prompt {n_source} tokens > data.max_source_length={self.max_source_length}")
        if self.max_target_length is not None and n_target > self.max_target_length:
            out.append(f"target {n_target} tokens > data.max_target_length={self.max_target_length}")
        if n_source + n_target > self.max_length:
            out.append(f"prompt + target {n_source + n_target} tokens > data.max_length={self.max_length}")
        return out

    def fit(self, n_source: int, n_target: int) -> tuple[int, int]:
        """Prompt and target tokens to keep when cutting (``truncation`` middle or left).

        Each part is first capped by its own limit. If they still exceed ``max_length``, the prompt
        gives way first — the target is what the model learns — but never below
        ``max_length - R`` tokens, where R is ``max_target_length`` or, without one, half of
        ``max_length``; the target is then cut from the right to what is left. So a short answer
        after a long prompt is kept whole, and a long reply cannot squeeze its prompt to nothing.
        """
        src = min(n_source, self.max_source_length or n_source)
        tgt = min(n_target, self.max_target_length or n_target)
        if src + tgt > self.max_length:
            reply_share = self.max_target_length or self.max_length - self.max_length // 2
            src = max(self.max_length - tgt, min(src, self.max_length - reply_share))
            tgt = self.max_length - src
        return src, tgt

    def describe(self) -> str:
        """The settings, as the config writes them."""
        parts = [f"data.max_length={self.max_length}"]
        if self.max_source_length is not None:
            parts.append(f"data.max_source_length={self.max_source_length}")
        if self.max_target_length is not None:
            parts.append(f"data.max_target_length={self.max_target_length}")
        return ", ".join([*parts, f"data.truncation={self.truncation}"])


@dataclass
class SFTBuild:
    """Tokenised examples plus what happened to the records that did not fit as they were.

    Attributes:
        examples: ``{"input_ids", "labels"}`` per kept record, in record order.
        n_records: Records given.
        truncated: One dict per kept-but-shortened record (``id``, what was cut, ``reason``).
        skipped: One dict per dropped record (``id``, ``reason``; ``task`` where there is one).
        tasks: Task → ``{"whole", "truncated", "dropped"}`` counts (records with a task only).
    """

    examples: list[dict[str, list[int]]]
    n_records: int
    truncated: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)

    def keep(self, example: dict[str, list[int]], task: str | None = None,
             truncated: dict[str, Any] | None = None) -> None:
        """Add an example; ``truncated`` describes the cut when it was shortened to fit."""
        self.examples.append(example)
        if truncated is not None:
            self.truncated.append(_with_task(truncated, task))
        self._count(task, "whole" if truncated is None else "truncated")

    def drop(self, record_id: str, task: str | None, reason: str) -> None:
        """Record that ``record_id`` is left out, and why."""
        self.skipped.append(_with_task({"id": record_id, "reason": reason}, task))
        self._count(task, "dropped")

    def _count(self, task: str | None, status: str) -> None:
        if task is not None:
            self.tasks.setdefault(task, {"whole": 0, "truncated": 0, "dropped": 0})[status] += 1

    def summary(self) -> dict[str, Any]:
        """Counts for logs and the run directory (``data_summary.json``)."""
        out: dict[str, Any] = {
            "records": self.n_records,
            "examples": len(self.examples),
            "whole": len(self.examples) - len(self.truncated),
            "truncated": len(self.truncated),
            "dropped": len(self.skipped),
        }
        if self.tasks:
            out["tasks"] = {name: dict(counts) for name, counts in sorted(self.tasks.items())}
        return out

    def dropped_tasks(self) -> dict[str, int]:
        """Tasks none of whose records made it into an example → how many records they had."""
        return {name: c["dropped"] for name, c in sorted(self.tasks.items()) if c["whole"] + c["truncated"] == 0}

    def summary_line(self, split: str) -> str:
        """One line for the console: kept whole, truncated, dropped; per task where not all whole."""
        s = self.summary()
        line = (f"{split}: {s['records']} records → {s['examples']} examples ({s['whole']} whole, "
                f"{s['truncated']} truncated), {s['dropped']} dropped")
        if self.tasks:
            cut = {n: c for n, c in sorted(self.tasks.items()) if c["truncated"] or c["dropped"]}
            if cut:
                line += "; whole/truncated/dropped per task: " + ", ".join(
                    f"{n} {c['whole']}/{c['truncated']}/{c['dropped']}" for n, c in cut.items())
            rest = len(self.tasks) - len(cut)
            if rest:
                line += f"; {'the other ' if cut else 'all '}{rest} tasks whole"
        return line


def _with_task(entry: dict[str, Any], task: str | None) -> dict[str, Any]:
    if task is None:
        return entry
    return {"id": entry["id"], "task": task, **{k: v for k, v in entry.items() if k != "id"}}


def _example(prompt_ids: list[int], target_ids: list[int]) -> dict[str, list[int]]:
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def build_sft_examples(
    records: list[ExamRecord], template: ExamTemplate, tokenizer: Any, max_length: int, *,
    max_source_length: int | None = None, max_target_length: int | None = None, truncation: str = "middle",
    max_explanation_chars: int | None = None, on_long_explanation: str = "drop",
) -> SFTBuild:
    """Render, tokenise and mask each record, fitted to the length limits (see the module docstring).

    Args:
        records: The exam records.
        template: How a record becomes prompt and target.
        tokenizer: The model's tokenizer.
        max_length: Tokens of prompt + target.
        max_source_length: Tokens of the prompt; a longer one drops the record.
        max_target_length: Tokens of the target (EOS included); the explanation is shortened to fit.
        truncation: ``middle``/``left``: shorten explanations to fit; ``drop``: drop any record over
            a limit instead (exam prompts are never cut, so the two cutting modes act alike here).
        max_explanation_chars: Explanations longer than this many characters (surrounding
            whitespace not counted) are handled by ``on_long_explanation``.
        on_long_explanation: ``drop`` the record, or ``cut`` the explanation to the limit.

    Returns:
        Examples plus the shortened (``truncated``: ``id``, ``explanation_chars``,
        ``kept_chars``, ``reason``) and dropped (``skipped``) records.
    """
    if on_long_explanation not in LONG_EXPLANATION:
        raise ValueError(f"data.on_long_explanation: expected one of {list(LONG_EXPLANATION)}, "
                         f"got {on_long_explanation!r}")
    limits = LengthLimits(max_length, max_source_length, max_target_length, truncation)
    build = SFTBuild(examples=[], n_records=len(records))
    for rec in records:
        # explanations are compared and cut without surrounding whitespace, as the target shows them
        rec = dataclasses.replace(rec, explanation=rec.explanation.strip())
        n_chars, reasons = len(rec.explanation), []
        if max_explanation_chars is not None and n_chars > max_explanation_chars:
            reason = f"explanation {n_chars} characters > data.max_explanation_chars={max_explanation_chars}"
            if on_long_explanation == "drop":
                build.drop(rec.id, None, reason)
                continue
            rec = dataclasses.replace(rec, explanation=rec.explanation[:max_explanation_chars])
            reasons.append(reason)
        prompt_ids = encode_prompt(tokenizer, template.render_prompt(rec, tokenizer), template)
        target_ids = encode_target(tokenizer, template.render_target(rec))
        over = limits.exceeded(len(prompt_ids), len(target_ids))
        if over and truncation == "drop":
            build.drop(rec.id, None, "; ".join(over))
            continue
        if over:
            budget = min(max_target_length or max_length, max_length - len(prompt_ids))
            fitted = None
            if max_source_length is None or len(prompt_ids) <= max_source_length:
                fitted = _fit_explanation(rec, template, tokenizer, budget)
            if fitted is None:
                build.drop(rec.id, None, "; ".join(over) + " (an exam prompt is never cut, an answer never "
                                                            "shortened)")
                continue
            target_ids, kept = fitted
            rec = dataclasses.replace(rec, explanation=rec.explanation[:kept])
            reasons += over
        if reasons:
            build.keep(_example(prompt_ids, target_ids), None, {
                "id": rec.id, "explanation_chars": n_chars, "kept_chars": len(rec.explanation),
                "reason": "; ".join(reasons)})
        else:
            build.keep(_example(prompt_ids, target_ids))
    return build


def _fit_explanation(
    rec: ExamRecord, template: ExamTemplate, tokenizer: Any, budget: int
) -> tuple[list[int], int] | None:
    """Longest explanation prefix whose target fits ``budget`` tokens (binary search on chars)."""
    lo, hi, best = 0, len(rec.explanation), None
    while lo <= hi:
        mid = (lo + hi) // 2
        short = dataclasses.replace(rec, explanation=rec.explanation[:mid])
        ids = encode_target(tokenizer, template.render_target(short))
        if len(ids) <= budget:
            best, lo = (ids, mid), mid + 1
        else:
            hi = mid - 1
    return best
