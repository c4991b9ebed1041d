"""The backend interface every inference path uses (predict, chat, server, demo)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings; greedy by default so evaluation is reproducible.

    Every field is recorded in a predictions file's producer description (``dataclasses.asdict``,
    see :mod:`medtune.inference.provenance`), so a file never mixes outputs of two settings.
    Backends apply all of them explicitly rather than inheriting a model's
    ``generation_config.json`` (which may carry its own ``top_k`` or ``repetition_penalty``), so
    the recorded settings are the whole story and the transformers and vLLM backends agree.

    Attributes:
        max_new_tokens: Most tokens generated per prompt.
        temperature: 0 decodes greedily; above 0 samples from ``softmax(logits / temperature)``.
        top_p: Nucleus sampling: keep the most probable tokens whose probabilities first reach
            ``top_p`` in total (1.0 keeps all). Sampling only.
        top_k: Keep only the ``top_k`` most probable tokens (0 keeps all). Sampling only.
        repetition_penalty: CTRL-style penalty on every token already in the prompt or the
            output (logit divided by it when positive, multiplied when negative); 1.0 is off.
            Applies to greedy decoding too.
        seed: Makes sampling reproducible: each prompt draws from its own random stream, seeded
            from ``seed`` and the prompt, so an output depends on neither the batch it ran in nor
            the order of the run (a resumed run samples what an uninterrupted one would have).
            None: a fresh stream per call (from the global torch RNG on the transformers backend).
        stop: Generation ends before the first of these strings.

    Raises:
        ValueError: A value outside its range (named in the message).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Checked here once, so the CLI, the server and library callers all fail the same way and
        # before a model is loaded, never half-way through a run.
        problems = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            problems.append(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def sampling(self) -> bool:
        """True when tokens are sampled (temperature above 0), False for greedy decoding."""
        return self.temperature > 0


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
