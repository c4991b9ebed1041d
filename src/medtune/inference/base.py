"""The backend interface every inference path uses (predict, chat, server, demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings; greedy by default so evaluation is reproducible."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0


class Backend(Protocol):
    """Generates continuations for already-rendered prompts."""

    name: str

    def generate(
        self, prompts: list[str], params: GenerationParams, add_special_tokens: bool = True
    ) -> list[str]:
        """One continuation per prompt (the prompt itself not included)."""
        ...


class FakeBackend:
    """Deterministic backend for tests: answers from a lookup, else a fixed reply.

    ``replies`` maps a prompt substring to the output returned for any prompt containing it.
    """

    name = "fake"

    def __init__(self, replies: dict[str, str] | None = None, default: str = "无法回答"):
        self.replies = replies or {}
        self.default = default
        self.calls: list[list[str]] = []

    def generate(
        self, prompts: list[str], params: GenerationParams, add_special_tokens: bool = True
    ) -> list[str]:
        """Look each prompt up; record the batch for assertions."""
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            reply = next((v for k, v in self.replies.items() if k in p), self.default)
            out.append(reply)
        return out
