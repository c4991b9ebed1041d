"""Run kind × command: every kind of run through every command that opens a run (the one resolver).

Tiny runs of each kind are trained once (2 steps each, the shipped sample data), including the
chains pt → sft → rm and (pt →) sft → dpo → rl, the rl stage scoring with that chained reward model.
Each cell then asserts either a real result or the exact one-line refusal:

* generation cells compare the command's output with greedy decoding by full forward passes of
  a reference model built here with peft directly (base + each earlier adapter merged + the run's
  own adapter, listed by hand in ``CHAIN``), on the prompt the run was trained with; and the run's
  adapter moved the model (its logits differ from the adapter-off model's);
* refusal cells run the real command line and compare stderr with the whole expected line.

``test_the_matrix_is_complete`` prints the table (``pytest -s``) and checks every cell ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from medtune.cli import main
from medtune.inference.base import GenerationParams

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "medtune" / "configs"
GPT = ROOT / "src" / "medtune" / "examples" / "medicalgpt"
QUICK = ["train.save_steps=1000", "train.logging_steps=1", "train.report_to=none", "train.max_steps=2"]
N_NEW = 6
PARAMS = GenerationParams(max_new_tokens=N_NEW)
TEXT = "发热的常见原因有"  # raw text a pt run continues
QUESTION = "发热三天，咳嗽，应该怎么办？"  # a user turn for conversation runs

KINDS = ["pt", "sft-exam", "sft-exam-prefix", "sft-conversation", "rm", "rm-full", "dpo", "rl"]
COMMANDS = ["predict", "predict-other-data", "loglik", "chat", "server", "webui", "export", "next-stage"]
RUN = {"pt": "pt", "sft-exam": "sfte", "sft-exam-prefix": "prefix", "sft-conversation": "sftc", "rm": "rm",
       "rm-full": "rm_full", "dpo": "dpo", "rl": "rl"}
# What each run's model is made of, in training order: every adapter but the last merged, the last
# on top. Written out here so the reference does not depend on the resolver under test.
CHAIN = {"pt": ["pt"], "sft-exam": ["sfte"], "sft-exam-prefix": ["prefix"], "sft-conversation": ["pt", "sftc"],
         "rm": ["pt", "sftc", "rm"], "dpo": ["pt", "sftc", "dpo"], "rl": ["pt", "sftc", "dpo", "rl"]}
DATA = {"pt": "text", "sft-exam": "exam", "sft-exam-prefix": "exam", "sft-conversation": "conversation",
        "dpo": "conversation", "rl": "conversation"}
CHILD = {"pt": "sftc", "sft-exam": "sfte_next", "sft-conversation": "dpo", "dpo": "rl", "rl": "rl_next"}
MATRIX: dict[tuple[str, str], str] = {}


# ---- training the runs (once) --------------------------------------------------------------------


def _train(recipe: str, model: Path | str, data: Path | str, out: Path, *extra: str) -> Path:
    rc = main(["train", str(CONFIGS / recipe), f"model.name_or_path={model}", f"data.train={data}",
               f"train.output_dir={out}", *QUICK, *extra])
    assert rc == 0, out
    return out


def _short_pairs(path: Path, n: int) -> Path:
    """The first ``n`` preference pairs of the shipped sample whose texts are short (fast on CPU)."""
    rows = []
    for line in (GPT / "dpo_zh_500.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if len(row["chosen"]) + len(row["rejected"]) + len(json.dumps(row["conversations"])) < 600:
            rows.append(line)
        if len(rows) == n:
            break
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, sample_records):
    from medtune.io import write_jsonl

    work = tmp_path_factory.mktemp("run-matrix")
    exam = work / "exam.jsonl"
    write_jsonl(exam, [r.to_dict() for r in sample_records[:8]])
    pairs = _short_pairs(work / "pairs.jsonl", 8)
    sft_conv = GPT / "medical_sft_1K_format.jsonl"
    lr = "train.learning_rate=5e-2"  # 2 steps must move the tiny model visibly
    r: dict[str, Path] = {"work": work, "exam": exam, "base": tiny_model_dir}
    r["pt"] = _train("pt_lora_tiny.yaml", tiny_model_dir, GPT / "fever.txt", work / "pt", "data.max_samples=40",
                     "pt.block_size=64", "train.batch_size=2", lr)
    r["sftc"] = _train("quickstart.yaml", r["pt"], sft_conv, work / "sftc", "data.max_samples=8",
                       "data.max_length=256", lr)
    pref = ["data.max_samples=null", "data.val_fraction=0", "train.batch_size=2"]
    r["rm"] = _train("rm_lora_tiny.yaml", r["sftc"], pairs, work / "rm", *pref)  # pt → sft → rm
    r["rm_full"] = _train("rm_lora_tiny.yaml", tiny_model_dir, pairs, work / "rm_full", *pref,
                          "adapter.method=full", "train.learning_rate=1e-4")
    r["sfte"] = _train("quickstart.yaml", tiny_model_dir, exam, work / "sfte", lr)
    r["prefix"] = _train("sft_prefix_tiny.yaml", tiny_model_dir, exam, work / "prefix")
    r["dpo"] = _train("dpo_lora_tiny.yaml", r["sftc"], pairs, work / "dpo", *pref, "train.learning_rate=5e-3")
    # sft → dpo → rl, rewarded by the chained reward model (which crashed to load before)
    r["rl"] = _train("rl_grpo_exam_tiny.yaml", r["dpo"], GPT / "grpo_sample.jsonl", work / "rl",
                     "data.max_samples=4", "rl.num_generations=2", "train.batch_size=2",
                     "rl.max_completion_length=4", "rl.reward=model", f"rl.reward_model={r['rm']}")
    r["sfte_next"] = _train("quickstart.yaml", r["sfte"], exam, work / "sfte_next", lr)
    r["rl_next"] = _train("quickstart.yaml", r["rl"], sft_conv, work / "rl_next", "data.max_samples=4",
                          "data.max_length=256", lr)
    return r


# ---- references built with peft directly ------------------------------------------------------------


def _bare(adapter: Path):
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter))
    config.task_type = None  # a weight delta, whatever head it is merged under
    return config


def _reference_model(runs, names: list[str], seq_cls: bool = False):
    """Base + adapters of ``names`` (all but the last merged), float32 on CPU, eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if seq_cls:
        model = AutoModelForSequenceClassification.from_pretrained(runs["base"], num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(runs["base"], dtype=torch.float32)
    for name in names[:-1]:
        adapter = runs[name] / "adapter"
        model = PeftModel.from_pretrained(model, str(adapter), config=_bare(adapter)).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(runs[names[-1]] / "adapter")).eval()
    if seq_cls and model.config.pad_token_id is None:
        model.config.pad_token_id = _tokenizer(runs).pad_token_id
    return model


@pytest.fixture(scope="module")
def refs(runs):
    return {kind: _reference_model(runs, CHAIN[kind]) for kind in DATA}


def _tokenizer(runs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(runs["base"])


def _greedy(model, tok, prompt: str, add_special_tokens: bool = True) -> str:
    """Greedy continuation by full forward passes (no cache, no generate)."""
    ids = tok(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(N_NEW):
            token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def _logits(model, tok, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0].float()


def _adapter_moved(model, tok, text: str) -> float:
    """Largest logit change the run's own adapter makes (0: training did nothing)."""
    with model.disable_adapter():
        base = _logits(model, tok, text)
    return float((_logits(model, tok, text) - base).abs().max())


def _prompt(runs, kind: str, template) -> tuple[str, bool]:
    """The prompt a run of ``kind`` is asked with, rendered as it was trained."""
    from medtune.data.conversations import conversation_prompt

    tok = _tokenizer(runs)
    if DATA[kind] == "exam":
        return template.render_prompt(_records(runs)[0], tok), not template.chat
    if DATA[kind] == "conversation":
        return conversation_prompt([{"role": "user", "content": QUESTION}], template, tok)
    return TEXT, True


def _records(runs):
    from medtune.data.exam import load_exam_file

    return load_exam_file(runs["exam"])[0][:2]


@pytest.fixture(scope="module")
def loaded(runs):
    """Each run opened as chat/serve/webui open it (``kind=None``: the run's own template)."""
    from medtune.inference.loading import load_backend

    return {kind: load_backend(run=str(runs[RUN[kind]]), kind=None) for kind in DATA}


def _refused(argv: list[str], capsys) -> str:
    """Run the command line; it must fail with exit 2 and exactly one line on stderr."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


# ---- the exact refusals ------------------------------------------------------------------------------


def rm_says(run: Path, loglik: bool = False) -> str:
    extra = ", and it has no language-model head to score answer options with" if loglik else ""
    return (f"{run} is a reward model (stage rm): a reward model scores text, it does not generate{extra}; use it "
            f"as rl.reward_model of an rl stage (rl.reward=model), or export it (medtune export {run} --out DIR) to "
            "load it with AutoModelForSequenceClassification")


def pt_says(run: Path, task: str, example: str) -> str:
    return (f"{run} is a continued-pretraining run (stage pt): it was trained on raw text and has no prompt "
            f"template, so it has no trained way to {task}; train an sft stage on it (model.name_or_path={run}), "
            f"try it zero-shot with a template you choose (--model {run} --template {example}), or continue text "
            "with medtune chat/serve")


def other_kind_says(run: Path, trained: str, given: str) -> str:
    return f"{run} was trained on {trained} data, but this data is {given} data"


# ---- the cells ---------------------------------------------------------------------------------------------


def _predict_cell(runs, refs, kind, data_kind, tmp_path, capsys) -> str:
    run = runs[RUN[kind]]
    out = tmp_path / "pred.jsonl"
    data = runs["exam"] if data_kind == "exam" else GPT / "medical_sft_1K_format.jsonl"
    argv = ["predict", "--run", str(run), "--data", str(data), "--out", str(out), "--limit", "2",
            "--batch-size", "1", "--max-new-tokens", str(N_NEW)]
    if kind.startswith("rm"):
        assert _refused(argv, capsys) == f"medtune predict: error: {rm_says(run)}"
        return "refused: reward model"
    if kind == "pt":
        task, example = ("answer exam questions", "qa") if data_kind == "exam" else ("reply to conversations", "plain")
        assert _refused(argv, capsys) == f"medtune predict: error: {pt_says(run, task, example)}"
        return "refused: no prompt template"
    if DATA[kind] != data_kind:
        assert _refused(argv, capsys) == f"medtune predict: error: {other_kind_says(run, DATA[kind], data_kind)}"
        return f"refused: trained on {DATA[kind]} data"
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    tok = _tokenizer(runs)
    assert len(rows) == 2
    for row in rows:
        if data_kind == "conversation":
            from medtune.data.conversations import conversation_prompt
            from medtune.inference.loading import resolve_run

            want_prompt, special = conversation_prompt(row["messages"], resolve_run(run).template, tok)
            assert row["prompt"] == want_prompt  # the run's conversation template, not the chat template
        else:
            special = True
        assert row["output"] == _greedy(refs[kind], tok, row["prompt"], special)
    assert _adapter_moved(refs[kind], tok, rows[0]["prompt"]) > 1e-4
    return "= reference greedy output; adapter moved logits"


@pytest.mark.parametrize("kind", KINDS)
def test_predict(runs, refs, kind, tmp_path, capsys):
    data_kind = "conversation" if DATA.get(kind) == "conversation" else "exam"
    MATRIX[kind, "predict"] = _predict_cell(runs, refs, kind, data_kind, tmp_path, capsys)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_other_data(runs, refs, kind, tmp_path, capsys):
    data_kind = "exam" if DATA.get(kind) == "conversation" else "conversation"
    MATRIX[kind, "predict-other-data"] = _predict_cell(runs, refs, kind, data_kind, tmp_path, capsys)


@pytest.mark.parametrize("kind", KINDS)
def test_loglik(runs, refs, kind, tmp_path, capsys):
    run = runs[RUN[kind]]
    argv = ["evaluate", "--mode", "loglik", "--run", str(run), "--data", str(runs["exam"]), "--limit", "2",
            "--out", str(tmp_path / "ev")]
    if kind.startswith("rm"):
        assert _refused(argv, capsys) == f"medtune evaluate: error: {rm_says(run, loglik=True)}"
        MATRIX[kind, "loglik"] = "refused: reward model"
        return
    if kind == "pt":
        want = pt_says(run, "score exam answers by log-likelihood", "qa")
        assert _refused(argv, capsys) == f"medtune evaluate: error: {want}"
        MATRIX[kind, "loglik"] = "refused: no prompt template"
        return
    if DATA[kind] == "conversation":
        assert _refused(argv, capsys) == f"medtune evaluate: error: {other_kind_says(run, 'conversation', 'exam')}"
        MATRIX[kind, "loglik"] = "refused: trained on conversation data"
        return
    assert main(argv) == 0
    assert (tmp_path / "ev" / "results.json").exists()
    from medtune.evaluation.loglik import build_requests
    from medtune.inference.loading import load_backend

    lb = load_backend(run=str(run), use="loglik")
    requests, _ = build_requests(_records(runs), lb.template, lb.backend.tokenizer)
    ref = refs[kind]
    for (context, conts), scores in zip(requests, lb.backend.loglikelihood(requests), strict=True):
        for cont, score in zip(conts, scores, strict=True):
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logprobs = torch.log_softmax(ref(input_ids=ids).logits[0, -ids.shape[1]:].float(), dim=-1)
            want = sum(float(logprobs[len(context) - 1 + k, t]) for k, t in enumerate(cont))
            assert score == pytest.approx(want, abs=1e-4)
    MATRIX[kind, "loglik"] = "= reference log-probs of every option"


class _Recorder:
    """A backend that records each streamed prompt and its reply (and has no /compare view)."""

    def __init__(self, backend):
        self.backend, self.tokenizer, self.calls = backend, backend.tokenizer, []

    def stream(self, prompt, params, add_special_tokens=True):
        pieces = list(self.backend.stream(prompt, params, add_special_tokens=add_special_tokens))
        self.calls.append((prompt, add_special_tokens, "".join(pieces)))
        yield from pieces


def _script(lines):
    it = iter(lines)
    return lambda prompt: next(it)


@pytest.mark.parametrize("kind", KINDS)
def test_chat(runs, refs, loaded, kind, capsys):
    import io

    from medtune.inference.chat import answer_exam
    from medtune.inference.terminal import TerminalChat

    run = runs[RUN[kind]]
    if kind.startswith("rm"):
        assert _refused(["chat", str(run)], capsys) == f"medtune chat: error: {rm_says(run)}"
        MATRIX[kind, "chat"] = "refused: reward model"
        return
    lb, tok, ref = loaded[kind], _tokenizer(runs), refs[kind]
    if DATA[kind] == "exam":
        rec = _records(runs)[0]
        prompt, special = _prompt(runs, kind, lb.template)
        ans = answer_exam(lb.backend, lb.template, rec.question, rec.options, PARAMS)
        assert ans.prompt == prompt and ans.output == _greedy(ref, tok, prompt, special)
        MATRIX[kind, "chat"] = "--exam: answer_exam = reference"
        return
    if kind == "pt":
        want = pt_says(run, "answer exam questions", "qa")
        assert _refused(["chat", str(run), "--exam"], capsys) == f"medtune chat: error: {want}"
        rec = _Recorder(lb.backend)
        chat = TerminalChat(rec, lb.template, PARAMS, read=_script([TEXT, "再来一段", "/exit"]), out=io.StringIO())
        assert chat.run() == 0
        assert [c[0] for c in rec.calls] == [TEXT, "再来一段"]  # each line continued alone: no turns
        assert rec.calls[0][2] == _greedy(ref, tok, TEXT)
        MATRIX[kind, "chat"] = "continues each line = reference; --exam refused"
        return
    from medtune.data.conversations import conversation_prompt

    want = other_kind_says(run, "conversation", "exam")
    assert _refused(["chat", str(run), "--exam"], capsys) == f"medtune chat: error: {want}"
    rec = _Recorder(lb.backend)
    chat = TerminalChat(rec, lb.template, PARAMS, read=_script([QUESTION, "还要注意什么？", "/exit"]), out=io.StringIO())
    assert chat.run() == 0
    first, second = rec.calls
    turn1 = [{"role": "user", "content": QUESTION}]
    assert first[:2] == conversation_prompt(turn1, lb.template, tok)
    assert not first[0].startswith("<|im_start|>")  # not the tokenizer's chat template: the run's own format
    assert first[2] == _greedy(ref, tok, first[0], first[1])
    turn2 = [*turn1, {"role": "assistant", "content": first[2]}, {"role": "user", "content": "还要注意什么？"}]
    assert second[:2] == conversation_prompt(turn2, lb.template, tok)
    assert second[2] == _greedy(ref, tok, second[0], second[1])
    MATRIX[kind, "chat"] = "turns in the run's format (2 turns) = reference; --exam refused"


@pytest.mark.parametrize("kind", KINDS)
def test_server(runs, refs, loaded, kind, capsys):
    from medtune.inference.server import background_server, create_app

    run = runs[RUN[kind]]
    if kind.startswith("rm"):
        assert _refused(["serve", str(run), "--port", "0"], capsys) == f"medtune serve: error: {rm_says(run)}"
        MATRIX[kind, "server"] = "refused: reward model"
        return
    lb, tok, ref = loaded[kind], _tokenizer(runs), refs[kind]
    prompt, special = _prompt(runs, kind, lb.template)
    app = create_app(lb.backend, "m", template=lb.template)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        def ask(path: str, **body) -> httpx.Response:
            return client.post(path, json={"model": "m", "max_tokens": N_NEW, "temperature": 0, **body})

        if DATA[kind] == "conversation":
            reply = ask("/v1/chat/completions", messages=[{"role": "user", "content": QUESTION}])
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == _greedy(ref, tok, prompt, special)
            assert reply.json()["usage"]["prompt_tokens"] == len(tok(prompt, add_special_tokens=special)["input_ids"])
            MATRIX[kind, "server"] = "chat completion in the run's format = reference"
            return
        reply = ask("/v1/completions", prompt=prompt)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == _greedy(ref, tok, prompt)
        chat = ask("/v1/chat/completions", messages=[{"role": "user", "content": QUESTION}])
    if kind == "pt":
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "chat_not_supported"
        assert "trained on raw text (stage pt)" in chat.json()["error"]["message"]
        MATRIX[kind, "server"] = "completion = reference; chat completion 400 (raw text)"
        return
    chat_text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                        add_generation_prompt=True)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == _greedy(
        ref, tok, chat_text, add_special_tokens=False)
    MATRIX[kind, "server"] = "completion and chat completion = reference"


@pytest.mark.parametrize("kind", KINDS)
def test_webui(runs, refs, loaded, kind, capsys):
    gr = pytest.importorskip("gradio")
    from medtune.web import app

    run = runs[RUN[kind]]
    if kind.startswith("rm"):
        assert _refused(["webui", str(run), "--port", "0"], capsys) == f"medtune webui: error: {rm_says(run)}"
        MATRIX[kind, "webui"] = "refused: reward model"
        return
    lb, tok, ref = loaded[kind], _tokenizer(runs), refs[kind]
    demo = app.build_demo(lb.backend, lb.template, lb.name, base_backend=lb.backend.base())
    assert isinstance(demo, gr.Blocks)
    ids = {b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    prompt, special = _prompt(runs, kind, lb.template)
    want = _greedy(ref, tok, prompt, special)
    if DATA[kind] == "exam":
        assert {"tab-chat", "tab-exam", "tab-compare"} <= ids
        rec = _records(runs)[0]
        options = "\n".join(f"{k} {v}" for k, v in rec.options.items())
        result = app.exam_handler(lb.backend, lb.template, rec.question, options, PARAMS)
        assert result.error is None and result.output == want
        MATRIX[kind, "webui"] = "chat+exam+compare tabs; exam answer = reference"
        return
    assert "tab-chat" in ids and "tab-exam" not in ids and "tab-compare" not in ids
    message = TEXT if kind == "pt" else QUESTION
    shown = list(app.chat_handler(lb.backend, [], message, PARAMS, lb.template))[-1]
    assert shown[-1] == {"role": "assistant", "content": want or app.EMPTY_REPLY}
    MATRIX[kind, "webui"] = ("continue tab only; continuation = reference" if kind == "pt"
                             else "chat tab only, run's format; reply = reference")


def _scores(model, tok, texts: list[str]) -> list[float]:
    with torch.no_grad():
        return [float(model(**tok(t, return_tensors="pt")).logits[0, 0]) for t in texts]


@pytest.mark.parametrize("kind", KINDS)
def test_export(runs, refs, kind, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from medtune.export import EXPORT_INFO, export_run

    run, out, tok = runs[RUN[kind]], runs["work"] / f"export-{kind}", _tokenizer(runs)
    if kind == "sft-exam-prefix":
        want = (f"{run} was trained with PREFIX_TUNING (adapter.method=prefix), which adds virtual tokens rather "
                "than a weight delta, so it cannot be merged into the base model; export it with --adapter-only "
                "and load it with peft (PeftModel.from_pretrained)")
        assert _refused(["export", str(run), "--out", str(out)], capsys) == f"medtune export: error: {want}"
        export_run(run, out, adapter_only=True)
        assert json.loads((out / EXPORT_INFO).read_text())["peft_type"] == "PREFIX_TUNING"
        MATRIX[kind, "export"] = "merge refused (virtual tokens); --adapter-only works"
        return
    assert main(["export", str(run), "--out", str(out)]) == 0
    info = json.loads((out / EXPORT_INFO).read_text())
    texts = [TEXT, "问题：发热怎么办？\n答案："]
    if kind.startswith("rm"):
        from medtune.train.rewards import load_reward_model

        exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
        rm, rm_tok = load_reward_model(run, dtype="float32")
        got = _scores(exported, tok, texts)
        assert got == pytest.approx(_scores(rm, rm_tok, texts), abs=1e-4)
        if kind == "rm":  # the chain pt → sft → rm, rebuilt with peft here
            assert got == pytest.approx(_scores(_reference_model(runs, CHAIN["rm"], seq_cls=True), tok, texts),
                                        abs=1e-4)
        assert info["run_kind"] == "rm" and info["load"] == "AutoModelForSequenceClassification.from_pretrained(OUT)"
        MATRIX[kind, "export"] = "seq-cls model; scores = load_reward_model's"
        return
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    for text in texts:
        assert (_logits(exported, tok, text) - _logits(refs[kind], tok, text)).abs().max() < 1e-4
    assert info["run_kind"] == loaded_kind(kind)
    MATRIX[kind, "export"] = "merged causal LM; logits = reference"


def test_adapter_only_export_of_a_chained_run_is_refused(runs, capsys):
    """Symptom: rl-exam's adapter exported alone loaded on the bare base and reproduced 0 of 48 answers."""
    run, out = runs["rl"], runs["work"] / "export-rl-adapter-only"
    want = (f"{run} was trained on top of earlier stages ({runs['pt']}, {runs['sftc']}, {runs['dpo']}), whose "
            "adapters are merged into the base first; its adapter alone on the base model would not reproduce the "
            "run. Export it merged (without --adapter-only), or export the previous stage merged (medtune export "
            f"{runs['dpo']} --out BASE) and load this run's adapter on BASE")
    assert _refused(["export", str(run), "--adapter-only", "--out", str(out)], capsys) == f"medtune export: error: {want}"
    assert not out.exists()


def loaded_kind(kind: str) -> str:
    return {"sft-exam-prefix": "sft-exam", "sft-conversation": "sft-conversation", "rl": "rl-conversation"}.get(
        kind, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_next_stage(runs, refs, loaded, kind, tmp_path, capsys):
    run = runs[RUN[kind]]
    argv = ["train", str(CONFIGS / "quickstart.yaml"), f"model.name_or_path={run}", f"data.train={runs['exam']}",
            f"train.output_dir={tmp_path / 'next'}", *QUICK]
    if kind in ("rm", "rm-full"):
        start = runs["sftc"] if kind == "rm" else runs["base"]
        want = (f"model.name_or_path: {run} is a reward model (stage rm): a reward model scores text, it does not "
                "generate, so no stage can train on top of it; use it as rl.reward_model (rl.reward=model), or "
                f"train from the model it started from ({start})")
        assert _refused(argv, capsys) == f"medtune train: error: {want}"
        assert not (tmp_path / "next").exists()
        if kind == "rm":  # and as a reward model it did its job: the rl run trained on its scores
            from safetensors.torch import load_file

            rl = load_file(runs["rl"] / "adapter" / "adapter_model.safetensors")
            assert all(t.abs().sum() > 0 for n, t in rl.items() if "lora_B" in n)
        MATRIX[kind, "next-stage"] = "refused as a base; works as rl.reward_model" if kind == "rm" else "refused"
        return
    if kind == "sft-exam-prefix":
        want = (f"model.name_or_path: {run} was trained with PREFIX_TUNING (virtual tokens, not a weight delta): "
                "it cannot be merged into the weights under another stage's adapter, and peft cannot train a saved "
                f"one further; train the next stage from {runs['base']}, or retrain prefix with adapter.method=lora")
        assert _refused(argv, capsys) == f"medtune train: error: {want}"
        assert _refused([*argv, "model.previous_adapter=stack"], capsys) == f"medtune train: error: {want}"
        MATRIX[kind, "next-stage"] = "refused (merge and stack)"
        return
    # the child run (trained on top of this one) with its own adapter off is exactly this run's model
    from medtune.inference.loading import load_backend

    child = load_backend(run=str(runs[CHILD[kind]]), kind=None).backend
    tok = _tokenizer(runs)
    with child.model.disable_adapter():
        got = _logits(child.model, tok, TEXT)
    assert (got - _logits(refs[kind], tok, TEXT)).abs().max() < 1e-4
    assert _adapter_moved(child.model, tok, TEXT) > 1e-4
    MATRIX[kind, "next-stage"] = f"{CHILD[kind]} on top: its base = this run's model"


def test_the_matrix_is_complete(capsys):
    missing = [(k, c) for k in KINDS for c in COMMANDS if (k, c) not in MATRIX]
    width = max(len(k) for k in KINDS)
    with capsys.disabled():
        print("\n" + " | ".join(["kind".ljust(width), *COMMANDS]))
        for k in KINDS:
            print(" | ".join([k.ljust(width), *(MATRIX.get((k, c), "(not run)") for c in COMMANDS)]))
    assert not missing, missing
