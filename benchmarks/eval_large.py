"""``medtune evaluate`` on a large predictions file: wall time, peak memory, and that the numbers do not move.

The file has ``--rows`` CMExam predictions (the shipped sample cycled, with unique ids): each
output a letter (the gold one 60% of the time) and a random prefix of the reference explanation,
so every metric, BLEU and ROUGE included, has work to do. ``medtune evaluate`` runs in a fresh
process on it; with ``--baseline-src`` the same command also runs on another medtune source tree
(e.g. a checkout of an older commit: ``git worktree add /tmp/old COMMIT``, then
``--baseline-src /tmp/old/src``), in the same run, and the two results.json are compared number by
number. A BLEU-only line times sacrebleu's ``corpus_score`` (what evaluate used before) against
medtune's streamed statistics on the same pairs.

    .venv/bin/python benchmarks/eval_large.py [--rows 68000] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def make_predictions(path: Path, rows: int) -> None:
    from medtune.data.cmexam import read_cmexam
    from medtune.quickstart import sample_path

    records = read_cmexam(sample_path(), on_invalid="skip").records
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            r = records[i % len(records)]
            row = r.to_dict()
            expl = r.explanation or ""
            letter = r.answer if rng.random() < 0.6 else rng.choice("ABCDE")
            row.update(id=f"{row['id']}-{i}", template="qa", prompt=r.question,
                       output=f"答案：{letter}\n分析：{expl[: rng.randint(0, len(expl))]}")
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_evaluate(src: Path, predictions: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of ``medtune evaluate`` from the source tree ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "medtune.cli", "evaluate", str(predictions), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"evaluate from {src} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20  # KiB → GiB


def numbers(results: Path) -> dict[str, float]:
    def flat(d: dict, prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[prefix + k] = float(v)
        return out

    return flat(json.loads(results.read_text(encoding="utf-8")))


def bleu_only(predictions: Path) -> tuple[float, float]:
    """Seconds of sacrebleu corpus_score (BLEU-1 and BLEU-4) and of medtune's bleu_scores, same pairs."""
    from sacrebleu.metrics import BLEU

    from medtune.evaluation.metrics import bleu_scores

    rows = [json.loads(line) for line in predictions.open(encoding="utf-8")]
    pairs = [(r["output"], r["explanation"]) for r in rows if r["explanation"].strip()]
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    start = time.perf_counter()
    theirs = [BLEU(tokenize="char", smooth_method="none", max_ngram_order=n).corpus_score(hyps, [refs]).score
              for n in (1, 4)]
    sacre = time.perf_counter() - start
    start = time.perf_counter()
    ours = bleu_scores(hyps, refs, (1, 4))
    streamed = time.perf_counter() - start
    assert [ours[1], ours[4]] == theirs, (ours, theirs)
    return sacre, streamed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=68_000)
    ap.add_argument("--baseline-src", type=Path, help="another medtune src/ to run the same evaluate from")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medtune-evallarge-"))
    predictions = work / "predictions.jsonl"
    make_predictions(predictions, args.rows)
    print(f"{args.rows:,} predictions; medtune evaluate in a fresh process each")
    seconds, peak = run_evaluate(SRC, predictions, work / "eval")
    if args.baseline_src:
        base_s, base_peak = run_evaluate(args.baseline_src, predictions, work / "eval-baseline")
        ours, theirs = numbers(work / "eval" / "results.json"), numbers(work / "eval-baseline" / "results.json")
        shared = sorted(set(ours) & set(theirs))
        worst = max(abs(ours[k] - theirs[k]) for k in shared)
        print(f"  baseline ({args.baseline_src})  {base_s:7.1f} s  peak {base_peak:5.2f} GiB")
        print(f"  this tree                 {seconds:7.1f} s  peak {peak:5.2f} GiB")
        print(f"  ratio                     {base_s / seconds:7.2f}x faster, {peak / base_peak:.2f}x the memory; "
              f"max |difference| over {len(shared)} numbers: {worst:.3g}")
    else:
        print(f"  this tree  {seconds:7.1f} s  peak {peak:5.2f} GiB")
    sacre, streamed = bleu_only(predictions)
    print(f"  BLEU-1 + BLEU-4 only: sacrebleu corpus_score {sacre:.1f} s, medtune streamed statistics {streamed:.1f} s "
          f"({sacre / streamed:.1f}x), identical scores")


if __name__ == "__main__":
    main()
