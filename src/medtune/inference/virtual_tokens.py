"""Generation with prefix-tuning (P-tuning v2) and prompt-tuning adapters that really uses them.

Why medtune does not rely on peft's own ``PeftModelForCausalLM.generate`` for these methods
(measured with transformers 5.24 and peft 0.21, ``tests/test_behaviour_matrix.py``):

* **prefix tuning** — transformers 5 renamed the ``past_key_values`` argument of the causal-LM
  ``forward`` to ``cache``, and ``generate`` always passes ``cache``. peft injects the trained
  prefix as ``past_key_values``; when both names arrive, transformers keeps ``cache`` (an empty
  cache) and drops the prefix with only a FutureWarning. Generation then equals the base model's,
  token for token, while training (which calls ``forward`` without ``cache``) did use the prefix.
* **prompt tuning** — for the same reason peft re-inserts the virtual tokens at every decoding
  step, and it drops the position ids, so only the first generated token matches the model's own
  forward pass, and left-padded batches differ from single prompts.

The fix needs nothing of peft's generation plumbing: the trained virtual tokens become the start
of the sequence that transformers' ``generate`` continues. ``num_virtual_tokens`` placeholder ids
are put in front of the prompt and the attention mask gets as many ones, and

* prefix tuning: the placeholders are already "processed" — the prefix keys/values are handed to
  ``generate`` as its cache, so only the real prompt is run;
* prompt tuning: ``inputs_embeds`` holds the virtual-token embeddings at the placeholder
  positions and the prompt's word embeddings after them.

Position ids come from the attention mask as in any left-padded generation: the prompt's first
token sits at position ``num_virtual_tokens``, exactly where training put it, with or without
left padding. The placeholders are cut from the returned sequences, so callers see the usual
``prompt ids + new ids``.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch

#: peft types whose adapter is a set of trained virtual tokens rather than a weight delta.
VIRTUAL_TOKEN_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")


def virtual_token_type(model: Any) -> str | None:
    """The active adapter's peft type when it adds virtual tokens and is switched on, else None."""
    config = getattr(model, "active_peft_config", None)
    if config is None or getattr(model, "_adapters_disabled", False):
        return None
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    return peft_type if peft_type in VIRTUAL_TOKEN_TYPES else None


def _cache_argument(model: Any) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older): the forward's cache argument."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def generate_with_virtual_tokens(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> Any:
    """``generate`` for a peft prompt-learning model: the continuation the trained model produces.

    Args:
        model: A ``PeftModelForCausalLM`` whose active adapter is prefix, prompt or P-tuning.
            With the adapter switched off (``disable_adapter()``) the base model generates.
        input_ids: Prompt ids, ``[batch, length]``, left-padded when batched.
        attention_mask: The prompt's mask (all ones when omitted).
        **kwargs: Passed to transformers' ``generate`` (max_new_tokens, streamer, ...).

    Returns:
        What ``generate`` returns (ids, or an output object with ``sequences``), with the prompt
        ids first as usual.
    """
    base = model.get_base_model()
    peft_type = virtual_token_type(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if peft_type is None:
        return base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("inputs_embeds cannot be combined with a prefix/prompt-tuning adapter")

    n_virtual = model.active_peft_config.num_virtual_tokens
    batch = input_ids.shape[0]
    placeholders = torch.zeros((batch, n_virtual), dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([placeholders, input_ids], dim=1)
    mask = torch.cat([torch.ones((batch, n_virtual), dtype=attention_mask.dtype, device=attention_mask.device),
                      attention_mask], dim=1)
    if peft_type == "PREFIX_TUNING":
        kwargs[_cache_argument(base)] = model.get_prompt(batch_size=batch)
    else:
        words = model.word_embeddings(input_ids)
        virtual = model.get_prompt(batch_size=batch).to(device=words.device, dtype=words.dtype)
        kwargs["inputs_embeds"] = torch.cat([virtual, words], dim=1)
    out = base.generate(input_ids=ids, attention_mask=mask, **kwargs)
    if hasattr(out, "sequences"):
        out.sequences = out.sequences[:, n_virtual:]
        return out
    return out[:, n_virtual:]


def use_virtual_token_generation(model: Any) -> Any:
    """Make ``model.generate`` go through :func:`generate_with_virtual_tokens` (returns ``model``).

    Set on the instance, so every caller gets it: medtune's backends, the web demo, and TRL's
    trainers that sample from the policy (GRPO/RLOO). A no-op for models without a
    prompt-learning adapter.
    """
    config = getattr(model, "active_peft_config", None)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)) if config is not None else None
    if peft_type in VIRTUAL_TOKEN_TYPES:
        def generate(self: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     **kwargs: Any) -> Any:
            if input_ids is None:
                input_ids = kwargs.pop("inputs")
            return generate_with_virtual_tokens(self, input_ids, attention_mask, **kwargs)

        model.generate = types.MethodType(generate, model)
    return model
