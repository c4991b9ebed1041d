"""Questions/s of generation-mode evaluation vs log-likelihood evaluation, in one run.

Both evaluate the same CMExam sample questions with the same tiny model and batch size:
generation = predict (greedy, 64 new tokens) + parse + score; log-likelihood = one forward pass
per question over its prompt, reading the option letters' probabilities.

    .venv/bin/python benchmarks/eval_speed.py [--questions 128] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from medtune.data.cmexam import read_cmexam
    from medtune.evaluation.evaluate import evaluate, evaluate_loglik
    from medtune.inference.base import GenerationParams
    from medtune.inference.hf import HFBackend
    from medtune.inference.predict import predict
    from medtune.models import build_tiny_model, load_for_inference, tokenizer_corpus
    from medtune.quickstart import sample_path
    from medtune.templates import get_template

    work = Path(tempfile.mkdtemp(prefix="medtune-evalbench-"))
    records = read_cmexam(sample_path(), on_invalid="skip").records
    model_dir = build_tiny_model(work / "tiny", tokenizer_corpus(records))
    model, tokenizer = load_for_inference(str(model_dir), dtype="float32")
    template = get_template("qa")
    qs = records[: args.questions]

    # warm-up, not timed: first calls pay one-off costs
    evaluate_loglik(qs[:16], HFBackend(model, tokenizer), tokenizer, template, work / "warm", batch_size=args.batch_size)

    start = time.perf_counter()
    predict(qs, HFBackend(model, tokenizer), template, work / "pred.jsonl",
            GenerationParams(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size,
            tokenizer=tokenizer, progress=False)
    evaluate(work / "pred.jsonl", work / "eval-gen")
    gen = len(qs) / (time.perf_counter() - start)

    start = time.perf_counter()
    evaluate_loglik(qs, HFBackend(model, tokenizer), tokenizer, template, work / "eval-ll", batch_size=args.batch_size)
    ll = len(qs) / (time.perf_counter() - start)

    print(f"{len(qs)} questions, batch {args.batch_size}, tiny model")
    print(f"  generation mode ({args.max_new_tokens} new tokens)  {gen:8.1f} questions/s   (baseline)")
    print(f"  log-likelihood mode               {ll:8.1f} questions/s")
    print(f"  ratio                             {ll / gen:8.1f}x")


if __name__ == "__main__":
    main()
