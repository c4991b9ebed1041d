"""Online RL (GRPO or RLOO from TRL): config → prompts → model + PEFT → reward → train → save.

The model samples ``rl.num_generations`` completions per prompt, a reward function scores them
(see :mod:`medtune.train.rewards` for which reward applies to which data) and the policy moves
towards the completions that scored above their group's mean. ``train.batch_size`` counts
*prompts* per device step; TRL's batch counts completions, so it is ``batch_size × num_generations``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from medtune.config import ConfigError, RunConfig
from medtune.io import write_jsonl
from medtune.train import common

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptRows:
    """The RL prompts and where the rows of ``data.train`` went."""

    rows: list[dict[str, Any]]  # one per usable prompt, with the columns the reward reads
    template: Any  # the exam template or conversation format the prompts were rendered with
    kind: str  # exam | conversation
    rejects: list[dict[str, Any]]  # rows rejected as invalid (data.on_invalid=skip)
    n_read: int  # rows read, rejects included
    n_beyond: int  # valid rows left out by data.max_samples
    skipped: list[dict[str, Any]]  # {"id", "reason"}: valid rows the reward cannot score


def build_prompt_rows(cfg: RunConfig, tokenizer: Any) -> PromptRows:
    """Prompt rows for TRL, with the template used, the data kind and the rows left out.

    Exam data give ``{"prompt", "options", "answer", "id"}`` (options as a JSON string, see
    :mod:`medtune.train.rewards`); conversations give ``{"prompt", "reference", "id"}`` with the
    final assistant reply as reference. With ``rl.reward=exam`` a conversation is scored against
    that reply, so one without a reply (e.g. a PromptCBLUE test split) is skipped and listed;
    ``rl.reward=model`` needs prompts only.

    Args:
        cfg: The run config (``data.*`` and ``rl.reward`` are read).
        tokenizer: The training tokenizer (chat templates render through it).

    Returns:
        The rows and the accounting of the others.

    Raises:
        ConfigError: ``data.template`` names no exam template.
    """
    from medtune.data.conversations import conversation_prompt
    from medtune.data.detect import detect
    from medtune.data.exam import load_conversations, load_exam_file
    from medtune.templates import TemplateError, conversation_template, get_template

    kind = detect(cfg.data.train, kinds=("exam", "conversation")).kind
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if kind == "exam":
        try:
            template: Any = get_template(cfg.data.template)
        except TemplateError as exc:
            raise ConfigError(f"data.template: {exc}") from exc
        records, rejects = load_exam_file(cfg.data.train, cfg.data.on_invalid)
        n_valid = len(records)
        if cfg.data.max_samples:
            records = records[: cfg.data.max_samples]
        for rec in records:
            rows.append({
                "id": rec.id,
                "prompt": template.render_prompt(rec, tokenizer),
                "options": json.dumps(rec.options, ensure_ascii=False),
                "answer": rec.answer,
            })
    else:
        template = conversation_template(cfg.data.conversation_format)
        needs_reference = cfg.rl.reward != "model"  # the reward is ROUGE-L against the reply
        records, rejects = load_conversations(cfg.data.train, cfg.data.on_invalid, require_reply=needs_reference)
        n_valid = len(records)
        if cfg.data.max_samples:
            records = records[: cfg.data.max_samples]
        for conv in records:
            if needs_reference and not conv.reply.strip():
                skipped.append({"id": conv.id, "reason": "no reply to score completions against "
                                                          "(rl.reward=exam on conversations; rl.reward=model "
                                                          "needs none)"})
                continue
            prompt, _ = conversation_prompt(conv.prompt_messages, template, tokenizer)
            rows.append({"id": conv.id, "prompt": prompt, "reference": conv.reply})
    return PromptRows(rows=rows, template=template, kind=kind, rejects=rejects, n_read=n_valid + len(rejects),
                      n_beyond=n_valid - len(records), skipped=skipped)


def check_reward_model(cfg: RunConfig) -> str | None:
    """With ``rl.reward=model``: the reward model's conversation format, once it is known to be a finished rm run.

    Raises:
        ConfigError: ``rl.reward_model`` is not a finished run directory, or was trained with
            ``model.trust_remote_code: true`` and this RL config does not allow remote code.
    """
    from medtune.train.rewards import check_reward_model_trust, reward_model_config

    if cfg.rl.reward != "model":
        return None
    try:
        saved = reward_model_config(cfg.rl.reward_model)
        # refused here, before the policy is loaded, rather than when the reward model is
        check_reward_model_trust(cfg.rl.reward_model, saved, cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"rl.reward_model: {exc}") from exc
    return (saved.get("data") or {}).get("conversation_format", "plain")


def check_prompt_format(cfg: RunConfig, kind: str, reward_format: str | None) -> None:
    """Conversation prompts must be rendered as the reward model saw them (its ``data.conversation_format``)."""
    if reward_format is not None and kind == "conversation" and reward_format != cfg.data.conversation_format:
        raise ConfigError(
            f"data.conversation_format: {cfg.data.conversation_format!r}, but the reward model "
            f"{cfg.rl.reward_model} was trained on {reward_format!r} prompts and would score text it never saw; "
            f"set data.conversation_format={reward_format}"
        )


def reward_function(cfg: RunConfig, template: Any, kind: str) -> Any:
    """The TRL reward function for ``cfg.rl.reward`` on data of ``kind`` (exam | conversation)."""
    from medtune.train import rewards

    if cfg.rl.reward == "model":
        # the RL config is the user's own, so it may allow the reward model's remote code
        return rewards.make_model_reward_fn(cfg.rl.reward_model, trust_remote_code=cfg.model.trust_remote_code)
    if kind == "exam":
        return rewards.make_exam_reward_fn(template, cfg.rl.format_bonus)
    # Conversations have no options to grade, so "exam" falls back to overlap with the reference.
    log.info("rl.reward=exam on conversation data: using reference_overlap_reward (ROUGE-L vs the reply)")
    return rewards.make_reference_overlap_reward_fn()


def quarter_means(values: list[float]) -> tuple[float | None, float | None]:
    """Mean of the first and of the last quarter of ``values`` (at least one value each)."""
    if not values:
        return None, None
    k = max(1, len(values) // 4)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def run(cfg: RunConfig, resume: bool = True) -> Path:
    """Train with GRPO or RLOO and return the run directory.

    Args:
        cfg: The run config (``stage: rl``); ``model.name_or_path`` is a base model or a previous
            run directory (e.g. an sft run, whose adapter is merged or stacked).
        resume: Continue from the run directory's last complete checkpoint, if any.

    Returns:
        The run directory: config.yaml, template.yaml, env.json, data_summary.json,
        skipped.jsonl, metrics.jsonl (with TRL's ``reward`` per logged step), adapter/ (or
        model/), train_results.json.
    """
    import torch
    from datasets import Dataset

    from medtune.adapters import check_method_compatibility, check_target_modules, peft_config_for
    from medtune.inference.virtual_tokens import use_virtual_token_generation
    from medtune.models import load_for_training

    # ---- checks that must fail before anything is loaded (e.g. QLoRA without a GPU) -----------
    check_method_compatibility(cfg.adapter, cfg.train, cfg.model.name_or_path)
    common.check_trainer_names(cfg)
    # the run directory is checked now but created only once the data is known to be usable
    run_dir, checkpoint = common.check_run_dir(cfg, resume=resume)

    # ---- data: records → prompts (+ the columns the reward reads) ---------------------------------
    tokenizer = common.load_training_tokenizer(cfg)
    reward_format = check_reward_model(cfg)
    prompts = build_prompt_rows(cfg, tokenizer)
    rows, template, kind, rejects = prompts.rows, prompts.template, prompts.kind, prompts.rejects
    check_prompt_format(cfg, kind, reward_format)
    skipped = prompts.skipped
    total_steps = common.planned_steps(cfg, len(rows), "prompts", [
        ("rows read", prompts.n_read),
        (f"rejected as invalid (data.on_invalid={cfg.data.on_invalid})", len(rejects)),
        (f"beyond data.max_samples={cfg.data.max_samples}", prompts.n_beyond),
        (f"skipped, e.g. {skipped[0]['reason']}" if skipped else "skipped", len(skipped)),
    ])
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
    # TRL wraps the model with this config itself (and, with beta > 0, uses the adapter-disabled
    # model as the reference, so no second copy of the weights is loaded).
    peft_config = None if stacked else peft_config_for(cfg.adapter, model.config.model_type, total_steps)
    check_target_modules(model, peft_config, cfg.adapter)  # one line naming the setting, not peft's traceback

    # ---- trainer -----------------------------------------------------------------------------------
    common_args = {
        **common.training_arguments(cfg, run_dir, has_val=False),
        # TRL counts completions per batch; a group of num_generations must fit in one batch.
        "per_device_train_batch_size": cfg.train.batch_size * cfg.rl.num_generations,
        "eval_strategy": "no",
        "num_generations": cfg.rl.num_generations,
        "max_completion_length": cfg.rl.max_completion_length,
        "temperature": cfg.rl.temperature,
        "beta": cfg.rl.beta,
        "use_vllm": False,
        # options/answer/reference must survive the column pruning to reach the reward function.
        "remove_unused_columns": False,
    }
    if cfg.rl.algorithm == "grpo":
        from trl import GRPOConfig as ConfigCls
        from trl import GRPOTrainer as TrainerCls
    else:
        from trl import RLOOConfig as ConfigCls
        from trl import RLOOTrainer as TrainerCls
    args = ConfigCls(**common_args)

    callbacks = common.standard_callbacks(cfg, run_dir, has_val=False)
    trainer = TrainerCls(
        model=model,
        reward_funcs=reward_function(cfg, template, kind),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )
    # TRL samples completions with model.generate, which for prefix/prompt tuning must go through
    # the trained virtual tokens (peft's own generate loses them under transformers 5).
    use_virtual_token_generation(trainer.model)

    # ---- record what this run is, before the (long) training starts --------------------------------
    if trainer.is_world_process_zero():
        data_files = [cfg.data.train] + ([cfg.rl.reward_model + "/config.yaml"] if cfg.rl.reward == "model" else [])
        common.record_run(cfg, run_dir, template, data_files)
        common.save_json(run_dir / "data_summary.json", {
            "kind": kind, "prompts": len(rows), "rejected_rows": len(rejects), "skipped_rows": len(skipped),
            "algorithm": cfg.rl.algorithm, "reward": cfg.rl.reward,
        })
        write_jsonl(run_dir / "skipped.jsonl", skipped + rejects)
        common.note_resume(run_dir, checkpoint)

    # ---- train ------------------------------------------------------------------------------------
    trainer.train(resume_from_checkpoint=checkpoint)

    # ---- save: adapter (or full model) + tokenizer + trainer state ----------------------------------
    if trainer.is_world_process_zero():
        common.save_trained(trainer, tokenizer, run_dir, adapter=peft_config is not None or stacked)
        # The full log history (resumed runs included) is in the trainer state; TRL logs the mean
        # reward of each logged step's sampled completions as "reward".
        rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
        first, last = quarter_means(rewards)
        common.save_json(run_dir / "train_results.json", {
            "global_step": trainer.state.global_step,
            "total_steps_planned": total_steps,
            "algorithm": cfg.rl.algorithm,
            "reward_logged_steps": len(rewards),
            "mean_reward_first_quarter": first,
            "mean_reward_last_quarter": last,
        })
    return run_dir
