"""``medtune quickstart --tokenizer qwen2.5``: real Chinese token counts and truncation, no download."""

from __future__ import annotations

import pytest

from medtune.quickstart import format_token_summary, token_summary


@pytest.fixture(scope="module")
def qwen(qwen25_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(qwen25_tokenizer_dir)


def test_token_summary_counts_as_training_tokenises(qwen, sample_records):
    from medtune.templates import get_template

    records = sample_records[:6]
    summary = token_summary(records, get_template("qa"), qwen, max_length=128)
    # qa prompts of the first six sample questions in Qwen2.5 tokens: 63, 58, 80, 65, 67, 57
    assert (summary["questions"], summary["vocabulary"], summary["prompt_mean"], summary["prompt_max"]) == (
        6, 151_665, 65.0, 80)
    assert summary["example_max"] == 345 and summary["example_mean"] == pytest.approx(214.83, abs=0.01)
    prompt_chars = sum(len(get_template("qa").render_prompt(r)) for r in records)
    assert summary["chars_per_token"] == pytest.approx(prompt_chars / 390)
    # every one of them is longer than the quickstart's 128 tokens: the explanation is shortened
    assert (summary["over"], summary["truncated"], summary["dropped"]) == (6, 6, 0)
    roomy = token_summary(records, get_template("qa"), qwen, max_length=512)
    assert (roomy["over"], roomy["truncated"], roomy["dropped"]) == (0, 0, 0)
    assert format_token_summary(summary, "qwen2.5") == (
        "      qwen2.5 tokenizer (151,665 tokens): a question with its options is 65 tokens on average, 80 at most "
        f"({prompt_chars / 390:.2f} characters per token); with answer and explanation 215 on average, 345 at most\n"
        "      6 of 6 training questions exceed data.max_length=128: 6 with the explanation shortened, 0 dropped")


def test_cli_passes_the_tokenizer_to_the_quickstart(monkeypatch):
    import medtune.quickstart
    from medtune.cli import main

    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(medtune.quickstart, "run_quickstart", fake)
    with pytest.raises(SystemExit):
        main(["quickstart", "--tokenizer", "qwen2.5", "--out", "unused"])
    assert seen["tokenizer"] == "qwen2.5"
    with pytest.raises(SystemExit) as exc:
        main(["quickstart", "--tokenizer", "qwen9"])
    assert exc.value.code == 2  # argparse: not one of ours, qwen2.5, deepseek


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_quickstart_with_a_real_tokenizer_prints_its_token_counts(tmp_path, monkeypatch, capsys, qwen25_tokenizer_dir):
    import medtune.quickstart

    def stop(cfg):
        raise _Stop(cfg.model.name_or_path)

    monkeypatch.setattr(medtune.quickstart.sft, "run", stop)  # the summary is printed before training
    with pytest.raises(_Stop) as stopped:
        medtune.quickstart.run_quickstart(tmp_path, tokenizer=str(qwen25_tokenizer_dir))
    assert stopped.value.args[0] == str(tmp_path / f"tiny-model-{qwen25_tokenizer_dir.name}")
    out = capsys.readouterr().out
    assert f"building the tiny model (random weights, the real {qwen25_tokenizer_dir} tokenizer)" in out
    assert "tokenizer (151,665 tokens): a question with its options is " in out
    assert "of 48 training questions exceed data.max_length=128: " in out


def test_quickstart_rerun_over_a_run_with_other_settings_is_refused_then_overwritten(tmp_path, monkeypatch):
    """A quickstart folder left by an older medtune (other defaults): refused with the way out, then --overwrite."""
    import yaml

    import medtune.quickstart
    from medtune.cli import main
    from medtune.config import load_config
    from medtune.quickstart import config_path
    from medtune.train.common import RunDirError, _overwrite_requested

    old = load_config(config_path("quickstart"), [f"train.output_dir={tmp_path / 'sft-lora'}", "adapter.r=4"])
    (tmp_path / "sft-lora").mkdir()
    (tmp_path / "sft-lora" / "config.yaml").write_text(yaml.safe_dump(old.to_dict()), encoding="utf-8")
    with pytest.raises(RunDirError, match=r"different config \(.*adapter\.r: 4 → 8.*\).*"
                                          rf"rerun with: medtune quickstart --out {tmp_path} --overwrite"):
        medtune.quickstart.run_quickstart(tmp_path)

    def stop(cfg):  # training would start over: the old run is to be replaced, not compared
        raise _Stop(_overwrite_requested(tmp_path / "sft-lora"))

    monkeypatch.setattr(medtune.quickstart.sft, "run", stop)
    with pytest.raises(_Stop) as stopped:
        medtune.quickstart.run_quickstart(tmp_path, overwrite=True)
    assert stopped.value.args[0] is True
    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(medtune.quickstart, "run_quickstart", fake)
    for argv, wanted in ((["quickstart", "--out", "unused"], False), (["quickstart", "--overwrite"], True)):
        with pytest.raises(SystemExit):
            main(argv)
        assert seen["overwrite"] is wanted


def test_quickstart_overwrite_reaches_predictions_made_with_other_settings(tmp_path, monkeypatch):
    """Predictions left with other settings are refused on a rerun; --overwrite predicts them again."""
    import json
    from types import SimpleNamespace

    import medtune.quickstart
    from medtune.inference.predict import PredictionFileError
    from medtune.inference.predict import predict as real_predict
    from medtune.templates import get_template

    # training is not what this checks: the "tuned" model is the tiny base model itself
    monkeypatch.setattr(medtune.quickstart.sft, "run", lambda cfg: tmp_path / "sft-lora")
    monkeypatch.setattr(medtune.quickstart, "resolve_run", lambda run_dir: SimpleNamespace(
        model_path=str(tmp_path / "tiny-model"), adapter_path=None, merge_first=[], template=get_template("qa")))

    def first_predict_only(*args, **kwargs):
        real_predict(*args, **kwargs)
        raise _Stop(kwargs.get("overwrite"))

    monkeypatch.setattr(medtune.quickstart, "predict", first_predict_only)
    with pytest.raises(_Stop):
        medtune.quickstart.run_quickstart(tmp_path, max_new_tokens=2)  # the older settings
    meta = tmp_path / "predictions" / "base-seen.meta.json"
    assert json.loads(meta.read_text())["generation"]["max_new_tokens"] == 2
    with pytest.raises(PredictionFileError, match="max_new_tokens"):
        medtune.quickstart.run_quickstart(tmp_path, max_new_tokens=3)
    with pytest.raises(_Stop) as stopped:
        medtune.quickstart.run_quickstart(tmp_path, max_new_tokens=3, overwrite=True)
    assert stopped.value.args[0] is True
    assert json.loads(meta.read_text())["generation"]["max_new_tokens"] == 3
