"""Seeded sampling for the transformers backend: one random stream per prompt.

transformers samples with the global torch RNG, one stream shared by the whole batch, so a
seeded output would depend on which other prompts were in its batch and on how many draws came
before it: a resumed prediction run, a different batch size or a different order would change
it. :class:`SeededSampler` instead gives every row its own ``torch.Generator`` seeded from the
run's seed and the row's prompt tokens, and does the sampling itself (temperature, then top-k,
then top-p, the order transformers and vLLM use), handing ``generate`` a distribution with a
single allowed token. Greedy search then picks exactly that token, so streaming, stop strings
and EOS handling stay transformers' own.

Padding is the one thing left that can move an output: a padded batch computes the same logits
as a single prompt only up to floating-point rounding, which can flip a draw that lands within
rounding of a boundary between two tokens.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessor

__all__ = ["SeededSampler", "derive_seed", "filter_logits"]

_SEED_BITS = 63  # torch.Generator.manual_seed and vLLM take any non-negative 63-bit integer


def derive_seed(seed: int, key: str | list[int] | tuple[int, ...]) -> int:
    """A 63-bit seed for one prompt: SHA-256 of the run's ``seed`` and the prompt (text or ids).

    Deterministic across processes and machines (unlike ``hash()``), and different prompts get
    unrelated streams even under one run seed.

    Args:
        seed: The run's seed (``GenerationParams.seed``).
        key: The prompt, as text or as token ids.

    Returns:
        An integer in ``[0, 2**63)``.
    """
    body = key if isinstance(key, str) else ",".join(str(int(t)) for t in key)
    digest = hashlib.sha256(f"{seed}\x00{body}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scale by ``temperature``, then mask all but the top-k, then all but the top-p nucleus.

    Masked entries become ``-inf``. As in transformers' warpers, top-k keeps every token tied
    with the k-th largest logit, and top-p keeps the most probable tokens up to and including the
    first one at which the cumulative probability reaches ``top_p`` (always at least one token).

    Args:
        logits: ``[batch, vocab]`` scores (any float dtype; the result is float32).
        temperature: > 0.
        top_k: 0 keeps every token.
        top_p: 1.0 keeps every token.

    Returns:
        The filtered, temperature-scaled logits, float32.
    """
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.sort(torch.softmax(scores, dim=-1), dim=-1, descending=True)
        # mass of the strictly more probable tokens; a token is kept while that is below top_p
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


class SeededSampler(LogitsProcessor):
    """A transformers logits processor that samples each row from its own seeded generator.

    Use it with ``do_sample=False``: it returns ``0`` for the sampled token and ``-inf`` for all
    others, so greedy search takes the sampled token. It must be the last processor that changes
    scores (custom processors run after transformers' own, e.g. the repetition penalty, and no
    sampling warpers are added when ``do_sample`` is False). One instance serves one ``generate``
    call: the generators are created at its first step.

    Args:
        temperature: > 0.
        top_k: 0 keeps every token.
        top_p: 1.0 keeps every token.
        seed: The run seed; None draws each row's seed from the global torch RNG (so
            ``torch.manual_seed`` still makes a call reproducible).
        pad_token_id: Left padding is stripped before a row's prompt is hashed, so the seed of a
            prompt does not depend on how much its batch padded it.
    """

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 pad_token_id: int | None = None):
        if not temperature > 0:
            raise ValueError(f"SeededSampler samples; temperature must be > 0, got {temperature!r}")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self.pad_token_id = pad_token_id
        self._generators: list[torch.Generator] | None = None

    def _row_seed(self, row: torch.Tensor) -> int:
        if self.seed is None:
            return int(torch.randint(0, 2**_SEED_BITS - 1, (1,)).item())
        ids = row.tolist()
        if self.pad_token_id is not None:
            start = 0
            while start < len(ids) and ids[start] == self.pad_token_id:
                start += 1
            ids = ids[start:]
        return derive_seed(self.seed, ids)

    # Exactly (input_ids, scores): transformers insists that any further parameter is passed by name.
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Sample one token per row; return scores that allow only that token."""
        if self._generators is None:
            # First step: ``input_ids`` is exactly the (left-padded) prompts.
            self._generators = []
            for row in input_ids:
                gen = torch.Generator(device=scores.device)
                gen.manual_seed(self._row_seed(row))
                self._generators.append(gen)
        probs = torch.softmax(filter_logits(scores, self.temperature, self.top_k, self.top_p), dim=-1)
        chosen = torch.stack([torch.multinomial(probs[b], 1, generator=gen)
                              for b, gen in enumerate(self._generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen, 0.0)
