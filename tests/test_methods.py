"""Every adapter method on the tiny Llama model: exact trainable-parameter counts, prefix/prompt
tuning train and generate, the guards that refuse combinations known to fail, and export.

Tiny model (medtune.models.build_tiny_model): Llama, hidden 128, intermediate 256, 4 layers,
4 attention heads (head_dim 32), 2 key/value heads (GQA: k/v projections are 128 → 64), tied
embeddings. The expected counts below are derived from these shapes by hand, not read back from peft.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from medtune.adapters import check_method_compatibility, peft_config_for, trainable_parameter_counts
from medtune.config import AdapterConfig, ConfigError, TrainConfig, load_config

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 128, 256, 4, 4, 2
HEAD_DIM = HIDDEN // HEADS
KV_DIM = KV_HEADS * HEAD_DIM  # 64: width of k_proj/v_proj outputs, and of each prefix key/value
R = 8
# (in_features, out_features) of every LoRA target in one decoder layer
LINEAR_SHAPES = {
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV_DIM), "v_proj": (HIDDEN, KV_DIM),
    "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}
LORA = LAYERS * sum(R * (i + o) for i, o in LINEAR_SHAPES.values())  # A: r x in, B: out x r
PROMPT = 16 * HIDDEN  # one input embedding per virtual token
# peft sizes prefixes for GQA by num_key_value_heads (#1901): a key and a value of KV_DIM per layer
PREFIX = 16 * LAYERS * 2 * KV_DIM
# P-tuning v2 projection: Embedding(16, KV_DIM) → Linear(KV_DIM, HIDDEN) → Tanh → Linear(HIDDEN, LAYERS*2*KV_DIM)
PREFIX_PROJECTED = 16 * KV_DIM + (KV_DIM * HIDDEN + HIDDEN) + (HIDDEN * LAYERS * 2 * KV_DIM + LAYERS * 2 * KV_DIM)


def base_params(vocab: int) -> int:
    """All weights of the tiny model (embeddings tied to the LM head, so counted once)."""
    per_layer = sum(i * o for i, o in LINEAR_SHAPES.values()) + 2 * HIDDEN  # + two RMSNorms
    return vocab * HIDDEN + LAYERS * per_layer + HIDDEN  # + final norm


def test_hand_derived_counts():
    # written out, so a change in the derivation above shows up here
    assert (LORA, PROMPT, PREFIX, PREFIX_PROJECTED) == (65536, 2048, 8192, 75392)


@pytest.mark.parametrize(
    ("spec", "kwargs", "expected"),
    [
        (AdapterConfig(method="lora"), {}, LORA),
        (AdapterConfig(method="qlora"), {}, LORA),  # same LoRA config; only the loading differs
        (AdapterConfig(method="prompt"), {}, PROMPT),
        (AdapterConfig(method="prefix"), {}, PREFIX),
        (AdapterConfig(method="prefix", prefix_projection=True), {"hidden_size": HIDDEN}, PREFIX_PROJECTED),
    ],
    ids=["lora", "qlora", "prompt", "prefix", "prefix-projection"],
)
def test_trainable_parameter_counts(tiny_model_dir, tiny_tokenizer, spec, kwargs, expected):
    from peft import get_peft_model

    from medtune.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu")
    assert model.config.vocab_size == len(tiny_tokenizer)
    base = base_params(len(tiny_tokenizer))
    assert trainable_parameter_counts(model) == (base, base)
    peft_model = get_peft_model(model, peft_config_for(spec, "llama", 10, **kwargs))
    assert trainable_parameter_counts(peft_model) == (expected, base + expected)
    # and peft's own count agrees
    assert peft_model.get_nb_trainable_parameters() == (expected, base + expected)


def test_prompt_text_init_uses_the_tokenizer(tiny_model_dir):
    from peft import get_peft_model

    from medtune.models import load_causal_lm

    spec = AdapterConfig(method="prompt", num_virtual_tokens=4)
    cfg = peft_config_for(spec, "llama", prompt_init_text="请回答下面的医学考试题",
                          tokenizer_name_or_path=str(tiny_model_dir))
    model = get_peft_model(load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu"), cfg)
    soft = model.prompt_encoder["default"].embedding.weight
    words = model.get_input_embeddings().weight
    # every virtual token starts as a real token's embedding (text init), not random noise
    assert all(torch.isclose(words, row).all(dim=1).any() for row in soft)
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        peft_config_for(spec, "llama", prompt_init_text="医学")


def test_prefix_with_gradient_checkpointing_is_refused():
    with pytest.raises(ConfigError, match=r"gradient_checkpointing=false.*|past_key_values") as exc:
        check_method_compatibility(AdapterConfig(method="prefix"), TrainConfig(gradient_checkpointing=True))
    assert "past_key_values" in str(exc.value) and "train.gradient_checkpointing=false" in str(exc.value)
    check_method_compatibility(AdapterConfig(method="prefix"), TrainConfig(gradient_checkpointing=False))
    check_method_compatibility(AdapterConfig(method="prompt"), TrainConfig(gradient_checkpointing=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_refused_on_cpu():
    from medtune.models import GPURequired

    with pytest.raises(GPURequired, match="needs a CUDA GPU"):
        check_method_compatibility(AdapterConfig(method="qlora"), TrainConfig())


def _sft_calls_the_guard() -> bool:
    from medtune.train import sft

    return "check_method_compatibility" in inspect.getsource(sft.run)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.skipif(not _sft_calls_the_guard(), reason="train/sft.py does not call check_method_compatibility yet")
def test_cli_qlora_on_cpu_fails_before_loading(tmp_path, records_file, capsys):
    from medtune.cli import main

    # The model path does not exist: if anything were loaded first, that error would come instead.
    rc = main(["train", "src/medtune/configs/quickstart.yaml", f"model.name_or_path={tmp_path / 'no-such-model'}",
               f"data.train={records_file(4)}", f"train.output_dir={tmp_path / 'run'}", "adapter.method=qlora"])
    assert rc == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not _sft_calls_the_guard(), reason="train/sft.py does not call check_method_compatibility yet")
def test_cli_prefix_with_gradient_checkpointing_exits_2(tmp_path, records_file, capsys):
    from medtune.cli import main

    rc = main(["train", "src/medtune/configs/sft_prefix_tiny.yaml", f"model.name_or_path={tmp_path / 'no-such-model'}",
               f"data.train={records_file(4)}", f"train.output_dir={tmp_path / 'run'}",
               "train.gradient_checkpointing=true"])
    assert rc == 2
    assert "gradient_checkpointing" in capsys.readouterr().err


# ---- training runs (slow) ----------------------------------------------------------------------

def _train(work, tiny_model_dir, records, method: str, name: str, **extra: str):
    from medtune.train.sft import run

    recipe = "quickstart.yaml" if method in ("lora", "adalora") else f"sft_{method}_tiny.yaml"
    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.train={records}",
                 f"train.output_dir={work / name}", f"adapter.method={method}", "train.max_steps=4",
                 "train.save_steps=1000", "train.logging_steps=2", "train.report_to=none",
                 "train.gradient_checkpointing=false"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return run(load_config(f"src/medtune/configs/{recipe}", overrides))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, sample_records):
    from medtune.io import write_jsonl

    work = tmp_path_factory.mktemp("methods")
    records = work / "train.jsonl"
    write_jsonl(records, [r.to_dict() for r in sample_records[:8]])
    return {
        "work": work, "records": records,
        "lora": _train(work, tiny_model_dir, records, "lora", "lora", **{"train.learning_rate": "5e-2"}),
        "prefix": _train(work, tiny_model_dir, records, "prefix", "prefix"),
        "prompt": _train(work, tiny_model_dir, records, "prompt", "prompt"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_methods_train_and_generate(runs, method):
    from medtune.data.exam import load_exam_file
    from medtune.inference.base import GenerationParams
    from medtune.inference.loading import load_backend
    from medtune.inference.predict import predict

    run_dir = runs[method]
    peft_type = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"]
    assert peft_type == {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method]
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(loss == loss for loss in losses)  # trained, no NaN
    assert json.loads((run_dir / "train_results.json").read_text())["global_step"] == 4

    loaded = load_backend(run=str(run_dir))
    records, _ = load_exam_file(str(runs["records"]), "error")
    out = runs["work"] / f"{method}-pred.jsonl"
    # batch 4 of different lengths: left padding together with the virtual tokens
    stats = predict(records, loaded.backend, loaded.template, out, GenerationParams(max_new_tokens=6),
                    batch_size=4, progress=False)
    assert stats["predicted"] == 8
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["output"], str) for r in rows)


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


@pytest.mark.slow
def test_merged_export_loads_plainly_and_matches(runs, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.export import EXPORT_INFO, export_run
    from medtune.models import load_for_inference

    out = export_run(runs["lora"], runs["work"] / "export-lora")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "template.yaml", EXPORT_INFO):
        assert (out / name).exists(), name
    assert not any(out.parent.glob(".export-lora.export-*"))  # temp folder renamed away
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["format"] == "merged" and info["method"] == "lora" and info["peft_type"] == "LORA"
    assert info["base_model"] == str(tiny_model_dir) and info["run_config"]["adapter"]["method"] == "lora"

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ref, ref_tok = load_for_inference(str(tiny_model_dir), str(runs["lora"] / "adapter"), dtype="float32", device="cpu")
    text = "问题：患者发热恶寒，头痛身痛，无汗而喘，治宜选用\n答案："
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    diff = (_logits(plain, tok, text) - _logits(ref, ref_tok, text)).abs().max().item()
    assert diff < 1e-4
    # the merge really moved the weights (LoRA trained), and no peft names remain
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in weights)
    base = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.slow
def test_adapter_only_export_and_overwrite(runs):
    from medtune.export import EXPORT_INFO, ExportError, export_run

    out = runs["work"] / "export-prefix"
    export_run(runs["prefix"], out, adapter_only=True)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "template.yaml", EXPORT_INFO} <= names
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["format"] == "adapter" and info["peft_type"] == "PREFIX_TUNING" and info["dtype"] is None

    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        export_run(runs["prompt"], out, adapter_only=True)
    export_run(runs["prompt"], out, adapter_only=True, overwrite=True)
    assert json.loads((out / EXPORT_INFO).read_text())["peft_type"] == "PROMPT_TUNING"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".export-prefix")) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_adapters_cannot_be_merged(runs, method):
    from medtune.export import ExportError, export_run

    out = runs["work"] / f"merge-{method}"
    with pytest.raises(ExportError, match="cannot be merged.*--adapter-only"):
        export_run(runs[method], out)
    assert not out.exists()
