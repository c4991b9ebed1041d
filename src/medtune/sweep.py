"""Grid sweeps: train → predict → evaluate for each combination, then one comparison.

Combinations run one after another; each lives in its own folder and a finished one (its
``eval/results.json`` exists) is skipped on rerun, while an interrupted one resumes (training from
its last checkpoint, prediction from its last written line).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.config import ConfigError, load_config
from medtune.io import atomic_write_json


@dataclass
class Combo:
    """One point of the grid."""

    overrides: list[str]  # key=value pairs
    slug: str  # folder name

    @property
    def label(self) -> str:
        """Human-readable name for tables."""
        return " ".join(self.overrides)


def parse_grid(grid: list[str]) -> list[Combo]:
    """``["template=qa,analysis_first", "learning_rate=1e-4,2e-4"]`` → the cartesian product."""
    axes = []
    for item in grid:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected key=value1,value2,...")
        key, values = item.split("=", 1)
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not options:
            raise ConfigError(f"--grid {item!r}: no values")
        axes.append([(key.strip(), v) for v in options])
    combos = []
    for point in itertools.product(*axes):
        overrides = [f"{k}={v}" for k, v in point]
        slug = "__".join(f"{k.split('.')[-1]}-{v}" for k, v in point)
        combos.append(Combo(overrides, re.sub(r"[^A-Za-z0-9_.=-]+", "_", slug)))
    return combos


def run_sweep(
    config: str | Path,
    grid: list[str],
    eval_data: str | Path,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    mode: str = "generate",
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run every combination (skipping finished ones) and write the comparison and report."""
    from medtune.data.exam import load_exam_file
    from medtune.evaluation.compare import compare_runs
    from medtune.evaluation.evaluate import evaluate, evaluate_loglik
    from medtune.inference.base import GenerationParams
    from medtune.inference.loading import load_backend
    from medtune.inference.predict import predict
    from medtune.report.markdown import write_report
    from medtune.train import sft

    out = Path(out_dir)
    combos = parse_grid(grid)
    # Validate every combination's config before the first (long) training starts.
    configs = {
        c.slug: load_config(config, [*(overrides or []), *c.overrides, f"train.output_dir={out / c.slug / 'run'}"])
        for c in combos
    }
    records, _ = load_exam_file(eval_data)
    summary: dict[str, Any] = {"grid": grid, "eval_data": str(eval_data), "mode": mode, "combinations": []}
    for i, combo in enumerate(combos, start=1):
        eval_dir = out / combo.slug / "eval"
        status = "skipped (finished earlier)"
        if not (eval_dir / "results.json").exists():
            print(f"[{i}/{len(combos)}] {combo.label}")
            run_dir = sft.run(configs[combo.slug])
            loaded = load_backend(run=str(run_dir))
            if mode == "loglik":
                evaluate_loglik(records, loaded.backend, loaded.backend.tokenizer, loaded.template, eval_dir,
                                batch_size=batch_size, source=str(eval_data))
            else:
                pred = out / combo.slug / "predictions.jsonl"
                predict(records, loaded.backend, loaded.template, pred, GenerationParams(max_new_tokens=max_new_tokens),
                        batch_size=batch_size, tokenizer=loaded.backend.tokenizer, source=loaded.source)
                evaluate(pred, eval_dir)
            status = "done"
        else:
            print(f"[{i}/{len(combos)}] {combo.label}: finished earlier, skipped")
        summary["combinations"].append({"label": combo.label, "slug": combo.slug, "status": status,
                                        "eval_dir": str(eval_dir)})
    eval_dirs = [out / c.slug / "eval" for c in combos]
    labels = [c.label for c in combos]
    summary["comparison"] = str(out / "comparison")
    compare_runs(eval_dirs, out / "comparison", labels=labels)
    summary["report"] = str(write_report(eval_dirs, out / "report.md", labels=labels,
                                         run_dirs={c.label: out / c.slug / "run" for c in combos}))
    atomic_write_json(out / "sweep.json", summary)
    return summary
