"""Architecture × method matrix: every family of ``medtune.tiny_models`` trained with every method.

Covered: each of the 13 architectures of ``ARCHITECTURES`` (llama, llama3, qwen2, qwen3, glm4,
phi, phi3, mistral, gemma2, gemma3, internlm3, qwen3_moe, deepseek_v3; tiny random models from
``arch_model_dir``: hidden 64, 2 layers, our 1,000-token BPE) × each of lora, adalora, prefix,
prompt and full: 64 cells trained, 1 refused. Each cell is an in-process SFT run
(``medtune.train.run``) of 2 optimiser steps (AdaLoRA: 3, its minimum) on the 4 shortest CMExam
questions of the sample, batch 4, ``data.max_length=160``, exam template ``chat`` (the family's own
chat template) where that template takes a system turn, else ``qa`` (phi has no chat template,
Gemma-2's refuses a system turn). Every trained cell is then checked by value:

* all 4 questions trained; the loss on them fell (LoRA/full: the Trainer's step-1 loss equals the
  base model's; prefix/prompt: below the step-1 loss of the random virtual tokens);
* the run loaded from disk, as every command loads it, gives the logits the model had when
  training ended (a callback keeps them; atol 1e-5), AdaLoRA's pruned ranks included;
* the LM head ran on label positions only exactly where ``label_head_reason`` allows it (lora and
  full, except Gemma-2's soft-capping), with the logged reason everywhere else;
* ``predict`` with batch 1 and batched (4 prompts of different lengths, left padding) give the
  same greedy outputs, equal to a reference decoded by full forward passes (no cache, no
  ``generate``) that stops at every token the model's ``generation_config`` names;
* log-likelihood scoring (letters) gives the same scores batched and one by one, differs from the
  adapter-off view (adapter methods), and picks one of its candidates for every question;
* export: lora/adalora merged weights, loaded by plain transformers, give the adapter model's
  logits (atol 1e-5, fp32); prefix/prompt merged export is refused with its reason and
  ``--adapter-only`` reloads onto the base model with the run's logits; full reloads with the
  run's logits (and ``--adapter-only`` is refused);
* one OpenAI-compatible server request answers 200 with the text ``predict`` gave for the same
  question (``/v1/chat/completions`` with the exam's system + user turns for chat-template
  families, ``/v1/completions`` with the rendered prompt for phi and gemma2).

Refused before the tokenizer or any weights are loaded, with the exact one-line reason: prefix on
deepseek_v3 (multi-head latent attention; ``medtune.adapters.architecture_reason``), by sft (API
and ``medtune train``, exit 2), pt, dpo and rl.

DPO (stage dpo, LoRA, 4 preference pairs) and GRPO (stage rl, the verifiable exam reward, 2
prompts × 2 generations) run 2 steps each on llama, qwen2 and glm4, each on top of that
architecture's LoRA SFT run (its adapter merged first). DPO's adapter moves and changes the
logits; GRPO logs an exam reward for every step (on a random model every completion of a group
usually scores the same, so the advantages and the update are ~0: no change is asserted).

Not covered here: DPO/GRPO on the other 10 architectures; pt and rm runs per architecture; chat
backend streaming and ``/compare`` per architecture (tests/test_behaviour_matrix.py, llama only);
log-likelihood over option texts; QLoRA (needs CUDA); the real 150k vocabularies
(tests/test_architectures.py checks their tokenizers only); real sizes or weights; multi-GPU; and
convergence: 2 steps prove the wiring, tests/test_behaviour_matrix.py proves memorisation on llama.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from medtune.inference.base import GenerationParams
from medtune.tiny_models import ARCHITECTURES

pytestmark = pytest.mark.slow

ARCHS = list(ARCHITECTURES)
METHODS = ["lora", "adalora", "prefix", "prompt", "full"]
N_NEW = 8
MAX_LENGTH = 160  # data.max_length: prompt + target tokens
PARAMS = GenerationParams(max_new_tokens=N_NEW)
# recipe, learning rate, steps (AdaLoRA needs >= 3 for its schedule)
RECIPES = {
    "lora": ("quickstart.yaml", "5e-2", 2),
    "adalora": ("quickstart.yaml", "5e-2", 3),
    "prefix": ("sft_prefix_tiny.yaml", "3e-2", 2),
    "prompt": ("sft_prompt_tiny.yaml", "3e-2", 2),
    "full": ("sft_full_tiny.yaml", "2e-3", 2),
}
# families whose chat template cannot render the chat exam template (its system turn)
PLAIN_TEMPLATE = {"phi", "gemma2"}
MLA_PREFIX = ("adapter.method=prefix does not work with model_type deepseek_v3: its multi-head latent attention "
              "caches one compressed latent per token instead of per-head keys and values, and peft's prefix "
              "tuning fills that cache with per-head key/value prefixes, whose shapes cannot match; use "
              "adapter.method=prompt or lora")
REFUSED = {("deepseek_v3", "prefix"): MLA_PREFIX}
CELLS = [(a, m) for a in ARCHS for m in METHODS if (a, m) not in REFUSED]
PREFERENCE_ARCHS = ["llama", "qwen2", "glm4"]


def template_for(arch: str) -> str:
    return "qa" if arch in PLAIN_TEMPLATE else "chat"


def _overrides(model: Path, data: Path, out: Path, arch: str, method: str) -> list[str]:
    _, lr, steps = RECIPES[method]
    return [f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={out}",
            f"adapter.method={method}", f"train.learning_rate={lr}", f"train.max_steps={steps}",
            "train.batch_size=4", "train.save_steps=1000", "train.logging_steps=1", "train.report_to=none",
            "train.gradient_checkpointing=false", "adapter.dropout=0.0", f"data.max_length={MAX_LENGTH}",
            f"data.template={template_for(arch)}"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module", autouse=True)
def quick():
    """Speed only. One torch thread: the models are tiny, and 2 threads on 2 busy cores made every
    matmul ~5x slower. ``gc.freeze``: the Trainer calls ``gc.collect`` at the end of every run
    (accelerate's ``free_memory``), which otherwise walks every object of the session each time."""
    import gc

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory, sample_records):
    from medtune.io import write_jsonl
    from medtune.templates import get_template

    root = tmp_path_factory.mktemp("arch-matrix")
    # the four shortest questions of the first 200: chat prompts of 79-129 tokens (by family), so
    # MAX_LENGTH keeps all four with the start of their explanation; their different lengths need left padding
    qa = get_template("qa")
    records = sorted(sample_records[:200], key=lambda r: len(qa.render_prompt(r)))[:4]
    data = root / "train.jsonl"
    write_jsonl(data, [r.to_dict() for r in records])
    return {"root": root, "records": records, "data": data}


def _final_logits_callback():
    """A Trainer callback keeping the trained model's logits on every training example as training ends."""
    from transformers import TrainerCallback

    class FinalLogits(TrainerCallback):
        def __init__(self) -> None:
            self.pairs: list[tuple[list[int], torch.Tensor]] = []

        def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            was_training = model.training
            model.eval()
            with torch.no_grad():
                for ids in train_dataloader.dataset["input_ids"]:
                    x = torch.tensor([ids])
                    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -len(ids):]
                    self.pairs.append((ids, logits.float().clone()))
            model.train(was_training)

    return FinalLogits()


@pytest.fixture(scope="module")
def trained(work, arch_model_dir):
    """``trained(arch, method)``: run directory, label-head log lines and final logits, trained once per module."""
    from medtune.config import load_config
    from medtune.train import common, run

    runs: dict[tuple[str, str], tuple[Path, list[str], list]] = {}

    def get(arch: str, method: str) -> tuple[Path, list[str], list]:
        if (arch, method) not in runs:
            recipe = RECIPES[method][0]
            out = work["root"] / f"{arch}-{method}"
            cfg = load_config(f"src/medtune/configs/{recipe}",
                              _overrides(arch_model_dir(arch), work["data"], out, arch, method))
            logger = logging.getLogger("medtune.train.label_head")
            handler, level = _Records(), logger.level
            final = _final_logits_callback()
            standard = common.standard_callbacks
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(common, "standard_callbacks", lambda *a, **k: [*standard(*a, **k), final])
                try:
                    runs[arch, method] = (run(cfg), handler.messages, final.pairs)
                finally:
                    logger.removeHandler(handler)
                    logger.setLevel(level)
        return runs[arch, method]

    return get


def _stop_ids(model, tokenizer) -> set[int]:
    """Every id that ends generation: the tokenizer's eos and the model's generation_config eos ids."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return {tokenizer.eos_token_id, *[i for i in configured if i is not None]}


def _reference(model, tokenizer, prompt: str, add_special_tokens: bool, stops: set[int]) -> str:
    """Greedy continuation by full forward passes (no cache, no generate)."""
    ids = tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(N_NEW):
            token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def _loss(model, examples) -> float:
    """Next-token cross-entropy over every target token of the training examples (the Trainer's batch loss).

    Computed from the logits: peft's AdaLoRA adds its orthogonality penalty to any loss it is asked
    for, and one loaded for inference cannot (``trainable_adapter_name`` is unset).
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor(e["labels"])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1]:]
            total += float(torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100,
                                                             reduction="sum"))
            count += int((labels[1:] != -100).sum())
    return total / count


def _logits(model, tokenizer, prompts: list[str], add_special_tokens: bool) -> list[torch.Tensor]:
    """Last-position-aligned logits of each prompt (virtual-token positions of prompt tuning left out)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
            out.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1]:].float())
    return out


@pytest.fixture(scope="module", params=CELLS, ids=[f"{a}-{m}" for a, m in CELLS])
def cell(request, work, trained, arch_model_dir):
    """One trained cell, loaded as every command loads it, with its reference values.

    Module-scoped and parametrized, so pytest runs every test of one cell before the next cell
    and releases each loaded model when its tests are done.
    """
    from medtune.data.sft import build_sft_examples
    from medtune.inference.loading import load_backend
    from medtune.models import load_causal_lm

    arch, method = request.param
    run_dir, label_log, final = trained(arch, method)
    lb = load_backend(run=str(run_dir))
    model, tok, tpl = lb.backend.model, lb.backend.tokenizer, lb.template
    model.eval()
    special = not tpl.chat
    prompts = [tpl.render_prompt(r, tok) for r in work["records"]]
    stops = _stop_ids(model, tok)
    examples = build_sft_examples(work["records"], tpl, tok, MAX_LENGTH).examples
    if method == "full":
        base_loss = _loss(load_causal_lm(str(arch_model_dir(arch)), dtype="float32", device="cpu").eval(), examples)
    else:
        with model.disable_adapter():
            base_loss = _loss(model, examples)
    return {
        "arch": arch, "method": method, "run": run_dir, "label_log": label_log, "final": final, "loaded": lb,
        "prompts": prompts,
        "special": special, "reference": [_reference(model, tok, p, special, stops) for p in prompts],
        "logits": _logits(model, tok, prompts, special), "loss": _loss(model, examples), "base_loss": base_loss,
    }


# ---- training --------------------------------------------------------------------------------------


def test_training_lowers_the_loss_on_its_data(cell):
    c, arch, method = cell, cell["arch"], cell["method"]
    summary = json.loads((c["run"] / "data_summary.json").read_text())["train"]
    assert (summary["examples"], summary["dropped"]) == (4, 0)  # every question trained, in one batch of 4
    # the loss the Trainer logged at step 1: the starting model's, on the whole batch (all 4 examples)
    first = json.loads((c["run"] / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    if method in ("prefix", "prompt"):  # random virtual tokens: the starting model is not the base model
        assert c["loss"] < first["loss"] - 1e-3, (arch, method, c["loss"], first["loss"])
        return
    # LoRA starts with B = 0, AdaLoRA with E = 0: the starting model is the base model
    if method in ("lora", "full"):  # (AdaLoRA's logged loss adds its orthogonality penalty)
        assert first["loss"] == pytest.approx(c["base_loss"], abs=1e-4)
    assert c["loss"] < c["base_loss"] - 1e-3, (arch, method, c["loss"], c["base_loss"])


def test_the_saved_run_reloads_as_trained(cell):
    """The run loaded from disk (as every command loads it) is the model training ended with."""
    model = cell["loaded"].backend.model
    assert len(cell["final"]) == 4
    with torch.no_grad():
        for ids, want in cell["final"]:
            x = torch.tensor([ids])
            got = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -len(ids):].float()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _label_head_expected(arch: str, method: str) -> str | None:
    if method not in ("lora", "full"):
        return f"adapter.method={method}: its forward is not the bare decoder's (penalty or virtual tokens)"
    if arch == "gemma2":
        return "final_logit_softcapping=30.0: the model's loss is on tanh-capped logits"
    return None


def test_label_positions_only_loss_where_exact(cell):
    messages = cell["label_log"]
    reason = _label_head_expected(cell["arch"], cell["method"])
    want = [] if reason is None else [f"LM head on all positions (the model's own loss): {reason}"]
    assert messages == want


# ---- entry points ----------------------------------------------------------------------------------


def test_predict_batch_1_equals_batched_equals_the_forward_pass(work, cell, tmp_path):
    from medtune.inference.predict import predict

    c, arch, method = cell, cell["arch"], cell["method"]
    lb = c["loaded"]
    outputs = {}
    for batch_size in (1, 4):
        out = tmp_path / f"pred-{batch_size}.jsonl"
        predict(work["records"], lb.backend, lb.template, out, PARAMS, batch_size=batch_size,
                tokenizer=lb.backend.tokenizer, progress=False)
        by_id = {row["id"]: row["output"] for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
        outputs[batch_size] = [by_id[r.id] for r in work["records"]]
    assert outputs[1] == outputs[4] == c["reference"], (arch, method)


def test_loglik_scores_and_picks_a_choice_per_question(work, cell):
    from medtune.evaluation.loglik import build_requests, pick

    c, method = cell, cell["method"]
    lb = c["loaded"]
    requests, cand_lists = build_requests(work["records"], lb.template, lb.backend.tokenizer, "letters")
    batched = lb.backend.loglikelihood(requests, batch_size=4)
    one_by_one = lb.backend.loglikelihood(requests, batch_size=1)
    for row_a, row_b in zip(batched, one_by_one, strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-4)
    picked = pick(work["records"], cand_lists, batched, "letters")
    assert [p["parsed"] in cands for p, cands in zip(picked, cand_lists, strict=True)] == [True] * 4
    assert all(score < 0 for row in batched for score in row)
    if method != "full":  # the adapter-off view scores differently
        base = lb.backend.base().loglikelihood(requests, batch_size=4)
        assert max(abs(a - b) for ra, rb in zip(base, batched, strict=True) for a, b in zip(ra, rb, strict=True)) > 1e-4


def test_server_answers_as_predict(work, cell):
    from fastapi.testclient import TestClient

    from medtune.inference.batching import CONTINUOUS_BATCHING_MODEL_TYPES
    from medtune.inference.server import create_app

    c = cell
    lb = c["loaded"]
    rec = work["records"][0]
    app = create_app(lb.backend, "m", template=lb.template, allowed_hosts=["testserver"])
    # greedy requests go through transformers' continuous batching wherever it is proven (not a
    # fallback that would make this test pass without it); elsewhere through batched generate()
    proven = lb.backend.model.config.model_type in CONTINUOUS_BATCHING_MODEL_TYPES
    continuous = proven and c["method"] in ("lora", "adalora", "full")
    assert (app.state.batching == "continuous") == continuous, app.state.batching
    with TestClient(app) as client:
        if lb.template.chat:
            user = lb.template.prompt.format(question=rec.question, options=lb.template.render_options(rec.options))
            reply = client.post("/v1/chat/completions", json={
                "model": "m", "max_tokens": N_NEW, "temperature": 0,
                "messages": [{"role": "system", "content": lb.template.system}, {"role": "user", "content": user}]})
            text = reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else None
        else:
            reply = client.post("/v1/completions", json={"model": "m", "prompt": c["prompts"][0],
                                                         "max_tokens": N_NEW, "temperature": 0})
            text = reply.json()["choices"][0]["text"] if reply.status_code == 200 else None
    assert reply.status_code == 200, reply.text
    assert text == c["reference"][0]


# ---- export ------------------------------------------------------------------------------------------


def _assert_same_logits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_export(work, cell, arch_model_dir):
    from medtune.export import ExportError, export_run
    from medtune.inference.loading import load_backend
    from medtune.models import load_causal_lm

    c, arch, method = cell, cell["arch"], cell["method"]
    run_dir, tok = c["run"], c["loaded"].backend.tokenizer
    out = work["root"] / f"export-{arch}-{method}"
    if method in ("prefix", "prompt"):
        peft_type = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method]
        with pytest.raises(ExportError) as refused:
            export_run(run_dir, out)
        assert str(refused.value) == (
            f"{run_dir} was trained with {peft_type} (adapter.method={method}), which adds virtual tokens rather "
            "than a weight delta, so it cannot be merged into the base model; export it with --adapter-only and "
            "load it with peft (PeftModel.from_pretrained)")
        assert not out.exists()
        export_run(run_dir, out, adapter_only=True)
        again = load_backend(model=str(arch_model_dir(arch)), adapter=str(out), template=str(out / "template.yaml"))
        model = again.backend.model
    else:
        if method == "full":
            with pytest.raises(ExportError, match=r"is a full fine-tune \(model/ folder, no adapter\); export it "
                                                  r"without --adapter-only"):
                export_run(run_dir, out, adapter_only=True)
        export_run(run_dir, out)
        # a merged export is a plain checkpoint: transformers alone loads it, no adapter left
        model = load_causal_lm(str(out), dtype="float32", device="cpu")
        assert not any("lora_" in n for n, _ in model.named_parameters())
    model.eval()
    _assert_same_logits(_logits(model, tok, c["prompts"], c["special"]), c["logits"])


# ---- refused before loading ------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Any tokenizer or weights loaded fails the test."""
    import medtune.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model or tokenizer was loaded before the refusal")

    for name in ("load_for_training", "load_causal_lm", "training_tokenizer", "load_tokenizer"):
        monkeypatch.setattr(medtune.models, name, refuse)


@pytest.mark.parametrize(("arch", "method"), list(REFUSED))
def test_impossible_combinations_are_refused_before_loading(work, arch_model_dir, no_loading, capsys, arch, method):
    from medtune.cli import main
    from medtune.config import ConfigError, load_config
    from medtune.train import run

    model = arch_model_dir(arch)
    recipe = RECIPES[method][0]
    out = work["root"] / f"refused-{arch}-{method}"
    overrides = _overrides(model, work["data"], out, arch, method)
    capsys.readouterr()  # building the model printed progress bars
    with pytest.raises(ConfigError) as refused:
        run(load_config(f"src/medtune/configs/{recipe}", overrides))
    assert str(refused.value) == REFUSED[arch, method]
    assert main(["train", f"src/medtune/configs/{recipe}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"medtune train: error: {REFUSED[arch, method]}"]
    # the other stages that take any method refuse it just as early
    for stage_recipe in ("pt_lora_tiny.yaml", "dpo_lora_tiny.yaml", "rl_grpo_exam_tiny.yaml"):
        with pytest.raises(ConfigError) as refused:
            run(load_config(f"src/medtune/configs/{stage_recipe}", [
                f"model.name_or_path={model}", f"data.train={work['data']}", f"train.output_dir={out}",
                f"adapter.method={method}"]))
        assert str(refused.value) == REFUSED[arch, method], stage_recipe
    assert not out.exists()


# ---- preference and RL stages ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", PREFERENCE_ARCHS)
def test_dpo_runs_on_top_of_the_sft_run(work, trained, arch):
    from safetensors.torch import load_file

    from medtune.config import load_config
    from medtune.inference.loading import load_backend
    from medtune.train import run
    from test_stages import _preference_file

    sft_dir = trained(arch, "lora")[0]
    pairs = _preference_file(work["root"] / f"pairs-{arch}.jsonl", 4)
    out = run(load_config("src/medtune/configs/dpo_lora_tiny.yaml", [
        f"model.name_or_path={sft_dir}", f"data.train={pairs}", f"train.output_dir={work['root'] / f'dpo-{arch}'}",
        "train.max_steps=2", "train.batch_size=2", "data.val_fraction=0", "data.max_samples=null",
        "data.max_length=256", "preference.max_prompt_length=128", "train.save_steps=1000", "train.logging_steps=1",
        "train.report_to=none"]))
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2
    lora_b = [t for n, t in load_file(out / "adapter" / "adapter_model.safetensors").items() if "lora_B" in n]
    assert lora_b and all(float(t.abs().sum()) > 0 for t in lora_b)  # lora_B starts at zero
    lb = load_backend(run=str(out), kind="conversation")
    assert lb.backend.has_adapter
    tok = lb.backend.tokenizer
    prompts = ["患者发热三天，咳嗽。", "下列哪项是维生素B12缺乏的表现？"]
    tuned = _logits(lb.backend.model.eval(), tok, prompts, True)
    with lb.backend.model.disable_adapter():  # the SFT run (merged) without the DPO adapter
        start = _logits(lb.backend.model, tok, prompts, True)
    assert max(float((a - b).abs().max()) for a, b in zip(tuned, start, strict=True)) > 1e-5


@pytest.mark.parametrize("arch", PREFERENCE_ARCHS)
def test_grpo_with_the_exam_reward_runs_on_top_of_the_sft_run(work, trained, arch):
    from medtune.config import load_config
    from medtune.train import run

    sft_dir = trained(arch, "lora")[0]
    out = run(load_config("src/medtune/configs/rl_grpo_exam_tiny.yaml", [
        f"model.name_or_path={sft_dir}", f"data.train={work['data']}", f"train.output_dir={work['root'] / f'rl-{arch}'}",
        f"data.template={template_for(arch)}", "train.max_steps=2", "train.batch_size=2", "rl.num_generations=2",
        "rl.max_completion_length=8", "train.save_steps=1000", "train.logging_steps=1", "train.report_to=none"]))
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and results["algorithm"] == "grpo"
    rewards = [row["reward"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "reward" in row]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.1 for r in rewards)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
