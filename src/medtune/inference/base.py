"""The backend interface every inference path uses (predict, chat, server, demo)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings; greedy by default so evaluation is reproducible."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings


class Backend(Protocol):
    """Generates continuations for already-rendered prompts."""

    name: str
    # The longest sequence (prompt plus generated tokens) the model handles, or None when unknown.
    # The server derives its default prompt limit from it.
    context_length: int | None

    def generate(
        self, prompts: list[str], params: GenerationParams, add_special_tokens: bool = True
    ) -> list[str]:
        """One continuation per prompt (the prompt itself not included)."""
        ...

    def stream(self, prompt: str, params: GenerationParams, add_special_tokens: bool = True) -> Iterator[str]:
        """The continuation of one prompt, piece by piece as it is generated."""
        ...

    def count_tokens(self, text: str, add_special_tokens: bool = False) -> int:
        """Number of tokens ``text`` encodes to (usage accounting, length limits)."""
        ...

    def loglikelihood(self, requests: list[tuple[list[int], list[list[int]]]], batch_size: int = 16) -> list[list[float]]:
        """Summed log-probability of each continuation given its context (token ids)."""
        ...


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stream_with_stops(pieces: Iterator[str], stop: tuple[str, ...]) -> Iterator[str]:
    """Pass pieces through, holding back text that could be the start of a stop string.

    Joined, the yielded pieces equal ``cut_at_stop(full_text, stop)[0]``.
    """
    if not any(stop):
        yield from pieces
        return
    hold = max(len(s) for s in stop) - 1
    text, sent = "", 0
    for piece in pieces:
        text += piece
        cut, stopped = cut_at_stop(text, stop)
        if stopped:
            if len(cut) > sent:
                yield cut[sent:]
            return
        safe = len(text) - hold
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent:
        yield text[sent:]


class FakeBackend:
    """Deterministic backend for tests: answers from a lookup, else a fixed reply.

    ``replies`` maps a prompt substring to the output returned for any prompt containing it.
    Tokens are characters. ``context_length`` plays the model's maximum sequence length (None:
    unknown, as for a model whose config does not say).
    """

    name = "fake"

    def __init__(self, replies: dict[str, str] | None = None, default: str = "无法回答",
                 context_length: int | None = None):
        self.replies = replies or {}
        self.default = default
        self.context_length = context_length
        self.calls: list[list[str]] = []

    def _reply(self, prompt: str, params: GenerationParams) -> str:
        reply = next((v for k, v in self.replies.items() if k in prompt), self.default)
        return cut_at_stop(reply[: params.max_new_tokens], params.stop)[0]

    def generate(
        self, prompts: list[str], params: GenerationParams, add_special_tokens: bool = True
    ) -> list[str]:
        """Look each prompt up; record the batch for assertions."""
        self.calls.append(list(prompts))
        return [self._reply(p, params) for p in prompts]

    def stream(self, prompt: str, params: GenerationParams, add_special_tokens: bool = True) -> Iterator[str]:
        """The same reply as ``generate``, one character at a time."""
        self.calls.append([prompt])
        yield from self._reply(prompt, params)

    def count_tokens(self, text: str, add_special_tokens: bool = False) -> int:
        """One token per character."""
        return len(text)

    def loglikelihood(self, requests: list[tuple[list[int], list[list[int]]]], batch_size: int = 16) -> list[list[float]]:
        """A fixed, checkable score: minus the continuation's length, minus 0.1 per token id unit."""
        return [[-float(len(c)) - 0.1 * sum(c) for c in conts] for _, conts in requests]
