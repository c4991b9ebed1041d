"""Direct preference optimisation: preference pairs → policy (+ reference) → TRL DPOTrainer → save.

Loss types: ``preference.loss_type`` is one of ``DPO_LOSS_TYPES``, the list TRL 1.16's DPOTrainer
implements (sigmoid = the original DPO, ipo, hinge, robust, ...). ORPO and SimPO are *not* DPO loss
types in TRL 1.16: they live in ``trl.experimental`` as separate trainers (``ORPOTrainer``;
``CPOTrainer`` with ``loss_type="simpo"``) with their own configs and no reference model. This stage
does not wire them up; asking for ``orpo`` or ``simpo`` raises an error that says so.

Reference model: with a PEFT method the reference is the policy with its adapter disabled (no second
copy in memory). With ``adapter.method: full`` or a stacked previous adapter, a second copy of the
starting model is loaded as the frozen reference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medtune.config import ConfigError, RunConfig
from medtune.train import common

log = logging.getLogger(__name__)

#: The loss types TRL 1.16.0's DPOTrainer implements (``DPOTrainer.dpo_loss``).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)

#: Preference methods TRL ships as separate (experimental) trainers, not as DPO loss types.
SEPARATE_TRAINERS = {
    "orpo": "trl.experimental.orpo.ORPOTrainer",
    "simpo": "trl.experimental.cpo.CPOTrainer with loss_type='simpo'",
    "cpo": "trl.experimental.cpo.CPOTrainer",
    "kto": "trl.KTOTrainer (unpaired data)",
}


def check_loss_type(loss_type: str) -> str:
    """Return ``loss_type`` if TRL's DPOTrainer implements it, else raise a ValueError saying what to use."""
    if loss_type in DPO_LOSS_TYPES:
        return loss_type
    if loss_type in SEPARATE_TRAINERS:
        raise ConfigError(f"preference.loss_type: {loss_type!r} is not a DPO loss in TRL 1.16 but a separate trainer "
                         f"({SEPARATE_TRAINERS[loss_type]}), which stage dpo does not run; "
                         f"DPO loss types: {', '.join(DPO_LOSS_TYPES)}")
    raise ConfigError(f"preference.loss_type: expected one of {list(DPO_LOSS_TYPES)}, got {loss_type!r}")


def dpo_dataset(rows: list[dict[str, Any]]) -> Any:
    """DPOTrainer's tokenised columns: ``prompt_ids`` (as inference feeds it), ``chosen_ids``/``rejected_ids``."""
    from datasets import Dataset

    return Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])


def pretokenized_dpo_trainer() -> type:
    """A ``DPOTrainer`` that trains on the token ids it is given.

    TRL 1.16's DPOTrainer always tokenises a ``prompt``/``chosen``/``rejected`` text dataset
    itself, tokenising ``prompt + reply`` as one string: where BPE merges across that boundary,
    the prompt's last token moves into the reply, so the model learns on a context it never
    sees at inference. Datasets that already have ``prompt_ids`` (``dpo_dataset``) skip that step;
    they are exactly what TRL's own preparation would produce, and its collator takes them as is.
    """
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer that leaves datasets with ``prompt_ids`` as they are."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if "prompt_ids" in (dataset.column_names or []):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def run(cfg: RunConfig, resume: bool = True) -> Path:
    """Train with DPO on preference pairs and return the run directory.

    Args:
        cfg: The run config (stage ``dpo``); ``preference.beta`` and ``preference.loss_type`` set the loss.
        resume: Continue from the last complete checkpoint in the run directory, if any.

    Returns:
        The run directory; ``train_results.json`` holds the held-out ``eval_rewards/accuracies``
        (share of pairs whose implicit reward ranks chosen above rejected) when pairs are held out.
    """
    import torch
    from trl import DPOConfig

    from medtune.adapters import check_method_compatibility, check_target_modules, peft_config_for
    from medtune.io import write_jsonl
    from medtune.models import load_for_training
    from medtune.templates import conversation_template
    from medtune.train.rm import load_pairs, preference_rows, require_pairs

    loss_type = check_loss_type(cfg.preference.loss_type)
    check_method_compatibility(cfg.adapter, cfg.train, cfg.model.name_or_path)
    common.check_trainer_names(cfg)

    # ---- run directory: checked now, created once the data is known to be usable ---------------
    run_dir, checkpoint = common.check_run_dir(cfg, resume=resume)

    # ---- data: pairs → prompt and reply token ids (the prompt as inference feeds it) -----------------
    tokenizer = common.load_training_tokenizer(cfg)
    train_pairs, val_pairs, rejects = load_pairs(cfg)
    fmt, limit, prompt_limit = cfg.data.conversation_format, cfg.data.max_length, cfg.preference.max_prompt_length
    train = preference_rows(train_pairs, fmt, tokenizer, limit, prompt_limit)
    val = preference_rows(val_pairs, fmt, tokenizer, limit, prompt_limit)
    total_steps = require_pairs(cfg, train, train_pairs, val_pairs, rejects)
    common.create_run_dir(run_dir)
    torch.manual_seed(cfg.train.seed)

    # ---- policy, PEFT and reference -----------------------------------------------------------------
    def load(previous_adapter: str) -> tuple[Any, bool]:
        loaded, _, is_stacked = load_for_training(
            cfg.model.name_or_path,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=cfg.model.attn_implementation,
            previous_adapter=previous_adapter,
            quantize_4bit=cfg.adapter.method == "qlora",
        )
        return loaded, is_stacked

    model, stacked = load(cfg.model.previous_adapter)
    peft_config = None if stacked else peft_config_for(cfg.adapter, model.config.model_type, total_steps)
    check_target_modules(model, peft_config, cfg.adapter)  # one line naming the setting, not peft's traceback
    ref_model = None
    if peft_config is None:
        # Full fine-tuning (or training a stacked adapter further): disabling "the" adapter would not
        # give the starting model, so a frozen copy of it is the reference. Merged, so the reference is
        # exactly the previous stage's model.
        ref_model, _ = load("merge")
        ref_model.eval().requires_grad_(False)

    # ---- trainer -----------------------------------------------------------------------------------
    has_val = bool(val.rows)
    args = DPOConfig(
        **common.training_arguments(cfg, run_dir, has_val),
        beta=cfg.preference.beta,
        loss_type=[loss_type],
        max_length=cfg.data.max_length,  # over-long pairs were already removed and listed
    )
    callbacks = common.standard_callbacks(cfg, run_dir, has_val)
    trainer = pretokenized_dpo_trainer()(
        model=model,
        ref_model=ref_model,
        args=args,
        # token ids, not text: TRL would tokenise prompt + reply as one string (see preference_rows)
        train_dataset=dpo_dataset(train.rows),
        eval_dataset=dpo_dataset(val.rows) if has_val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )

    # ---- record what this run is ------------------------------------------------------------------
    if trainer.is_world_process_zero():
        common.record_run(cfg, run_dir, conversation_template(fmt))
        common.save_json(run_dir / "data_summary.json", {
            "train": {"pairs": len(train_pairs), "used": len(train.rows), "skipped": len(train.skipped)},
            "validation": {"pairs": len(val_pairs), "used": len(val.rows), "skipped": len(val.skipped)},
            "rejected_rows": len(rejects),
        })
        write_jsonl(run_dir / "skipped.jsonl", train.skipped + val.skipped + rejects)
        common.note_resume(run_dir, checkpoint)

    # ---- train, then the held-out preference accuracy -------------------------------------------------
    trainer.train(resume_from_checkpoint=checkpoint)
    evaluation = trainer.evaluate() if has_val else {}

    # ---- save ---------------------------------------------------------------------------------------
    if trainer.is_world_process_zero():
        common.save_trained(trainer, tokenizer, run_dir, adapter=peft_config is not None or stacked)
        common.save_json(run_dir / "train_results.json", {
            "global_step": trainer.state.global_step,
            "total_steps_planned": total_steps,
            "loss_type": loss_type,
            "beta": cfg.preference.beta,
            "validation_pairs": len(val.rows),
            **evaluation,
        })
    return run_dir
