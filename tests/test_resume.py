"""A training run killed after its first checkpoint resumes and finishes with the same step count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

MAX_STEPS = 60


def _train_cmd(tiny_model_dir, data, out):
    return [sys.executable, "-m", "medtune.cli", "train", "src/medtune/configs/quickstart.yaml",
            f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={out}",
            f"train.max_steps={MAX_STEPS}", "train.save_steps=5", "train.logging_steps=1",
            "train.report_to=none", "train.save_total_limit=null"]


def test_killed_run_resumes(tmp_path, tiny_model_dir, records_file):
    data = records_file(16)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, data, out), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    first = out / "checkpoint-5" / "trainer_state.json"
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.exists(), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists(), "the run finished before it was killed; test proves nothing"
    done_before = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert done_before < MAX_STEPS

    # rerun the same command: resumes from the last complete checkpoint
    rerun = subprocess.run(_train_cmd(tiny_model_dir, data, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # said on the console, not only in a debug log: the rerun must not look like a fresh start
    assert f"resuming from {out / f'checkpoint-{done_before}'} (step {done_before}); the steps after it are redone" \
        in rerun.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    # the metrics log has each training step once, in order (lines past the checkpoint were trimmed)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, MAX_STEPS + 1))


def test_changed_config_refuses_to_resume(tmp_path, tiny_model_dir, records_file, capsys):
    from medtune.cli import main

    data = records_file(8)
    out = tmp_path / "run"
    base = ["train", "src/medtune/configs/quickstart.yaml", f"model.name_or_path={tiny_model_dir}",
            f"data.train={data}", f"train.output_dir={out}", "train.max_steps=2", "train.report_to=none"]
    assert main(base) == 0
    assert main([*base, "train.learning_rate=1e-3"]) == 2  # different experiment, same folder
    data.write_text(data.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    assert main(base) == 2  # same config, but the training data changed
    assert "SHA-256 changed" in capsys.readouterr().err
