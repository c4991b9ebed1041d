"""Trainer settings the workflows use, checked by what the run really did.

- ``train.warmup_steps``: the learning rate rises linearly over exactly that many steps.
- ``train.eval_steps``: evaluation every K optimiser steps.
- ``train.eval_accuracy``: validation answer accuracy logged beside ``eval_loss`` at each
  evaluation, with the same values ``medtune evaluate`` (loglik) and the chat helper (generate) give.
- ``train.load_best_model_at_end`` + ``train.metric_for_best_model``: the saved adapter is the best
  checkpoint's.
- ``medtune train --overwrite``: starts over in an existing run directory.
- The trainable parameter count is printed at the start of every run.
- A wrong ``adapter.target_modules`` fails in one line naming the setting and the layers there are.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from medtune.cli import main
from medtune.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "medtune" / "configs"
QUICK = ["train.report_to=none", "train.logging_steps=1"]
LR = 5e-3  # quickstart.yaml's learning rate


def _train(*overrides: str) -> int:
    return main(["train", str(CONFIGS / "quickstart.yaml"), *QUICK, *overrides])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _error_line(err: str) -> str:
    lines = re.findall(r"medtune train: error: .*", err)
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# ---- one run: warm-up, step-wise evaluation, accuracy as the best-checkpoint metric ---------------

SCRIPTED_ACCURACY = [0.25, 0.75, 0.5, 0.25]  # evaluations at steps 2, 4, 6, 8: the best is step 4


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, tiny_model_dir, sample_records):
    """8 steps, warm-up 4, evaluation and checkpoint every 2 steps, best by eval_accuracy.

    The accuracy is scripted (its real values are checked in the tests below), so which checkpoint
    is best is known in advance; the real eval_loss falls all along, so choosing by loss would
    load the last checkpoint instead.
    """
    from medtune.io import write_jsonl
    from medtune.train.answer_accuracy import AnswerAccuracyCallback

    tmp = tmp_path_factory.mktemp("best")
    write_jsonl(tmp / "train.jsonl", [r.to_dict() for r in sample_records[:16]])
    write_jsonl(tmp / "val.jsonl", [r.to_dict() for r in sample_records[16:24]])
    scripted = iter(SCRIPTED_ACCURACY)
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(AnswerAccuracyCallback, "score", lambda self, model: next(scripted))
        rc = _train(f"model.name_or_path={tiny_model_dir}", f"data.train={tmp / 'train.jsonl'}",
                    f"data.validation={tmp / 'val.jsonl'}", f"train.output_dir={tmp / 'run'}",
                    "train.max_steps=8", "train.batch_size=4", "train.warmup_steps=4", "train.eval_steps=2",
                    "train.save_steps=2", "train.save_total_limit=null", "train.eval_accuracy=loglik",
                    "train.load_best_model_at_end=true", "train.metric_for_best_model=eval_accuracy")
    assert rc == 0
    return SimpleNamespace(run_dir=tmp / "run", stdout=stdout.getvalue(), model_dir=tiny_model_dir)


@pytest.mark.slow
def test_warmup_steps_raise_the_learning_rate_linearly_over_that_many_steps(best_run):
    lrs = {r["step"]: r["learning_rate"] for r in _rows(best_run.run_dir) if "learning_rate" in r}
    # the rate used for step s: (s-1)/4 of the peak while warming up, then linear decay to 0 at step 9
    expected = [0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25]
    assert [lrs[s] for s in range(1, 9)] == pytest.approx([LR * f for f in expected])


@pytest.mark.slow
def test_eval_steps_evaluate_every_k_steps_with_accuracy_beside_the_loss(best_run):
    evals = [r for r in _rows(best_run.run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]  # per epoch (16 examples / 4) would be 4, 8
    assert [r["eval_accuracy"] for r in evals] == SCRIPTED_ACCURACY  # in the same log line
    state = json.loads((best_run.run_dir / "trainer_state.json").read_text())
    history = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["eval_accuracy"] for e in history] == SCRIPTED_ACCURACY


@pytest.mark.slow
def test_load_best_model_at_end_saves_the_best_checkpoint_by_eval_accuracy(best_run):
    run_dir = best_run.run_dir
    evals = [r for r in _rows(run_dir) if "eval_loss" in r]
    by_loss = min(evals, key=lambda r: r["eval_loss"])["step"]
    assert by_loss != 4  # so the metric really decides
    assert _same_weights(run_dir / "adapter", run_dir / "checkpoint-4")
    assert not _same_weights(run_dir / "adapter", run_dir / "checkpoint-8")
    results = json.loads((run_dir / "train_results.json").read_text())
    assert Path(results["best_model_checkpoint"]).name == "checkpoint-4"
    assert results["best_metric"] == 0.75 and results["eval_accuracy"] == 0.75 and results["step"] == 4
    assert results["global_step"] == 8
    # and the console says which weights were saved (they are not the last step's)
    assert "best checkpoint: checkpoint-4 (eval_accuracy 0.75); the saved weights are its" in best_run.stdout


@pytest.mark.slow
def test_trainable_parameters_are_printed_at_the_start(best_run):
    line = next(x for x in best_run.stdout.splitlines() if x.startswith("trainable parameters:"))
    trainable = sum(t.numel() for t in load_file(best_run.run_dir / "adapter" / "adapter_model.safetensors").values())
    base = sum(t.numel() for t in load_file(best_run.model_dir / "model.safetensors").values())
    total = base + trainable
    assert line == f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"


def test_trainable_line_for_full_fine_tuning():
    from medtune.train.common import format_trainable

    assert format_trainable(1_040_512, 1_040_512) == "trainable parameters: 1,040,512 of 1,040,512 (100.0000%)"


# ---- the accuracy itself ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from medtune.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir), None, dtype="float32")
    return model, tokenizer


@pytest.mark.slow
def test_loglik_accuracy_equals_medtune_evaluate_loglik(tmp_path, tiny_lm, sample_records):
    from medtune.evaluation.evaluate import evaluate_loglik
    from medtune.inference.hf import HFBackend
    from medtune.templates import get_template
    from medtune.train.answer_accuracy import AnswerAccuracyCallback

    model, tokenizer = tiny_lm
    records, template = sample_records[:12], get_template("qa")
    model.train()
    callback = AnswerAccuracyCallback(records, template, tokenizer, "loglik", batch_size=5)
    accuracy = callback.score(model)
    assert model.training  # put back in the mode training left it in
    model.eval()
    reference = evaluate_loglik(records, HFBackend(model, tokenizer), tokenizer, template, tmp_path)["accuracy"]
    assert accuracy == pytest.approx(reference / 100)  # evaluate reports percent; training logs a fraction
    assert 0 < accuracy < 1  # a value that can tell two scorers apart


@pytest.mark.slow
def test_generated_answers_match_the_chat_helper_question_by_question(tiny_lm, sample_records):
    from medtune.inference.base import GenerationParams
    from medtune.inference.chat import answer_exam
    from medtune.inference.hf import HFBackend
    from medtune.templates import get_template
    from medtune.train.answer_accuracy import AnswerAccuracyCallback

    model, tokenizer = tiny_lm
    records, template = sample_records[:4], get_template("qa")
    callback = AnswerAccuracyCallback(records, template, tokenizer, "generate", batch_size=4, max_new_tokens=6)
    letters = callback._generated_letters(model)
    backend, params = HFBackend(model, tokenizer), GenerationParams(max_new_tokens=6)
    one_by_one = [answer_exam(backend, template, r.question, r.options, params).letters for r in records]
    assert letters == one_by_one
    assert callback.score(model) == sum(a == r.answer for a, r in zip(one_by_one, records, strict=True)) / len(records)


def test_generated_outputs_are_read_by_the_robust_reader(monkeypatch, tiny_tokenizer, sample_records):
    from medtune.inference.hf import HFBackend
    from medtune.templates import get_template
    from medtune.train.answer_accuracy import AnswerAccuracyCallback

    records = [r for r in sample_records if len(r.answer) == 1][:4]
    wrong = next(k for k in records[2].options if k != records[2].answer)
    outputs = [f"答案：{records[0].answer}\n理由：……",  # the template's format
               f"我认为正确答案是{records[1].answer}。",  # free text the robust reader still reads
               f"答案：{wrong}",  # wrong
               "不知道"]  # no answer
    monkeypatch.setattr(HFBackend, "generate", lambda self, prompts, params, add_special_tokens=True: outputs)
    callback = AnswerAccuracyCallback(records, get_template("qa"), tiny_tokenizer, "generate")
    assert callback.score(torch.nn.Linear(2, 2)) == 0.5


def test_accuracy_goes_into_the_logged_and_returned_metrics():
    from medtune.train.answer_accuracy import AnswerAccuracyCallback

    callback = AnswerAccuracyCallback.__new__(AnswerAccuracyCallback)
    callback._last = None
    callback.score = lambda model: 0.6
    state = SimpleNamespace(global_step=7, log_history=[{"eval_loss": 1.5, "step": 7}])
    logs = {"eval_loss": 1.5}
    callback.on_log(None, state, None, logs=logs, model=object())
    assert logs["eval_accuracy"] == 0.6 and state.log_history[-1]["eval_accuracy"] == 0.6
    copy = {"eval_loss": 1.5}  # a trainer that returned a copy of what it logged
    callback.on_evaluate(None, state, None, metrics=copy)
    assert copy["eval_accuracy"] == 0.6
    train_logs = {"loss": 2.0}
    callback.on_log(None, state, None, logs=train_logs, model=object())
    assert "eval_accuracy" not in train_logs  # training-loss lines are not scored


def test_early_stopping_follows_the_best_model_metric():
    from medtune.train.common import EarlyStopOnMetric

    stop = EarlyStopOnMetric(patience=2, metric="eval_accuracy", greater_is_better=True)
    control = SimpleNamespace(should_training_stop=False)
    for accuracy, stopped in [(0.3, False), (0.5, False), (0.4, False), (0.5, True)]:
        stop.on_evaluate(None, None, control, metrics={"eval_loss": 1.0, "eval_accuracy": accuracy})
        assert control.should_training_stop is stopped


def test_a_best_model_metric_the_stage_does_not_log_is_named():
    from medtune.train.common import RequireEvalMetric

    check = RequireEvalMetric("eval_rewards/margin")
    check.on_evaluate(None, None, None, metrics={"before_loss": 2.0})  # pt's "before" pass: not checked
    with pytest.raises(ConfigError, match=r"^train\.metric_for_best_model: 'eval_rewards/margin' is not among "
                                          r"this stage's evaluation metrics \['eval_loss', 'eval_rewards/margins'\]$"):
        check.on_evaluate(None, None, None, metrics={"eval_loss": 1.0, "eval_rewards/margins": 0.2,
                                                      "eval_runtime": 3.0})


@pytest.mark.slow
def test_eval_accuracy_on_conversation_data_is_refused(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "messages": [
        {"role": "user", "content": "发热三天怎么办？"}, {"role": "assistant", "content": "多喝水，休息。"}]},
        ensure_ascii=False) + "\n" for i in range(6)), encoding="utf-8")
    out = tmp_path / "run"
    rc = _train(f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={out}",
                "data.val_fraction=0.3", "train.eval_accuracy=loglik")
    assert rc == 2
    assert "train.eval_accuracy: scores answers to multiple-choice questions" in _error_line(capsys.readouterr().err)
    assert not out.exists()


# ---- warm-up longer than the run ------------------------------------------------------------------


def test_warmup_longer_than_the_run_is_refused():
    from medtune.train.common import planned_steps

    cfg = load_config(None, ["model.name_or_path=m", "data.train=t.jsonl", "train.warmup_steps=10",
                             "train.batch_size=4", "train.epochs=2"])
    assert planned_steps(cfg, 24, "examples", [("rows read", 24)]) == 12  # 12 steps > 10: fine
    with pytest.raises(ConfigError, match=r"^train\.warmup_steps: 10 warm-up steps, but the run makes 6 optimiser "
                                          r"steps, so the learning rate would never reach"):
        planned_steps(cfg, 12, "examples", [("rows read", 12)])


# ---- --overwrite ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_overwrite_starts_over_in_an_existing_run_dir(tmp_path, tiny_model_dir, records_file, capsys):
    out = tmp_path / "run"
    base = [f"model.name_or_path={tiny_model_dir}", f"data.train={records_file(8)}", f"train.output_dir={out}",
            "train.save_steps=1", "train.save_total_limit=null"]
    assert _train(*base, "train.max_steps=3") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    capsys.readouterr()

    # a different config in the same directory is refused without --overwrite ...
    assert _train(*base, "train.max_steps=2", "train.learning_rate=1e-3") == 2
    assert "holds a run with a different config" in _error_line(capsys.readouterr().err)

    # ... and replaces the old run with it: nothing of the old run is resumed or kept
    assert main(["train", str(CONFIGS / "quickstart.yaml"), *QUICK, *base, "train.max_steps=2",
                 "train.learning_rate=1e-3", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert load_config(out / "config.yaml").train.learning_rate == 1e-3
    steps = [r["step"] for r in _rows(out) if "loss" in r]
    assert steps == [1, 2]  # the new run's log only, from its first step
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(tmp_path, tiny_model_dir, records_file, capsys):
    out = tmp_path / "run"
    base = [f"model.name_or_path={tiny_model_dir}", f"data.train={records_file(8)}", f"train.output_dir={out}"]
    assert _train(*base, "train.max_steps=1") == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(["train", str(CONFIGS / "quickstart.yaml"), *QUICK, *base, "data.template=nope",
                 "--overwrite"]) == 2
    assert "data.template: unknown template 'nope'" in _error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == before


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine", encoding="utf-8")
    rc = main(["train", str(CONFIGS / "quickstart.yaml"), "model.name_or_path=some/model", "data.train=t.jsonl",
               f"train.output_dir={folder}", "--overwrite"])
    assert rc == 2
    assert "is not a medtune run directory (no run config.yaml), so --overwrite will not delete it" in _error_line(
        capsys.readouterr().err)
    assert (folder / "keep.txt").read_text(encoding="utf-8") == "mine"

    from medtune.train.common import RunDirError, check_overwritable

    monkeypatch.chdir(folder)
    with pytest.raises(RunDirError, match="is the working directory or holds it"):
        check_overwritable(tmp_path)


# ---- adapter.target_modules -----------------------------------------------------------------------


@pytest.mark.slow
def test_unknown_target_module_is_one_line_naming_the_setting(tmp_path, tiny_model_dir, records_file, capsys):
    out = tmp_path / "run"
    rc = _train(f"model.name_or_path={tiny_model_dir}", f"data.train={records_file(4)}", f"train.output_dir={out}",
                "adapter.target_modules=[q_proj,qproj]", "train.max_steps=1")
    assert rc == 2
    assert _error_line(capsys.readouterr().err) == (
        "medtune train: error: adapter.target_modules: qproj not found in the model; model_type llama has the "
        "linear layers down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or use all-linear)")
    assert not out.exists()


def test_target_module_check_accepts_what_peft_accepts(tiny_lm):
    from medtune.adapters import check_target_modules, peft_config_for
    from medtune.config import AdapterConfig

    model, _ = tiny_lm
    for targets in (None, "all-linear", ["q_proj", "v_proj"], r".*\.self_attn\.(q|v)_proj", ["self_attn.o_proj"]):
        spec = AdapterConfig(target_modules=targets)
        check_target_modules(model, peft_config_for(spec, "llama"), spec)
    spec = AdapterConfig(target_modules=r".*\.attention\.wq")
    with pytest.raises(ConfigError, match=r"^adapter\.target_modules: .*attention.* not found in the model; "
                                          r"model_type llama has the linear layers down_proj, gate_proj"):
        check_target_modules(model, peft_config_for(spec, "llama"), spec)
    # defaults from the table of another architecture: refused only because none of them exists
    spec = AdapterConfig()
    with pytest.raises(ConfigError, match=r"not found in the model \(the default for model_type llama\)"):
        check_target_modules(model, peft_config_for(spec, "internlm2"), spec)
