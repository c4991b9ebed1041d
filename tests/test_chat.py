"""Terminal chat: the loop with a fake backend, and the real CLI driven through a pseudo-terminal."""

from __future__ import annotations

import io
import sys

import pytest

from medtune.inference.base import FakeBackend, GenerationParams
from medtune.inference.chat import chat_prompt, parse_exam_text
from medtune.inference.terminal import TerminalChat
from medtune.templates import get_template


def _script(lines):
    it = iter(lines)

    def read(prompt: str) -> str:
        return next(it)  # StopIteration would mean the loop read past the script

    return read


def test_history_reset_and_exit():
    backend = FakeBackend({"第二": "好的", "你好": "您好"}, default="嗯")
    out = io.StringIO()
    chat = TerminalChat(backend, get_template("qa"), GenerationParams(), read=_script(
        ["你好", "第二个问题", "/reset", "第三", "/exit"]), out=out)
    assert chat.run() == 0
    prompts = [call[0] for call in backend.calls]
    # without a tokenizer the plain 用户/助手 transcript is used; turn 2 carries turn 1
    assert prompts[0] == "用户：你好\n助手："
    assert prompts[1] == "用户：你好\n助手：您好\n用户：第二个问题\n助手："
    assert prompts[2] == "用户：第三\n助手："  # after /reset
    text = out.getvalue()
    assert "模型> 您好" in text and "(history cleared)" in text


def test_exam_mode_parses_answer():
    backend = FakeBackend({"带状疱疹": "D\n理由：带状疱疹沿肋间神经分布"})
    out = io.StringIO()
    chat = TerminalChat(backend, get_template("qa"), GenerationParams(), exam=True, read=_script(
        ["下列哪种病变引起的胸痛常沿一侧肋间神经分布", "A 胸肌劳损", "B 流行性胸痛", "C 颈椎病",
         "D 带状疱疹", "E 皮下蜂窝组织炎", "", "只有一行", "", "/exit"]), out=out)
    assert chat.run() == 0
    text = out.getvalue()
    assert "[模型] 答案: D" in text and "[模型] 解释: 带状疱疹沿肋间神经分布" in text
    assert "(not an exam question: need at least two options" in text
    assert backend.calls[0][0].startswith("问题：下列哪种病变引起的胸痛常沿一侧肋间神经分布\nA: 胸肌劳损")


def test_compare_without_adapter_says_so():
    out = io.StringIO()
    chat = TerminalChat(FakeBackend(), get_template("qa"), GenerationParams(), read=_script(["/compare 你好", "/exit"]),
                        out=out)
    chat.run()
    assert "/compare needs a model with an adapter" in out.getvalue()


def test_parse_exam_text_forms():
    q, opts = parse_exam_text("哪个是\nA 甲\nB. 乙\nC、丙\nＤ：丁")
    assert q == "哪个是" and opts == {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}
    with pytest.raises(ValueError, match="no question"):
        parse_exam_text("\n\n")
    with pytest.raises(ValueError, match="after the options"):
        parse_exam_text("哪个是\nA 甲\nB 乙\n这不是选项")


def test_chat_prompt_uses_chat_template(tiny_tokenizer):
    prompt, special = chat_prompt([{"role": "user", "content": "你好"}], tiny_tokenizer)
    assert prompt == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n" and special is False
    with pytest.raises(ValueError, match="bad message"):
        chat_prompt([{"role": "robot", "content": "x"}], tiny_tokenizer)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, sample_records):
    from medtune.config import load_config
    from medtune.io import write_jsonl
    from medtune.train import sft

    work = tmp_path_factory.mktemp("chat-run")
    write_jsonl(work / "t.jsonl", [r.to_dict() for r in sample_records[:4]])
    cfg = load_config("src/medtune/configs/quickstart.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={work / 't.jsonl'}",
        f"train.output_dir={work / 'run'}", "train.max_steps=2", "train.report_to=none"])
    return sft.run(cfg)


def test_cli_chat_through_a_pty(tiny_run):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "medtune.cli", "chat", str(tiny_run), "--max-new-tokens", "6"],
                          encoding="utf-8", timeout=60, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    try:
        child.expect("template qa")
        child.expect("你> ")
        child.sendline("你好")
        child.expect("模型> ")
        child.expect("你> ")
        child.sendline("/compare 你好")
        child.expect("基座 base> ")
        child.expect("微调 tuned> ")
        child.expect("你> ")
        child.sendline("/reset")
        child.expect(r"\(history cleared\)")
        child.expect("你> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_cli_exam_mode_through_a_pty(tiny_run):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "medtune.cli", "chat", str(tiny_run), "--exam",
                                           "--max-new-tokens", "8"],
                          encoding="utf-8", timeout=60, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    try:
        child.expect("你> ")
        for line in ["不寐的病位主要在", "A 心", "B 脑", "C 肝", "D 脾", "E 肾", ""]:
            child.sendline(line)
        child.expect(r"\[模型\] 答案: ")
        child.expect(r"\[模型\] 解释: ")
        child.expect("你> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_an_empty_reply_is_said_as_the_web_demo_says_it():
    """Symptom: a reply of only newlines showed a bare '模型> ' (the web demo said the model produced no text)."""
    from medtune.inference.chat import EMPTY_REPLY

    out = io.StringIO()
    chat = TerminalChat(FakeBackend({"发烧": "\n\n"}), get_template("qa"), GenerationParams(),
                        read=_script(["发烧怎么办", "/exit"]), out=out)
    assert chat.run() == 0
    assert f"模型> \n\n{EMPTY_REPLY}\n" in out.getvalue()
    assert chat.history[1] == {"role": "assistant", "content": "\n\n"}  # the history keeps what was generated
    out = io.StringIO()
    chat = TerminalChat(FakeBackend(default="好的"), get_template("qa"), GenerationParams(),
                        read=_script(["再问", "/exit"]), out=out)
    assert chat.run() == 0
    assert "模型> 好的\n" in out.getvalue() and EMPTY_REPLY not in out.getvalue()
