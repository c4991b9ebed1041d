"""The transformers backend: batched, left-padded generation with any causal LM (+ peft adapter)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from medtune.inference.base import GenerationParams, cut_at_stop, stream_with_stops
from medtune.inference.virtual_tokens import virtual_token_type


class HFBackend:
    """Wraps a loaded model and tokenizer (see ``medtune.models.load_for_inference``).

    ``use_adapter=False`` on a peft model answers with the base model (the adapter switched off
    for each call), so "before vs after" needs the weights in memory once.
    """

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, use_adapter: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.use_adapter = use_adapter
        self.device = next(model.parameters()).device
        self.context_length = model_context_length(model)
        # prefix/prompt tuning put this many trained positions before every prompt
        self.virtual_tokens = model.active_peft_config.num_virtual_tokens if virtual_token_type(model) else 0
        # The tokenizer is shared with other threads (the server counts tokens while generating);
        # a padded call temporarily changes its padding settings, so calls are serialised.
        self._tokenizer_lock = threading.Lock()

    @property
    def has_adapter(self) -> bool:
        """True when the model carries a peft adapter."""
        return hasattr(self.model, "disable_adapter")

    def base(self) -> HFBackend:
        """The same weights with the adapter switched off."""
        view = HFBackend(self.model, self.tokenizer, use_adapter=False)
        view._tokenizer_lock = self._tokenizer_lock
        return view

    def adapter_context(self) -> contextlib.AbstractContextManager:
        """Switches the adapter off for the duration when this backend is the base view."""
        if not self.use_adapter and self.has_adapter:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _generate_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        """``model.generate`` keyword arguments that apply exactly ``params``, nothing else.

        Decoding is always transformers' greedy search. When sampling, a :class:`SeededSampler`
        (the last logits processor) draws each row's token from that row's own seeded stream and
        leaves only it allowed, so greedy search emits it: a seeded output then does not depend
        on its batch or on the order of the run, which transformers' own sampling (one global RNG
        for the whole batch) cannot give. Every knob a model's ``generation_config.json`` may carry
        (temperature, top-p, top-k, min-p, typical-p, repetition penalty) is overridden, so what
        the predictions file records is what ran, on this backend as on vLLM.
        """
        from transformers import LogitsProcessorList

        from medtune.inference.sampling import SeededSampler

        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            # the tokenizer's eos (what medtune appends to every training target) and every other
            # token the model's generation_config ends a turn with (GLM-4's <|user|>, Phi-3's <|end|>,
            # Gemma's <end_of_turn>, Qwen's <|endoftext|>), as transformers and vLLM stop by default
            "eos_token_id": stop_token_ids(getattr(self, "model", None), self.tokenizer),
            # None clears a value the model's generation_config may set, and avoids transformers'
            # "flag ignored in greedy mode" warnings; the sampler below applies ours.
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "min_p": None,
            "typical_p": None,
            # applies to greedy decoding as well; 1.0 overrides a model default such as Qwen's 1.05
            "repetition_penalty": params.repetition_penalty,
        }
        if params.sampling:
            kwargs["logits_processor"] = LogitsProcessorList([SeededSampler(
                params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
                pad_token_id=self.tokenizer.pad_token_id)])
        if params.stop:
            # transformers stops generating once a stop string is produced; the text is cut below.
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], params: GenerationParams, add_special_tokens: bool = True
    ) -> list[str]:
        """Greedy (or sampled) continuations; left padding so every prompt ends where output starts."""
        with self._tokenizer_lock:
            enc = self.tokenizer(
                prompts,
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=add_special_tokens,
            ).to(self.device)
        with self.adapter_context():
            out = self.model.generate(**enc, **self._generate_kwargs(params))
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop(t, params.stop)[0] for t in texts]

    def stream(self, prompt: str, params: GenerationParams, add_special_tokens: bool = True) -> Iterator[str]:
        """Yield text pieces as tokens are generated (generation runs in a worker thread).

        Closing the generator early (a client went away) stops generation at the next token.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        with self._tokenizer_lock:
            enc = self.tokenizer([prompt], return_tensors="pt", add_special_tokens=add_special_tokens).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        errors: list[BaseException] = []

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return cancelled.is_set()

        def work() -> None:
            try:
                with torch.inference_mode(), self.adapter_context():
                    self.model.generate(**enc, **self._generate_kwargs(params), streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_Cancelled()]))
            except BaseException as exc:  # surfaced in the consumer below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from stream_with_stops((p for p in streamer if p), params.stop)
        finally:
            cancelled.set()
            thread.join()
        if errors:
            raise errors[0]

    def loglikelihood(self, requests: list[tuple[list[int], list[list[int]]]], batch_size: int = 16) -> list[list[float]]:
        """Summed log-probabilities of continuations (see ``continuation_logprobs``)."""
        with self.adapter_context():
            return continuation_logprobs(self.model, requests, self.tokenizer.pad_token_id, batch_size=batch_size)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (safe to call from several threads)."""
        with self._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def count_tokens(self, text: str, add_special_tokens: bool = False) -> int:
        """Token count with this model's tokenizer."""
        return len(self.encode(text, add_special_tokens=add_special_tokens))


def stop_token_ids(model: Any, tokenizer: Any) -> int | list[int] | None:
    """Ids that end generation: the tokenizer's eos, then the model's ``generation_config`` eos ids.

    One id is returned as an int (as ``generate`` is usually given it), several as a list.
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, (list, tuple)) else [configured]:
        if isinstance(token, int) and token not in ids:
            ids.append(token)
    return ids[0] if len(ids) == 1 else (ids or None)


def model_context_length(model: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` or the like)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _LabelHead:
    """Log-probabilities at chosen columns only: the LM head never runs over a whole prompt.

    With a 150k-token vocabulary the LM head over every prompt position is most of a scorer's
    work and memory (16 questions × 200 positions in fp32 is 1.9 GB of logits). Three ways, the
    first that is exact for the model:

    ``hidden``: one forward with ``logits_to_keep=1`` and ``output_hidden_states``, then the
    model's own output embedding applied to the final hidden state at exactly the columns read
    (one per question for answer letters). Exact only where logits are ``lm_head(final hidden
    state)`` with nothing after it, so it is refused for configs that scale or cap logits and,
    on the first batch, checked: the last column of the longest row must give the model's own
    logits, else the next way is used from then on.
    ``span``: ``logits_to_keep`` = the columns from the earliest one read to the end (batches
    are sorted by length, so the span is short).
    ``full``: every column, for models whose forward takes no ``logits_to_keep``.

    Columns are input columns; a prompt-tuning adapter's virtual tokens come first in the model's
    outputs and are skipped by counting from the end.
    """

    # config attributes that change logits after the LM head (Gemma 2's soft capping, Cohere's
    # logit_scale, Granite's logits_scaling): the model's own logits must be used there
    _POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

    def __init__(self, model: Any) -> None:
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.output_embeddings = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        config = getattr(base, "config", None)
        text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        post_head = any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in self._POST_HEAD)
        if not _accepts_logits_to_keep(model):
            self.mode = "full"
        elif self.output_embeddings is None or post_head:
            self.mode = "span"
        else:
            self.mode = "hidden"
        self.checked = False

    def log_probs(self, seqs: list[list[int]], columns: list[list[int]], pad_id: int,
                  device: Any) -> list[torch.Tensor]:
        """Per row, ``[len(columns[r]), vocab]`` log-probabilities at its input columns."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        if self.mode == "hidden":
            out = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True)
            hidden = out.hidden_states[-1][:, -width:]
            if not self.checked:
                self.checked = True
                longest = max(range(len(seqs)), key=lambda r: len(seqs[r]))  # its last column is width - 1
                mine = self.output_embeddings(hidden[longest, width - 1]).float()
                if not torch.allclose(mine, out.logits[longest, -1].float(), rtol=1e-3, atol=1e-3):
                    self.mode = "span"
                    return self.log_probs(seqs, columns, pad_id, device)
            rows = torch.tensor([r for r, cols in enumerate(columns) for _ in cols], device=hidden.device)
            cols = torch.tensor([c for cols in columns for c in cols], device=hidden.device)
            picked = torch.log_softmax(self.output_embeddings(hidden[rows, cols]).float(), dim=-1)
            return list(picked.split([len(c) for c in columns]))
        first = min(min(cols) for cols in columns)
        kept = width - first if self.mode == "span" else width
        extra = {"logits_to_keep": kept} if self.mode == "span" else {}
        logits = self.model(input_ids=ids, attention_mask=mask, **extra).logits[:, -kept:]
        offset = width - kept  # input column c is kept column c - offset
        return [torch.log_softmax(logits[r, [c - offset for c in cols]].float(), dim=-1)
                for r, cols in enumerate(columns)]


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def continuation_logprobs(
    model: Any,
    requests: list[tuple[list[int], list[list[int]]]],
    pad_id: int,
    batch_size: int = 16,
) -> list[list[float]]:
    """Summed log-probability of each continuation given its context, token ids in and out.

    ``requests`` is one ``(context_ids, [continuation_ids, ...])`` per question. When every
    continuation of a question is a single token (answer letters, the usual case) the question
    costs one forward pass over its context: all candidates are read off the last position's
    distribution. Otherwise each ``context + continuation`` is scored as its own sequence.

    Sequences are right-padded and no position ids are passed, so every token sits where it sat
    in training (which pads on the right too) whatever the batch: this matters for adapters that
    add virtual tokens (peft drops explicit position ids for prompt tuning), and it is what makes
    a batched score equal the single-question score.
    """
    device = next(model.parameters()).device
    results: list[list[float] | None] = [None] * len(requests)

    fast = [i for i, (_, conts) in enumerate(requests) if all(len(c) == 1 for c in conts)]
    fast_set = set(fast)
    slow = [(i, j) for i, (_, conts) in enumerate(requests) if i not in fast_set for j in range(len(conts))]

    head = _LabelHead(model)

    fast.sort(key=lambda i: len(requests[i][0]))
    for start in range(0, len(fast), batch_size):
        chunk = fast[start : start + batch_size]
        # a single-token candidate is predicted at the context's last column
        rows = head.log_probs([requests[i][0] for i in chunk], [[len(requests[i][0]) - 1] for i in chunk],
                              pad_id, device)
        for logprobs, i in zip(rows, chunk, strict=True):
            results[i] = [float(logprobs[0, c[0]]) for c in requests[i][1]]

    slow.sort(key=lambda ij: len(requests[ij[0]][0]) + len(requests[ij[0]][1][ij[1]]))
    partial: dict[int, dict[int, float]] = {}
    for start in range(0, len(slow), batch_size):
        chunk = slow[start : start + batch_size]
        # continuation token k sits at column first + k and is predicted at column first + k - 1
        columns = [list(range(len(requests[i][0]) - 1, len(requests[i][0]) - 1 + len(requests[i][1][j])))
                   for i, j in chunk]
        rows = head.log_probs([requests[i][0] + requests[i][1][j] for i, j in chunk], columns, pad_id, device)
        for logprobs, (i, j) in zip(rows, chunk, strict=True):
            cont = torch.tensor(requests[i][1][j], device=logprobs.device)
            partial.setdefault(i, {})[j] = float(logprobs.gather(1, cont[:, None]).sum())
    for i, scores in partial.items():
        results[i] = [scores[j] for j in range(len(requests[i][1]))]
    return [r if r is not None else [] for r in results]
