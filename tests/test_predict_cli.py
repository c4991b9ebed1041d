"""``medtune predict`` (and the other commands that open a run) with a real tiny model and run.

Regression tests for silent wrong results: a rerun into an existing ``--out`` with another
model kept the old outputs ("0 predicted, N already there"); a run directory's config could turn
on ``trust_remote_code``; data with repeated ids crashed with a traceback.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from medtune.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, sample_records):
    from medtune.config import load_config
    from medtune.io import write_jsonl
    from medtune.train.sft import run

    work = tmp_path_factory.mktemp("predict-cli")
    data = work / "train.jsonl"
    write_jsonl(data, [r.to_dict() for r in sample_records[:4]])
    return run(load_config("src/medtune/configs/quickstart.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={work / 'run'}",
        "train.max_steps=2", "train.learning_rate=5e-2", "train.report_to=none"]))


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rerun_with_the_tuned_model_into_the_base_models_file_is_refused(
        lora_run, tiny_model_dir, records_file, tmp_path, capsys):
    data, out = records_file(4), tmp_path / "pred.jsonl"
    base = ["predict", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    assert main(base) == 0
    before = out.read_bytes()
    capsys.readouterr()
    tuned = ["predict", "--run", str(lora_run), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    assert main(tuned) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medtune predict: error: ")
    assert "was produced by something else" in err and "adapters:" in err and "--overwrite" in err
    assert out.read_bytes() == before
    # the same command again is a no-op resume; --overwrite replaces every line
    assert main(base) == 0 and "0 predicted, 4 already there" in capsys.readouterr().out
    assert main([*tuned, "--overwrite"]) == 0
    meta = json.loads((tmp_path / "pred.meta.json").read_text())
    assert meta["run"]["global_step"] == 2 and len(meta["adapters"]) == 1 and meta["adapters"][0]["sha256"]
    assert {row["source"] for row in _rows(out)} == {meta["key"]}
    assert meta["template"]["name"] == "qa" and meta["generation"]["max_new_tokens"] == 4


def test_duplicate_ids_are_one_line_and_dedupe_predicts_each_once(tiny_model_dir, records_file, tmp_path, capsys):
    data = records_file(3)
    lines = data.read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join([*lines, lines[0], lines[0]]) + "\n", encoding="utf-8")  # oversampled row
    out = tmp_path / "p.jsonl"
    cmd = ["predict", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "2"]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}, row 4, field 'id': duplicate id 'val_sample-00001' (first at line 1)" in err
    assert main([*cmd, "--dedupe"]) == 0
    assert "2 repeated rows left out" in capsys.readouterr().out
    assert sorted(row["id"] for row in _rows(out)) == ["val_sample-00001", "val_sample-00002", "val_sample-00003"]
    changed = json.loads(lines[0])
    changed["question"] += "？"
    data.write_text("\n".join([*lines, json.dumps(changed, ensure_ascii=False)]) + "\n", encoding="utf-8")
    assert main([*cmd, "--dedupe", "--overwrite"]) == 2
    assert "record 4 has id 'val_sample-00001' like an earlier record but different content" in capsys.readouterr().err


def _model_with_remote_code(tiny_model_dir, where, marker):
    """A copy of the tiny model whose config asks for its own Python code (which leaves a marker)."""
    model = where / "custom-code-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    pass\n", encoding="utf-8")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("command", ["predict", "chat", "serve", "webui", "evaluate", "export"])
def test_a_run_directory_cannot_turn_on_remote_code(lora_run, tiny_model_dir, records_file, tmp_path, capsys,
                                                    command):
    marker = tmp_path / "the-model-code-ran"
    model = _model_with_remote_code(tiny_model_dir, tmp_path, marker)
    shared = tmp_path / "shared-run"  # a run someone shared, whose config asks for remote code
    shutil.copytree(lora_run, shared)
    cfg = yaml.safe_load((shared / "config.yaml").read_text())
    cfg["model"].update(name_or_path=str(model), trust_remote_code=True)
    (shared / "config.yaml").write_text(yaml.safe_dump(cfg))

    data = records_file(2)
    argv = {
        "predict": ["predict", "--run", str(shared), "--data", str(data), "--out", str(tmp_path / "p.jsonl")],
        "chat": ["chat", str(shared)],
        "serve": ["serve", str(shared), "--port", "0"],
        "webui": ["webui", str(shared), "--port", "0"],
        "evaluate": ["evaluate", "--mode", "loglik", "--run", str(shared), "--data", str(data),
                     "--out", str(tmp_path / "ev")],
        "export": ["export", str(shared), "--out", str(tmp_path / "exported")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "was trained with model.trust_remote_code=true" in err and "pass --trust-remote-code" in err
    assert not marker.exists()  # nothing of the model's code ran


def test_remote_code_runs_only_when_the_command_line_allows_it(lora_run, tiny_model_dir, records_file, tmp_path):
    marker = tmp_path / "the-model-code-ran"
    model = _model_with_remote_code(tiny_model_dir, tmp_path, marker)
    shared = tmp_path / "shared-run"
    shutil.copytree(lora_run, shared)
    cfg = yaml.safe_load((shared / "config.yaml").read_text())
    cfg["model"].update(name_or_path=str(model), trust_remote_code=True)
    (shared / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--run", str(shared), "--data", str(records_file(2)), "--out", str(out),
                 "--max-new-tokens", "2", "--trust-remote-code"]) == 0
    assert marker.exists() and len(_rows(out)) == 2
