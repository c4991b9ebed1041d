"""Tokenise exam records for supervised fine-tuning: prompt masked, loss on the response only.

The prompt and the response are tokenised separately and concatenated, so the prompt tokens a
model is trained on are exactly the tokens ``encode_prompt`` gives at prediction time (tokenising
the joined string would let BPE merge across the boundary and shift the first answer token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from medtune.records import ExamRecord
from medtune.templates import ExamTemplate

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)


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


@dataclass
class SFTBuild:
    """Tokenised examples plus what happened to the records that did not fit as they were."""

    examples: list[dict[str, list[int]]]
    n_records: int
    truncated: list[dict[str, Any]] = field(default_factory=list)  # explanation shortened to fit
    skipped: list[dict[str, Any]] = field(default_factory=list)  # prompt + answer alone too long

    def summary(self) -> dict[str, int]:
        """Counts for logs and the run directory."""
        return {
            "records": self.n_records,
            "examples": len(self.examples),
            "explanations_truncated": len(self.truncated),
            "skipped_too_long": len(self.skipped),
        }


def _example(prompt_ids: list[int], target_ids: list[int]) -> dict[str, list[int]]:
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def build_sft_examples(
    records: list[ExamRecord], template: ExamTemplate, tokenizer: Any, max_length: int
) -> SFTBuild:
    """Render, tokenise and mask each record.

    A record longer than ``max_length`` has its explanation shortened (characters from the end)
    until it fits, so the answer is never cut off, whichever side of the explanation it sits on.
    A record whose prompt and answer alone do not fit is skipped. Both are counted and listed.
    """
    build = SFTBuild(examples=[], n_records=len(records))
    for rec in records:
        prompt_ids = encode_prompt(tokenizer, template.render_prompt(rec, tokenizer), template)
        target_ids = encode_target(tokenizer, template.render_target(rec))
        if len(prompt_ids) + len(target_ids) <= max_length:
            build.examples.append(_example(prompt_ids, target_ids))
            continue
        budget = max_length - len(prompt_ids)
        fitted = _fit_explanation(rec, template, tokenizer, budget)
        if fitted is None:
            build.skipped.append(
                {"id": rec.id, "reason": f"prompt + answer need more than max_length={max_length} tokens"}
            )
            continue
        target_ids, kept_chars = fitted
        build.truncated.append(
            {"id": rec.id, "explanation_chars": len(rec.explanation), "kept_chars": kept_chars}
        )
        build.examples.append(_example(prompt_ids, target_ids))
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
