"""Web demo: the handlers called directly, then the real page driven in headless Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before gradio is first imported anywhere in this process: no analytics or version-check calls.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
gr = pytest.importorskip("gradio")

from medtune.inference.base import FakeBackend, GenerationParams  # noqa: E402
from medtune.templates import get_template  # noqa: E402
from medtune.web import app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TUNED_REPLY = "D\n理由：带状疱疹沿肋间神经分布"
BASE_REPLY = "A\n理由：胸肌劳损也会胸痛"
PARAMS = GenerationParams(max_new_tokens=64)
# One browser wait (page actions and expect(), which has its own 5 s default otherwise); each test
# does a handful, and a passing run of the whole module takes well under a minute.
WAIT_MS = 15_000


def _tuned() -> FakeBackend:
    return FakeBackend({"带状疱疹": TUNED_REPLY})


# ---- handlers, no browser ----------------------------------------------------------------------


def test_exam_handler_reads_answer_and_explanation():
    backend = _tuned()
    result = app.exam_handler(backend, get_template("qa"), app.EXAMPLE_QUESTION, app.EXAMPLE_OPTIONS, PARAMS)
    assert result.error is None
    assert result.letters == "D"
    assert result.explanation == "带状疱疹沿肋间神经分布"
    assert result.output == TUNED_REPLY
    assert result.prompt.startswith("问题：下列哪种病变引起的胸痛常沿一侧肋间神经分布\nA: 胸肌劳损\n")
    assert list(result.options) == ["A", "B", "C", "D", "E"]
    assert result.scores is None  # FakeBackend has no token probabilities


def test_whole_question_in_the_question_box():
    text = f"{app.EXAMPLE_QUESTION}\n{app.EXAMPLE_OPTIONS}"
    result = app.exam_handler(_tuned(), get_template("qa"), text, "", PARAMS)
    assert result.letters == "D" and result.options["E"] == "皮下蜂窝组织炎"


@pytest.mark.parametrize(
    ("question", "options", "message"),
    [
        (app.EXAMPLE_QUESTION, "", "need at least two options"),
        (app.EXAMPLE_QUESTION, "A 胸肌劳损", "need at least two options"),
        ("", app.EXAMPLE_OPTIONS, "no question text"),
        (app.EXAMPLE_QUESTION, "胸肌劳损\nA 流行性胸痛\nB 颈椎病", "'胸肌劳损' in the options box is not an option"),
        (app.EXAMPLE_QUESTION, "A 胸肌劳损\nB 流行性胸痛\n还有一行", "after the options is not an option"),
    ],
)
def test_bad_input_is_a_message_not_an_exception(question, options, message):
    backend = _tuned()
    result = app.exam_handler(backend, get_template("qa"), question, options, PARAMS)
    assert message in result.error
    assert result.letters == "" and backend.calls == []  # the model is not asked


def test_generation_failure_is_a_message():
    class Broken(FakeBackend):
        def generate(self, prompts, params, add_special_tokens=True):
            raise RuntimeError("CUDA out of memory")

    result = app.exam_handler(Broken(), get_template("qa"), app.EXAMPLE_QUESTION, app.EXAMPLE_OPTIONS, PARAMS)
    assert result.error == "generation failed: CUDA out of memory"


def test_compare_handler_asks_both_models():
    base = FakeBackend({"带状疱疹": BASE_REPLY})
    base_res, tuned_res = app.compare_handler(
        base, _tuned(), get_template("qa"), app.EXAMPLE_QUESTION, app.EXAMPLE_OPTIONS, PARAMS
    )
    assert (base_res.letters, tuned_res.letters) == ("A", "D")
    assert base_res.explanation == "胸肌劳损也会胸痛"
    fresh = FakeBackend()
    bad = app.compare_handler(fresh, _tuned(), get_template("qa"), "问题", "", PARAMS)
    assert all("need at least two options" in r.error for r in bad) and fresh.calls == []


def test_chat_handler_streams_and_keeps_history():
    backend = FakeBackend({"第二": "好的", "你好": "您好\n用户：我替你问"})
    history = [{"role": "user", "content": [{"type": "text", "text": "你好"}]},  # gradio 6 message parts
               {"role": "assistant", "content": [{"type": "text", "text": "您好"}]}]
    steps = list(app.chat_handler(backend, history, "  第二个问题 ", PARAMS))
    assert steps[0][-1] == {"role": "user", "content": "第二个问题"}  # shown before the model answers
    assert [s[-1]["content"] for s in steps[1:]] == ["好", "好的"]  # then the reply grows
    # no tokenizer → plain transcript that carries the earlier turn
    assert backend.calls[-1] == ["用户：你好\n助手：您好\n用户：第二个问题\n助手："]

    # a base model writing the user's next turn is cut at "\n用户："
    first = list(app.chat_handler(backend, [], "你好", PARAMS))[-1]
    assert first[-1] == {"role": "assistant", "content": "您好"}


def test_chat_empty_reply_placeholder_is_not_sent_back():
    backend = FakeBackend(default="")
    shown = list(app.chat_handler(backend, [], "你好", PARAMS))[-1]
    assert shown[-1]["content"] == app.EMPTY_REPLY
    list(app.chat_handler(backend, shown, "再问", PARAMS))
    assert app.EMPTY_REPLY not in backend.calls[-1][0]
    assert list(app.chat_handler(backend, shown, "   ", PARAMS)) == [shown]  # blank input: nothing asked


def test_build_demo_tabs_depend_on_base_backend():
    def elem_ids(demo) -> set[str]:
        return {b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)}

    tpl = get_template("qa")
    with_base = app.build_demo(_tuned(), tpl, "run-x", base_backend=FakeBackend())
    without = app.build_demo(_tuned(), tpl, "run-x")
    assert isinstance(with_base, gr.Blocks)
    assert {"tab-chat", "tab-exam", "tab-compare", "compare-base-letters"} <= elem_ids(with_base)
    assert "tab-compare" not in elem_ids(without) and "tab-exam" in elem_ids(without)
    assert with_base.analytics_enabled is False


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    from medtune.inference.hf import HFBackend
    from medtune.models import load_for_inference

    return HFBackend(*load_for_inference(str(tiny_model_dir)))


def test_exam_handler_with_tiny_model_gives_probabilities(tiny_backend):
    result = app.exam_handler(tiny_backend, get_template("qa"), app.EXAMPLE_QUESTION, app.EXAMPLE_OPTIONS,
                              GenerationParams(max_new_tokens=8))
    assert result.error is None and result.prompt.endswith("答案：")
    assert set(result.scores) == {"A", "B", "C", "D", "E"}
    assert sum(result.scores.values()) == pytest.approx(1.0)
    rows = app.probability_rows(result.options, result.scores)
    assert [r[0] for r in rows] == ["A", "B", "C", "D", "E"] and rows[3][1] == "带状疱疹"


# ---- the real page in headless Chromium ----------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by playwright (never `playwright install`)."""
    if not CHROMIUM.exists():
        pytest.skip("no browser: /usr/bin/chromium is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=WAIT_MS)
        yield chromium
        chromium.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _served(demo) -> Iterator[str]:
    """Launch on a free loopback port without blocking; always close the server afterwards."""
    url = app.launch(demo, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close(verbose=False)


def _save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("MEDTUNE_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    page.goto(url, timeout=WAIT_MS)
    return page


def test_exam_tab_in_browser(browser, tmp_path):
    from playwright.sync_api import expect

    start = time.monotonic()
    demo = app.build_demo(_tuned(), get_template("qa"), "tiny-run", base_backend=FakeBackend({"带状疱疹": BASE_REPLY}),
                          params=PARAMS)
    with _served(demo) as url:
        assert url.startswith("http://127.0.0.1:")
        page = _open(browser, url)
        page.get_by_role("tab", name="考题 Exam").click()
        page.locator("#exam-question textarea").fill(app.EXAMPLE_QUESTION)
        page.locator("#exam-options textarea").fill(app.EXAMPLE_OPTIONS)
        page.locator("#exam-submit").click()
        expect(page.locator("#exam-letters .letters")).to_have_text("D", timeout=WAIT_MS)
        expect(page.locator("#exam-explanation textarea")).to_have_value("带状疱疹沿肋间神经分布", timeout=WAIT_MS)
        expect(page.locator("#exam-raw textarea")).to_have_value(TUNED_REPLY, timeout=WAIT_MS)
        expect(page.locator("#exam-probs-na")).to_be_visible(timeout=WAIT_MS)  # FakeBackend: no probabilities
        _save_screenshot(page, tmp_path, "webui_exam.png")


        page.get_by_role("tab", name="对比 Compare").click()
        page.locator("#compare-submit").click()  # the example question is pre-filled
        expect(page.locator("#compare-base-letters .letters")).to_have_text("A", timeout=WAIT_MS)
        expect(page.locator("#compare-tuned-letters .letters")).to_have_text("D", timeout=WAIT_MS)
        _save_screenshot(page, tmp_path, "webui_compare.png")

        page.get_by_role("tab", name="对话 Chat").click()
        page.locator("#chat-input textarea").fill("带状疱疹是什么")
        page.locator("#chat-input textarea").press("Enter")
        expect(page.locator("#chatbot")).to_contain_text("理由：带状疱疹沿肋间神经分布", timeout=WAIT_MS)
        page.locator("#chat-reset").click()
        expect(page.locator("#chatbot")).not_to_contain_text("带状疱疹是什么", timeout=WAIT_MS)

        # bad input: the parser's message in the page, the old answer cleared, no traceback
        page.get_by_role("tab", name="考题 Exam").click()
        page.locator("#exam-options textarea").fill("A 胸肌劳损")
        page.locator("#exam-submit").click()
        expect(page.locator("#exam-status")).to_contain_text("need at least two options", timeout=WAIT_MS)
        expect(page.locator("#exam-letters .letters")).to_have_text("—", timeout=WAIT_MS)
        expect(page.locator("#exam-explanation textarea")).to_have_value("", timeout=WAIT_MS)
        page.close()
    assert time.monotonic() - start < 60


def test_tiny_model_page_loads_and_scores_options(browser, tiny_backend, tmp_path):
    from playwright.sync_api import expect

    demo = app.build_demo(tiny_backend, get_template("qa"), "tiny-model", params=GenerationParams(max_new_tokens=8))
    with _served(demo) as url:
        page = _open(browser, url)
        expect(page.get_by_role("tab", name="考题 Exam")).to_be_visible(timeout=WAIT_MS)
        assert page.get_by_role("tab", name="对比 Compare").count() == 0  # no base backend given
        page.get_by_role("tab", name="考题 Exam").click()
        page.locator("#exam-submit").click()  # pre-filled example
        # a random-weight model answers anything, but its option probabilities are real
        expect(page.locator("#exam-probs")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#exam-probs")).to_contain_text("带状疱疹", timeout=WAIT_MS)
        expect(page.locator("#exam-probs")).to_contain_text("%", timeout=WAIT_MS)
        _save_screenshot(page, tmp_path, "webui_tiny_model.png")
        page.close()
