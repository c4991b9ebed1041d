"""Commands that need no model never import the model stack (torch, transformers, peft, trl, ...).

Each of them used to pay ~6 s (16 s cold) for ``import torch`` before doing anything. Their speed
is measured in ``benchmarks/startup.py``; here, what they import, on real inputs and on errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODEL_STACK = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers", "safetensors")
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "medtune" / "examples" / "cmexam" / "val_sample.csv"


def _prediction_rows(records: list[dict], outputs: list[str]) -> list[dict]:
    return [{**r, "template": "qa", "prompt": r["question"], "output": out} for r, out in zip(records, outputs, strict=True)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from medtune.cli import main
    from medtune.io import read_jsonl, write_jsonl

    d = tmp_path_factory.mktemp("startup")
    assert main(["convert", "cmexam", str(SAMPLE), "--out", str(d / "records.jsonl"), "--on-invalid", "skip"]) == 0
    records = read_jsonl(d / "records.jsonl")[:40]
    write_jsonl(d / "base.jsonl", _prediction_rows(records, ["A"] * len(records)))
    write_jsonl(d / "tuned.jsonl", _prediction_rows(records, [r["answer"] for r in records]))
    for name in ("base", "tuned"):
        assert main(["evaluate", str(d / f"{name}.jsonl"), "--out", str(d / f"eval-{name}")]) == 0
    return {"dir": d}


COMMANDS = {
    "templates": ["templates"],
    "convert": ["convert", "cmexam", str(SAMPLE), "--out", "{d}/again.jsonl", "--on-invalid", "skip"],
    "convert (missing file)": ["convert", "cmexam", "{d}/missing.csv", "--out", "{d}/x.jsonl"],
    "evaluate": ["evaluate", "{d}/tuned.jsonl", "--out", "{d}/eval-again"],
    "evaluate (missing file)": ["evaluate", "{d}/missing.jsonl", "--out", "{d}/eval-x"],
    "compare": ["compare", "{d}/eval-base", "{d}/eval-tuned", "--out", "{d}/compare"],
    "report": ["report", "{d}/eval-base", "{d}/eval-tuned", "--out", "{d}/report/report.md"],
    "data inspect": ["data", "inspect", "{d}/records.jsonl", "--out", "{d}/inspect"],
    "data check": ["data", "check", "{d}/records.jsonl"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_without_a_model_imports_no_model_stack(inputs, name):
    argv = [a.format(d=inputs["dir"]) for a in COMMANDS[name]]
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from medtune.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main({argv!r})
        print(json.dumps({{"rc": rc, "loaded": [m for m in {MODEL_STACK!r} if m in sys.modules]}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == (2 if "missing" in name else 0)
    assert result["loaded"] == []


@pytest.mark.parametrize("name", [n for n in COMMANDS if "missing" in n])
def test_a_missing_input_is_reported_before_any_data_library_loads(inputs, name):
    argv = [a.format(d=inputs["dir"]) for a in COMMANDS[name]]
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from medtune.cli import main
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main({argv!r})
        heavy = ("pandas", "numpy", "scipy", "sklearn", "sacrebleu", "jieba", "matplotlib") + {MODEL_STACK!r}
        print(json.dumps({{"rc": rc, "err": err.getvalue(), "loaded": [m for m in heavy if m in sys.modules]}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["rc"], result["loaded"]) == (2, [])
    assert "No such file or directory" in result["err"] and "missing." in result["err"]
