"""Pairwise reward model: preference pairs → seq-cls model + SEQ_CLS LoRA → TRL RewardTrainer → save.

The prompt of each pair is rendered with ``conversation_prompt`` (the same text SFT and DPO see), and
the reward is the score head's output on the last token of ``prompt + reply + EOS``. Held-out
pairwise accuracy (share of pairs with reward(chosen) > reward(rejected)) is measured by
``pairwise_accuracy`` before and after training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from medtune.config import RunConfig
from medtune.train import common

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreferenceRows:
    """Pairs as TRL's standard (text) preference rows, and the pairs that were left out."""

    rows: list[dict[str, str]]  # {"id", "prompt", "chosen", "rejected"}
    skipped: list[dict[str, Any]]  # {"id", "reason"}


def preference_rows(pairs: list[Any], fmt: str, tokenizer: Any, max_length: int,
                    max_prompt_length: int | None = None) -> PreferenceRows:
    """Render ``PreferencePair`` records as ``{"prompt", "chosen", "rejected"}`` text rows.

    Pairs whose prompt + reply (+ EOS) exceed ``max_length`` tokens, or whose prompt exceeds
    ``max_prompt_length``, are skipped and listed: TRL's RewardTrainer would drop them silently and
    DPOTrainer would cut them, and a cut reply is no longer the reply that was judged.

    Args:
        pairs: ``PreferencePair`` records.
        fmt: Conversation format (``plain`` or ``chat``), as in SFT.
        tokenizer: The training tokenizer.
        max_length: Token limit for prompt + reply.
        max_prompt_length: Optional token limit for the prompt alone.

    Returns:
        The rows and the skipped pairs.
    """
    from medtune.data.conversations import conversation_prompt

    eos = tokenizer.eos_token or ""
    out = PreferenceRows(rows=[], skipped=[])
    for pair in pairs:
        prompt, _ = conversation_prompt(pair.prompt, fmt, tokenizer)
        n_prompt = len(tokenizer(prompt)["input_ids"])
        longest = max(len(tokenizer(prompt + reply + eos)["input_ids"]) for reply in (pair.chosen, pair.rejected))
        if max_prompt_length is not None and n_prompt > max_prompt_length:
            out.skipped.append({"id": pair.id, "reason": f"prompt {n_prompt} tokens > max_prompt_length={max_prompt_length}"})
        elif longest > max_length:
            out.skipped.append({"id": pair.id, "reason": f"{longest} tokens > max_length={max_length}"})
        else:
            out.rows.append({"id": pair.id, "prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected})
    return out


def load_pairs(cfg: RunConfig) -> tuple[list[Any], list[Any], list[dict[str, Any]]]:
    """``(train pairs, held-out pairs, rejected rows)`` from data.train and data.validation / val_fraction."""
    from medtune.data.exam import split_records
    from medtune.data.instructions import read_preferences

    read = read_preferences(cfg.data.train, on_invalid=cfg.data.on_invalid)
    pairs, rejects = list(read.records), list(read.rejects)
    if cfg.data.max_samples:
        pairs = pairs[: cfg.data.max_samples]
    if cfg.data.validation:
        val = read_preferences(cfg.data.validation, on_invalid=cfg.data.on_invalid)
        return pairs, list(val.records), rejects + list(val.rejects)
    train, held = split_records(pairs, cfg.data.val_fraction, cfg.train.seed)
    return train, held, rejects


def reward_scores(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 8) -> list[float]:
    """Scalar reward of each text from a sequence-classification model (num_labels=1).

    Texts are right-padded in batches; the model itself picks the last non-pad token, exactly as in
    training, so these are the rewards the RewardTrainer optimised.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                padding_side="right").to(device)
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                scores += logits[:, 0].float().tolist()
    finally:
        model.train(was_training)
    return scores


def pairwise_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, str]], batch_size: int = 8) -> float | None:
    """Share of rows with reward(prompt + chosen) > reward(prompt + rejected); ties count as wrong.

    Args:
        model: Sequence-classification model with one output.
        tokenizer: Its tokenizer (a pad token is needed for batching).
        rows: ``{"prompt", "chosen", "rejected"}`` text rows (see ``preference_rows``).
        batch_size: Texts per forward pass.

    Returns:
        The accuracy in [0, 1], or ``None`` for no rows.
    """
    if not rows:
        return None
    eos = tokenizer.eos_token or ""

    def full(row: dict[str, str], key: str) -> str:
        # TRL appends EOS to text replies that lack it; score the same text it trained on
        reply = row[key] if row[key].endswith(eos) else row[key] + eos
        return row["prompt"] + reply

    chosen = reward_scores(model, tokenizer, [full(r, "chosen") for r in rows], batch_size)
    rejected = reward_scores(model, tokenizer, [full(r, "rejected") for r in rows], batch_size)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)


def seq_cls_peft_config(cfg: RunConfig, model_type: str, total_steps: int) -> Any:
    """The stage's peft config with task type SEQ_CLS (so the new score head is trained and saved)."""
    from peft import TaskType

    from medtune.adapters import peft_config_for

    base = peft_config_for(cfg.adapter, model_type, total_steps)
    return None if base is None else dataclasses.replace(base, task_type=TaskType.SEQ_CLS)


def run(cfg: RunConfig, resume: bool = True) -> Path:
    """Train a reward model on preference pairs and return the run directory.

    Args:
        cfg: The run config (stage ``rm``); data.train holds preference rows or PreferencePair records.
        resume: Continue from the last complete checkpoint in the run directory, if any.

    Returns:
        The run directory; ``train_results.json`` has ``pairwise_accuracy_before``/``_after`` on
        the held-out pairs (``None`` when nothing is held out).
    """
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from medtune.adapters import total_optimizer_steps
    from medtune.io import write_jsonl
    from medtune.models import load_for_training, training_tokenizer
    from medtune.templates import conversation_template

    if cfg.adapter.method in ("prefix", "prompt"):
        raise ValueError("stage rm supports adapter.method lora, adalora, qlora or full (the score head must train)")

    # ---- run directory -----------------------------------------------------------------------
    run_dir, checkpoint = common.prepare_run_dir(cfg, resume=resume)
    torch.manual_seed(cfg.train.seed)

    # ---- data: pairs → rendered text rows --------------------------------------------------------
    tokenizer = training_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    train_pairs, val_pairs, rejects = load_pairs(cfg)
    train = preference_rows(train_pairs, cfg.data.conversation_format, tokenizer, cfg.data.max_length)
    val = preference_rows(val_pairs, cfg.data.conversation_format, tokenizer, cfg.data.max_length)
    if not train.rows:
        raise ValueError(f"{cfg.data.train}: no preference pairs left to train on "
                         f"({len(train.skipped)} too long, {len(rejects)} invalid)")

    # ---- model (with a fresh 1-output score head) + SEQ_CLS PEFT -----------------------------------
    model, _, stacked = load_for_training(
        cfg.model.name_or_path,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        previous_adapter=cfg.model.previous_adapter,
        quantize_4bit=cfg.adapter.method == "qlora",
        sequence_classification=True,
    )
    total_steps = total_optimizer_steps(
        len(train.rows), cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.train.epochs,
        cfg.train.max_steps, int(os.environ.get("WORLD_SIZE", "1")),
    )
    peft_config = None if stacked else seq_cls_peft_config(cfg, model.config.model_type, total_steps)

    # ---- trainer -----------------------------------------------------------------------------------
    has_val = bool(val.rows)
    args = RewardConfig(
        **common.training_arguments(cfg, run_dir, has_val),
        max_length=cfg.data.max_length,  # over-long pairs were already removed and listed
    )
    callbacks = common.standard_callbacks(cfg, run_dir, has_val)

    def dataset(rows: list[dict[str, str]]) -> Any:
        return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset(train.rows),
        eval_dataset=dataset(val.rows) if has_val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )

    # ---- record what this run is ------------------------------------------------------------------
    if trainer.is_world_process_zero():
        common.record_run(cfg, run_dir, conversation_template(cfg.data.conversation_format))
        common.save_json(run_dir / "data_summary.json", {
            "train": {"pairs": len(train_pairs), "used": len(train.rows), "skipped": len(train.skipped)},
            "validation": {"pairs": len(val_pairs), "used": len(val.rows), "skipped": len(val.skipped)},
            "rejected_rows": len(rejects),
        })
        write_jsonl(run_dir / "skipped.jsonl", train.skipped + val.skipped + rejects)
        common.note_resume(run_dir, checkpoint)

    # ---- accuracy before, train, accuracy after ----------------------------------------------------
    batch = cfg.train.eval_batch_size
    before = pairwise_accuracy(trainer.model, tokenizer, val.rows, batch)
    trainer.train(resume_from_checkpoint=checkpoint)
    after = pairwise_accuracy(trainer.model, tokenizer, val.rows, batch)

    # ---- save ---------------------------------------------------------------------------------------
    if trainer.is_world_process_zero():
        common.save_trained(trainer, tokenizer, run_dir, adapter=peft_config is not None or stacked)
        final: dict[str, Any] = {
            "global_step": trainer.state.global_step,
            "total_steps_planned": total_steps,
            "validation_pairs": len(val.rows),
            "pairwise_accuracy_before": before,
            "pairwise_accuracy_after": after,
        }
        evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        if evals:  # TRL's own per-batch eval metrics from the last epoch, for comparison
            final.update(evals[-1])
        common.save_json(run_dir / "train_results.json", final)
    return run_dir
