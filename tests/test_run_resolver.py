"""The one resolver and how each run kind is rendered, without training: fast checks on run folders.

``tests/test_run_matrix.py`` trains real runs of every kind and walks every command; these tests
build run directories by hand (config.yaml, template.yaml, an adapter folder) so the decisions —
what is refused, with which words, and how a turn becomes a prompt — are checked in milliseconds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
import yaml

from medtune.inference.base import FakeBackend, GenerationParams
from medtune.inference.chat import reply_prompt, reply_stops
from medtune.inference.loading import RawText, resolve_source
from medtune.templates import conversation_template, get_template

PARAMS = GenerationParams(max_new_tokens=16)


def _run_dir(root: Path, name: str, stage: str, template: dict, parent: str = "some/base-model",
             adapter: dict | None = None) -> Path:
    """A finished-looking run directory: config.yaml, template.yaml and adapter/adapter_config.json."""
    run = root / name
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "stage": stage, "model": {"name_or_path": parent, "dtype": "float32"}, "adapter": {"method": "lora"}}))
    (run / "template.yaml").write_text(yaml.safe_dump(template, allow_unicode=True))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(adapter or {"peft_type": "LORA",
                                                                                "task_type": "CAUSAL_LM"}))
    return run


PT_TEMPLATE = {"kind": "none", "name": "pt", "description": "continued pretraining on raw text: no prompt template"}
CONV_TEMPLATE = {"kind": "conversation", "name": "plain", "version": 1}


@pytest.fixture
def dirs(tmp_path):
    qa = get_template("qa").to_dict()
    return {
        "pt": _run_dir(tmp_path, "pt", "pt", PT_TEMPLATE),
        "sft-exam": _run_dir(tmp_path, "sfte", "sft", qa),
        "sft-conversation": _run_dir(tmp_path, "sftc", "sft", CONV_TEMPLATE),
        "rm": _run_dir(tmp_path, "rm", "rm", CONV_TEMPLATE, adapter={"peft_type": "LORA", "task_type": "SEQ_CLS"}),
        "dpo": _run_dir(tmp_path, "dpo", "dpo", CONV_TEMPLATE),
        "rl-exam": _run_dir(tmp_path, "rl", "rl", qa),
    }


def test_run_kind_template_and_chain(dirs, tmp_path):
    assert {k: resolve_source(run=str(d), kind=None).run_kind for k, d in dirs.items() if k != "rm"} == {
        "pt": "pt", "sft-exam": "sft-exam", "sft-conversation": "sft-conversation", "dpo": "dpo", "rl-exam": "rl-exam"}
    pt = resolve_source(run=str(dirs["pt"]), kind=None)
    assert pt.template == RawText() and pt.data_kind == "text"
    # a chain: the earlier run's adapter is merged first, this run's stays switchable
    child = _run_dir(tmp_path, "child", "sft", CONV_TEMPLATE, parent=str(dirs["pt"]))
    r = resolve_source(run=str(child), kind="conversation")
    assert r.merge_first == [str(dirs["pt"] / "adapter")] and r.adapter_path == str(child / "adapter")
    assert r.model_path == "some/base-model" and [a["path"] for a in r.source["adapters"]] == [
        str((dirs["pt"] / "adapter").resolve()), str((child / "adapter").resolve())]  # provenance: the whole chain


@pytest.mark.parametrize("use", ["generate", "loglik"])
def test_what_each_kind_refuses(dirs, use):
    def refusal(kind: str, data: str | None) -> str | None:
        try:
            resolve_source(run=str(dirs[kind]), kind=data, use=use)
        except ValueError as exc:
            return str(exc)
        return None

    rm = refusal("rm", None)
    assert rm.startswith(f"{dirs['rm']} is a reward model (stage rm): a reward model scores text, it does not "
                         "generate")
    assert ("no language-model head" in rm) == (use == "loglik")
    if use == "generate":
        assert refusal("pt", None) is None  # raw text continues
        assert "it has no trained way to answer exam questions" in refusal("pt", "exam")
        assert "(--model" in refusal("pt", "conversation") and "--template plain)" in refusal("pt", "conversation")
        assert refusal("sft-conversation", "exam") == (f"{dirs['sft-conversation']} was trained on conversation "
                                                       "data, but this data is exam data")
        assert refusal("rl-exam", "conversation").endswith("was trained on exam data, but this data is conversation data")
        assert refusal("dpo", "conversation") is None and refusal("sft-exam", "exam") is None
    else:
        assert "it has no trained way to score exam answers by log-likelihood" in refusal("pt", "exam")
        assert refusal("dpo", "exam").endswith("was trained on conversation data, but this data is exam data")
        assert refusal("rl-exam", "exam") is None
    # every kind exports
    assert all(resolve_source(run=str(d), kind=None, use="export") for d in dirs.values())


def test_a_reward_model_is_refused_however_it_is_named(dirs, tmp_path):
    exported = tmp_path / "exported-rm"
    exported.mkdir()
    (exported / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ValueError, match=r"is a sequence-classification model \(LlamaForSequenceClassification") as err:
        resolve_source(model=str(exported))
    # an export is loaded as it is, not exported again
    assert str(err.value).endswith("or load it with AutoModelForSequenceClassification")
    with pytest.raises(ValueError, match=r"rm is a reward model \(stage rm\).*or export it \(medtune export "):
        resolve_source(model=str(dirs["rm"]))
    with pytest.raises(ValueError, match=r"rm/adapter is a reward-model adapter \(peft task SEQ_CLS\)"):
        resolve_source(model="some/base-model", adapter=str(dirs["rm"] / "adapter"))
    with pytest.raises(ValueError, match=r"rm is a reward model \(stage rm\)"):
        resolve_source(model=str(dirs["rm"]))
    # a pt run's weights with a template the caller chooses: allowed, as --model
    r = resolve_source(model=str(dirs["pt"]), template="qa")
    assert r.template.name == "qa" and r.adapter_path == str(dirs["pt"] / "adapter")


def test_training_on_top_of_a_reward_model_or_a_prefix_run_is_refused_before_loading(dirs, tmp_path):
    from medtune.models import training_tokenizer

    with pytest.raises(ValueError, match="so no stage can train on top of it; use it as rl.reward_model "
                                         r"\(rl.reward=model\), or train from the model it started from "
                                         r"\(some/base-model\)"):
        training_tokenizer(str(dirs["rm"]))
    prefix = _run_dir(tmp_path, "prefix", "sft", get_template("qa").to_dict(),
                      adapter={"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM"})
    with pytest.raises(ValueError, match="trained with PREFIX_TUNING .* train the next stage from some/base-model"):
        training_tokenizer(str(prefix))


def test_reply_prompt_renders_as_each_kind_was_trained(tiny_tokenizer):
    turn = [{"role": "user", "content": "发热怎么办？"}]
    two = [*turn, {"role": "assistant", "content": "多喝水"}, {"role": "user", "content": "还有呢？"}]
    plain = conversation_template("plain")
    assert reply_prompt(turn, plain, tiny_tokenizer) == ("发热怎么办？", True)  # not the tokenizer's ChatML
    assert reply_prompt(two, plain, tiny_tokenizer) == ("用户：发热怎么办？\n助手：多喝水<|im_end|>\n用户：还有呢？\n助手：", True)
    chat = reply_prompt(turn, conversation_template("chat"), tiny_tokenizer)
    assert chat == ("<|im_start|>user\n发热怎么办？<|im_end|>\n<|im_start|>assistant\n", False)
    zh = conversation_template("instruct_zh")
    assert reply_prompt(turn, zh, tiny_tokenizer) == ("### 指令\n发热怎么办？\n\n### 输出\n", True)
    assert reply_stops(zh, True) == ("\n\n### 结束",)  # trained to end replies with it: cut there
    assert reply_prompt(two, RawText(), tiny_tokenizer) == ("还有呢？", True)  # raw text: the new text alone
    assert reply_prompt(turn, get_template("qa"), tiny_tokenizer)[0].startswith("<|im_start|>user")  # free chat


def test_terminal_chat_by_kind():
    from medtune.inference.terminal import TerminalChat

    def run(template, lines, **kw):
        backend = FakeBackend({"发热": "多喝水\n\n### 结束\n### 指令"}, default="嗯")
        out = io.StringIO()
        it = iter(lines)
        TerminalChat(backend, template, PARAMS, read=lambda p: next(it), out=out, **kw).run()
        return backend.calls, out.getvalue()

    calls, text = run(conversation_template("instruct_zh"), ["发热怎么办？", "/exit"])
    assert calls[0][0] == "### 指令\n发热怎么办？\n\n### 输出\n" and "模型> 多喝水\n" in text
    calls, text = run(RawText(), ["发热的原因", "再写", "/exit"])
    assert [c[0] for c in calls] == ["发热的原因", "再写"] and "each line you type is continued" in text
    with pytest.raises(ValueError, match="exam mode needs an exam template; this model's is plain"):
        TerminalChat(FakeBackend(), conversation_template("plain"), PARAMS, exam=True)
    with pytest.raises(ValueError, match="no place for a system message"):
        TerminalChat(FakeBackend(), RawText(), PARAMS, system="你是医生")


def test_server_by_kind():
    from medtune.inference.server import background_server, create_app

    def ask(template, path, **body):
        backend = FakeBackend({"发热": "多喝水\n\n### 结束\n### 指令"}, default="嗯")
        app = create_app(backend, "m", template=template)
        with background_server(app) as url, httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
            return client.post(path, json={"model": "m", **body}), backend.calls

    messages = [{"role": "user", "content": "发热怎么办？"}]
    reply, calls = ask(conversation_template("instruct_zh"), "/v1/chat/completions", messages=messages)
    assert calls[0][0] == "### 指令\n发热怎么办？\n\n### 输出\n"
    assert reply.json()["choices"][0]["message"]["content"] == "多喝水"  # cut at the trained end marker
    reply, calls = ask(RawText(), "/v1/chat/completions", messages=messages)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "chat_not_supported" and calls == []
    reply, calls = ask(RawText(), "/v1/completions", prompt="发热的原因")
    assert reply.status_code == 200 and calls[0][0] == "发热的原因"


def test_webui_tabs_by_kind():
    pytest.importorskip("gradio")
    from medtune.web import app

    assert app.demo_tabs(get_template("qa"), has_base=True) == ["chat", "exam", "compare"]
    assert app.demo_tabs(conversation_template("plain"), has_base=True) == ["chat"]
    assert app.demo_tabs(RawText(), has_base=False) == ["chat"]
    backend = FakeBackend({"发热": "多喝水\n\n### 结束\n### 指令"})
    shown = list(app.chat_handler(backend, [], "发热怎么办？", PARAMS, conversation_template("instruct_zh")))[-1]
    assert shown[-1] == {"role": "assistant", "content": "多喝水"}
    history = [{"role": "user", "content": "旧的"}, {"role": "assistant", "content": "旧回复"}]
    list(app.chat_handler(backend, history, "发热的原因", PARAMS, RawText()))
    assert backend.calls[-1][0] == "发热的原因"  # raw text: earlier turns are not sent


def test_an_export_prompts_with_its_runs_template(tmp_path):
    """Symptom: predict --model EXPORT used the default 'plain' format where the run was trained with 'chat'."""
    from medtune.inference.loading import EXPORT_INFO
    from medtune.templates import conversation_template, get_template

    export = tmp_path / "export"
    export.mkdir()
    (export / EXPORT_INFO).write_text(json.dumps({"format": "merged"}))
    conversation_template("chat").save(export / "template.yaml")
    assert resolve_source(model=str(export), kind="conversation").template.name == "chat"
    # the caller's --template wins; data of another kind gets that kind's default, as for any model
    assert resolve_source(model=str(export), kind="conversation", template="alpaca").template.name == "alpaca"
    assert resolve_source(model=str(export), kind="exam").template.name == "qa"
    # an exam export likewise, and a plain model folder is not an export
    get_template("analysis_first").save(export / "template.yaml")
    assert resolve_source(model=str(export), kind="exam").template.name == "analysis_first"
    (export / EXPORT_INFO).unlink()
    assert resolve_source(model=str(export), kind="exam").template.name == "qa"
