"""Training throughput: medtune's SFT path vs a plain transformers ``Trainer`` + peft LoRA.

Both train on the shipped CMExam sample with identical settings (template ``qa``, max_length 512,
batch 4, LoRA r=8 on every projection, 1 epoch, random sampling) on the identical tokenised,
prompt-masked examples. The baseline pads every batch to its longest example with
``DataCollatorForSeq2Seq``, as a plain Trainer recipe does; medtune's path is ``sft.run`` itself.
Each training runs in a fresh process, so its peak RSS is its own.

``--vocab qwen2.5`` trains a random-init Qwen2 (hidden 256, 4 layers, tied embeddings) with the
real Qwen2.5 vocabulary (151,680 rows), where the LM head and the cross-entropy are most of the
work and memory; the default is the tiny Llama with our 3,000-token tokenizer. ``--hidden-size``
and ``--layers`` change the model's shape (e.g. 1024 and 8: the LM head a smaller share of the
work); ``--method full`` fine-tunes every weight in both trainings instead of LoRA.

Reported: non-padding tokens per second of training (``train_runtime`` from the Trainer), their
ratio, peak RSS, and the training loss (``train_loss``, a mean per label token) of each, so a
speed-up that changed what is optimised would show up as a different loss; then the untrained
model's loss per label token over the same batches computed both ways (``start_losses``).

    OMP_NUM_THREADS is forced to 1 (one core per run, so the figure is not a thread-count lottery).
    .venv/bin/python benchmarks/train_speed.py [--vocab qwen2.5] [--records 300] [--repeats 3]
        [--method lora|full] [--hidden-size 256 --layers 4]
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


def prepare(args: argparse.Namespace) -> dict:
    """Build the model and the records file once; the children read them."""
    from medtune.data.cmexam import read_cmexam
    from medtune.io import write_jsonl
    from medtune.models import build_tiny_model, tokenizer_corpus
    from medtune.quickstart import sample_path

    work = Path(tempfile.mkdtemp(prefix="medtune-train-speed-"))
    records = read_cmexam(sample_path(), on_invalid="skip").records
    shape = {"hidden_size": args.hidden_size or (128 if args.vocab == "ours" else 256), "num_layers": args.layers,
             "num_heads": max(4, (args.hidden_size or 0) // 64)}
    if args.vocab == "ours":
        model_dir = build_tiny_model(work / "model", tokenizer_corpus(records), **shape)
    else:
        model_dir = build_tiny_model(work / "model", tokenizer_corpus(records), arch="qwen2", tokenizer="qwen2.5",
                                     **shape)
    write_jsonl(work / "train.jsonl", [r.to_dict() for r in records[: args.records]])
    config = json.loads((model_dir / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # tied embeddings counted once
    return {"work": str(work), "model": str(model_dir), "hidden": config["hidden_size"], "params": params}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def child(args: argparse.Namespace) -> None:
    """One training (``--child plain|ours``) in this process; prints one JSON line."""
    import resource

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medtune.adapters import model_type_of, peft_config_for
    from medtune.config import load_config
    from medtune.data.exam import load_exam_file
    from medtune.data.sft import IGNORE_INDEX, build_sft_examples
    from medtune.models import load_causal_lm, load_tokenizer
    from medtune.quickstart import config_path
    from medtune.templates import get_template
    from medtune.train import sft

    work, model_dir = Path(args.work), args.model
    train, _ = load_exam_file(work / "train.jsonl")
    cfg = load_config(config_path("quickstart"), [
        f"model.name_or_path={model_dir}", f"data.train={work / 'train.jsonl'}",
        f"train.output_dir={work / 'run'}", "train.epochs=1", f"train.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", "data.template=qa", "adapter.r=8", "model.dtype=float32",
        "data.val_fraction=0",  # every record trains, as in the baseline (no held-out split)
        "train.report_to=none", "train.save_steps=100000", "train.logging_steps=100000",
        "train.group_by_length=true", f"adapter.method={args.method}", *args.override,
    ])
    tokenizer = load_tokenizer(model_dir)
    examples = build_sft_examples(train, get_template("qa"), tokenizer, args.max_length).examples
    tokens = sum(len(e["input_ids"]) for e in examples)
    labels = sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in examples)
    if args.child == "loss":
        print(json.dumps(start_losses(model_dir, examples, tokenizer, args.batch_size)))
        return
    if args.child == "plain":
        torch.manual_seed(cfg.train.seed)
        model = load_causal_lm(model_dir, dtype="float32")
        if args.method == "lora":
            model = get_peft_model(model, peft_config_for(cfg.adapter, model_type_of(model_dir) or "llama"))
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
        runtime, loss = metrics["train_runtime"], metrics["train_loss"]
    else:
        from medtune.train.common import overwriting

        with overwriting(cfg.train.output_dir):
            run_dir = sft.run(cfg, resume=False)
        logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = next(r for r in logs if "train_runtime" in r)
        runtime, loss = summary["train_runtime"], summary["train_loss"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    print(json.dumps({"tokens_per_s": tokens / runtime, "loss": loss, "peak_gib": peak, "tokens": tokens,
                      "labels": labels, "examples": len(examples)}))


def start_losses(model_dir: str, examples: list[dict], tokenizer, batch_size: int, batches: int = 8) -> dict:
    """The untrained model's loss per label token over the same batches, computed both ways.

    The training losses above cannot match exactly (length grouping gives the runs different
    batches, so the weights differ after the first step); this compares the two loss
    computations on identical weights and batches: the model's own ``model(**batch).loss`` and
    medtune's label-position LM head.
    """
    from transformers import DataCollatorForSeq2Seq

    from medtune.data.sft import IGNORE_INDEX
    from medtune.models import load_causal_lm
    from medtune.train.label_head import label_head_loss

    model = load_causal_lm(model_dir, dtype="float32").eval()
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    plain = ours = 0.0
    labels = 0
    with torch.no_grad():
        for i in range(batches):
            chunk = examples[i * batch_size:(i + 1) * batch_size]
            if not chunk:
                break
            batch = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in chunk])
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            plain += float(model(**batch).loss) * n
            ours += float(label_head_loss(model, batch)) * n
            labels += n
    return {"plain": plain / labels, "ours": ours / labels, "labels": labels}


def main() -> None:
    """Build the model, run both trainings alternately (each in its own process), print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=300, help="CMExam sample rows to train on")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating (median shown)")
    ap.add_argument("--vocab", choices=["ours", "qwen2.5"], default="ours")
    ap.add_argument("--method", choices=["lora", "full"], default="lora", help="in both trainings")
    ap.add_argument("--hidden-size", type=int, default=None, help="model width (default 128, or 256 for qwen2.5)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--override", action="append", default=[], help="key=value for medtune's run (e.g. adapter.method=full)")
    ap.add_argument("--child", choices=["plain", "ours", "loss"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import subprocess
    import sys

    made = prepare(args)
    common = [sys.executable, __file__, "--work", made["work"], "--model", made["model"],
              "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--method", args.method,
              *[f"--override={o}" for o in args.override]]

    def once(kind: str) -> dict:
        done = subprocess.run([*common, "--child", kind], capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    runs: dict[str, list[dict]] = {"plain": [], "ours": []}
    for i in range(args.repeats):  # alternate, so drift in machine speed hits both alike
        runs["plain"].append(once("plain"))
        runs["ours"].append(once("ours"))
        print(f"  repeat {i + 1}: plain {runs['plain'][-1]['tokens_per_s']:.0f} tok/s, "
              f"medtune {runs['ours'][-1]['tokens_per_s']:.0f} tok/s", flush=True)
    first = runs["ours"][0]
    print(f"{args.vocab} vocabulary, hidden {made['hidden']}, {args.layers} layers, {made['params']:,} parameters, "
          f"{args.method}; {first['examples']} examples, {first['tokens']} non-pad tokens, "
          f"{first['labels']} label tokens; batch {args.batch_size}, max_length {args.max_length}, 1 thread")
    plain = statistics.median(r["tokens_per_s"] for r in runs["plain"])
    ours = statistics.median(r["tokens_per_s"] for r in runs["ours"])
    peak_plain = max(r["peak_gib"] for r in runs["plain"])
    peak_ours = max(r["peak_gib"] for r in runs["ours"])
    print(f"  medtune SFT path        {ours:10.0f} tokens/s   peak RSS {peak_ours:5.2f} GiB   "
          f"train_loss {runs['ours'][0]['loss']:.6f}")
    print(f"  plain Trainer + peft    {plain:10.0f} tokens/s   peak RSS {peak_plain:5.2f} GiB   "
          f"train_loss {runs['plain'][0]['loss']:.6f}")
    print(f"  ratio                   {ours / plain:10.2f}x   (median of {args.repeats}); "
          f"peak RSS {peak_ours / peak_plain:.2f}x")
    start = once("loss")
    print(f"  loss per label token of the untrained model, same {start['labels']} label tokens: "
          f"plain {start['plain']:.6f}, medtune {start['ours']:.6f}, "
          f"relative difference {abs(start['ours'] - start['plain']) / start['plain']:.1e}")
    shutil.rmtree(made["work"], ignore_errors=True)


if __name__ == "__main__":
    main()
