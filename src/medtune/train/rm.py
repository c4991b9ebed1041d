"""Pairwise reward model: preference pairs → seq-cls model + SEQ_CLS LoRA → TRL RewardTrainer → save.

The prompt of each pair is rendered with ``conversation_prompt`` (the same text SFT and DPO see) and
tokenised on its own, exactly as inference feeds it; each reply is tokenised on its own and ends
with EOS. The reward is the score head's output on the last token of ``prompt ids + reply ids``. Held-out
pairwise accuracy (share of pairs with reward(chosen) > reward(rejected)) is measured by
``pairwise_accuracy`` before and after training.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from medtune.config import ConfigError, RunConfig
from medtune.train import common

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreferenceRows:
    """Pairs as token ids (and the texts they came from), and the pairs that were left out."""

    # {"id", "prompt", "chosen", "rejected": texts; "prompt_ids": the prompt as inference feeds it;
    #  "chosen_ids", "rejected_ids": each reply tokenised on its own, ending with EOS}
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]]  # {"id", "reason"}


def preference_rows(pairs: list[Any], fmt: str, tokenizer: Any, max_length: int,
                    max_prompt_length: int | None = None) -> PreferenceRows:
    """Tokenise ``PreferencePair`` records: the prompt and each reply separately.

    The prompt ids are exactly those inference feeds the model (``encode_conversation_prompt``)
    and each reply is tokenised on its own and ends with EOS, as SFT does. TRL would tokenise
    ``prompt + reply`` as one string, where BPE can merge the prompt's last characters with the
    reply's first ones (the prompt then loses its last token to the reply: trained on a context
    the model never sees at inference).

    Pairs whose prompt + reply exceed ``max_length`` tokens, or whose prompt exceeds
    ``max_prompt_length``, are skipped and listed: TRL's RewardTrainer would drop them silently and
    DPOTrainer would cut them, and a cut reply is no longer the reply that was judged.

    Args:
        pairs: ``PreferencePair`` records.
        fmt: Conversation format (``plain`` or ``chat``), as in SFT.
        tokenizer: The training tokenizer; needs an EOS token.
        max_length: Token limit for prompt + reply.
        max_prompt_length: Optional token limit for the prompt alone.

    Returns:
        The rows and the skipped pairs.
    """
    from medtune.data.conversations import conversation_prompt, encode_conversation_prompt
    from medtune.data.sft import encode_target

    if tokenizer.eos_token_id is None:
        raise ValueError("model.name_or_path: preference training needs a tokenizer with an EOS token "
                         "(each reply ends with it) and this one has none")
    out = PreferenceRows(rows=[], skipped=[])
    for pair in pairs:
        prompt, _ = conversation_prompt(pair.prompt, fmt, tokenizer)
        prompt_ids = encode_conversation_prompt(pair.prompt, fmt, tokenizer)
        chosen_ids, rejected_ids = encode_target(tokenizer, pair.chosen), encode_target(tokenizer, pair.rejected)
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            out.skipped.append({"id": pair.id, "reason": f"prompt {len(prompt_ids)} tokens > "
                                                         f"preference.max_prompt_length={max_prompt_length}"})
        elif longest > max_length:
            out.skipped.append({"id": pair.id, "reason": f"{longest} tokens > data.max_length={max_length}"})
        else:
            out.rows.append({"id": pair.id, "prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                             "prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return out


def require_pairs(cfg: RunConfig, train: PreferenceRows, train_pairs: list[Any], val_pairs: list[Any],
                  rejects: list[dict[str, Any]]) -> int:
    """Optimiser steps for the usable training pairs; refuses a run with none (``common.planned_steps``)."""
    held_out = 0 if cfg.data.validation else len(val_pairs)
    skipped = train.skipped
    return common.planned_steps(cfg, len(train.rows), "preference pairs", [
        ("valid pairs read", len(train_pairs) + held_out),
        (f"rows rejected as invalid (data.on_invalid={cfg.data.on_invalid})", len(rejects)),
        (f"held out for validation (data.val_fraction={cfg.data.val_fraction})", held_out),
        (f"skipped, e.g. {skipped[0]['reason']}" if skipped else "skipped", len(skipped)),
    ])


def load_pairs(cfg: RunConfig) -> tuple[list[Any], list[Any], list[dict[str, Any]]]:
    """``(train pairs, held-out pairs, rejected rows)`` from data.train and data.validation / val_fraction."""
    from medtune.data.exam import load_preferences, split_records

    read = load_preferences(cfg.data.train, on_invalid=cfg.data.on_invalid)
    pairs, rejects = list(read.records), list(read.rejects)
    if cfg.data.max_samples:
        pairs = pairs[: cfg.data.max_samples]
    if cfg.data.validation:
        val = load_preferences(cfg.data.validation, on_invalid=cfg.data.on_invalid)
        return pairs, list(val.records), rejects + list(val.rejects)
    train, held = split_records(pairs, cfg.data.val_fraction, cfg.train.seed)
    return train, held, rejects


def reward_scores(model: Any, tokenizer: Any, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
    """Scalar reward of each token sequence from a sequence-classification model (num_labels=1).

    Sequences are right-padded in batches; the model itself picks the last non-pad token, exactly
    as in training, so these are the rewards the RewardTrainer optimised.
    """
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                scores += logits[:, 0].float().tolist()
    finally:
        model.train(was_training)
    return scores


def scored_sequence(row: dict[str, Any], key: str, tokenizer: Any) -> list[int]:
    """Token ids of ``prompt + row[key]`` as the reward model is trained on them (prompt and reply apart).

    Rows from ``preference_rows`` carry their ids; plain text rows (``{"prompt", "chosen",
    "rejected"}``) are tokenised the same way: the prompt on its own, the reply on its own + EOS.
    """
    from medtune.data.sft import encode_target

    if "prompt_ids" in row:
        return row["prompt_ids"] + row[f"{key}_ids"]
    return tokenizer(row["prompt"])["input_ids"] + encode_target(tokenizer, row[key])


def pairwise_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int = 8) -> float | None:
    """Share of rows with reward(prompt + chosen) > reward(prompt + rejected); ties count as wrong.

    Args:
        model: Sequence-classification model with one output.
        tokenizer: Its tokenizer (its pad token pads the batches).
        rows: Rows from ``preference_rows`` (or ``{"prompt", "chosen", "rejected"}`` texts).
        batch_size: Sequences per forward pass.

    Returns:
        The accuracy in [0, 1], or ``None`` for no rows.
    """
    if not rows:
        return None
    chosen = reward_scores(model, tokenizer, [scored_sequence(r, "chosen", tokenizer) for r in rows], batch_size)
    rejected = reward_scores(model, tokenizer, [scored_sequence(r, "rejected", tokenizer) for r in rows], batch_size)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)


def reward_dataset(rows: list[dict[str, Any]]) -> Any:
    """RewardTrainer's pre-tokenised columns: ``chosen_ids``/``rejected_ids`` = prompt + reply ids.

    TRL skips its own tokenisation for datasets with these columns, so it trains on exactly
    these ids.
    """
    from datasets import Dataset

    return Dataset.from_list([{"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                               "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in rows])


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
    from trl import RewardConfig, RewardTrainer

    from medtune.adapters import check_method_compatibility, check_target_modules
    from medtune.io import write_jsonl
    from medtune.models import load_for_training
    from medtune.templates import conversation_template

    if cfg.adapter.method in ("prefix", "prompt"):
        raise ConfigError(f"adapter.method: stage rm supports lora, adalora, qlora or full (the score head must "
                          f"train), got {cfg.adapter.method!r}")
    check_method_compatibility(cfg.adapter, cfg.train, cfg.model.name_or_path)
    common.check_trainer_names(cfg)

    # ---- run directory: checked now, created once the data is known to be usable ---------------
    run_dir, checkpoint = common.check_run_dir(cfg, resume=resume)

    # ---- data: pairs → prompt and reply token ids ----------------------------------------------------
    tokenizer = common.load_training_tokenizer(cfg)
    train_pairs, val_pairs, rejects = load_pairs(cfg)
    train = preference_rows(train_pairs, cfg.data.conversation_format, tokenizer, cfg.data.max_length)
    val = preference_rows(val_pairs, cfg.data.conversation_format, tokenizer, cfg.data.max_length)
    total_steps = require_pairs(cfg, train, train_pairs, val_pairs, rejects)
    common.create_run_dir(run_dir)
    torch.manual_seed(cfg.train.seed)

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
    peft_config = None if stacked else seq_cls_peft_config(cfg, model.config.model_type, total_steps)
    check_target_modules(model, peft_config, cfg.adapter)  # one line naming the setting, not peft's traceback

    # ---- trainer -----------------------------------------------------------------------------------
    has_val = bool(val.rows)
    args = RewardConfig(
        **common.training_arguments(cfg, run_dir, has_val),
        max_length=cfg.data.max_length,  # over-long pairs were already removed and listed
    )
    callbacks = common.standard_callbacks(cfg, run_dir, has_val)
    trainer = RewardTrainer(
        model=model,
        args=args,
        # token ids, not text: TRL would tokenise prompt + reply as one string (see preference_rows)
        train_dataset=reward_dataset(train.rows),
        eval_dataset=reward_dataset(val.rows) if has_val else None,
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
