"""AdaLoRA really adapts: its rank budget moves during training (update_and_allocate runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from medtune.adapters import adalora_ranks, adalora_schedule, total_optimizer_steps
from medtune.config import AdapterConfig, load_config

pytestmark = pytest.mark.slow


def test_total_steps_and_schedule():
    assert total_optimizer_steps(32, 4, 1, 3.0, -1) == 24
    assert total_optimizer_steps(33, 4, 2, 1.0, -1) == 5  # 9 batches → 5 updates
    assert total_optimizer_steps(33, 4, 2, 1.0, 7) == 7
    assert total_optimizer_steps(32, 4, 1, 1.0, -1, world_size=2) == 4
    assert adalora_schedule(AdapterConfig(method="adalora"), 40) == (4, 4)
    with pytest.raises(ValueError, match="tinit"):
        adalora_schedule(AdapterConfig(method="adalora", tinit=20, tfinal=20), 40)


def test_adalora_rank_defaults_follow_peft():
    from peft import AdaLoraConfig

    from medtune.adapters import peft_config_for

    ours, peft_default = AdapterConfig(method="adalora"), AdaLoraConfig(total_step=40)
    assert (ours.init_r, ours.target_r) == (peft_default.init_r, peft_default.target_r) == (12, 8)
    built = peft_config_for(ours, "llama", total_steps=40)
    assert (built.init_r, built.target_r, built.deltaT) == (12, 8, 1)
    shipped = load_config(Path(__file__).resolve().parents[1] / "src/medtune/configs/cmexam_adalora_7b.yaml")
    assert shipped.adapter.target_r == 8


def test_adalora_ranks_change(tmp_path, tiny_model_dir, records_file):
    from medtune.models import load_for_inference
    from medtune.train import sft

    data = records_file(16)
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
        "adapter.method=adalora", "adapter.init_r=6", "adapter.target_r=2", "adapter.tinit=2",
        "adapter.tfinal=2", "train.max_steps=12", "train.batch_size=4",
        "train.report_to=none", "data.max_length=96",
    ])
    run_dir = sft.run(cfg)
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "ADALORA" and adapter_cfg["total_step"] == 12
    # update_and_allocate filled in a rank pattern (plain Trainer leaves it None)
    assert adapter_cfg["rank_pattern"], "rank budget never moved"
    model, _ = load_for_inference(cfg.model.name_or_path, str(run_dir / "adapter"), dtype="float32")
    ranks = adalora_ranks(model)
    assert ranks and len(ranks) == 4 * 7  # 4 layers × 7 target modules
    assert sum(ranks.values()) < 6 * len(ranks), "no singular value was pruned"
    assert len(set(ranks.values())) > 1, "ranks were not reallocated unevenly"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["adapter"]["method"] == "adalora"


def test_validation_loss_each_epoch_and_grad_accumulation(tmp_path, tiny_model_dir, records_file):
    from medtune.train import sft

    data = records_file(20)
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
        "data.val_fraction=0.2", "train.epochs=2", "train.batch_size=2", "train.gradient_accumulation_steps=2",
        "train.report_to=none", "data.max_length=256",
    ])
    run_dir = sft.run(cfg)
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logs if "eval_loss" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]  # validation loss once per epoch
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["train"]["examples"] == 16 and summary["validation"]["examples"] == 4
    # 16 examples / batch 2 = 8 micro-batches; accumulating 2 → 4 optimiser steps per epoch
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == 8
    final = json.loads((run_dir / "train_results.json").read_text())
    assert final["global_step"] == 8 and "eval_loss" in final


def test_early_stop_on_eval_loss_callback():
    from types import SimpleNamespace

    from medtune.train.common import EarlyStopOnEvalLoss

    cb = EarlyStopOnEvalLoss(patience=2)
    control = SimpleNamespace(should_training_stop=False)
    for loss, stop in [(3.0, False), (2.0, False), (2.5, False), (2.1, True)]:
        cb.on_evaluate(None, None, control, metrics={"eval_loss": loss})
        assert control.should_training_stop is stop


def test_early_stopping_stops_a_run(tmp_path, tiny_model_dir, records_file):
    from medtune.train import sft

    cfg = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={records_file(12)}", f"train.output_dir={tmp_path / 'r'}",
        "data.val_fraction=0.25", "train.epochs=30", "train.batch_size=3", "train.learning_rate=0.5",
        "train.early_stopping_patience=1", "train.report_to=none", "data.max_length=256",
    ])
    run_dir = sft.run(cfg)  # a learning rate this high makes the validation loss get worse
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] < 30 * 3


def _adalora_cfg(tiny_model_dir, data, out, *extra):
    return load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={out}",
        "adapter.method=adalora", "adapter.init_r=6", "adapter.target_r=2", "adapter.tinit=2",
        "adapter.tfinal=2", "train.max_steps=12", "train.batch_size=4",
        "train.save_steps=4", "train.save_total_limit=null", "train.report_to=none", "data.max_length=96", *extra,
    ])


def test_adalora_run_resumed_mid_schedule_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, records_file):
    """Symptom: resuming an AdaLoRA run after its ranks moved died with "size mismatch for ...lora_A"."""
    import shutil

    from safetensors.torch import load_file

    from medtune.train import sft

    data = records_file(16)
    cfg = _adalora_cfg(tiny_model_dir, data, tmp_path / "run")
    run_dir = sft.run(cfg)
    whole = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    whole_pattern = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    # checkpoint-8 is inside the budget schedule (steps 3..10): ranks have already been cut
    mid = json.loads((run_dir / "checkpoint-8" / "adalora_rank_pattern.json").read_text())
    assert mid and not all(all(v) for v in mid.values())
    shutil.rmtree(run_dir / "checkpoint-12")
    shutil.rmtree(run_dir / "adapter")
    run_dir = sft.run(cfg)  # same command: resumes from checkpoint-8
    resumed = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"] == whole_pattern
    assert resumed.keys() == whole.keys()
    for name, tensor in whole.items():
        assert resumed[name].shape == tensor.shape, name
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name


def test_adalora_load_best_model_at_end_saves_the_best_checkpoints_ranks(tmp_path, tiny_model_dir, records_file):
    """Symptom: load_best_model_at_end with AdaLoRA died with "size mismatch" after training finished."""
    from medtune.models import load_for_inference
    from medtune.train import sft

    data = records_file(20)
    cfg = _adalora_cfg(tiny_model_dir, data, tmp_path / "run", "data.val_fraction=0.2",
                       "train.load_best_model_at_end=true", "train.eval_accuracy=loglik",
                       "train.metric_for_best_model=eval_accuracy")
    run_dir = sft.run(cfg)
    state = json.loads((run_dir / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.name == "checkpoint-4"  # accuracy never beat step 4 (ties keep the first): not the last checkpoint
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    best_pattern = json.loads((best / "adalora_rank_pattern.json").read_text())
    assert saved == {k.replace(".default", ""): v for k, v in best_pattern.items()}
    model, _ = load_for_inference(cfg.model.name_or_path, str(run_dir / "adapter"), dtype="float32")
    kept = {k: sum(v) for k, v in saved.items()}
    ranks = adalora_ranks(model)
    assert sorted(ranks.values()) == sorted(kept.values())
