"""Supervised fine-tuning (exam records or conversations): config → data → model + PEFT → trainer → train → save."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from medtune.config import ConfigError, RunConfig
from medtune.io import write_jsonl
from medtune.train import common

log = logging.getLogger(__name__)


def run(cfg: RunConfig, resume: bool = True) -> Path:
    """Train and return the run directory (see DESIGN.md for its contents)."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medtune.adapters import check_method_compatibility, check_target_modules, peft_config_for
    from medtune.data.conversations import build_conversation_examples
    from medtune.data.detect import detect
    from medtune.data.exam import load_conversations, load_exam_file, split_records
    from medtune.data.sft import IGNORE_INDEX, build_sft_examples
    from medtune.models import load_for_training
    from medtune.templates import TemplateError, conversation_template, get_template
    from medtune.train.label_head import LabelHeadTrainer, label_head_applies

    # ---- checks that must fail before anything is loaded (e.g. QLoRA without a GPU) -----------
    check_method_compatibility(cfg.adapter, cfg.train, cfg.model.name_or_path)
    common.check_trainer_names(cfg)
    # the run directory is checked now but created only once the data is known to be usable
    run_dir, checkpoint = common.check_run_dir(cfg, resume=resume)

    # ---- data: records → template → tokenised, prompt-masked examples ---------------------------
    tokenizer = common.load_training_tokenizer(cfg)
    limits = {"max_source_length": cfg.data.max_source_length, "max_target_length": cfg.data.max_target_length,
              "truncation": cfg.data.truncation}
    exam = detect(cfg.data.train, kinds=("exam", "conversation")).kind == "exam"
    if cfg.train.eval_accuracy != "none" and not exam:
        raise ConfigError(f"train.eval_accuracy: scores answers to multiple-choice questions, and data.train "
                          f"({cfg.data.train}) holds conversations; set train.eval_accuracy=none")
    if exam:
        try:
            template = get_template(cfg.data.template)
        except TemplateError as exc:
            raise ConfigError(f"data.template: {exc}") from exc
        load = load_exam_file

        def build(recs: list) -> Any:
            return build_sft_examples(recs, template, tokenizer, cfg.data.max_length, **limits,
                                      max_explanation_chars=cfg.data.max_explanation_chars,
                                      on_long_explanation=cfg.data.on_long_explanation)
    else:  # instructions, dialogues, PromptCBLUE, ...: loss on every assistant reply
        if cfg.data.max_explanation_chars is not None:
            raise ConfigError(f"data.max_explanation_chars: applies to exam questions, and data.train "
                              f"({cfg.data.train}) holds conversations; remove it")
        try:
            template = conversation_template(cfg.data.conversation_format)
        except TemplateError as exc:
            raise ConfigError(f"data.conversation_format: {exc}") from exc
        load = load_conversations

        def build(recs: list) -> Any:
            return build_conversation_examples(recs, template, tokenizer, cfg.data.max_length, **limits)

    records, rejects = load(cfg.data.train, cfg.data.on_invalid)
    n_read, n_invalid = len(records) + len(rejects), len(rejects)
    if cfg.data.max_samples:
        records = records[: cfg.data.max_samples]
    n_beyond = n_read - n_invalid - len(records)
    if cfg.data.validation:
        val_records, val_rejects = load(cfg.data.validation, cfg.data.on_invalid)
        rejects += val_rejects
    else:
        records, val_records = split_records(records, cfg.data.val_fraction, cfg.train.seed)
    train_build, val_build = build(records), build(val_records)
    if int(os.environ.get("RANK", "0")) == 0:  # printed, not logged: the CLI shows only warnings
        for split, built in (("train", train_build), ("validation", val_build)):
            if built.n_records:
                print(built.summary_line(split), flush=True)
    lost = train_build.dropped_tasks()
    # (with no example left at all, planned_steps below says so, naming where the rows went)
    if lost and train_build.examples and not cfg.data.allow_dropped_tasks:
        example = next(e["reason"] for e in train_build.skipped if e.get("task") in lost)
        raise ConfigError(
            f"data: every training example of task(s) {', '.join(f'{t} ({n})' for t, n in lost.items())} would be "
            f"dropped (e.g. {example}); raise data.max_length, set data.truncation=middle or left, or set "
            f"data.allow_dropped_tasks=true to train without them")
    skipped = train_build.skipped
    total_steps = common.planned_steps(cfg, len(train_build.examples), "examples", [
        ("rows read", n_read),
        (f"rejected as invalid (data.on_invalid={cfg.data.on_invalid})", n_invalid),
        (f"beyond data.max_samples={cfg.data.max_samples}", n_beyond),
        (f"held out for validation (data.val_fraction={cfg.data.val_fraction})",
         0 if cfg.data.validation else len(val_records)),
        (f"skipped, e.g. {skipped[0]['reason']}" if skipped else "skipped", len(skipped)),
    ])
    answer_accuracy = _answer_accuracy_callback(cfg, val_records, template, tokenizer) if exam else None
    common.create_run_dir(run_dir)
    torch.manual_seed(cfg.train.seed)

    # ---- model + PEFT -----------------------------------------------------------------------------
    model, _, stacked = load_for_training(
        cfg.model.name_or_path,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        previous_adapter=cfg.model.previous_adapter,
        quantize_4bit=cfg.adapter.method == "qlora",
    )
    peft_config = None if stacked else peft_config_for(cfg.adapter, model.config.model_type, total_steps,
                                                       hidden_size=model.config.hidden_size)
    if peft_config is not None:
        check_target_modules(model, peft_config, cfg.adapter)
        model = get_peft_model(model, peft_config)

    # ---- trainer -----------------------------------------------------------------------------------
    # The examples are already tokenised and prompt-masked (labels = -100 on the prompt), so the
    # plain transformers Trainer is all that is needed. TRL's SFTTrainer was measured 2-3x slower
    # here: it computes per-token entropy and accuracy through a chunked LM head every step.
    has_val = bool(val_build.examples)
    args = TrainingArguments(
        **common.training_arguments(cfg, run_dir, has_val),
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        # every trainable parameter gets a gradient each step; without this DDP re-scans the graph
        ddp_find_unused_parameters=False,
    )
    callbacks = common.standard_callbacks(cfg, run_dir, has_val, answer_accuracy=answer_accuracy)
    # The LM head only on label positions where that is exactly the model's own loss (one
    # process, plain/LoRA decoders): about 13% less compute on exam data, same loss and gradients.
    trainer_cls = LabelHeadTrainer if label_head_applies(model, cfg.adapter.method) else Trainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_build.examples),
        eval_dataset=Dataset.from_list(val_build.examples) if has_val else None,
        # pads input_ids with the pad token and labels with -100; builds the attention mask
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    # ---- record what this run is, before the (long) training starts --------------------------------
    if trainer.is_world_process_zero():
        common.record_run(cfg, run_dir, template)
        common.save_json(
            run_dir / "data_summary.json",
            {"train": train_build.summary(), "validation": val_build.summary(), "rejected_rows": len(rejects)},
        )
        # Nothing is dropped silently: what did not enter training as it was is written out.
        write_jsonl(run_dir / "skipped.jsonl", train_build.skipped + val_build.skipped + rejects)
        write_jsonl(run_dir / "truncated.jsonl", train_build.truncated + val_build.truncated)
        common.note_resume(run_dir, checkpoint)

    # ---- train ------------------------------------------------------------------------------------
    trainer.train(resume_from_checkpoint=checkpoint)

    # ---- save: adapter (or full model) + tokenizer + trainer state ----------------------------------
    # every process takes part (FSDP and ZeRO-3 gather the weights from all of them); rank 0 writes
    common.save_trained(trainer, tokenizer, run_dir, adapter=peft_config is not None or stacked)
    if trainer.is_world_process_zero():
        final = {"global_step": trainer.state.global_step, "total_steps_planned": total_steps}
        evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        best = trainer.state.best_model_checkpoint if cfg.train.load_best_model_at_end else None
        if best:
            # the saved weights are the best checkpoint's: report its evaluation, not the last one
            step = int(Path(best).name.removeprefix("checkpoint-"))
            evals = [entry for entry in evals if entry["step"] == step] or evals
            final.update(best_model_checkpoint=best, metric_for_best_model=cfg.train.metric_for_best_model,
                         best_metric=trainer.state.best_metric)
        if evals:  # the validation already computed (no second pass over the data)
            final.update(evals[-1])
        common.save_json(run_dir / "train_results.json", final)
    return run_dir


def _answer_accuracy_callback(cfg: RunConfig, val_records: list, template: Any, tokenizer: Any) -> Any:
    """The ``train.eval_accuracy`` callback for exam data, or ``None`` when it is off.

    Built before the run directory exists, so a template without an answer cue (loglik) or an
    empty validation split is refused without leaving anything behind.
    """
    from medtune.evaluation.loglik import answer_cue
    from medtune.train.answer_accuracy import AnswerAccuracyCallback

    mode = cfg.train.eval_accuracy
    if mode == "none":
        return None
    if not val_records:
        raise ConfigError(f"train.eval_accuracy: no validation questions to score (data.val_fraction="
                          f"{cfg.data.val_fraction} of the training records, data.validation={cfg.data.validation})")
    if mode == "loglik":
        try:
            answer_cue(template)
        except ValueError as exc:
            raise ConfigError(f"train.eval_accuracy: loglik needs the answer letters in the template's target: "
                              f"{exc}; use train.eval_accuracy=generate") from exc
    return AnswerAccuracyCallback(val_records, template, tokenizer, mode, batch_size=cfg.train.eval_batch_size,
                                  max_new_tokens=cfg.train.eval_max_new_tokens)
