r"""Tokenise conversations for SFT: loss on every assistant turn, nothing else.

A conversation template (``medtune.templates.ConversationTemplate``; shipped: ``plain``, ``chat``,
``alpaca``, ``instruct_zh``, or a YAML file of your own) says how messages become text:

- ``chat: false`` — the template's own markup. ``plain`` has none: a single-turn conversation is the
  user's text followed directly by the reply (right for prompt→response data such as PromptCBLUE,
  whose inputs already end with a cue like ``答：``); several turns become a ``用户：…\n助手：…``
  transcript; a system message comes first on its own line.
- ``chat: true`` — the model's own chat template (``tokenizer.chat_template``), rendered turn by turn.

Every function here takes the template itself, or its shipped name or YAML path.

Both are built from segments — (text, trained?) pairs — tokenised one by one and concatenated, so
the tokens of a prompt at training time are the tokens ``conversation_prompt`` gives at inference
(tokenising prompt + reply as one string would let BPE merge across the boundary).

Lengths (``build_conversation_examples``): the *prompt* is everything before the last reply, the
*target* is the last reply (with its end marker and EOS). ``medtune.data.sft.LengthLimits`` says
how many tokens of each are kept: the prompt is cut from the left or in the middle, the target from
the right, or the whole example is dropped (``truncation="drop"``). Every cut and drop is listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.data.sft import IGNORE_INDEX, LengthLimits, SFTBuild, task_of
from medtune.records import Conversation
from medtune.templates import ConversationTemplate, as_conversation_template

TemplateLike = ConversationTemplate | str | Path


def segments(messages: list[dict[str, str]], template: TemplateLike, tokenizer: Any = None,
             add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """``[(text, is_assistant_reply), ...]`` whose concatenation is the rendered conversation.

    Args:
        messages: ``{"role", "content"}`` dicts (system first, then alternating user/assistant).
        template: The conversation template, or a shipped name / YAML path.
        tokenizer: Needed for ``chat: true`` templates, and for the EOS text after each reply.
        add_generation_prompt: Chat templates only: end with the assistant header (inference).

    Returns:
        The segments; assistant replies are the trained ones.
    """
    tpl = as_conversation_template(template)
    messages = tpl.apply(messages)
    if tpl.chat:
        return _chat_segments(messages, tokenizer, add_generation_prompt)
    return _markup_segments(messages, tpl, tokenizer)


def _markup_segments(messages: list[dict[str, str]], tpl: ConversationTemplate,
                     tokenizer: Any) -> list[tuple[str, bool]]:
    # each reply ends with the EOS token, written as text so that a prompt string containing
    # earlier replies tokenises to the same ids the model was trained on
    eos = tokenizer.eos_token if tokenizer is not None and tokenizer.eos_token else ""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    out: list[tuple[str, bool]] = [(tpl.system_format.format(system=system[0]), False)] if system else []
    several = sum(1 for m in turns if m["role"] == "user") > 1
    user_format = tpl.multi_turn_user_format if several and tpl.multi_turn_user_format else tpl.user_format
    seen_user = False
    for m in turns:
        if m["role"] == "assistant":
            out.append((tpl.assistant_format.format(reply=m["content"]) + eos, True))
        else:
            out.append(((tpl.turn_separator if seen_user else "") + user_format.format(user=m["content"]), False))
            seen_user = True
    return [(t, a) for t, a in out if t]


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


def uses_special_tokens(template: TemplateLike) -> bool:
    """Whether a prompt in ``template`` is tokenised with the special tokens (BOS)."""
    # chat templates carry their own BOS/special tokens in the text
    return not as_conversation_template(template).chat


def _encode_pieces(tokenizer: Any, segs: list[tuple[str, bool]], template: TemplateLike) -> list[tuple[list[int], bool]]:
    special = uses_special_tokens(template)
    return [(tokenizer(text, add_special_tokens=(k == 0 and special))["input_ids"], trained)
            for k, (text, trained) in enumerate(segs)]


def encode_segments(tokenizer: Any, segs: list[tuple[str, bool]],
                    template: TemplateLike) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``; labels are -100 except on assistant replies."""
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in _encode_pieces(tokenizer, segs, template):
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def conversation_prompt(messages: list[dict[str, str]], template: TemplateLike, tokenizer: Any) -> tuple[str, bool]:
    """``(prompt text, add_special_tokens)`` for the next assistant reply (inference)."""
    segs = segments(messages, template, tokenizer, add_generation_prompt=True)
    return "".join(t for t, _ in segs), uses_special_tokens(template)


def encode_conversation_prompt(messages: list[dict[str, str]], template: TemplateLike, tokenizer: Any) -> list[int]:
    """Token ids of the prompt for the next assistant reply, exactly as inference feeds them.

    Inference tokenises the whole ``conversation_prompt`` text on its own; training on a prompt
    and a reply (DPO, reward models) must use these ids and append the reply's own tokens, not
    tokenise ``prompt + reply`` as one string, where BPE can merge the prompt's last characters
    with the reply's first ones.
    """
    text, special = conversation_prompt(messages, template, tokenizer)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def cut_prompt(ids: list[int], labels: list[int], keep: int, truncation: str,
               bos_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """The prompt's ids and labels cut to ``keep`` tokens (``left``: drop its start; ``middle``: its middle).

    A leading BOS token is kept by ``left``: the model never saw a sequence without one.
    ``middle`` keeps the first ``keep // 2`` tokens and the last ``keep - keep // 2``, so an
    instruction at either end and the cue before the reply both survive.
    """
    if keep >= len(ids):
        return ids, labels
    if keep <= 0:
        return [], []
    if truncation == "middle":
        head, tail = keep // 2, keep - keep // 2
        return ids[:head] + ids[len(ids) - tail:], labels[:head] + labels[len(labels) - tail:]
    if truncation != "left":
        raise ValueError(f"truncation: expected middle or left, got {truncation!r}")
    if bos_token_id is not None and ids[0] == bos_token_id and keep > 1:
        return ids[:1] + ids[len(ids) - keep + 1:], labels[:1] + labels[len(labels) - keep + 1:]
    return ids[len(ids) - keep:], labels[len(labels) - keep:]


def build_conversation_examples(records: list[Conversation], template: TemplateLike, tokenizer: Any,
                                max_length: int, *, max_source_length: int | None = None,
                                max_target_length: int | None = None, truncation: str = "middle") -> SFTBuild:
    """Tokenised, masked examples, each example's prompt and target fitted to the length limits.

    Args:
        records: The conversations.
        template: Conversation template, or a shipped name / YAML path.
        tokenizer: The model's tokenizer.
        max_length: Tokens of prompt + target.
        max_source_length: Tokens of the prompt (everything before the last reply); ``None``: no own limit.
        max_target_length: Tokens of the target (the last reply, with its end marker and EOS).
        truncation: ``middle`` or ``left`` (how the prompt is cut; the target is always cut from the
            right, its EOS with it, so a cut reply never teaches the model to stop there), or
            ``drop`` (nothing is cut; an example over any limit is dropped whole).

    Returns:
        The examples, ``truncated`` (what was cut, per example), ``skipped`` (dropped whole: over
        the limits with ``drop``, or no assistant reply to learn from) and per-task counts
        (``meta.task_dataset``).
    """
    tpl = as_conversation_template(template)
    limits = LengthLimits(max_length, max_source_length, max_target_length, truncation)
    build = SFTBuild(examples=[], n_records=len(records))
    bos = getattr(tokenizer, "bos_token_id", None) if uses_special_tokens(tpl) else None
    for rec in records:
        task = task_of(rec.meta)
        pieces = _encode_pieces(tokenizer, segments(rec.messages, tpl, tokenizer), tpl)
        last = max((k for k, (ids, trained) in enumerate(pieces) if trained and ids), default=None)
        if last is None:
            # e.g. an unlabelled PromptCBLUE test split: with every label masked the loss is 0/0 = NaN
            build.drop(rec.id, task, "no assistant reply to learn from")
            continue
        src_ids, src_labels, tgt_ids, tgt_labels = [], [], [], []
        for k, (ids, trained) in enumerate(pieces):
            # earlier replies of a multi-turn conversation are part of the prompt here, still trained
            labels = ids if trained else [IGNORE_INDEX] * len(ids)
            if k < last:
                src_ids, src_labels = src_ids + ids, src_labels + labels
            else:
                tgt_ids, tgt_labels = tgt_ids + ids, tgt_labels + labels
        over = limits.exceeded(len(src_ids), len(tgt_ids))
        if not over:
            build.keep({"input_ids": src_ids + tgt_ids, "labels": src_labels + tgt_labels}, task)
            continue
        if truncation == "drop":
            build.drop(rec.id, task, "; ".join(over))
            continue
        n_src, n_tgt = limits.fit(len(src_ids), len(tgt_ids))
        info = {"id": rec.id, "prompt_tokens": len(src_ids), "kept_prompt_tokens": n_src,
                "reply_tokens": len(tgt_ids), "kept_reply_tokens": n_tgt, "reason": "; ".join(over)}
        src_ids, src_labels = cut_prompt(src_ids, src_labels, n_src, truncation, bos)
        build.keep({"input_ids": src_ids + tgt_ids[:n_tgt], "labels": src_labels + tgt_labels[:n_tgt]}, task, info)
    return build
