"""Training refuses nonsense and stops on divergence; preference prompts keep their inference tokens.

- A run refused for its settings or data fails in one line and leaves no run directory behind.
- A run whose loss or weights stop being finite stops at that step, names it and the last good
  checkpoint, and never saves the NaN model as its result.
- DPO and reward-model training see exactly the prompt tokens inference feeds the model, also
  where BPE would merge the prompt's last characters with the reply's first ones.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from medtune.cli import main
from medtune.train import common

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "medtune" / "configs"
QUICK = ["train.report_to=none", "train.logging_steps=1"]

# Single-turn plain prompts whose last character merges with the reply's first one in the tiny
# model's BPE (e.g. 发 + 热 → 发热); checked in _assert_merges_across_boundary, not assumed.
MERGING_PAIRS = [
    {"prompt": "患者发", "chosen": "热三天", "rejected": "冷"},
    {"prompt": "咳", "chosen": "嗽怎么办", "rejected": "多喝水"},
    {"prompt": "最可能的诊", "chosen": "断是感冒", "rejected": "不知道"},
    {"prompt": "问：发热", "chosen": "休息", "rejected": "跑步"},
]


def _train(recipe: str, *overrides: str, capsys: pytest.CaptureFixture | None = None) -> tuple[int, str]:
    rc = main(["train", str(CONFIGS / recipe), *QUICK, *overrides])
    return rc, capsys.readouterr().err if capsys else ""


def _error_line(err: str) -> str:
    # a progress bar may leave its last frame on the same terminal line, so search, not startswith
    lines = re.findall(r"medtune train: error: .*", err)
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def _write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


# ---- refused before the run directory exists -----------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "case", "expected"),
    [
        ("quickstart.yaml", "missing_model", r"model\.name_or_path: no such folder: .*nope"),
        ("quickstart.yaml", "unknown_template", r"data\.template: unknown template 'nope'; available: .*qa"),
        ("quickstart.yaml", "exam_rows_all_too_long",
         r"data\.train: .* leaves 0 training examples \(8 rows read, 8 skipped.*0 optimiser steps"),
        ("quickstart.yaml", "conversations_without_reply",
         r"data\.train: .* leaves 0 training examples \(2 rows read, 2 skipped, e\.g\. no assistant reply"),
        ("dpo_lora_tiny.yaml", "pairs_all_too_long",
         r"data\.train: .* leaves 0 training preference pairs \(4 valid pairs read, 4 skipped, "
         r"e\.g\. \d+ tokens > data\.max_length=4\)"),
        ("rl_grpo_exam_tiny.yaml", "missing_model", r"model\.name_or_path: no such folder: .*nope"),
        ("rl_grpo_exam_tiny.yaml", "unknown_template", r"data\.template: unknown template 'nope'; available: .*qa"),
        # the exam reward on conversations is ROUGE-L against the reply: without one, no usable prompt
        ("rl_grpo_exam_tiny.yaml", "conversations_without_reply",
         r"data\.train: .* leaves 0 training prompts \(2 rows read, 2 skipped, e\.g\. no reply to score "
         r"completions against \(rl\.reward=exam on conversations.*0 optimiser steps"),
        ("rl_grpo_exam_tiny.yaml", "reward_model_not_a_run",
         r"rl\.reward_model: .*no-rm: not a run directory \(no config\.yaml\)"),
        ("rl_grpo_exam_tiny.yaml", "reward_model_saw_other_prompts",
         r"data\.conversation_format: 'plain', but the reward model .*chat-rm was trained on 'chat' prompts"),
    ],
)
def test_refused_run_names_the_setting_and_leaves_no_run_dir(
        tmp_path, tiny_model_dir, records_file, capsys, recipe, case, expected):
    out = tmp_path / "run"
    data = records_file(8)
    overrides = [f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}"]
    if case == "missing_model":
        overrides += [f"model.name_or_path={tmp_path / 'nope'}", f"data.train={data}"]
    elif case == "unknown_template":
        overrides += ["data.template=nope", f"data.train={data}"]
    elif case == "exam_rows_all_too_long":
        overrides += ["data.max_length=8", f"data.train={data}"]
    elif case == "conversations_without_reply":
        # a PromptCBLUE test split (no targets) read as training data: every label would be masked
        # and the loss 0/0 = NaN
        from medtune.data.promptcblue import PROMPTCBLUE_TASKS

        rows = [{"sample_id": str(i), "task_dataset": next(iter(PROMPTCBLUE_TASKS)), "input": "发热三天？答：",
                 "target": ""} for i in range(2)]
        split = tmp_path / "test.json"
        split.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        overrides += [f"data.train={split}"]
    elif case == "reward_model_saw_other_prompts":
        rm_dir = tmp_path / "chat-rm"
        (rm_dir / "adapter").mkdir(parents=True)
        (rm_dir / "config.yaml").write_text("stage: rm\ndata:\n  conversation_format: chat\n", encoding="utf-8")
        prompts = _write_pairs(tmp_path / "prompts.jsonl", [
            {"id": "1", "messages": [{"role": "user", "content": "发热三天怎么办？"}]}])
        overrides += [f"data.train={prompts}", "rl.reward=model", f"rl.reward_model={rm_dir}"]
    elif case == "reward_model_not_a_run":
        (tmp_path / "no-rm").mkdir()
        overrides += [f"data.train={data}", "rl.reward=model", f"rl.reward_model={tmp_path / 'no-rm'}"]
    else:
        pairs = _write_pairs(tmp_path / "pairs.jsonl", MERGING_PAIRS)
        overrides += [f"data.train={pairs}", "data.max_length=4", "data.val_fraction=0", "data.max_samples=null"]
    rc, err = _train(recipe, *overrides, capsys=capsys)
    assert rc == 2
    line = _error_line(err)
    assert re.search(expected, line), line
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_promptcblue_line_without_target_is_refused_in_command_line_terms(tmp_path, tiny_model_dir, capsys):
    # one labelled line and one without a target: not a test split (those have none at all)
    from medtune.data.promptcblue import PROMPTCBLUE_TASKS

    task = next(iter(PROMPTCBLUE_TASKS))
    rows = [{"sample_id": "a", "task_dataset": task, "input": "发热三天？答：", "target": "感冒"},
            {"sample_id": "b", "task_dataset": task, "input": "咳嗽？答：", "target": ""}]
    data = tmp_path / "dev.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    rc, err = _train("quickstart.yaml", f"model.name_or_path={tiny_model_dir}", f"data.train={data}",
                     f"train.output_dir={out}", capsys=capsys)
    assert rc == 2
    assert _error_line(err) == (
        f"medtune train: error: {data}, row 2, field 'target': empty target while other lines have one: a line "
        "without a target can be predicted, not trained on; fill it in, or leave such lines out "
        "(data.on_invalid=skip in train, --on-invalid skip in convert)"
    )
    assert "require_target" not in err and not out.exists()


# ---- divergence -------------------------------------------------------------------------------------


def _finite_checkpoint(checkpoint: Path) -> bool:
    weights = load_file(checkpoint / "adapter_model.safetensors")
    return bool(weights) and all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_diverging_learning_rate_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, records_file, capsys):
    out = tmp_path / "run"
    rc, err = _train("quickstart.yaml", f"model.name_or_path={tiny_model_dir}", f"data.train={records_file(8)}",
                     f"train.output_dir={out}", "train.learning_rate=1e30", "train.max_steps=6",
                     "train.save_steps=1", "train.save_total_limit=null", capsys=capsys)
    assert rc == 2
    line = _error_line(err)
    step = int(re.search(r"training diverged at step (\d+):", line).group(1))
    assert 1 < step < 6 and ("became nan" in line or "became inf" in line)
    assert "train.learning_rate (now 1e+30)" in line
    # the NaN model is not the run's result, and no checkpoint of the diverged step was written
    assert not (out / "adapter").exists() and not (out / "train_results.json").exists()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert checkpoints == list(range(1, step)), checkpoints
    last = out / f"checkpoint-{step - 1}"
    assert f"the last good checkpoint, {last}, is kept" in line
    assert all(_finite_checkpoint(out / f"checkpoint-{n}") for n in checkpoints)
    # the log shows what the guard saw instead of the Trainer's NaN-hiding running mean
    losses = [json.loads(x).get("loss") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(loss is None or math.isfinite(loss) for loss in losses[: step - 1])


@pytest.mark.slow
def test_diverging_run_before_its_first_checkpoint_leaves_no_run_dir(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "docs.txt"
    text.write_text("患者发热三天，咳嗽，最可能的诊断是感冒。\n" * 40, encoding="utf-8")
    out = tmp_path / "run"
    rc, err = _train("pt_lora_tiny.yaml", f"model.name_or_path={tiny_model_dir}", f"data.train={text}",
                     f"train.output_dir={out}", "pt.block_size=32", "data.max_samples=null",
                     "train.learning_rate=1e30", "train.max_steps=6", "train.save_steps=50", capsys=capsys)
    assert rc == 2
    line = _error_line(err)
    assert "training diverged at step" in line and "no checkpoint had been saved yet (train.save_steps=50)" in line
    assert not out.exists()


class _PoisonWeight(TrainerCallback):
    """Writes NaN into one trainable weight right after the optimiser step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: D102
        if state.global_step + 1 == self.at:  # global_step counts this step only after the hook
            weight = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
            with torch.no_grad():
                weight[0, 0] = float("nan")


@pytest.mark.slow
def test_nan_weight_in_dpo_stops_before_it_is_checkpointed(tmp_path, tiny_model_dir, capsys, monkeypatch):
    standard = common.standard_callbacks
    monkeypatch.setattr(common, "standard_callbacks", lambda *a, **k: [_PoisonWeight(at=2), *standard(*a, **k)])
    out = tmp_path / "run"
    pairs = _write_pairs(tmp_path / "pairs.jsonl", MERGING_PAIRS)
    rc, err = _train("dpo_lora_tiny.yaml", f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}",
                     f"train.output_dir={out}", "data.max_samples=null", "data.val_fraction=0",
                     "train.batch_size=2", "train.max_steps=4", "train.save_steps=1", capsys=capsys)
    assert rc == 2
    line = _error_line(err)
    assert "training diverged at step 2: the trainable weights became nan" in line
    assert f"the last good checkpoint, {out / 'checkpoint-1'}, is kept" in line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert _finite_checkpoint(out / "checkpoint-1") and not (out / "adapter").exists()


def test_guard_stops_on_a_non_finite_logged_loss(tmp_path):
    guard = common.NonFiniteGuard()
    args = SimpleNamespace(output_dir=str(tmp_path), save_steps=50, learning_rate=2e-4, max_grad_norm=1.0,
                           fp16=False)
    guard.on_log(args, SimpleNamespace(global_step=3), None, logs={"loss": 1.5})  # finite: no-op
    with pytest.raises(common.TrainingDiverged, match=r"step 3: the training loss became nan.*no checkpoint"):
        guard.on_log(args, SimpleNamespace(global_step=3), None, logs={"loss": float("nan")})
    weights = torch.nn.Linear(2, 2)
    with torch.no_grad():
        weights.bias[1] = float("inf")
    with pytest.raises(common.TrainingDiverged, match=r"step 4: the trainable weights became inf \(1 of 2 tensors, "
                                                      r"first bias\)"):
        guard.on_step_end(args, SimpleNamespace(global_step=4), None, model=weights)


def test_trainer_logs_do_not_hide_nan_losses(tmp_path):
    from medtune.config import load_config

    cfg = load_config(None, ["model.name_or_path=m", "data.train=t.jsonl"])
    assert common.training_arguments(cfg, tmp_path, has_val=False)["logging_nan_inf_filter"] is False
    assert any(isinstance(c, common.NonFiniteGuard) for c in common.standard_callbacks(cfg, tmp_path, False))


# ---- preference prompts: the tokens inference feeds -------------------------------------------------


def _inference_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """What ``predict`` feeds for this prompt: conversation_prompt's text, tokenised on its own."""
    from medtune.data.conversations import conversation_prompt

    text, special = conversation_prompt([{"role": "user", "content": prompt}], "plain", tokenizer)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _assert_merges_across_boundary(tokenizer, pairs: list[dict]) -> None:
    """At least one pair where tokenising prompt + reply as one string changes the prompt's tokens."""
    merged = [p for p in pairs
              if tokenizer(p["prompt"] + p["chosen"])["input_ids"][: len(_inference_prompt_ids(tokenizer, p["prompt"]))]
              != _inference_prompt_ids(tokenizer, p["prompt"])]
    assert merged, "no pair merges across the boundary: the test would prove nothing"


class _RecordTrainingBatch(TrainerCallback):
    """Collates the whole training set with the trainer's own collator when training starts."""

    batch: dict | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):  # noqa: D102
        dataset = train_dataloader.dataset
        type(self).batch = train_dataloader.collate_fn([dataset[i] for i in range(len(dataset))])


def _train_recording(monkeypatch, recipe: str, tiny_model_dir, tmp_path, capsys) -> tuple[dict, dict]:
    standard = common.standard_callbacks
    monkeypatch.setattr(common, "standard_callbacks", lambda *a, **k: [*standard(*a, **k), _RecordTrainingBatch()])
    pairs = _write_pairs(tmp_path / "pairs.jsonl", MERGING_PAIRS)
    out = tmp_path / "run"
    rc, err = _train(recipe, f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}", f"train.output_dir={out}",
                     "data.max_samples=null", "data.val_fraction=0", "train.batch_size=2", "train.max_steps=2",
                     capsys=capsys)
    assert rc == 0, err[-2000:]
    results = json.loads((out / "train_results.json").read_text())
    return _RecordTrainingBatch.batch, results


@pytest.mark.slow
def test_dpo_prompt_tokens_match_inference_when_bpe_merges_across_boundary(
        tmp_path, tiny_model_dir, tiny_tokenizer, capsys, monkeypatch):
    _assert_merges_across_boundary(tiny_tokenizer, MERGING_PAIRS)
    batch, results = _train_recording(monkeypatch, "dpo_lora_tiny.yaml", tiny_model_dir, tmp_path, capsys)
    assert results["global_step"] == 2  # and it trains
    n = len(MERGING_PAIRS)
    assert batch["input_ids"].shape[0] == 2 * n  # chosen rows, then rejected rows
    for i, pair in enumerate(MERGING_PAIRS):
        for row, reply in ((i, pair["chosen"]), (n + i, pair["rejected"])):
            real = batch["attention_mask"][row].bool()
            tokens = batch["input_ids"][row][real].tolist()
            is_reply = batch["completion_mask"][row][real].bool().tolist()
            prompt_part = [t for t, r in zip(tokens, is_reply, strict=True) if not r]
            reply_part = [t for t, r in zip(tokens, is_reply, strict=True) if r]
            assert prompt_part == _inference_prompt_ids(tiny_tokenizer, pair["prompt"]), pair
            assert reply_part == tiny_tokenizer(reply, add_special_tokens=False)["input_ids"] + [
                tiny_tokenizer.eos_token_id]


@pytest.mark.slow
def test_rm_prompt_tokens_match_inference_when_bpe_merges_across_boundary(
        tmp_path, tiny_model_dir, tiny_tokenizer, capsys, monkeypatch):
    _assert_merges_across_boundary(tiny_tokenizer, MERGING_PAIRS)
    batch, results = _train_recording(monkeypatch, "rm_lora_tiny.yaml", tiny_model_dir, tmp_path, capsys)
    assert results["global_step"] == 2
    n = len(MERGING_PAIRS)
    for i, pair in enumerate(MERGING_PAIRS):
        for row, reply in ((i, pair["chosen"]), (n + i, pair["rejected"])):
            tokens = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            expected = _inference_prompt_ids(tiny_tokenizer, pair["prompt"])
            assert tokens[: len(expected)] == expected, pair
            assert tokens[len(expected):] == tiny_tokenizer(reply, add_special_tokens=False)["input_ids"] + [
                tiny_tokenizer.eos_token_id]
