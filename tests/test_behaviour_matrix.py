"""Behaviour matrix: every adapter method × every way a user reaches the trained model.

A tiny model is trained to memorise four exam questions with each method (lora, adalora,
prefix, prompt, full). Every entry point must then (a) give outputs that differ from the base
model's and (b) agree with the model's own forward pass — the computation training optimised:

* ``predict`` with batch size 1 and batched (left padding, prompts of different lengths);
* log-likelihood scores (letters: one forward pass; option texts: multi-token continuations);
* the chat backend (``answer_exam``, streaming, and ``/compare``'s adapter-off view);
* one request to the OpenAI-compatible server;
* ``export`` → reload (merged weights, or the adapter alone for prefix/prompt tuning).

The reference is greedy decoding by repeated full forward passes without a cache, through the
trained model's ``forward`` (for peft models, the same code path as the training loss).
Values are compared, never types: a prefix adapter that generation silently ignored made every
"tuned" output equal the base model's while all older tests stayed green.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from medtune.inference.base import GenerationParams

pytestmark = pytest.mark.slow

METHODS = ["lora", "adalora", "prefix", "prompt", "full"]
N_NEW = 8  # tokens generated per question
PARAMS = GenerationParams(max_new_tokens=N_NEW)
RECIPES = {  # recipe, learning rate, steps: each memorises the 4 questions far enough to change outputs
    "lora": ("quickstart.yaml", "5e-2", 30),
    "adalora": ("quickstart.yaml", "5e-2", 30),
    "prefix": ("sft_prefix_tiny.yaml", "3e-2", 30),
    "prompt": ("sft_prompt_tiny.yaml", "3e-2", 30),
    "full": ("sft_full_tiny.yaml", "2e-3", 30),
}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_model_dir, sample_records):
    from medtune.config import load_config
    from medtune.io import write_jsonl
    from medtune.train.sft import run

    work = tmp_path_factory.mktemp("matrix")
    # four questions of clearly different prompt lengths, so batches need left padding
    records = sorted(sample_records[:40], key=lambda r: len(r.question))[::10][:4]
    data = work / "train.jsonl"
    write_jsonl(data, [r.to_dict() for r in records])
    runs = {}
    for method in METHODS:
        recipe, lr, steps = RECIPES[method]
        overrides = [f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={work / method}",
                     f"adapter.method={method}", f"train.learning_rate={lr}", f"train.max_steps={steps}",
                     "train.batch_size=4", "train.save_steps=1000", "train.logging_steps=10", "train.report_to=none",
                     "train.gradient_checkpointing=false", "adapter.dropout=0.0"]
        runs[method] = run(load_config(f"src/medtune/configs/{recipe}", overrides))
    return {"work": work, "records": records, "data": data, "runs": runs, "base": tiny_model_dir}


def _reference(model, tokenizer, prompt: str, add_special_tokens: bool) -> list[int]:
    """Greedy continuation by full forward passes (no cache, no generate)."""
    ids = tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(N_NEW):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


@pytest.fixture(scope="module")
def loaded(matrix):
    """Per method: the run loaded as every command loads it, and the reference continuations."""
    from medtune.inference.loading import load_backend

    out = {}
    for method, run_dir in matrix["runs"].items():
        lb = load_backend(run=str(run_dir))
        model, tok, tpl = lb.backend.model, lb.backend.tokenizer, lb.template
        prompts = [tpl.render_prompt(r, tok) for r in matrix["records"]]
        tuned = [_reference(model, tok, p, not tpl.chat) for p in prompts]
        if method == "full":
            from medtune.models import load_for_inference

            base_model, _ = load_for_inference(str(matrix["base"]))
            base = [_reference(base_model, tok, p, not tpl.chat) for p in prompts]
        else:
            with model.disable_adapter():
                base = [_reference(model, tok, p, not tpl.chat) for p in prompts]
        out[method] = {"loaded": lb, "prompts": prompts, "tuned": tuned, "base": base,
                       "tuned_text": [tok.decode(t, skip_special_tokens=True) for t in tuned],
                       "base_text": [tok.decode(t, skip_special_tokens=True) for t in base]}
    return out


@pytest.mark.parametrize("method", METHODS)
def test_training_changed_what_the_model_says(loaded, method):
    cell = loaded[method]
    assert all(t != b for t, b in zip(cell["tuned"], cell["base"], strict=True)), (method, cell["tuned_text"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_predict_equals_the_forward_pass(matrix, loaded, method, batch_size, tmp_path):
    from medtune.inference.predict import predict

    cell = loaded[method]
    lb = cell["loaded"]
    out = tmp_path / "pred.jsonl"
    predict(matrix["records"], lb.backend, lb.template, out, PARAMS, batch_size=batch_size,
            tokenizer=lb.backend.tokenizer, progress=False)
    by_id = {row["id"]: row["output"] for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert [by_id[r.id] for r in matrix["records"]] == cell["tuned_text"]


@pytest.mark.parametrize("method", METHODS)
def test_loglik_equals_the_forward_pass(matrix, loaded, method):
    from medtune.evaluation.loglik import build_requests

    lb = loaded[method]["loaded"]
    model, tok = lb.backend.model, lb.backend.tokenizer
    for choices in ("letters", "text"):
        requests, _ = build_requests(matrix["records"], lb.template, tok, choices)
        batched = lb.backend.loglikelihood(requests, batch_size=4)
        base = lb.backend.base().loglikelihood(requests, batch_size=4) if method != "full" else None
        for (context, conts), scores in zip(requests, batched, strict=True):
            with torch.no_grad():
                for cont, score in zip(conts, scores, strict=True):
                    ids = torch.tensor([context + cont])
                    logits = model(input_ids=ids).logits[0, -ids.shape[1]:]  # prompt tuning: virtual first
                    logprobs = torch.log_softmax(logits.float(), dim=-1)
                    want = sum(float(logprobs[len(context) - 1 + k, t]) for k, t in enumerate(cont))
                    assert score == pytest.approx(want, abs=1e-4), (method, choices)
        if base is not None:  # the adapter-off view scores differently
            diff = max(abs(a - b) for row_a, row_b in zip(base, batched, strict=True)
                       for a, b in zip(row_a, row_b, strict=True))
            assert diff > 1e-3, (method, choices)


@pytest.mark.parametrize("method", METHODS)
def test_chat_backend_stream_and_compare(matrix, loaded, method):
    from medtune.inference.chat import answer_exam

    cell = loaded[method]
    lb = cell["loaded"]
    for rec, prompt, want, base_want in zip(matrix["records"], cell["prompts"], cell["tuned_text"],
                                            cell["base_text"], strict=True):
        assert answer_exam(lb.backend, lb.template, rec.question, rec.options, PARAMS).output == want
        assert "".join(lb.backend.stream(prompt, PARAMS, add_special_tokens=not lb.template.chat)) == want
        if method != "full":  # /compare: the same weights with the adapter switched off
            assert lb.backend.base().generate([prompt], PARAMS, add_special_tokens=not lb.template.chat) == [base_want]


@pytest.mark.parametrize("method", METHODS)
def test_server_answers_as_the_forward_pass(loaded, method):
    from medtune.inference.server import background_server, create_app

    cell = loaded[method]
    app = create_app(cell["loaded"].backend, "m")
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        reply = client.post("/v1/completions", json={"model": "m", "prompt": cell["prompts"][0],
                                                     "max_tokens": N_NEW, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == cell["tuned_text"][0]


@pytest.mark.parametrize("method", METHODS)
def test_export_and_reload_gives_the_same_answers(matrix, loaded, method):
    from medtune.export import export_run
    from medtune.inference.loading import load_backend

    cell = loaded[method]
    virtual = method in ("prefix", "prompt")
    out = export_run(matrix["runs"][method], matrix["work"] / f"export-{method}", adapter_only=virtual)
    template = str(out / "template.yaml")
    if virtual:  # cannot be merged: the adapter alone, loaded onto the base model
        again = load_backend(model=str(matrix["base"]), adapter=str(out), template=template)
    else:
        again = load_backend(model=str(out), template=template)
    assert again.backend.generate(cell["prompts"], PARAMS) == cell["tuned_text"]
