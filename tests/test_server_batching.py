"""Concurrent requests generated together: the batcher, continuous batching, and the faster LM head.

The batching must never change an answer: every test that batches compares each response with
the same request answered alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
import torch

from medtune.inference.base import FakeBackend, GenerationParams
from medtune.inference.batching import ContinuousBatching, RequestBatcher
from medtune.inference.server import background_server, create_app

MODEL = "medtune-test"
TIMEOUT = 30.0


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class GatedBackend(FakeBackend):
    """Answers with the prompt reversed; the first call waits until released (the model is 'busy')."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.release = threading.Event()
        self.started = threading.Event()
        self.params: list[GenerationParams] = []
        self.fail = False

    def generate(self, prompts, params, add_special_tokens=True):
        self.calls.append(list(prompts))
        self.params.append(params)
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(TIMEOUT)
        if self.fail:
            raise RuntimeError("backend exploded")
        return [p[::-1][: params.max_new_tokens] for p in prompts]


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


def _busy_then(url: str, backend: GatedBackend, bodies: list[dict], app) -> tuple[httpx.Response, list[httpx.Response]]:
    """One request occupies the model; ``bodies`` arrive meanwhile; then the model is released."""
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"{url}/v1/completions", json={"model": MODEL, "prompt": "先来", "max_tokens": 9}, timeout=TIMEOUT,
        trust_env=False)))
    first.start()
    assert backend.started.wait(TIMEOUT)
    gate = app.state.medtune
    later: dict = {}
    t = threading.Thread(target=lambda: later.update(r=asyncio.run(_post_all(url, bodies))))
    t.start()
    wait_until(lambda: gate.admitted == 1 + len(bodies))
    time.sleep(0.2)  # admitted requests are rendered in a worker thread before they reach the batcher
    backend.release.set()
    first.join(TIMEOUT)
    t.join(TIMEOUT)
    return result["r"], later["r"]


def test_requests_waiting_for_the_model_are_generated_in_one_batch():
    backend = GatedBackend()
    app = create_app(backend, MODEL, max_queue=8, max_batch_size=8)
    assert app.state.batching.startswith("batched (continuous batching: not a transformers backend")
    prompts = ["甲乙丙", "丁戊", "己庚辛壬", "癸"]
    with background_server(app) as url:
        first, rest = _busy_then(url, backend, [{"model": MODEL, "prompt": p, "max_tokens": 9} for p in prompts], app)
        assert first.json()["choices"][0]["text"] == "来先"
        # each response is its own prompt's answer, as if it had been sent alone
        assert [r.json()["choices"][0]["text"] for r in rest] == [p[::-1] for p in prompts]
        assert [r.json()["usage"]["completion_tokens"] for r in rest] == [len(p) for p in prompts]
        assert backend.calls[0] == ["先来"]
        assert len(backend.calls) == 2 and sorted(backend.calls[1]) == sorted(prompts)
        assert (app.state.medtune.admitted, app.state.medtune.running) == (0, 0)


def test_a_batch_holds_only_requests_with_the_same_settings():
    backend = GatedBackend()
    app = create_app(backend, MODEL, max_queue=8, max_batch_size=8)
    bodies = [{"model": MODEL, "prompt": "一二三", "max_tokens": 2},
              {"model": MODEL, "prompt": "四五六", "max_tokens": 2},
              {"model": MODEL, "prompt": "七八九", "max_tokens": 3, "stop": ["八"]}]
    with background_server(app) as url:
        _, rest = _busy_then(url, backend, bodies, app)
    assert [r.json()["choices"][0]["text"] for r in rest] == ["三二", "六五", "九八七"]
    assert sorted(sorted(b) for b in backend.calls[1:]) == [["一二三", "四五六"], ["七八九"]]
    # every call ran one setting, the one its requests asked for
    by_prompt = {p: params for call, params in zip(backend.calls, backend.params, strict=True) for p in call}
    assert by_prompt["一二三"].max_new_tokens == by_prompt["四五六"].max_new_tokens == 2
    assert (by_prompt["七八九"].max_new_tokens, by_prompt["七八九"].stop) == (3, ("八",))


def test_max_batch_size_caps_a_batch():
    backend = GatedBackend()
    app = create_app(backend, MODEL, max_queue=8, max_batch_size=2)
    prompts = ["一", "二", "三", "四", "五"]
    with background_server(app) as url:
        _, rest = _busy_then(url, backend, [{"model": MODEL, "prompt": p, "max_tokens": 4} for p in prompts], app)
    assert [r.json()["choices"][0]["text"] for r in rest] == prompts
    assert [len(c) for c in backend.calls[1:]] == [2, 2, 1]


def test_a_failed_batch_fails_each_of_its_requests_with_500():
    backend = GatedBackend()
    backend.fail = True
    app = create_app(backend, MODEL, max_queue=8, max_batch_size=8)
    with background_server(app) as url:
        first, rest = _busy_then(url, backend, [{"model": MODEL, "prompt": p} for p in ("一", "二")], app)
    for r in (first, *rest):
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "backend_error"
    assert (app.state.medtune.admitted, app.state.medtune.running) == (0, 0)


def test_batcher_leaves_out_requests_cancelled_before_their_batch():
    ran: list[list[str]] = []
    release = threading.Event()

    def run(prompts, key):
        ran.append(prompts)
        if len(ran) == 1:
            release.wait(TIMEOUT)
        return [p.upper() for p in prompts]

    async def scenario() -> list:
        sem = asyncio.Semaphore(1)

        @contextlib.asynccontextmanager
        async def slot():
            async with sem:
                yield lambda n: None

        batcher = RequestBatcher(run, max_batch_size=8, slot=slot)
        first = asyncio.create_task(batcher.submit("a", "k"))
        while not ran:
            await asyncio.sleep(0.01)
        b = asyncio.create_task(batcher.submit("b", "k"))
        c = asyncio.create_task(batcher.submit("c", "k"))
        await asyncio.sleep(0.05)
        c.cancel()
        await asyncio.sleep(0.05)
        release.set()
        return [await first, await b, c.cancelled()]

    assert asyncio.run(scenario()) == ["A", "B", True]
    assert ran == [["a"], ["b"]]


def test_batcher_refuses_a_bad_batch_size():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_batch_size"):
            RequestBatcher(lambda p, k: p, bad, slot=None)
        with pytest.raises(ValueError, match="max-batch-size"):
            create_app(FakeBackend(), MODEL, max_batch_size=bad)


# ---- a real model: continuous batching and the weight-first LM head ----------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from medtune.models import load_for_inference

    return load_for_inference(str(tiny_model_dir))


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """The model as ``medtune serve`` loads it: with the decoding LM head."""
    from medtune.inference.lm_head import use_decoding_lm_head
    from medtune.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir))
    assert use_decoding_lm_head(model)
    return model, tokenizer


def _prompts(tokenizer) -> list[str]:
    questions = ["患者发热三天，最可能的诊断是？", "咳嗽", "下列哪项属于中医的望诊？A 舌象 B 脉象",
                 "治疗风寒感冒宜用", "肝主疏泄的生理功能不包括", "患儿", "心悸失眠，多梦健忘", "脾胃"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def test_continuous_batching_answers_as_one_at_a_time_generation(served):
    from medtune.inference.hf import HFBackend
    from medtune.inference.lm_head import mkl_packing_available

    model, tokenizer = served
    backend = HFBackend(model, tokenizer)
    prompts = _prompts(tokenizer)
    params = GenerationParams(max_new_tokens=24)
    alone = [backend.generate([p], params, add_special_tokens=False)[0] for p in prompts]
    assert len(set(alone)) > 1, "the tiny model should answer the prompts differently"

    app = create_app(backend, MODEL, max_queue=16, max_batch_size=8, continuous_batching=True)
    assert app.state.batching == "continuous"
    bodies = [{"model": MODEL, "prompt": p, "max_tokens": 24} for p in prompts]
    with background_server(app) as url:
        together = asyncio.run(_post_all(url, bodies))
        again = asyncio.run(_post_all(url, bodies[::-1]))[::-1]
        # stop strings: cut where generate() would have stopped
        stop = alone[0][3:5]
        stopped = httpx.post(f"{url}/v1/completions", json={**bodies[0], "stop": [stop]}, timeout=TIMEOUT,
                             trust_env=False).json()["choices"][0]["text"]
    assert [r.json()["choices"][0]["text"] for r in together] == alone
    assert [r.json()["choices"][0]["text"] for r in again] == alone
    assert stopped == backend.generate([prompts[0]], GenerationParams(max_new_tokens=24, stop=(stop,)),
                                       add_special_tokens=False)[0]
    assert stopped == alone[0][: alone[0].index(stop)]
    # the batched steps went through the packed head (one-at-a-time steps never pack it)
    assert (model.get_output_embeddings()._medtune_packed.packed is not None) == mkl_packing_available()
    # the generation thread is stopped with the server (it is not a daemon: it would hold the process)
    # (threads without a name are named after their target: "Thread-N (_run_generation_loop)")
    wait_until(lambda: not [t for t in threading.enumerate() if "_run_generation_loop" in t.name], 10)


def test_continuous_batching_is_used_only_where_it_is_exact(loaded):
    from medtune.inference.hf import HFBackend

    model, tokenizer = loaded
    backend = HFBackend(model, tokenizer)
    assert ContinuousBatching.unsupported_reason(backend) is None
    assert ContinuousBatching.accepts(GenerationParams())
    assert not ContinuousBatching.accepts(GenerationParams(temperature=0.7, seed=1))
    assert not ContinuousBatching.accepts(GenerationParams(repetition_penalty=1.2))
    assert "virtual tokens" in ContinuousBatching.unsupported_reason(_Attrs(backend, virtual_tokens=8))
    assert "switched off" in ContinuousBatching.unsupported_reason(_Attrs(backend, use_adapter=False))
    assert ContinuousBatching.unsupported_reason(FakeBackend()) == "not a transformers backend"
    with pytest.raises(ValueError, match="continuous batching cannot serve this model: not a transformers"):
        create_app(FakeBackend(), MODEL, continuous_batching=True)
    assert create_app(backend, MODEL, continuous_batching=False).state.batching.startswith("batched")
    assert create_app(backend, MODEL, max_batch_size=1).state.batching == "one at a time"


    class Recording(HFBackend):
        def generate(self, prompts, params, add_special_tokens=True):
            seen.append(params)
            return super().generate(prompts, params, add_special_tokens)

    # greedy requests go to continuous batching; sampled ones to generate() through the batcher
    seen: list[GenerationParams] = []
    app = create_app(Recording(model, tokenizer), MODEL, max_batch_size=8)
    body = {"model": MODEL, "prompt": _prompts(tokenizer)[0], "max_tokens": 12}
    with background_server(app) as url:
        for extra in ({}, {"temperature": 0.8}):
            r = httpx.post(f"{url}/v1/completions", json={**body, **extra}, timeout=TIMEOUT, trust_env=False)
            assert r.status_code == 200, r.text
    assert [(p.temperature, p.repetition_penalty) for p in seen] == [(0.8, 1.0)]


class _Attrs:
    """A backend seen with some attributes changed."""

    def __init__(self, backend, **changes):
        self._backend, self._changes = backend, changes

    def __getattr__(self, name):
        return self._changes[name] if name in self._changes else getattr(self._backend, name)


def test_decoding_lm_head_gives_the_models_logits_and_answers(tiny_model_dir, loaded):
    from medtune.inference.hf import HFBackend
    from medtune.inference.lm_head import mkl_packing_available, use_decoding_lm_head
    from medtune.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir))  # its own copy: the head is changed in place
    reference, _ = loaded
    head = model.get_output_embeddings()
    assert use_decoding_lm_head(model)
    assert head.forward.__func__.__name__ == "_decoding_linear"
    for shape in [(1, 1), (1, 3), (2, 4), (8,), (1, 64)]:  # one row (weight first) and batches (packed)
        x = torch.randn(*shape, head.in_features)
        with torch.no_grad():  # as in generation
            got = head(x)
        assert got.shape == (*shape, head.out_features) and got.is_contiguous()
        torch.testing.assert_close(got, torch.nn.functional.linear(x, head.weight, head.bias), rtol=1e-5, atol=1e-5)
    # the packed copy is what served those batches, where this torch has MKL
    assert (head._medtune_packed.packed is not None) == mkl_packing_available()
    big = torch.randn(100, head.in_features)  # above the row limit: the ordinary product
    with torch.no_grad():
        assert torch.equal(head(big), torch.nn.functional.linear(big, head.weight, head.bias))
    prompts = _prompts(tokenizer)
    params = GenerationParams(max_new_tokens=24)
    assert (HFBackend(model, tokenizer).generate(prompts, params, add_special_tokens=False)
            == HFBackend(reference, tokenizer).generate(prompts, params, add_special_tokens=False))
    # not applied where it does not pay or would be wrong
    reference_head = reference.get_output_embeddings()
    half = torch.nn.Linear(4, 6).to(torch.bfloat16)
    assert not use_decoding_lm_head(_Headed(half))
    assert reference_head.forward.__func__ is torch.nn.Linear.forward


def test_decoding_lm_head_follows_a_changed_weight_and_leaves_gradients_to_f_linear():
    from medtune.inference.lm_head import use_decoding_lm_head

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=True)
    assert use_decoding_lm_head(_Headed(head))
    x = torch.randn(4, 32)
    with torch.no_grad():
        head(x)  # packs (where MKL is available)
        head.weight.mul_(-2)  # changed in place, e.g. a merge: the packed copy must not be used stale
        head.bias.add_(1)
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight, head.bias),
                                   rtol=1e-5, atol=1e-5)
        head.weight = torch.nn.Parameter(torch.randn(500, 32))  # replaced: another tensor
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight, head.bias),
                                   rtol=1e-5, atol=1e-5)
    out = head(x)  # with autograd on: the ordinary product, so a gradient reaches the weight
    out.sum().backward()
    assert head.weight.grad is not None and torch.equal(head.weight.grad, x.sum(0).expand(500, 32))


def test_decoding_lm_head_falls_back_where_mkl_cannot_pack(monkeypatch):
    from medtune.inference import lm_head

    def cannot_pack(*args):
        raise RuntimeError("no packing on this CPU")

    monkeypatch.setattr(lm_head, "mkl_packing_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", cannot_pack, raising=False)
    head = torch.nn.Linear(32, 500, bias=True)
    assert lm_head.use_decoding_lm_head(_Headed(head))
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight, head.bias),
                                   rtol=1e-5, atol=1e-5)
    assert head._medtune_packed.refused


def test_decoding_lm_head_leaves_large_heads_unpacked(monkeypatch):
    from medtune.inference import lm_head

    monkeypatch.setattr(lm_head, "PACK_MAX_WEIGHT_BYTES", 1000)
    head = torch.nn.Linear(32, 500, bias=False)
    assert lm_head.use_decoding_lm_head(_Headed(head))
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ head.weight.T, rtol=1e-5, atol=1e-5)
    assert head._medtune_packed.packed is None and head._medtune_packed.refused


class _Headed:
    def __init__(self, head):
        self.head = head

    def get_output_embeddings(self):
        return self.head
