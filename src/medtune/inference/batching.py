"""Concurrent requests answered together: one batched ``generate`` call for all that are waiting.

At a real vocabulary, one decoding step costs about the same for one prompt as for eight: the LM
head reads its whole ``[vocabulary, hidden]`` weight every step whatever the batch (measured on
a random-init Qwen2 with the 151,680-row Qwen2.5 vocabulary, one CPU thread: 8 prompts × 32 new
tokens in one ``model.generate`` took 1.55 s, one at a time 4.6 s). So requests that arrive while
the model is busy wait, and are then generated in one call of the backend's own batched
generation (transformers' left-padded ``generate`` for :class:`~medtune.inference.hf.HFBackend`),
not by a scheduler of ours. A batch only holds prompts with the same decoding settings, so what
each request asked for is exactly what ran; greedy rows do not depend on the rows beside them
(checked against one-at-a-time generation in ``tests/test_server_batching.py``), and seeded
sampling draws each row from its own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio.to_thread

from medtune.inference.base import GenerationParams

Result = TypeVar("Result")

# A generation slot (see medtune.inference.server._Gate.slot): held while a batch runs; the
# callable it yields is told how many requests the batch carries, for the server's load figures.
SlotFactory = Callable[[], contextlib.AbstractAsyncContextManager[Callable[[int], None]]]


@dataclass
class _Waiting:
    key: Hashable
    prompt: str
    future: asyncio.Future


class RequestBatcher(Generic[Result]):
    """Collects prompts that arrive while generation is busy and runs each group as one batch.

    Args:
        run: ``run(prompts, key) -> results`` (one per prompt, in order), called in a worker
            thread; ``key`` is what the batch's prompts share (the decoding settings).
        max_batch_size: Most prompts in one call; 1 generates every request on its own.
        slot: Generation slots (the server's concurrency limit); each batch holds one while it runs.

    The first waiting request decides each batch's key (first come, first served); later ones
    with another key wait for a batch of their own. A request whose client has gone before its
    batch starts is left out of it.
    """

    def __init__(self, run: Callable[[list[str], Any], list[Result]], max_batch_size: int, slot: SlotFactory):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self._run = run
        self.max_batch_size = max_batch_size
        self._slot = slot
        self._waiting: list[_Waiting] = []
        self._dispatcher: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones

    async def submit(self, prompt: str, key: Hashable) -> Result:
        """The result for ``prompt``, generated in a batch with others of the same ``key``."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(key, prompt, loop.create_future())
        self._waiting.append(waiting)
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch())
        # Cancelling this await (the client went away) cancels the future, and _take skips it.
        return await waiting.future

    async def _dispatch(self) -> None:
        """Start batches while requests wait; each batch takes its prompts once it has a slot."""
        while self._waiting:
            taken = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._run_batch(taken))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            # Waiting here (not just starting tasks) is what lets requests pile up behind a busy
            # slot: the next batch is only formed when a slot frees.
            await taken.wait()

    def _take(self) -> list[_Waiting]:
        """The oldest waiting request and up to ``max_batch_size - 1`` more with its key."""
        self._waiting = [w for w in self._waiting if not w.future.done()]
        if not self._waiting:
            return []
        key = self._waiting[0].key
        batch = [w for w in self._waiting if w.key == key][: self.max_batch_size]
        chosen = {id(w) for w in batch}
        self._waiting = [w for w in self._waiting if id(w) not in chosen]
        return batch

    async def _run_batch(self, taken: asyncio.Event) -> None:
        try:
            async with self._slot() as count:
                batch = self._take()
                taken.set()
                if not batch:
                    return
                count(len(batch))
                try:
                    # run_sync waits for the thread even when cancelled: the slot is held exactly
                    # as long as the backend is busy.
                    results = await anyio.to_thread.run_sync(self._run, [w.prompt for w in batch], batch[0].key)
                    if len(results) != len(batch):
                        raise RuntimeError(f"the backend returned {len(results)} results for {len(batch)} prompts")
                except Exception as exc:  # every request of the batch fails with it
                    for w in batch:
                        if not w.future.done():
                            w.future.set_exception(exc)
                else:
                    for w, result in zip(batch, results, strict=True):
                        if not w.future.done():
                            w.future.set_result(result)
        finally:
            taken.set()



# Architectures whose continuous-batched answers tests/test_arch_matrix.py checks against predict's
# (the server test of every architecture x method). DeepSeek-V3's latent attention (MLA) is not
# here: its keys and values have different widths, which transformers' paged cache does not take
# (its generation loop fails with an index_copy_ shape error); nor Gemma-2, which runs eager attention
# (for its attention soft-capping), which continuous batching would swap for its own.
CONTINUOUS_BATCHING_MODEL_TYPES = frozenset({
    "llama", "qwen2", "qwen3", "glm4", "phi", "phi3", "mistral", "gemma3_text", "internlm3", "qwen3_moe",
})


class ContinuousBatching:
    """Greedy requests to a transformers model answered by transformers' continuous batching.

    A request joins the running batch at the next decoding step instead of waiting for the batch
    before it to end (:meth:`transformers.GenerationMixin.init_continuous_batching`: a paged KV
    cache, one forward for every running request per step). Used by the server for requests it
    can answer exactly as :meth:`HFBackend.generate <medtune.inference.hf.HFBackend.generate>`
    would (:meth:`accepts`); the others go to :class:`RequestBatcher`.

    Stop strings are applied to the finished text (generation runs on to an end token or
    ``max_tokens``), which gives the text ``generate`` gives; only the time spent after the stop
    string is extra.

    Args:
        backend: An :class:`~medtune.inference.hf.HFBackend` (see :func:`unsupported_reason`).
        max_batch_size: Most requests decoding at once.
        max_cache_tokens: Tokens of KV cache to allocate (prompts plus outputs of the requests
            running at once); requests beyond it wait for room.
    """

    def __init__(self, backend: Any, max_batch_size: int, max_cache_tokens: int):
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_cache_tokens = max_cache_tokens
        self._manager: Any = None
        self._lock = threading.Lock()
        self._count = itertools.count()

    @staticmethod
    def unsupported_reason(backend: Any) -> str | None:
        """Why continuous batching cannot serve ``backend`` exactly, or None when it can."""
        model = getattr(backend, "model", None)
        if model is None or getattr(backend, "name", None) != "hf":
            return "not a transformers backend"
        if getattr(backend, "virtual_tokens", 0):
            return "prefix/prompt tuning adds virtual tokens, which its paged cache does not take"
        if not getattr(backend, "use_adapter", True):
            return "the adapter is switched off per call"
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "init_continuous_batching"):
            return f"{type(base).__name__} has no continuous batching"
        model_type = getattr(base.config, "model_type", None)
        if model_type not in CONTINUOUS_BATCHING_MODEL_TYPES:
            return f"model_type {model_type}: not proven to answer as generate() does under continuous batching"
        attn = getattr(base.config, "_attn_implementation", None)
        # eager would be switched to transformers' paged eager attention for the whole model,
        # which other requests' ordinary generate() then cannot use
        if attn != "sdpa" and not str(attn).startswith("flash_attention"):
            return f"attention implementation {attn!r} (continuous batching here needs sdpa or flash attention)"
        return None

    @staticmethod
    def accepts(params: GenerationParams) -> bool:
        """Greedy, without a repetition penalty: what one shared generation config can run exactly."""
        return params.temperature == 0 and params.repetition_penalty == 1.0

    def _start(self) -> Any:
        """The running manager (created on the first request: it allocates the cache)."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from medtune.inference.hf import stop_token_ids

        with self._lock:
            if self._manager is not None and self._manager.background_thread_status.fatal_error is not None:
                # its loop died on an error (already reported to the requests it had): start afresh
                self._manager.stop(block=True, timeout=10)
                self._manager = None
            if self._manager is None:
                model = self.backend.model
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                eos = stop_token_ids(model, self.backend.tokenizer)
                config = GenerationConfig(do_sample=False, eos_token_id=eos if eos is not None else -1,
                                          pad_token_id=self.backend.tokenizer.pad_token_id)
                page = 256
                cb_config = ContinuousBatchingConfig(
                    page_size=page,
                    # sized from our limits, not from free memory (left to itself on a CPU it
                    # took 60% of RAM: 12 GB for a 1M-parameter model)
                    num_blocks=max(1, -(-self.max_cache_tokens // page)),
                    max_batch_tokens=max(256, min(self.max_cache_tokens, 4096)),
                    max_requests_per_batch=self.max_batch_size,
                    # keep the attention the model was loaded with: other requests use it too
                    auto_switch_to_flash=False,
                    # refuse rather than silently drop a logits processor it cannot apply
                    drop_unsupported_processors=False,
                )
                manager = base.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
                manager.start()
                self._manager = manager
            return self._manager

    async def generate(self, text: str, params: GenerationParams, add_special_tokens: bool) -> str:
        """The greedy continuation of ``text``, cut at the first stop string."""
        from medtune.inference.base import cut_at_stop

        backend = self.backend
        manager = await anyio.to_thread.run_sync(self._start)
        ids = await anyio.to_thread.run_sync(lambda: backend.encode(text, add_special_tokens=add_special_tokens))
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        request_id = f"medtune-{next(self._count)}"

        def on_output(output: Any) -> None:  # called on this event loop by transformers
            if output.is_finished() and not done.done():
                done.set_result(output)

        manager.register_result_handler(request_id, on_output)
        if manager.add_request(ids, request_id=request_id, max_new_tokens=params.max_new_tokens) is None:
            # transformers refuses (with a log line) once its loop has stopped, e.g. after an error
            raise RuntimeError("continuous batching is not accepting requests: "
                               f"{manager.background_thread_status.fatal_error or 'its generation loop has stopped'}")
        try:
            output = await done
        except asyncio.CancelledError:
            manager.cancel_request(request_id)  # the client went away: stop decoding for it
            raise
        if output.error is not None:
            raise RuntimeError(f"continuous batching failed: {output.error}")
        decoded = backend.tokenizer.decode(output.generated_tokens, skip_special_tokens=True)
        return cut_at_stop(decoded, params.stop)[0]

    def close(self) -> None:
        """Stop the generation thread (it is not a daemon: a process would not exit past it)."""
        with self._lock:
            if self._manager is not None:
                self._manager.stop(block=True, timeout=10)
                self._manager = None
