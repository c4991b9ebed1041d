"""Training throughput: medtune's SFT path vs a plain transformers ``Trainer`` + peft LoRA.

Both train the locally built tiny model on the shipped CMExam sample with identical settings
(template ``qa``, max_length 512, batch 4, LoRA r=8, 1 epoch, random sampling) on the identical
tokenised, prompt-masked examples. The baseline pads every batch to its longest example with
``DataCollatorForSeq2Seq``, as a plain Trainer recipe does; medtune's path is ``sft.run`` itself.

Reported: non-padding tokens per second of training (``train_runtime`` from the Trainer), their
ratio, and the training loss (``train_loss``, a mean per label token) of each, so a speed-up that
changed what is optimised would show up as a different loss.

    OMP_NUM_THREADS is forced to 1 (one core per run, so the figure is not a thread-count lottery).
    .venv/bin/python benchmarks/train_speed.py [--records 300] [--repeats 3]
"""

from __future__ import annotations

import os

# Set before torch is imported: intra-op threads are fixed when the OpenMP runtime starts.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    """Build the tiny model, run both trainings alternately, print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=300, help="CMExam sample rows to train on")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating (median shown)")
    args = ap.parse_args()

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medtune.adapters import peft_config_for
    from medtune.config import load_config
    from medtune.data.cmexam import read_cmexam
    from medtune.data.sft import IGNORE_INDEX, build_sft_examples
    from medtune.io import write_jsonl
    from medtune.models import build_tiny_model, load_causal_lm, load_tokenizer, tokenizer_corpus
    from medtune.quickstart import config_path, sample_path
    from medtune.templates import get_template
    from medtune.train import sft

    work = Path(tempfile.mkdtemp(prefix="medtune-train-speed-"))
    records = read_cmexam(sample_path(), on_invalid="skip").records
    train = records[: args.records]
    model_dir = build_tiny_model(work / "tiny", tokenizer_corpus(records))
    write_jsonl(work / "train.jsonl", [r.to_dict() for r in train])

    cfg = load_config(config_path("quickstart"), [
        f"model.name_or_path={model_dir}", f"data.train={work / 'train.jsonl'}",
        f"train.output_dir={work / 'run'}", "train.epochs=1", f"train.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", "data.template=qa", "adapter.r=8",
        "data.val_fraction=0",  # every record trains, as in the baseline (no held-out split)
        "train.report_to=none", "train.save_steps=100000", "train.logging_steps=100000",
        # length-grouped batches: little padding (the knob exists; its default is False today)
        "train.group_by_length=true",
    ])
    tokenizer = load_tokenizer(str(model_dir))
    examples = build_sft_examples(train, get_template("qa"), tokenizer, args.max_length).examples
    tokens = sum(len(e["input_ids"]) for e in examples)
    label_tokens = sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in examples)

    def plain_trainer() -> tuple[float, float]:
        """The baseline: a textbook Trainer + peft LoRA run, padding each batch to its longest."""
        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(load_causal_lm(str(model_dir), dtype="float32"),
                               peft_config_for(cfg.adapter, "llama"))
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(work / "plain"), num_train_epochs=1,
                per_device_train_batch_size=args.batch_size, learning_rate=cfg.train.learning_rate,
                warmup_steps=cfg.train.warmup_ratio, lr_scheduler_type=cfg.train.lr_scheduler,
                weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                seed=cfg.train.seed, report_to="none", save_strategy="no", logging_steps=100000,
                use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True,
                train_sampling_strategy="random"),
            train_dataset=Dataset.from_list(examples),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        )
        metrics = trainer.train().metrics
        return tokens / metrics["train_runtime"], metrics["train_loss"]

    def medtune_sft() -> tuple[float, float]:
        """medtune's path: config → records → template → tokenise/mask → sft.run's Trainer."""
        run_dir = sft.run(cfg, resume=False)
        logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = next(r for r in logs if "train_runtime" in r)
        shutil.rmtree(run_dir)  # the next repeat starts clean (same config, no resume)
        return tokens / summary["train_runtime"], summary["train_loss"]

    print(f"torch threads {torch.get_num_threads()}; {len(examples)} examples, {tokens} non-pad tokens, "
          f"{label_tokens} label tokens; batch {args.batch_size}, max_length {args.max_length}, "
          f"LoRA r={cfg.adapter.r}, 1 epoch", flush=True)
    plain_trainer()  # warm-up: the first training in a process pays one-off costs (kernels, allocator)
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "ours": []}
    for i in range(args.repeats):  # alternate, so drift in machine speed hits both alike
        runs["plain"].append(plain_trainer())
        runs["ours"].append(medtune_sft())
        print(f"  repeat {i + 1}: plain {runs['plain'][-1][0]:.0f} tok/s, "
              f"medtune {runs['ours'][-1][0]:.0f} tok/s", flush=True)
    plain = statistics.median(s for s, _ in runs["plain"])
    ours = statistics.median(s for s, _ in runs["ours"])
    print(f"  medtune SFT path        {ours:10.0f} tokens/s   train_loss {runs['ours'][0][1]:.6f}")
    print(f"  plain Trainer + peft    {plain:10.0f} tokens/s   train_loss {runs['plain'][0][1]:.6f}")
    print(f"  ratio                   {ours / plain:10.2f}x   (median of {args.repeats})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
