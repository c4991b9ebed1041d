"""Training tokens/s and prediction questions/s on the tiny model and the shipped CMExam sample.

Each figure is printed beside a baseline measured in the same run:
- training: medtune's SFT path vs a plain transformers ``Trainer`` + peft LoRA on the identical
  tokenised examples (same model, LoRA settings, batch size, steps);
- prediction: medtune's batched, length-sorted ``predict`` vs one question at a time.

    .venv/bin/python benchmarks/speed.py [--train-records 200] [--predict-records 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-records", type=int, default=200)
    ap.add_argument("--predict-records", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed training runs of each (median shown)")
    args = ap.parse_args()

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medtune.adapters import peft_config_for
    from medtune.config import load_config
    from medtune.data.cmexam import read_cmexam
    from medtune.data.sft import build_sft_examples
    from medtune.inference.base import GenerationParams
    from medtune.inference.hf import HFBackend
    from medtune.inference.predict import predict
    from medtune.io import write_jsonl
    from medtune.models import (
        build_tiny_model,
        load_causal_lm,
        load_for_inference,
        load_tokenizer,
        tokenizer_corpus,
    )
    from medtune.quickstart import config_path, sample_path
    from medtune.templates import get_template
    from medtune.train import sft

    work = Path(tempfile.mkdtemp(prefix="medtune-bench-"))
    records = read_cmexam(sample_path(), on_invalid="skip").records
    train, held = records[: args.train_records], records[-args.predict_records :]
    model_dir = build_tiny_model(work / "tiny", tokenizer_corpus(records))
    write_jsonl(work / "train.jsonl", [r.to_dict() for r in train])
    print(f"torch threads: {torch.get_num_threads()}, tiny model: {model_dir}")

    # ---- training: medtune -------------------------------------------------------------------------
    cfg = load_config(config_path("quickstart"), [
        f"model.name_or_path={model_dir}", f"data.train={work / 'train.jsonl'}",
        f"train.output_dir={work / 'run'}", "train.epochs=1", f"train.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", "train.report_to=none", "train.save_steps=100000",
        "train.logging_steps=1000",
    ])
    tokenizer = load_tokenizer(str(model_dir))
    examples = build_sft_examples(train, get_template("qa"), tokenizer, args.max_length).examples
    tokens = sum(len(e["input_ids"]) for e in examples)
    # ---- training: plain transformers Trainer + peft on the same examples and settings (baseline)
    def plain_trainer() -> float:
        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(load_causal_lm(str(model_dir), dtype="float32"),
                               peft_config_for(cfg.adapter, "llama"))
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=str(work / "plain"), num_train_epochs=1,
                                   per_device_train_batch_size=args.batch_size,
                                   learning_rate=cfg.train.learning_rate, report_to="none",
                                   save_strategy="no", logging_steps=1000, use_cpu=True,
                                   dataloader_pin_memory=False, disable_tqdm=True),
            train_dataset=Dataset.from_list(examples),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        )
        return tokens / trainer.train().metrics["train_runtime"]

    # ---- training: medtune's path (config → records → template → tokenise/mask → trainer) -----------
    def medtune_sft() -> float:
        run_dir = sft.run(cfg, resume=False)
        logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        shutil.rmtree(run_dir)  # the next repeat starts clean (same config, no resume)
        return tokens / next(r["train_runtime"] for r in logs if "train_runtime" in r)

    plain_trainer()  # warm-up: the first training in a process pays one-off costs
    runs: dict[str, list[float]] = {"plain": [], "ours": []}
    for _ in range(args.repeats):  # alternate, so drift in machine speed hits both alike
        runs["plain"].append(plain_trainer())
        runs["ours"].append(medtune_sft())
    plain, ours = statistics.median(runs["plain"]), statistics.median(runs["ours"])
    run_dir = sft.run(cfg, resume=False)  # keep one adapter for the prediction benchmark

    # ---- prediction: batched + length-sorted vs one at a time ------------------------------------------
    model, tokenizer = load_for_inference(str(model_dir), str(run_dir / "adapter"), dtype="float32")
    backend, params = HFBackend(model, tokenizer), GenerationParams(max_new_tokens=args.max_new_tokens)
    speeds = {}
    for batch in (16, 1):
        start = time.perf_counter()
        predict(held, backend, "qa", work / f"pred-b{batch}.jsonl", params, batch_size=batch,
                tokenizer=tokenizer, progress=False)
        speeds[batch] = len(held) / (time.perf_counter() - start)

    print()
    print(f"training   ({len(examples)} examples, {tokens} non-pad tokens, batch {args.batch_size}, "
          f"max_length {args.max_length}, LoRA r={cfg.adapter.r})")
    print(f"  medtune SFT path        {ours:10.0f} tokens/s   (median of {args.repeats})")
    print(f"  plain Trainer + peft    {plain:10.0f} tokens/s   (baseline, median of {args.repeats})")
    print(f"  ratio                   {ours / plain:10.2f}x")
    print(f"prediction ({len(held)} questions, greedy, max_new_tokens {args.max_new_tokens})")
    print(f"  batched (16), sorted    {speeds[16]:10.1f} questions/s")
    print(f"  one at a time           {speeds[1]:10.1f} questions/s   (baseline)")
    print(f"  ratio                   {speeds[16] / speeds[1]:10.2f}x")


if __name__ == "__main__":
    main()
