"""Questions/s of generation-mode evaluation vs log-likelihood evaluation, in one run.

All three evaluate the same CMExam sample questions with the same model and batch size:
generation = predict (greedy, 64 new tokens) + parse + score; medtune log-likelihood = one
forward pass per question, the LM head only on the positions read (``logits_to_keep``); plain
scorer = the same forward passes through ``model(**batch).logits`` (every position through the LM
head, log-softmax over all of it), reading the same letters: what a scorer without that care costs.

``--vocab qwen2.5`` builds a random-init Qwen2 (hidden 256, 4 layers, tied embeddings) with the
real Qwen2.5 vocabulary (151,936 rows), where the LM head is most of the work; the default is the
tiny Llama with our 3,000-token tokenizer.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_speed.py [--vocab qwen2.5] [--questions 128] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab", choices=["ours", "qwen2.5"], default="ours")
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
    if args.vocab == "ours":
        model_dir = build_tiny_model(work / "tiny", tokenizer_corpus(records))
    else:
        model_dir = build_tiny_model(work / "qwen2", tokenizer_corpus(records), arch="qwen2", tokenizer="qwen2.5",
                                     hidden_size=256, num_layers=4, num_heads=4)
    model, tokenizer = load_for_inference(str(model_dir), dtype="float32")
    template = get_template("qa")
    qs = records[: args.questions]

    # warm-up, not timed: first calls pay one-off costs
    evaluate_loglik(qs[:16], HFBackend(model, tokenizer), tokenizer, template, work / "warm", batch_size=args.batch_size)

    def generation_rate(gen_model, name: str) -> float:
        """Questions/s of generate + parse + score, as `medtune predict` then `evaluate`."""
        start = time.perf_counter()
        predict(qs, HFBackend(gen_model, tokenizer), template, work / f"{name}.jsonl",
                GenerationParams(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size,
                tokenizer=tokenizer, progress=False)
        evaluate(work / f"{name}.jsonl", work / f"eval-{name}")
        return len(qs) / (time.perf_counter() - start)

    gen = generation_rate(model, "pred")
    # the same generation with the model as `medtune predict` loads it (load_backend): its LM head
    # computed for decoding steps as inference/lm_head.py does
    from medtune.inference.lm_head import use_decoding_lm_head

    served, _ = load_for_inference(str(model_dir), dtype="float32")
    decoding_head = use_decoding_lm_head(served)
    gen_served = generation_rate(served, "pred-served")
    del served

    start = time.perf_counter()
    evaluate_loglik(qs, HFBackend(model, tokenizer), tokenizer, template, work / "eval-ll", batch_size=args.batch_size)
    ll = len(qs) / (time.perf_counter() - start)

    start = time.perf_counter()
    plain = plain_scorer(model, tokenizer, template, qs, args.batch_size)
    plain_rate = len(qs) / (time.perf_counter() - start)
    ours = {row["id"]: row["parsed"] for row in map(json.loads, (work / "eval-ll" / "scored.jsonl").read_text().splitlines())}
    agree = sum(ours.get(rid) == pick for rid, pick in plain.items())

    print(f"{len(qs)} questions, batch {args.batch_size}, {model.config.model_type} model, "
          f"vocabulary {model.config.vocab_size:,}, {torch.get_num_threads()} thread(s)")
    print(f"  generation mode ({args.max_new_tokens} new tokens)  {gen:8.1f} questions/s   (baseline 1)")
    print(f"  generation, as medtune predict loads the model ({'decoding LM head' if decoding_head else 'no change'}) "
          f"{gen_served:8.1f} questions/s   (baseline 1b)")
    print(f"  plain model(**batch).logits scorer  {plain_rate:8.1f} questions/s   (baseline 2)")
    print(f"  medtune log-likelihood mode        {ll:8.1f} questions/s")
    print(f"  ratio to generation                {ll / gen:8.1f}x   ({ll / gen_served:.1f}x baseline 1b)")
    print(f"  ratio to the plain scorer          {ll / plain_rate:8.1f}x   (same pick on {agree}/{len(qs)})")


def plain_scorer(model, tokenizer, template, records, batch_size: int) -> dict[str, str]:
    """Picks from full logits: the same batches of prompts, ``model(**batch).logits`` and a log-softmax over
    every position, read at each prompt's last position (multi-token candidates: summed over their tokens,
    one row per candidate)."""
    from medtune.evaluation.loglik import build_requests

    def logprobs_of(seqs):
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)

    picks = {}
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            requests, cand_lists = build_requests(chunk, template, tokenizer, "letters")
            single = [i for i, (_, conts) in enumerate(requests) if all(len(c) == 1 for c in conts)]
            logprobs = logprobs_of([requests[i][0] for i in single]) if single else None
            for i, (rec, (ctx, conts), cands) in enumerate(zip(chunk, requests, cand_lists, strict=True)):
                if i in single:
                    row = single.index(i)
                    scores = [float(logprobs[row, len(ctx) - 1, c[0]]) for c in conts]
                else:
                    lp = logprobs_of([ctx + c for c in conts])
                    scores = [sum(float(lp[r, len(ctx) - 1 + k, t]) for k, t in enumerate(c)) for r, c in enumerate(conts)]
                picks[rec.id] = cands[max(range(len(scores)), key=scores.__getitem__)]
    return picks


if __name__ == "__main__":
    main()
