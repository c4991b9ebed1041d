"""Wall time of the commands that need no model, beside the model-stack import they used to pay.

Each command runs as a user runs it (``medtune ...`` in a fresh process) on the shipped CMExam
sample: convert, evaluate of a predictions file (999 rows), compare, report, data inspect/check,
templates, and a convert of a missing file (an error must come at once). The baseline, timed in
the same run, is ``python -c "import torch, transformers, peft"``: what every command paid before
it could do anything when the CLI imported the model stack to name its exception classes.
Times are the median of ``--repeat`` runs (warm file cache).

    .venv/bin/python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(argv: list[str], repeat: int, ok: tuple[int, ...] = (0,)) -> float:
    """Median wall seconds of ``argv`` over ``repeat`` runs (each must exit with a code in ``ok``)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if done.returncode not in ok:
            raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}\n{done.stderr[-1000:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from medtune.io import read_jsonl, write_jsonl
    from medtune.quickstart import sample_path

    work = Path(tempfile.mkdtemp(prefix="medtune-startup-"))
    medtune = str(BIN / "medtune")
    subprocess.run([medtune, "convert", "cmexam", str(sample_path()), "--out", str(work / "records.jsonl"),
                    "--on-invalid", "skip"], check=True, capture_output=True)
    records = read_jsonl(work / "records.jsonl")
    for name, pick in (("base", lambda r: "A"), ("tuned", lambda r: r["answer"])):
        write_jsonl(work / f"{name}.jsonl", [{**r, "template": "qa", "prompt": r["question"], "output": pick(r)}
                                             for r in records])
        subprocess.run([medtune, "evaluate", str(work / f"{name}.jsonl"), "--out", str(work / f"eval-{name}")],
                       check=True, capture_output=True)

    baseline = timed([sys.executable, "-c", "import torch, transformers, peft"], args.repeat)
    commands = {
        "templates": ["templates"],
        "convert cmexam (999 rows)": ["convert", "cmexam", str(sample_path()), "--out", str(work / "again.jsonl"),
                                      "--on-invalid", "skip"],
        "convert of a missing file": ["convert", "cmexam", str(work / "missing.csv"), "--out", str(work / "x.jsonl")],
        "evaluate (999 predictions)": ["evaluate", str(work / "tuned.jsonl"), "--out", str(work / "eval-again")],
        "compare": ["compare", str(work / "eval-base"), str(work / "eval-tuned"), "--out", str(work / "compare")],
        "report": ["report", str(work / "eval-base"), str(work / "eval-tuned"), "--out", str(work / "r" / "report.md")],
        "data inspect": ["data", "inspect", str(work / "records.jsonl"), "--out", str(work / "inspect")],
        "data check": ["data", "check", str(work / "records.jsonl")],
    }
    print(f"baseline: import torch, transformers, peft: {baseline:.2f} s (median of {args.repeat})")
    print(f"{'command':<30} {'seconds':>8} {'x baseline':>10}")
    for name, argv in commands.items():
        seconds = timed([medtune, *argv], args.repeat, ok=(2,) if "missing" in name else (0,))
        print(f"{name:<30} {seconds:>8.2f} {seconds / baseline:>10.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
