"""Decoding settings: validation, the seeded sampler, and how each backend applies them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medtune.inference.base import GenerationParams
from medtune.inference.sampling import SeededSampler, derive_seed, filter_logits

PROMPTS = ["发热怎么办？", "高血压患者应该注意什么饮食问题？", "咳嗽", "头痛三天，伴有恶心，需要做什么检查？"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"seed": -3}, r"seed must be an integer in \[0, 2\*\*63\)"),
        ({"seed": True}, "seed must be an integer"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ],
)
def test_generation_params_out_of_range_are_refused_naming_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)


def test_generation_params_defaults_are_greedy_and_off():
    params = GenerationParams()
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.seed) == (
        0.0, 1.0, 0, 1.0, None)
    assert not params.sampling and GenerationParams(temperature=0.5).sampling


# ---- filter_logits: values worked out by hand ------------------------------------------------------


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [3.0, 1.0, 1.0, 0.0]])
    out = filter_logits(logits, temperature=1.0, top_k=2)
    inf = float("-inf")
    assert out.tolist() == [[2.0, 1.0, inf, inf], [3.0, 1.0, 1.0, inf]]  # the tie with the 2nd stays


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # mass of the more probable tokens before each: 0, 0.5, 0.8, 0.95 → kept while < top_p
    kept = lambda p: torch.isfinite(filter_logits(logits, 1.0, top_p=p)).tolist()[0]  # noqa: E731
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # never fewer than one token
    assert kept(1.0) == [True, True, True, True]


def test_temperature_divides_logits_before_filtering():
    out = filter_logits(torch.tensor([[2.0, 1.0, -4.0]]), temperature=2.0)
    assert out.tolist() == [[1.0, 0.5, -2.0]]


def test_derive_seed_is_deterministic_and_separates_prompts_and_seeds():
    a = derive_seed(7, "发热怎么办？")
    assert a == derive_seed(7, "发热怎么办？") and 0 <= a < 2**63
    assert a != derive_seed(8, "发热怎么办？") and a != derive_seed(7, "咳嗽")
    assert derive_seed(7, [5, 6]) == derive_seed(7, (5, 6)) != derive_seed(7, [6, 5])


def test_seeded_sampler_ignores_left_padding_when_seeding_a_row():
    # The same prompt [5, 6], once padded (pad id 0) and once not, draws from the same stream.
    vocab = 50
    scores = torch.zeros((1, vocab))  # uniform: every draw depends on the generator alone
    padded = SeededSampler(1.0, seed=3, pad_token_id=0)
    bare = SeededSampler(1.0, seed=3, pad_token_id=0)
    draws_padded = [int(padded(torch.tensor([[0, 0, 5, 6]]), scores).argmax()) for _ in range(20)]
    draws_bare = [int(bare(torch.tensor([[5, 6]]), scores).argmax()) for _ in range(20)]
    assert draws_padded == draws_bare
    assert len(set(draws_bare)) > 1  # it really samples
    out = bare(torch.tensor([[5, 6]]), scores)
    assert int(torch.isfinite(out).sum()) == 1 and out.max().item() == 0.0


# ---- the transformers backend on a tiny model --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    from medtune.inference.hf import HFBackend
    from medtune.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir), None)
    return HFBackend(model, tokenizer)


def test_same_seed_gives_same_outputs_and_another_seed_other_outputs(tiny_backend):
    params = GenerationParams(max_new_tokens=8, temperature=1.0, seed=1)
    first = tiny_backend.generate(PROMPTS, params)
    assert tiny_backend.generate(PROMPTS, params) == first
    other = tiny_backend.generate(PROMPTS, GenerationParams(max_new_tokens=8, temperature=1.0, seed=2))
    assert all(a != b for a, b in zip(first, other, strict=True))
    assert first != tiny_backend.generate(PROMPTS, GenerationParams(max_new_tokens=8))  # not greedy


def test_seeded_output_does_not_depend_on_batch_or_order(tiny_backend):
    params = GenerationParams(max_new_tokens=8, temperature=1.0, seed=5)
    together = tiny_backend.generate(PROMPTS, params)
    one_by_one = [tiny_backend.generate([p], params)[0] for p in PROMPTS]
    reversed_batch = tiny_backend.generate(PROMPTS[::-1], params)[::-1]
    assert one_by_one == together and reversed_batch == together
    assert "".join(tiny_backend.stream(PROMPTS[1], params)) == together[1]


def test_top_k_one_and_tiny_top_p_sample_the_greedy_output(tiny_backend):
    greedy = tiny_backend.generate(PROMPTS, GenerationParams(max_new_tokens=8))
    assert tiny_backend.generate(PROMPTS, GenerationParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=9)) == greedy
    assert tiny_backend.generate(PROMPTS, GenerationParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=9)) == greedy


def test_unseeded_sampling_follows_torch_manual_seed(tiny_backend):
    params = GenerationParams(max_new_tokens=8, temperature=1.0)
    torch.manual_seed(11)
    first = tiny_backend.generate(PROMPTS, params)
    torch.manual_seed(11)
    assert tiny_backend.generate(PROMPTS, params) == first


def test_generate_kwargs_override_the_model_generation_config():
    from medtune.inference.hf import HFBackend

    backend = object.__new__(HFBackend)  # _generate_kwargs only reads the tokenizer
    backend.tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    greedy = backend._generate_kwargs(GenerationParams(max_new_tokens=5))
    assert greedy == {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": 2,
                      "temperature": None, "top_p": None, "top_k": None, "min_p": None, "typical_p": None,
                      "repetition_penalty": 1.0}
    sampled = backend._generate_kwargs(GenerationParams(temperature=0.7, top_p=0.9, top_k=40,
                                                        repetition_penalty=1.1, seed=3))
    (sampler,) = sampled.pop("logits_processor")
    assert isinstance(sampler, SeededSampler)
    assert (sampler.temperature, sampler.top_k, sampler.top_p, sampler.seed, sampler.pad_token_id) == (
        0.7, 40, 0.9, 3, 0)
    assert sampled["do_sample"] is False and sampled["repetition_penalty"] == 1.1


def test_repetition_penalty_changes_greedy_output(tiny_backend):
    plain = tiny_backend.generate(PROMPTS, GenerationParams(max_new_tokens=12))
    penalised = tiny_backend.generate(PROMPTS, GenerationParams(max_new_tokens=12, repetition_penalty=5.0))
    assert plain != penalised


# ---- the vLLM backend's sampling parameters (no vLLM needed) -----------------------------------------


def _vllm_backend():
    from medtune.inference.vllm import VLLMBackend

    backend = object.__new__(VLLMBackend)
    backend._vllm = SimpleNamespace(SamplingParams=lambda **kwargs: kwargs)  # records what it is given
    return backend


def test_vllm_sampling_params_apply_every_setting_and_seed_each_prompt():
    backend = _vllm_backend()
    greedy = backend._sampling(GenerationParams(max_new_tokens=9, top_p=0.5, repetition_penalty=1.2), PROMPTS)
    assert greedy == {"max_tokens": 9, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                      "repetition_penalty": 1.2, "stop": None}
    params = GenerationParams(max_new_tokens=9, temperature=0.8, top_p=0.9, top_k=20, seed=4, stop=("\n",))
    per_prompt = backend._sampling(params, PROMPTS[:2])
    assert per_prompt == [{"max_tokens": 9, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
                           "repetition_penalty": 1.0, "stop": ["\n"], "seed": derive_seed(4, p)}
                          for p in PROMPTS[:2]]
    unseeded = backend._sampling(GenerationParams(temperature=0.8), PROMPTS)
    assert unseeded == {"max_tokens": 128, "temperature": 0.8, "top_p": 1.0, "top_k": -1,
                        "repetition_penalty": 1.0, "stop": None}
