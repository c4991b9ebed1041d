"""Optional vLLM backend (GPU): ``pip install medtune[vllm]``.

Same interface as the transformers backend. vLLM is imported only when this backend is asked
for, so the rest of medtune never needs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from medtune.inference.base import GenerationParams, cut_at_stop


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what to install."""


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise BackendUnavailable(
            "the vLLM backend needs the vllm package and a CUDA GPU: pip install 'medtune[vllm]' "
            "(or use --backend hf, the default)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("the vLLM backend needs a CUDA GPU; none is visible (use --backend hf)")
    return vllm


def _max_model_len(llm: Any) -> int | None:
    """The engine's maximum sequence length (prompt plus output), None if this vLLM hides it.

    ``llm_engine.model_config.max_model_len`` is where vLLM keeps the resolved limit (the model's
    own, or a smaller ``max_model_len`` override), the one it enforces itself; ``LLM.model_config``
    is looked at too in case a release moves it.
    """
    for owner in (getattr(llm, "llm_engine", None), llm):
        value = getattr(getattr(owner, "model_config", None), "max_model_len", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class VLLMBackend:
    """vLLM engine with an optional LoRA adapter."""

    name = "vllm"

    def __init__(self, model_path: str, adapter_path: str | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, max_lora_rank: int = 64):
        vllm = _require_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                            enable_lora=adapter_path is not None, max_lora_rank=max_lora_rank)
        self.tokenizer = self.llm.get_tokenizer()
        self.context_length = _max_model_len(self.llm)
        self._lora = None
        if adapter_path:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("adapter", 1, adapter_path)

    def _sampling(self, params: GenerationParams, prompts: list[str] | None = None) -> Any:
        """The ``SamplingParams`` that apply exactly ``params``: one object, or one per prompt.

        With a seed, each prompt gets its own (vLLM seeds every request separately), derived from
        the seed and the prompt text as ``medtune.inference.sampling.derive_seed`` does, so a
        seeded output depends on neither its batch nor the order of the run. Greedy decoding
        ignores top-p/top-k/seed, so they are left at vLLM's "off" values there.
        """
        sampling = params.sampling
        common = {
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p if sampling else 1.0,
            # -1 is "off" in vLLM 0.8 (which rejects 0) and is still accepted as "off" by later releases
            "top_k": params.top_k if sampling and params.top_k > 0 else -1,
            "repetition_penalty": params.repetition_penalty,
            "stop": list(params.stop) or None,
        }
        if not (sampling and params.seed is not None and prompts is not None):
            return self._vllm.SamplingParams(**common)
        from medtune.inference.sampling import derive_seed

        return [self._vllm.SamplingParams(**common, seed=derive_seed(params.seed, p)) for p in prompts]

    def generate(self, prompts: list[str], params: GenerationParams, add_special_tokens: bool = True) -> list[str]:
        """Batched generation (vLLM schedules the batch itself)."""
        inputs = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]}
                  for p in prompts]
        outs = self.llm.generate(inputs, self._sampling(params, prompts), lora_request=self._lora, use_tqdm=False)
        return [cut_at_stop(o.outputs[0].text, params.stop)[0] for o in outs]

    def stream(self, prompt: str, params: GenerationParams, add_special_tokens: bool = True) -> Iterator[str]:
        """The offline engine has no token stream; the whole answer is yielded at once."""
        yield self.generate([prompt], params, add_special_tokens)[0]

    def loglikelihood(self, requests: list[tuple[list[int], list[list[int]]]], batch_size: int = 16) -> list[list[float]]:
        """Scores from vLLM's prompt log-probabilities of ``context + continuation``."""
        flat = [(i, ctx + cont, len(cont)) for i, (ctx, conts) in enumerate(requests) for cont in conts]
        sampling = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        outs = self.llm.generate([{"prompt_token_ids": ids} for _, ids, _ in flat], sampling,
                                 lora_request=self._lora, use_tqdm=False)
        scores: list[list[float]] = [[] for _ in requests]
        for (i, ids, n), out in zip(flat, outs, strict=True):
            # prompt_logprobs[t] maps token ids to logprobs at position t (None at position 0)
            scores[i].append(sum(out.prompt_logprobs[t][ids[t]].logprob for t in range(len(ids) - n, len(ids))))
        return scores

    def count_tokens(self, text: str, add_special_tokens: bool = False) -> int:
        """Token count with the engine's tokenizer."""
        return len(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
