r"""Tokenise conversations for SFT: loss on every assistant turn, nothing else.

Two formats:

- ``plain``: no chat markup. A single-turn conversation is the user's text followed directly by
  the reply (right for prompt→response data such as PromptCBLUE, whose inputs already end with a
  cue like ``答：``). Multi-turn conversations become a ``用户：…\\n助手：…`` transcript. A system
  message, if any, comes first on its own line.
- ``chat``: the model's own chat template (``tokenizer.chat_template``), rendered turn by turn.

Both are built from segments — (text, trained?) pairs — tokenised one by one and concatenated, so
the tokens of a prompt at training time are the tokens ``conversation_prompt`` gives at inference.
"""

from __future__ import annotations

from typing import Any

from medtune.data.sft import IGNORE_INDEX, SFTBuild
from medtune.records import Conversation

FORMATS = ("plain", "chat")


def segments(messages: list[dict[str, str]], fmt: str, tokenizer: Any = None,
             add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """``[(text, is_assistant_reply), ...]`` whose concatenation is the rendered conversation."""
    if fmt == "chat":
        return _chat_segments(messages, tokenizer, add_generation_prompt)
    if fmt != "plain":
        raise ValueError(f"data.conversation_format: expected one of {list(FORMATS)}, got {fmt!r}")
    # each reply ends with the EOS token, written as text so that a prompt string containing
    # earlier replies tokenises to the same ids the model was trained on
    eos = tokenizer.eos_token if tokenizer is not None and tokenizer.eos_token else ""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    out: list[tuple[str, bool]] = [(system[0] + "\n", False)] if system else []
    single = len([t for t in turns if t["role"] == "user"]) == 1
    for i, m in enumerate(turns):
        if m["role"] == "assistant":
            out.append((m["content"] + eos, True))
        elif single:
            out.append((m["content"], False))
        else:
            out.append((("\n" if i else "") + "用户：" + m["content"] + "\n助手：", False))
    return out


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any,
                   add_generation_prompt: bool) -> list[tuple[str, bool]]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.conversation_format=chat needs a tokenizer with a chat template and this model's "
                         "has none; set data.conversation_format=plain (or start from a chat/instruct model)")

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            # everything up to the assistant header is prompt; the reply and its end-of-turn
            # markup are what the model must learn to produce
            head = render(messages[:i], True)
            full = render(messages[: i + 1], False)
            if not (head.startswith(done) and full.startswith(head)):
                raise ValueError("data.conversation_format=chat: this model's chat template does not render a "
                                 "conversation prefix by prefix, so replies cannot be masked exactly; "
                                 "set data.conversation_format=plain")
            out += [(head[len(done):], False), (full[len(head):], True)]
            done = full
    final = render(messages, add_generation_prompt) if messages[-1]["role"] != "assistant" else done
    if final.startswith(done) and len(final) > len(done):
        out.append((final[len(done):], False))
    return [(t, a) for t, a in out if t]


def uses_special_tokens(fmt: str) -> bool:
    """Whether a prompt in conversation format ``fmt`` is tokenised with the special tokens (BOS)."""
    # chat templates carry their own BOS/special tokens in the text
    return fmt == "plain"


def encode_segments(tokenizer: Any, segs: list[tuple[str, bool]], fmt: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``; labels are -100 except on assistant replies."""
    ids: list[int] = []
    labels: list[int] = []
    for k, (text, trained) in enumerate(segs):
        piece = tokenizer(text, add_special_tokens=(k == 0 and uses_special_tokens(fmt)))["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def conversation_prompt(messages: list[dict[str, str]], fmt: str, tokenizer: Any) -> tuple[str, bool]:
    """``(prompt text, add_special_tokens)`` for the next assistant reply (inference)."""
    segs = segments(messages, fmt, tokenizer, add_generation_prompt=True)
    return "".join(t for t, _ in segs), uses_special_tokens(fmt)


def encode_conversation_prompt(messages: list[dict[str, str]], fmt: str, tokenizer: Any) -> list[int]:
    """Token ids of the prompt for the next assistant reply, exactly as inference feeds them.

    Inference tokenises the whole ``conversation_prompt`` text on its own; training on a prompt
    and a reply (DPO, reward models) must use these ids and append the reply's own tokens, not
    tokenise ``prompt + reply`` as one string, where BPE can merge the prompt's last characters
    with the reply's first ones.
    """
    text, special = conversation_prompt(messages, fmt, tokenizer)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def build_conversation_examples(records: list[Conversation], fmt: str, tokenizer: Any,
                                max_length: int) -> SFTBuild:
    """Tokenised, masked examples.

    Over-long conversations are skipped and listed, never cut mid-reply (which would teach the
    model to stop early); so are conversations without an assistant reply (nothing to learn).
    """
    build = SFTBuild(examples=[], n_records=len(records))
    for rec in records:
        ids, labels = encode_segments(tokenizer, segments(rec.messages, fmt, tokenizer), fmt)
        if all(label == IGNORE_INDEX for label in labels):
            # e.g. an unlabelled PromptCBLUE test split: with every label masked the loss is 0/0 = NaN
            build.skipped.append({"id": rec.id, "reason": "no assistant reply to learn from"})
            continue
        if len(ids) > max_length:
            build.skipped.append({"id": rec.id, "reason": f"{len(ids)} tokens > data.max_length={max_length}"})
            continue
        build.examples.append({"input_ids": ids, "labels": labels})
    return build
