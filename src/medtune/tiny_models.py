"""Tiny random-weight models of the architectures users fine-tune, with their chat formats, offline.

``build_tiny_model(out_dir, texts, arch="glm4", tokenizer="qwen2.5")`` writes a folder that loads
with ``AutoModelForCausalLM``/``AutoTokenizer`` like a hub checkpoint: the architecture's own
config class and modelling code from transformers (at a small size), and a tokenizer that is
either ours (a byte-level BPE trained on ``texts``, fast) or a real vocabulary
(:mod:`medtune.vocabularies`: Qwen2.5's or DeepSeek's). Either way the tokenizer gets the
architecture's chat template and the special tokens that template writes.

Why it is built this way:

* **The ids must survive the round trip.** ``AutoTokenizer.from_pretrained(folder)`` picks the
  tokenizer class from ``config.json``'s ``model_type``; for ``qwen2`` it rebuilds any tokenizer
  as ``Qwen2Tokenizer`` (NFC + Qwen's regex), which changes the ids of a tokenizer trained with
  another pre-tokenizer (STACK.md). So our BPE is trained with Qwen's normaliser and regex for the
  Qwen family, and every build loads its folder back through ``AutoTokenizer`` and refuses to
  finish when a probe text gets other ids (:func:`check_tokenizer_round_trip`).
* **Chat formats are the families' own** (no-tools paths of their published templates; see
  :data:`CHAT_FORMATS`), including their quirks: Gemma-2 refuses a system turn, Mistral puts the
  system text into the last user turn, GLM-4's generation prompt has no newline after
  ``<|assistant|>``. The tests compare medtune's ``chat`` exam template against them.
* **BOS**: families whose tokenizer prepends BOS to plain text (Llama-3, Mistral, Gemma,
  InternLM3) get ``add_bos_token`` so plain templates see the BOS a real model would.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---- chat formats --------------------------------------------------------------------------------

# ChatML without a default system turn (Yi and many Llama-architecture Chinese chat models): the
# template the tiny model has always shipped, so medtune.models.build_tiny_model's default is
# unchanged. The same string as medtune.models.CHATML_TEMPLATE (a test keeps them equal; this
# module cannot import medtune.models, which calls it).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3 (and Qwen3-MoE): ChatML; the last assistant turn after the last user query carries a
# (possibly empty) <think> block; enable_thinking=false adds an empty one to the generation prompt.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# GLM-4-9B-Chat: the generation prompt ends at <|assistant|>; the model writes the newline itself.
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}"
    "<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Mistral-7B-Instruct-v0.3: the system text goes into the *last* user turn only.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Gemma-2-it: no system role at all.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Gemma-3-it (text): the system text is put in front of the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

INTERNLM3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEEPSEEK_V3_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A family's chat template and the tokens it needs.

    Attributes:
        name: Short name (shown in reports).
        template: Jinja chat template (``None``: the family ships none, e.g. Phi-2).
        special_tokens: Tokens the template writes, added as special tokens when the tokenizer lacks them.
        plain_tokens: Tokens added as ordinary (non-special) added tokens, e.g. Qwen3's ``<think>``,
            which ``skip_special_tokens`` must keep.
        eos: The tokenizer's eos token: what medtune appends to every training target.
        bos: The bos token (``None``: none).
        pad: The pad token (``None``: the tokenizer's own, else ``<|endoftext|>`` for ours, else eos).
        add_bos: Plain text is encoded with BOS in front (the family's tokenizer does so).
        stop: Further tokens that end generation (``generation_config.eos_token_id``).
    """

    name: str
    template: str | None
    special_tokens: tuple[str, ...] = ()
    plain_tokens: tuple[str, ...] = ()
    eos: str = "<|endoftext|>"
    bos: str | None = None
    pad: str | None = None
    add_bos: bool = False
    stop: tuple[str, ...] = ()

    def all_tokens(self) -> list[str]:
        """Every token this format names (special ones first), without repeats, in a fixed order."""
        out: list[str] = []
        for tok in (self.bos, *self.special_tokens, self.eos, self.pad, *self.stop):
            if tok and tok not in out:
                out.append(tok)
        return out


def _qwen_format(name: str, template: str, plain: tuple[str, ...] = ()) -> ChatFormat:
    return ChatFormat(name, template, ("<|im_start|>", "<|im_end|>"), plain, eos="<|im_end|>",
                      pad="<|endoftext|>", stop=("<|endoftext|>",))


def _chat_formats() -> dict[str, ChatFormat]:
    from medtune.vocabularies import QWEN3_EXTRA_TOKENS, QWEN25_CHAT_TEMPLATE

    return {
        "chatml": ChatFormat("chatml", CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                             pad="<|endoftext|>"),
        "qwen2.5": _qwen_format("qwen2.5", QWEN25_CHAT_TEMPLATE),
        "qwen3": _qwen_format("qwen3", QWEN3_TEMPLATE, QWEN3_EXTRA_TOKENS),
        "llama3": ChatFormat("llama3", LLAMA3_TEMPLATE,
                             ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"),
                             eos="<|eot_id|>", bos="<|begin_of_text|>", add_bos=True, stop=("<|end_of_text|>",)),
        "glm4": ChatFormat("glm4", GLM4_TEMPLATE,
                           ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
                           eos="<|endoftext|>", pad="<|endoftext|>", stop=("<|user|>", "<|observation|>")),
        "phi3": ChatFormat("phi3", PHI3_TEMPLATE, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                           eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", stop=("<|end|>",)),
        "mistral": ChatFormat("mistral", MISTRAL_TEMPLATE, ("[INST]", "[/INST]"), eos="</s>", bos="<s>",
                              add_bos=True),
        "gemma2": ChatFormat("gemma2", GEMMA2_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"), eos="<eos>",
                             bos="<bos>", pad="<pad>", add_bos=True, stop=("<end_of_turn>",)),
        "gemma3": ChatFormat("gemma3", GEMMA3_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"), eos="<eos>",
                             bos="<bos>", pad="<pad>", add_bos=True, stop=("<end_of_turn>",)),
        "internlm3": ChatFormat("internlm3", INTERNLM3_TEMPLATE, ("<|im_start|>", "<|im_end|>"), eos="</s>",
                                bos="<s>", add_bos=True, stop=("<|im_end|>",)),
        "deepseek_v3": ChatFormat("deepseek_v3", DEEPSEEK_V3_TEMPLATE, ("<｜User｜>", "<｜Assistant｜>"),
                                  eos="<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>"),
        "none": ChatFormat("none", None, eos="<|endoftext|>", bos="<|endoftext|>"),  # Phi-2: GPT-2 style
    }


# ---- architectures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """The small dimensions every architecture is built at."""

    hidden_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    initializer_range: float

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention: half the query heads, as the tiny Llama always had)."""
        return max(1, self.num_heads // 2)


def _dense(size: Size, **extra: Any) -> dict[str, Any]:
    """Config fields a Llama-like decoder shares (names as most transformers configs spell them)."""
    return {
        "hidden_size": size.hidden_size,
        "intermediate_size": size.hidden_size * 2,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": size.max_positions,
        "initializer_range": size.initializer_range,
        **extra,
    }


@dataclass(frozen=True)
class Architecture:
    """One ``--arch``: the transformers config it builds and the family's chat format.

    Attributes:
        name: The ``--arch`` value.
        model_type: ``config.model_type`` of the built model (what ``TARGET_MODULES`` is keyed by).
        family: The real models it stands for (shown in ``--help`` and reports).
        chat: Key of :data:`CHAT_FORMATS`.
        config: Size → config fields beyond vocabulary and special-token ids.
        tie_word_embeddings: As the family's small models (untied ones double the vocabulary weights).
        qwen_pretokenizer: Train our BPE with Qwen's NFC + regex (``AutoTokenizer`` loads a
            ``qwen2`` folder as ``Qwen2Tokenizer``, which imposes them; the rest of the family is
            kept the same so one family tokenises one way).
    """

    name: str
    model_type: str
    family: str
    chat: str
    config: Callable[[Size], dict[str, Any]]
    tie_word_embeddings: bool = False
    qwen_pretokenizer: bool = False


def _moe_qwen3(size: Size) -> dict[str, Any]:
    return _dense(size, head_dim=size.head_dim, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=size.hidden_size, decoder_sparse_step=1, norm_topk_prob=True,
                  output_router_logits=False)


def _deepseek_v3(size: Size) -> dict[str, Any]:
    # Multi-head latent attention: low-rank q and kv projections, separate rope/no-rope key parts;
    # layer 0 dense (first_k_dense_replace), later layers 4 routed experts + 1 shared expert.
    return _dense(size, num_key_value_heads=size.num_heads, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=size.hidden_size,
                  q_lora_rank=size.hidden_size // 2, kv_lora_rank=size.hidden_size // 2,
                  qk_nope_head_dim=size.head_dim, qk_rope_head_dim=max(2, size.head_dim // 2),
                  v_head_dim=size.head_dim, n_group=1, topk_group=1)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    # the default: the Llama decoder with ChatML (Yi-style), exactly the tiny model medtune always built
    Architecture("llama", "llama", "Llama decoder + ChatML (Yi, many Chinese Llama derivatives)", "chatml",
                 lambda s: _dense(s), tie_word_embeddings=True),
    Architecture("llama3", "llama", "Llama-3 / 3.1 Instruct", "llama3", lambda s: _dense(s, rope_theta=500000.0)),
    Architecture("qwen2", "qwen2", "Qwen2 / Qwen2.5", "qwen2.5", lambda s: _dense(s),
                 tie_word_embeddings=True, qwen_pretokenizer=True),
    Architecture("qwen3", "qwen3", "Qwen3 (dense)", "qwen3", lambda s: _dense(s, head_dim=s.head_dim),
                 tie_word_embeddings=True, qwen_pretokenizer=True),
    Architecture("glm4", "glm4", "GLM-4 (GLM-4-9B-0414 / glm-4-9b-chat-hf)", "glm4",
                 lambda s: _dense(s, head_dim=s.head_dim)),
    Architecture("phi", "phi", "Phi-2 (no chat template)", "none",
                 lambda s: _dense(s, num_key_value_heads=s.num_heads)),
    Architecture("phi3", "phi3", "Phi-3 / Phi-3.5 mini", "phi3", lambda s: _dense(s)),
    Architecture("mistral", "mistral", "Mistral-7B-Instruct v0.3", "mistral",
                 lambda s: _dense(s, head_dim=s.head_dim)),
    Architecture("gemma2", "gemma2", "Gemma-2 (logit soft-capping)", "gemma2",
                 lambda s: _dense(s, head_dim=s.head_dim, query_pre_attn_scalar=s.head_dim),
                 tie_word_embeddings=True),
    Architecture("gemma3", "gemma3_text", "Gemma-3 text (Gemma3ForCausalLM)", "gemma3",
                 lambda s: _dense(s, head_dim=s.head_dim, query_pre_attn_scalar=s.head_dim),
                 tie_word_embeddings=True),
    Architecture("internlm3", "internlm3", "InternLM3 (runs on the Llama code)", "internlm3",
                 lambda s: _dense(s, head_dim=s.head_dim)),
    Architecture("qwen3_moe", "qwen3_moe", "Qwen3-MoE (4 experts, top-2)", "qwen3", _moe_qwen3,
                 qwen_pretokenizer=True),
    Architecture("deepseek_v3", "deepseek_v3", "DeepSeek-V3 (MLA + 4 routed experts, 1 shared)", "deepseek_v3",
                 _deepseek_v3),
)}

#: ``--tokenizer`` choices: ours (BPE trained on the data) or a real vocabulary.
TOKENIZERS = ("ours", "qwen2.5", "deepseek")

# Texts every built tokenizer must give the same ids for after a save/load round trip: digits,
# Latin abbreviations, full-width forms, newlines, combining marks (NFC) and emoji.
ROUND_TRIP_PROBES = (
    "患者，男，45岁。发热3天，体温39.5℃，HBsAg阳性，ALT 1234 U/L。",
    "问题：下列哪项是维生素B12缺乏的表现？\nA: 巨幼细胞贫血\nB: 缺铁性贫血\n\n答案：A\n理由：……",
    "ＡＢＣ１２３ CK-MB e\u0301 🙂  two  spaces\ttab",
)


def chat_format(arch: str) -> ChatFormat:
    """The chat format an architecture is built with."""
    return _chat_formats()[architecture(arch).chat]


def architecture(name: str) -> Architecture:
    """The :class:`Architecture` called ``name``.

    Raises:
        ValueError: Unknown name, listing the known ones.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


# ---- tokenizers --------------------------------------------------------------------------------------


def _train_ours(texts: Iterable[str], vocab_size: int, fmt: ChatFormat, arch: Architecture) -> Any:
    """Byte-level BPE trained on ``texts`` with the format's tokens as special tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from medtune.vocabularies import QWEN_PATTERN

    # <|endoftext|> first: ids 0.. of the default (llama/ChatML) tokenizer are what they always were.
    specials = ["<|endoftext|>"] + [t for t in fmt.all_tokens() if t != "<|endoftext|>"]
    bpe = Tokenizer(models.BPE())
    if arch.qwen_pretokenizer:
        # Qwen2Tokenizer's pipeline, so that AutoTokenizer's rebuild of a qwen2 folder changes nothing
        bpe.normalizer = normalizers.NFC()
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    if fmt.plain_tokens:
        bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in fmt.plain_tokens])
    pad = fmt.pad or "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=fmt.eos, pad_token=pad, bos_token=fmt.bos)


def _real(tokenizer: str | Any) -> Any:
    """A real tokenizer by name (``qwen2.5``/``deepseek``), a tokenizer folder, or a copy of an object."""
    from transformers import PreTrainedTokenizerFast

    from medtune.vocabularies import REAL_TOKENIZERS

    if not isinstance(tokenizer, (str, os.PathLike)):
        return copy.deepcopy(tokenizer)  # tokens are added below: leave the caller's object alone
    if str(tokenizer) in REAL_TOKENIZERS:
        return REAL_TOKENIZERS[str(tokenizer)]()
    path = Path(tokenizer)
    if path.is_dir():
        # the class that keeps tokenizer.json as it is (AutoTokenizer may pick another: see module doc)
        return PreTrainedTokenizerFast.from_pretrained(path)
    raise ValueError(f"unknown tokenizer {str(tokenizer)!r}; expected {', '.join(TOKENIZERS)} or a tokenizer folder")


def _adapt(tok: Any, fmt: ChatFormat) -> Any:
    """Give a real tokenizer the format's tokens, bos/eos/pad and BOS behaviour."""
    from tokenizers import AddedToken

    added = tok.get_added_vocab()
    # Not yet an added token: appended after the vocabulary in the order the format names them, or,
    # when the BPE vocabulary already holds the string (Qwen's has "<s>" as an ordinary token),
    # registered as special at that id, so that text containing it gives the id a reload gives.
    missing = [t for t in fmt.all_tokens() if t not in added and t not in fmt.plain_tokens]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    plain = [t for t in fmt.plain_tokens if t not in added]
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tok.eos_token = fmt.eos
    if fmt.bos:
        tok.bos_token = fmt.bos
    if fmt.pad:
        tok.pad_token = fmt.pad
    elif tok.pad_token is None:
        tok.pad_token = fmt.eos
    return tok


def build_tokenizer(arch: str, tokenizer: str | os.PathLike | Any = "ours", texts: Iterable[str] = (),
                    vocab_size: int = 3000) -> Any:
    """The tokenizer a tiny model of ``arch`` is built with, chat template included.

    Args:
        arch: Key of :data:`ARCHITECTURES`.
        tokenizer: ``ours`` (BPE trained on ``texts``), ``qwen2.5``/``deepseek`` (real vocabularies,
            :mod:`medtune.vocabularies`), a folder holding a saved tokenizer, or a tokenizer object
            (copied, e.g. one converted once and reused).
        texts: Training text for ``ours``.
        vocab_size: Target vocabulary of ``ours``.

    Returns:
        A ``PreTrainedTokenizerFast``.
    """
    spec = architecture(arch)
    fmt = chat_format(arch)
    if isinstance(tokenizer, str) and tokenizer == "ours":
        tok = _train_ours(texts, vocab_size, fmt, spec)
    else:
        tok = _adapt(_real(tokenizer), fmt)
    if fmt.add_bos:
        tok.add_bos_token = True  # transformers rebuilds the post-processor: BOS before plain text
    tok.chat_template = fmt.template
    return tok


def check_tokenizer_round_trip(folder: str | os.PathLike, tokenizer: Any, texts: Iterable[str] = ()) -> None:
    """Refuse a saved folder whose ``AutoTokenizer`` gives other ids, tokens or template than ``tokenizer``.

    Checks the probe texts, the first training texts, every added token on its own and inside a
    text, and a rendered chat.

    Raises:
        ValueError: Naming the first text whose ids differ, with both id lists.
    """
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(folder))  # what medtune.models.load_tokenizer calls
    added = [t for t in tokenizer.get_added_vocab() if not t.startswith("<｜place▁holder")]
    probes = [*ROUND_TRIP_PROBES, *list(texts)[:20], *added, "发热" + "".join(added) + "三天"]
    if tokenizer.chat_template:
        probes.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": ROUND_TRIP_PROBES[1]}], tokenize=False, add_generation_prompt=True))
    for text in probes:
        for special in (True, False):
            want = tokenizer(text, add_special_tokens=special)["input_ids"]
            got = loaded(text, add_special_tokens=special)["input_ids"]
            if want != got:
                raise ValueError(
                    f"{folder}: AutoTokenizer loads {type(loaded).__name__}, which encodes {text[:40]!r} "
                    f"(add_special_tokens={special}) as {got[:12]}… instead of {want[:12]}…{_class_hint(loaded)}")
    for attr in ("eos_token", "bos_token", "pad_token", "chat_template"):
        if getattr(loaded, attr) != getattr(tokenizer, attr):
            raise ValueError(f"{folder}: {attr} loads back as {getattr(loaded, attr)!r}, "
                             f"not {getattr(tokenizer, attr)!r}")
    if len(loaded) != len(tokenizer):
        raise ValueError(f"{folder}: {len(loaded)} tokens load back, not {len(tokenizer)}")


def _class_hint(loaded: Any) -> str:
    if type(loaded).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return ""
    return (f" (transformers picks {type(loaded).__name__} from config.json's model_type and rebuilds the "
            "normaliser and pre-tokenizer with its own; give this architecture a tokenizer that uses them, "
            "or pick another architecture)")


# ---- models --------------------------------------------------------------------------------------------


def model_config(arch: str, tokenizer: Any, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                 max_positions: int = 1024, initializer_range: float = 0.1, pad_vocab_to: int = 1) -> Any:
    """The transformers config (the architecture's own class) of a tiny ``arch`` model for ``tokenizer``.

    ``pad_vocab_to`` rounds the embedding rows up as real checkpoints do (Qwen's 151,936 rows for
    151,665 tokens); the extra rows are never produced by the tokenizer.
    """
    from transformers import AutoConfig

    spec = architecture(arch)
    fmt = chat_format(arch)
    size = Size(hidden_size, num_layers, num_heads, max_positions, initializer_range)
    if spec.model_type == "deepseek_v3" and num_layers < 2:
        raise ValueError("deepseek_v3 needs num_layers >= 2 (layer 0 is dense, the MoE layers follow)")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    ids = tokenizer.convert_tokens_to_ids
    stops = [tokenizer.eos_token_id] + [ids(t) for t in fmt.stop if ids(t) != tokenizer.eos_token_id]
    return AutoConfig.for_model(
        spec.model_type,
        vocab_size=math.ceil(len(tokenizer) / pad_vocab_to) * pad_vocab_to,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=tokenizer.pad_token_id,
        **spec.config(size),
    )


def build_tiny_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str] = (), arch: str = "llama",
                         tokenizer: str | os.PathLike | Any = "ours", vocab_size: int = 3000) -> Any:
    """Write the tokenizer of a tiny ``arch`` model, with the architecture's ``config.json``, and check it.

    The ``config.json`` (default sizes) is written because it is what makes ``AutoTokenizer``
    choose a tokenizer class; :func:`build_tiny_model` replaces it with the sized one. This is the
    cheap half of a build (no weights): enough to prove a folder loads back with our ids.

    Returns:
        The tokenizer as built (the object whose ids the folder reproduces).

    Raises:
        ValueError: The folder does not load back with the same ids (see :func:`check_tokenizer_round_trip`).
    """
    texts = list(texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(arch, tokenizer, texts, vocab_size)
    tok.save_pretrained(out)
    model_config(arch, tok, pad_vocab_to=_pad_vocab_to(tokenizer)).save_pretrained(out)
    try:
        check_tokenizer_round_trip(out, tok, texts)
    except ValueError as exc:
        raise ValueError(f"--arch {arch} --tokenizer {_name(tokenizer)}: {exc}; the folder is incomplete") from None
    return tok


def _name(tokenizer: Any) -> str:
    return str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else type(tokenizer).__name__


def _pad_vocab_to(tokenizer: Any) -> int:
    # ours: exactly its tokens (the tiny model medtune always built); real vocabularies: embedding
    # rows rounded up to a multiple of 128, as their checkpoints have (Qwen: 151,936 for 151,665)
    return 1 if isinstance(tokenizer, str) and tokenizer == "ours" else 128


def build_tiny_model(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    arch: str = "llama",
    tokenizer: str | os.PathLike | Any = "ours",
    vocab_size: int = 3000,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_positions: int = 1024,
    seed: int = 0,
    initializer_range: float = 0.1,
) -> Path:
    """Build a random-weight ``arch`` model and its tokenizer in ``out_dir``; returns ``out_dir``.

    Args:
        out_dir: Folder to write (created).
        texts: What our BPE is trained on (real tokenizers use them only as round-trip probes).
        arch: Key of :data:`ARCHITECTURES` (``medtune init-tiny-model --arch``).
        tokenizer: ``ours``, ``qwen2.5``, ``deepseek``, a tokenizer folder, or a tokenizer object (see
            :func:`build_tokenizer`).
        vocab_size: Our BPE's vocabulary (real tokenizers keep theirs, in embedding rows rounded up
            to a multiple of 128).
        hidden_size: Model width; head width is ``hidden_size // num_heads``.
        num_layers: Decoder layers.
        num_heads: Query heads (key/value heads: half of them).
        max_positions: ``max_position_embeddings``.
        seed: Seeds the random weights.
        initializer_range: 0.1 rather than the usual 0.02: with embeddings that small a random
            model's logits are nearly flat (entropy ≈ ln V), and LoRA, which cannot touch the
            embeddings, then needs many times more steps before the answers it learns win the argmax.

    Raises:
        ValueError: Unknown architecture or tokenizer, sizes the architecture cannot take, or a
            tokenizer that does not load back with the same ids (checked before any weights are made).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tok = build_tiny_tokenizer(out, texts, arch, tokenizer, vocab_size)
    config = model_config(arch, tok, hidden_size, num_layers, num_heads, max_positions, initializer_range,
                          pad_vocab_to=_pad_vocab_to(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out
