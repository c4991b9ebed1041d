"""The quickstart: convert → build tiny model → fine-tune (LoRA) → predict → evaluate → report.

Everything runs on the shipped CMExam sample with a model built locally, so it needs no download.
The tiny model is random before training, so what it can show is that the loop learns: it is
scored on questions it was trained on (seen) and on held-out questions (unseen, where a tiny
model trained on a few dozen questions stays near chance), before and after fine-tuning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medtune.config import load_config
from medtune.data.cmexam import convert_cmexam
from medtune.data.exam import split_records
from medtune.evaluation.evaluate import evaluate
from medtune.inference.base import GenerationParams
from medtune.inference.hf import HFBackend
from medtune.inference.loading import resolve_run
from medtune.inference.predict import predict
from medtune.inference.provenance import model_source
from medtune.io import write_jsonl
from medtune.models import build_tiny_model, load_for_inference, load_tokenizer, tokenizer_corpus
from medtune.report.markdown import write_report
from medtune.templates import get_template
from medtune.train import sft


@dataclass
class QuickstartResult:
    """Where the quickstart wrote its outputs."""

    out_dir: Path
    run_dir: Path
    eval_dirs: dict[str, Path]
    report: Path


def sample_path() -> Path:
    """The shipped CMExam sample (1,000 real validation rows)."""
    return Path(str(resources.files("medtune") / "examples" / "cmexam" / "val_sample.csv"))


def config_path(name: str) -> Path:
    """A shipped YAML recipe."""
    return Path(str(resources.files("medtune") / "configs" / f"{name}.yaml"))


def run_quickstart(
    out_dir: str | Path = "runs/quickstart",
    n_train: int = 48,
    n_heldout: int = 100,
    overrides: list[str] | None = None,
    max_new_tokens: int = 48,
    tokenizer: str = "ours",
    overwrite: bool = False,
) -> QuickstartResult:
    """Run the whole loop; returns paths. ``overrides`` go to the training config.

    ``tokenizer`` is ``ours`` (a small BPE trained on the sample, fast) or a real vocabulary
    (``qwen2.5``, ``deepseek``; ``medtune.vocabularies``, no download) to see how a real model
    tokenises the questions; the model is the same tiny Llama either way, with a 150k-row
    embedding for a real vocabulary, so training is slower.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- data: convert the sample, hold out questions the model never sees -----------------------
    print(f"[1/5] converting {sample_path().name}")
    conv = convert_cmexam(sample_path(), out / "records.jsonl", on_invalid="skip")
    print(f"      {len(conv.records)} records, {len(conv.rejects)} rejected "
          f"(see {out / 'records.rejects.jsonl'}), {conv.n_missing_explanation} without explanation")
    pool, heldout = split_records(conv.records, n_heldout / len(conv.records), seed=0)
    train = pool[:n_train]
    write_jsonl(out / "train.jsonl", [r.to_dict() for r in train])
    write_jsonl(out / "heldout.jsonl", [r.to_dict() for r in heldout])

    # ---- tiny model: random weights, tokenizer trained on the training questions ------------------
    if tokenizer == "ours":
        print("[2/5] building the tiny model (random weights, BPE tokenizer trained on the sample)")
        model_dir = out / "tiny-model"
    else:
        print(f"[2/5] building the tiny model (random weights, the real {tokenizer} tokenizer)")
        model_dir = out / f"tiny-model-{Path(tokenizer).name}"  # one folder per tokenizer: never a mix
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, tokenizer_corpus(pool), tokenizer=tokenizer)

    # ---- fine-tune ----------------------------------------------------------------------------------
    cfg = load_config(
        config_path("quickstart"),
        [f"model.name_or_path={model_dir}", f"data.train={out / 'train.jsonl'}",
         f"train.output_dir={out / 'sft-lora'}", *(overrides or [])],
    )
    summary = token_summary(train, get_template(cfg.data.template), load_tokenizer(str(model_dir)), cfg.data.max_length)
    print(format_token_summary(summary, tokenizer))
    print(f"[3/5] fine-tuning with LoRA on {len(train)} questions")
    from medtune.train.common import RunDirError, overwriting

    try:
        with overwriting(cfg.train.output_dir) if overwrite else contextlib.nullcontext():
            run_dir = sft.run(cfg)
    except RunDirError as exc:
        # e.g. a quickstart run left by an older medtune whose defaults differ: say how to rerun
        # this command, not which config key to change
        raise RunDirError(f"{exc} (or rerun with: medtune quickstart --out {out} --overwrite)") from exc

    # ---- predict: base and tuned model, on seen and held-out questions --------------------------------
    print("[4/5] predicting (base model = before, tuned model = after)")
    art = resolve_run(run_dir)
    params = GenerationParams(max_new_tokens=max_new_tokens)
    from medtune.data.cmexam import load_records

    sets = {"seen": load_records(out / "train.jsonl"), "heldout": load_records(out / "heldout.jsonl")}
    eval_dirs: dict[str, Path] = {}
    for model_name, adapter in (("base", None), ("tuned", art.adapter_path)):
        model, tokenizer = load_for_inference(art.model_path, adapter, dtype="float32", merge_first=art.merge_first)
        backend = HFBackend(model, tokenizer)
        source = model_source(art.model_path, adapter, art.merge_first, dtype="float32",
                              run=run_dir if adapter else None)
        for set_name, records in sets.items():
            label = f"{model_name}-{set_name}"
            pred_path = out / "predictions" / f"{label}.jsonl"
            predict(records, backend, art.template, pred_path, params, batch_size=16, tokenizer=tokenizer,
                    source=source, overwrite=overwrite)
            eval_dirs[label] = out / "eval" / label

    # ---- evaluate + report ------------------------------------------------------------------------------
    print("[5/5] evaluating and writing the report")
    for label, eval_dir in eval_dirs.items():
        evaluate(out / "predictions" / f"{label}.jsonl", eval_dir)
    order = ["base-seen", "tuned-seen", "base-heldout", "tuned-heldout"]
    report = write_report([eval_dirs[k] for k in order], out / "report.md", run_dirs={"sft-lora": run_dir})
    return QuickstartResult(out, run_dir, eval_dirs, report)


def token_summary(records: list[Any], template: Any, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """Token counts of exam ``records`` as training tokenises them with ``template``.

    Args:
        records: Exam records.
        template: The exam template training uses.
        tokenizer: The model's tokenizer.
        max_length: ``data.max_length``: prompt + target tokens per example.

    Returns:
        ``questions``; ``prompt_mean``/``prompt_max`` (the rendered question with its options, as the
        model reads it); ``example_mean``/``example_max`` (with the answer, explanation and EOS);
        ``chars_per_token`` of the prompts; ``over`` (examples longer than ``max_length``), and of
        those ``truncated`` (explanation shortened) and ``dropped``, exactly as training decides.
    """
    from medtune.data.sft import build_sft_examples, encode_prompt, encode_target

    prompts = [template.render_prompt(r, tokenizer) for r in records]
    prompt_tokens = [len(encode_prompt(tokenizer, p, template)) for p in prompts]
    example_tokens = [n + len(encode_target(tokenizer, template.render_target(r)))
                      for n, r in zip(prompt_tokens, records, strict=True)]
    built = build_sft_examples(records, template, tokenizer, max_length)
    n = max(len(records), 1)
    return {
        "questions": len(records), "vocabulary": len(tokenizer), "max_length": max_length,
        "prompt_mean": sum(prompt_tokens) / n, "prompt_max": max(prompt_tokens, default=0),
        "example_mean": sum(example_tokens) / n, "example_max": max(example_tokens, default=0),
        "chars_per_token": sum(map(len, prompts)) / max(sum(prompt_tokens), 1),
        "over": sum(t > max_length for t in example_tokens),
        "truncated": len(built.truncated), "dropped": len(built.skipped),
    }


def format_token_summary(summary: dict[str, Any], tokenizer_name: str) -> str:
    """Two indented lines for the quickstart's output."""
    s = summary
    return (f"      {tokenizer_name} tokenizer ({s['vocabulary']:,} tokens): a question with its options is "
            f"{s['prompt_mean']:.0f} tokens on average, {s['prompt_max']} at most "
            f"({s['chars_per_token']:.2f} characters per token); with answer and explanation "
            f"{s['example_mean']:.0f} on average, {s['example_max']} at most\n"
            f"      {s['over']} of {s['questions']} training questions exceed data.max_length={s['max_length']}: "
            f"{s['truncated']} with the explanation shortened, {s['dropped']} dropped")
