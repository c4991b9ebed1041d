"""The transformers backend: batched, left-padded generation with any causal LM (+ peft adapter)."""

from __future__ import annotations

from typing import Any

import torch

from medtune.inference.base import GenerationParams


class HFBackend:
    """Wraps a loaded model and tokenizer (see ``medtune.models.load_for_inference``)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], params: GenerationParams, add_special_tokens: bool = True
    ) -> list[str]:
        """Greedy (or sampled) continuations; left padding so every prompt ends where output starts."""
        enc = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=add_special_tokens,
        ).to(self.device)
        sample = params.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": sample,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        else:
            # Clear sampling knobs a model's generation_config may carry, so greedy stays greedy
            # without "flag ignored" warnings.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**enc, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
