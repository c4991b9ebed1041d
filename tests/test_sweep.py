"""A sweep over 3 templates × 2 learning rates completes, compares, reports, and resumes."""

from __future__ import annotations

import json

import pytest

from medtune.config import ConfigError
from medtune.sweep import parse_grid

pytestmark = pytest.mark.slow


def test_parse_grid():
    combos = parse_grid(["template=qa,analysis_first", "train.learning_rate=1e-4,2e-4"])
    assert [c.overrides for c in combos] == [
        ["template=qa", "train.learning_rate=1e-4"], ["template=qa", "train.learning_rate=2e-4"],
        ["template=analysis_first", "train.learning_rate=1e-4"],
        ["template=analysis_first", "train.learning_rate=2e-4"],
    ]
    assert combos[0].slug == "template-qa__learning_rate-1e-4"
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_grid(["template"])


def test_sweep_3_templates_x_2_lrs(tmp_path, tiny_model_dir, records_file, capsys):
    from medtune.cli import main

    train = records_file(8, "train.jsonl")
    test = records_file(6, "test.jsonl", start=100)
    out = tmp_path / "sweep"
    argv = ["sweep", "src/medtune/configs/quickstart.yaml", f"model.name_or_path={tiny_model_dir}",
            f"data.train={train}", "train.max_steps=2", "train.report_to=none",
            "--grid", "template=qa,analysis_first,instructed", "learning_rate=1e-3,5e-3",
            "--eval-data", str(test), "--out", str(out), "--max-new-tokens", "8"]
    assert main(argv) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [c["status"] for c in summary["combinations"]] == ["done"] * 6
    for combo in summary["combinations"]:
        results = json.loads((out / combo["slug"] / "eval" / "results.json").read_text())
        assert results["n"] == 6
        template = combo["label"].split()[0].split("=")[1]
        assert results["templates"] == [template]  # each run's own template was used to predict
        assert json.loads((out / combo["slug"] / "run" / "trainer_state.json").read_text())["global_step"] == 2
    comparison = (out / "comparison" / "comparison.md").read_text()
    assert "template=instructed learning_rate=5e-3" in comparison and "McNemar" in comparison
    assert (out / "report.md").exists()

    # rerun: everything is skipped
    capsys.readouterr()
    assert main(argv) == 0
    assert "6 combinations (0 run now" in capsys.readouterr().out
