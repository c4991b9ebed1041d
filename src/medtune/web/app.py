"""The gradio demo: 对话 chat, 考题 exam questions with option probabilities, 对比 base vs tuned.

``build_demo`` never loads a model: it receives ready backends (``medtune.inference.loading.
load_backend`` makes them), so the CLI, tests and notebooks decide what runs. The work each button
does lives in plain module-level functions (``exam_handler``, ``compare_handler``,
``chat_handler``) that know nothing about gradio, so they can be tested without a browser; the
gradio callbacks inside ``build_demo`` only translate their results into component updates.

Gradio is imported lazily, always through ``_import_gradio``, which first sets
``GRADIO_ANALYTICS_ENABLED=False``: with analytics on, gradio calls api.gradio.app and
huggingface.co when a demo is built and launched, and this demo must make no outbound calls.
"""

from __future__ import annotations

import html
import ipaddress
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from medtune.inference.base import GenerationParams
from medtune.inference.chat import (
    EMPTY_REPLY,
    answer_exam,
    keeps_history,
    option_scores,
    parse_exam_text,
    reply_prompt,
    reply_stops,
)
from medtune.templates import ExamTemplate

if TYPE_CHECKING:
    import gradio

log = logging.getLogger(__name__)

# Long enough for an answer plus a few sentences of explanation; evaluation's 128 cuts many off.
DEFAULT_PARAMS = GenerationParams(max_new_tokens=256)

EXAMPLE_QUESTION = "下列哪种病变引起的胸痛常沿一侧肋间神经分布"
EXAMPLE_OPTIONS = "A 胸肌劳损\nB 流行性胸痛\nC 颈椎病\nD 带状疱疹\nE 皮下蜂窝组织炎"
# From the bundled CMExam sample: single answer (D, A) and multiple answers (ABCD).
EXAMPLES = [
    [EXAMPLE_QUESTION, EXAMPLE_OPTIONS],
    ["行于脉外的气是", "A 卫气\nB 中气\nC 元气\nD 宗气\nE 营气"],
    ["艾叶的功效有", "A 温经\nB 止血\nC 散寒\nD 止痛\nE 养肝血"],
]

# Shown for a reply with no text, so the user sees the turn ended; never sent back to the model.

# Every event that runs a model shares one queue slot. The tuned and base backends usually share
# one set of weights (HFBackend.base() switches the adapter off for the duration of a call), so
# two events running at once could generate with the adapter in the wrong state.
_MODEL_QUEUE: dict[str, Any] = {"concurrency_id": "model", "concurrency_limit": 1}

# The error also stays in the status line under the button, so the toast need not linger.
_TOAST_SECONDS = 5

_LETTERS_CSS = """
.answer { text-align: center; padding: 0.4rem 0 0.8rem; }
.answer .caption { font-size: 0.85rem; color: var(--body-text-color-subdued); }
.answer .letters { font-size: 4rem; font-weight: 700; line-height: 1.1; letter-spacing: 0.12em;
                   color: var(--color-accent); }
.answer .letters.none { color: var(--body-text-color-subdued); }
.answer .note { font-size: 0.85rem; color: var(--body-text-color-subdued); }
"""


def _import_gradio() -> Any:
    """Import gradio with analytics switched off (set before gradio reads it)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    return gr


@dataclass
class ExamResult:
    """What one exam request produced, ready to show; ``error`` is set instead of raising.

    Attributes:
        letters: The answer letters read from the output ("" when none could be read).
        explanation: The explanation part of the output.
        output: The raw generated text.
        prompt: The prompt the model was given.
        options: The parsed options, letter → text.
        scores: Probability of each option letter, or None when the backend cannot score.
        error: A message for the user when the input was unusable or generation failed.
    """

    letters: str = ""
    explanation: str = ""
    output: str = ""
    prompt: str = ""
    options: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] | None = None
    error: str | None = None


def parse_exam_input(question: str, options_text: str) -> tuple[str, dict[str, str]]:
    """Read the question box and the options box (one option per line, ``A 胸肌劳损``).

    The whole pasted question (question line, then option lines) may also be typed into the
    question box with the options box left empty.

    Args:
        question: Text of the question box.
        options_text: Text of the options box.

    Returns:
        The question and its options, letter → text.

    Raises:
        ValueError: With a message fit to show the user (mostly ``parse_exam_text``'s own).
    """
    question, options_text = question.strip(), options_text.strip()
    if not question:
        # Checked here because parse_exam_text would take the first option line as the question.
        raise ValueError("no question text: type the question into the 问题 box")
    if options_text:
        # With a separate options box, line breaks in the question are only wrapping; joining
        # them keeps a question line that starts like an option ("A型血…") from being read as one.
        question = " ".join(line.strip() for line in question.splitlines() if line.strip())
    parsed_question, options = parse_exam_text(f"{question}\n{options_text}" if options_text else question)
    if options_text and parsed_question != question:
        # parse_exam_text appends lines before the first option to the question; in the options
        # box such a line is a mistyped option, so say so instead of silently changing the question.
        stray = parsed_question[len(question) :].strip()
        raise ValueError(f"{stray!r} in the options box is not an option (one per line, e.g. 'A 胸肌劳损')")
    return parsed_question, options


def _scores_or_none(backend: Any, template: ExamTemplate, question: str, options: dict[str, str]) -> dict[str, float] | None:
    """Option probabilities, or None when the backend cannot give them (or scoring fails)."""
    try:
        return option_scores(backend, template, question, options)
    except Exception:  # the answer is still worth showing without its probabilities
        log.warning("option scoring failed", exc_info=True)
        return None


def exam_handler(
    backend: Any, template: ExamTemplate, question: str, options_text: str, params: GenerationParams
) -> ExamResult:
    """Answer one exam question typed into the page.

    Args:
        backend: The backend that answers (``Backend`` protocol).
        template: The run's exam template, so the prompt matches training.
        question: Text of the question box.
        options_text: Text of the options box, one option per line.
        params: Decoding settings.

    Returns:
        The parsed answer, explanation, raw output and option probabilities; on bad input or a
        failed generation, a result whose ``error`` says why (never an exception).
    """
    try:
        q, options = parse_exam_input(question, options_text)
    except ValueError as exc:
        return ExamResult(error=str(exc))
    try:
        ans = answer_exam(backend, template, q, options, params)
    except Exception as exc:  # e.g. out of memory or a chat template the tokenizer lacks: show it
        log.exception("exam generation failed")
        return ExamResult(options=options, error=f"generation failed: {exc}")
    scores = _scores_or_none(backend, template, q, options)
    return ExamResult(ans.letters, ans.explanation, ans.output, ans.prompt, options, scores)


def compare_handler(
    base_backend: Any,
    backend: Any,
    template: ExamTemplate,
    question: str,
    options_text: str,
    params: GenerationParams,
) -> tuple[ExamResult, ExamResult]:
    """The same exam question answered by the base model and by the tuned model.

    Args:
        base_backend: The model before fine-tuning (often ``backend.base()``).
        backend: The fine-tuned model.
        template: The exam template both are asked with.
        question: Text of the question box.
        options_text: Text of the options box.
        params: Decoding settings for both.

    Returns:
        ``(base_result, tuned_result)``; both carry the error when the input is unusable.
    """
    try:
        parse_exam_input(question, options_text)
    except ValueError as exc:  # parse once so bad input never reaches either model
        return ExamResult(error=str(exc)), ExamResult(error=str(exc))
    return (
        exam_handler(base_backend, template, question, options_text, params),
        exam_handler(backend, template, question, options_text, params),
    )


def probability_rows(options: dict[str, str], scores: dict[str, float]) -> list[list[str]]:
    """Table rows ``[letter, option text, "12.3%"]`` in option order."""
    return [[letter, text, f"{scores.get(letter, 0.0):.1%}"] for letter, text in options.items()]


def compare_probability_rows(
    options: dict[str, str], base_scores: dict[str, float], tuned_scores: dict[str, float]
) -> list[list[str]]:
    """Table rows ``[letter, option text, base %, tuned %]`` in option order."""
    return [
        [letter, text, f"{base_scores.get(letter, 0.0):.1%}", f"{tuned_scores.get(letter, 0.0):.1%}"]
        for letter, text in options.items()
    ]


def _message_text(content: Any) -> str:
    """Plain text of a chat message's content.

    Gradio 6 hands messages back with content as a list of parts (``{"type": "text", "text":
    …}``); direct callers pass strings. Non-text parts (files) carry nothing the model can read.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list | tuple):
        return "".join(_message_text(part) for part in content)
    return ""


def chat_handler(
    backend: Any, history: list[dict[str, Any]], message: str, params: GenerationParams, template: Any = None
) -> Iterator[list[dict[str, str]]]:
    """Stream the assistant's reply to ``message``, given the conversation so far.

    Args:
        backend: The backend that replies.
        history: Earlier messages (``{"role", "content"}``, content as text or gradio parts).
        message: The user's new message.
        params: Decoding settings.
        template: The run's template: it decides how the turns become a prompt
            (:func:`medtune.inference.chat.reply_prompt`; None or an exam template: free chat).

    Yields:
        The whole conversation after each new piece of the reply: first with only the user's
        message added, then with the reply growing (so the page shows it as it is written).
    """
    messages = [
        {"role": m["role"], "content": _message_text(m.get("content"))}
        for m in history
        if m.get("role") in ("user", "assistant")
    ]
    message = message.strip()
    if not message:
        yield messages
        return
    messages.append({"role": "user", "content": message})
    yield list(messages)
    # The placeholder for an empty reply stays on the page but is not sent: the model never said it.
    said = [m for m in messages if not (m["role"] == "assistant" and m["content"] == EMPTY_REPLY)]
    if not keeps_history(template):  # raw text: only the new message is continued
        said = said[-1:]
    prompt, add_special = reply_prompt(said, template, getattr(backend, "tokenizer", None))
    stops = reply_stops(template, add_special)
    if stops:
        params = replace(params, stop=(*params.stop, *stops))
    reply = ""
    for piece in backend.stream(prompt, params, add_special_tokens=add_special):
        reply += piece
        yield [*messages, {"role": "assistant", "content": reply}]
    if not reply.strip():
        yield [*messages, {"role": "assistant", "content": EMPTY_REPLY}]


def _letters_html(result: ExamResult | None) -> str:
    """The big answer display: letters, a dash before any answer, "?" when none was read."""
    if result is None or result.error:
        body = '<div class="letters none">—</div>'
    elif result.letters:
        body = f'<div class="letters">{html.escape(result.letters)}</div>'
    else:
        body = '<div class="letters none">?</div><div class="note">无法从输出中读出答案 · no answer could be read</div>'
    return f'<div class="answer"><div class="caption">答案 Answer</div>{body}</div>'


def _status_markdown(result: ExamResult) -> str:
    """A one-line status under the submit button: the error, or nothing."""
    return f"⚠️ **输入或生成有误 · {html.escape(result.error)}**" if result.error else ""


def demo_tabs(template: Any, has_base: bool) -> list[str]:
    """The tabs a demo of a run with ``template`` has: exam tabs only for an exam template.

    A conversation run (sft on conversations, dpo, rl) and a pt run have no exam template, so
    they get the chat tab alone: in the run's conversation format, or (pt) as text continuation.
    """
    if getattr(template, "kind", "exam") != "exam":
        return ["chat"]
    return ["chat", "exam", *(["compare"] if has_base else [])]


def build_demo(
    backend: Any,
    template: Any,
    name: str,
    base_backend: Any = None,
    params: GenerationParams | None = None,
) -> gradio.Blocks:
    """Build the demo around already-loaded backends (nothing is loaded here).

    Args:
        backend: The (fine-tuned) model's backend; answers chat and exam questions.
        template: The template the run was trained with: an exam template (chat, exam and
            compare tabs), a conversation format (chat in that format), or raw text (pt: the chat
            tab continues text); see :func:`demo_tabs`.
        name: Display name of the model/run, shown in the header.
        base_backend: The model before fine-tuning; when given, a 对比 Compare tab answers the
            same question with both (exam templates only).
        params: Decoding settings for every tab; defaults to greedy, 256 new tokens.

    Returns:
        The gradio app; serve it with ``launch``.
    """
    gr = _import_gradio()
    params = params or DEFAULT_PARAMS
    tabs = demo_tabs(template, base_backend is not None)
    continuation = not keeps_history(template)

    def letters_box(elem_id: str) -> Any:
        # Scoped CSS on the component itself, so the styling does not depend on launch(css=…).
        return gr.HTML(_letters_html(None), css_template=_LETTERS_CSS, js_on_load=None, elem_id=elem_id,
                       container=True, padding=True)

    def question_inputs(prefix: str) -> tuple[Any, Any]:
        question = gr.Textbox(EXAMPLE_QUESTION, label="问题 Question", lines=2, max_lines=8,
                              elem_id=f"{prefix}-question")
        options = gr.Textbox(EXAMPLE_OPTIONS, label="选项 Options（每行一个，如 A 胸肌劳损）", lines=5,
                             max_lines=12, elem_id=f"{prefix}-options")
        return question, options

    with gr.Blocks(title=f"medtune · {name}", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## medtune 医学考试模型演示\n模型 Model: **{html.escape(name)}** · 模板 Template: "
            f"**{html.escape(template.name)}** · 最多生成 {params.max_new_tokens} tokens"
        )
        with gr.Tabs():
            # ---- 对话 Chat -------------------------------------------------------------------
            with gr.Tab("续写 Continue" if continuation else "对话 Chat", id="chat", elem_id="tab-chat"):
                chatbot = gr.Chatbot(label="续写 Continue" if continuation else "对话 Chat", height=460,
                                     elem_id="chatbot",
                                     placeholder=("输入一段文字，模型接着写（预训练模型，不保留上文）· raw text is continued"
                                                  if continuation else "向模型提问，例如：带状疱疹的典型表现是什么？"))
                with gr.Row(equal_height=True):
                    chat_input = gr.Textbox(show_label=False, placeholder="输入消息，回车发送 · Enter to send",
                                            scale=6, elem_id="chat-input", container=False)
                    send = gr.Button("发送 Send", variant="primary", scale=1, min_width=100)
                    reset = gr.Button("清空 Reset", scale=1, min_width=100, elem_id="chat-reset")

                def chat_ui(history: list[dict[str, Any]], message: str) -> Iterator[tuple[Any, str]]:
                    shown: Any = history
                    try:
                        for shown in chat_handler(backend, history or [], message, params, template):
                            yield shown, ""
                    except Exception as exc:  # the error belongs in the page, not a traceback
                        log.exception("chat generation failed")
                        gr.Warning(f"生成失败 generation failed: {exc}", duration=_TOAST_SECONDS)
                        yield shown, ""

                def chat_reset() -> tuple[list, str]:
                    return [], ""

                gr.on([chat_input.submit, send.click], chat_ui, [chatbot, chat_input], [chatbot, chat_input],
                      api_name="chat", **_MODEL_QUEUE)
                reset.click(chat_reset, None, [chatbot, chat_input], queue=False)

            if "exam" in tabs:
                _exam_tabs(gr, backend, template, name, base_backend if "compare" in tabs else None, params,
                           question_inputs, letters_box)
    return demo


def _exam_tabs(gr: Any, backend: Any, template: ExamTemplate, name: str, base_backend: Any,
               params: GenerationParams, question_inputs: Any, letters_box: Any) -> None:
    """The 考题 Exam tab, and the 对比 Compare tab when there is a base model (inside ``gr.Tabs``)."""
    # ---- 考题 Exam -------------------------------------------------------------------
    with gr.Tab("考题 Exam", id="exam", elem_id="tab-exam"):
        with gr.Row():
            with gr.Column(scale=1):
                exam_q, exam_opts = question_inputs("exam")
                exam_btn = gr.Button("作答 Answer", variant="primary", elem_id="exam-submit")
                exam_status = gr.Markdown(elem_id="exam-status")
                gr.Examples(EXAMPLES, [exam_q, exam_opts], label="示例 Examples")
            with gr.Column(scale=1):
                exam_letters = letters_box("exam-letters")
                exam_expl = gr.Textbox(label="解释 Explanation", lines=3, max_lines=12,
                                       interactive=False, elem_id="exam-explanation")
                exam_probs = gr.Dataframe(headers=["选项", "内容", "概率 Probability"],
                                          datatype=["str", "str", "str"], column_widths=["14%", "56%", "30%"],
                                          label="选项概率 Option probabilities", interactive=False,
                                          visible=False, elem_id="exam-probs")
                exam_probs_na = gr.Markdown(
                    "选项概率：不可用（该后端不提供逐词概率）· option probabilities: not available "
                    "for this backend", visible=False, elem_id="exam-probs-na")
                exam_raw = gr.Textbox(label="原始输出 Raw output", lines=3, max_lines=12,
                                      interactive=False, elem_id="exam-raw")
                with gr.Accordion("提示词 Prompt", open=False):
                    exam_prompt = gr.Textbox(show_label=False, lines=4, max_lines=20, interactive=False)

        def exam_ui(question: str, options_text: str) -> list[Any]:
            result = exam_handler(backend, template, question, options_text, params)
            if result.error:
                gr.Warning(result.error, duration=_TOAST_SECONDS)
            probs_ok = result.scores is not None and not result.error
            return [
                _letters_html(result),
                result.explanation,
                gr.Dataframe(probability_rows(result.options, result.scores) if probs_ok else [],
                             visible=probs_ok),
                gr.Markdown(visible=not probs_ok and not result.error),
                result.output,
                result.prompt,
                _status_markdown(result),
            ]

        exam_outputs = [exam_letters, exam_expl, exam_probs, exam_probs_na, exam_raw, exam_prompt, exam_status]
        exam_btn.click(exam_ui, [exam_q, exam_opts], exam_outputs, api_name="exam", **_MODEL_QUEUE)

    # ---- 对比 Compare ----------------------------------------------------------------
    if base_backend is not None:
        with gr.Tab("对比 Compare", id="compare", elem_id="tab-compare"):
            with gr.Row():
                with gr.Column(scale=2):
                    cmp_q, cmp_opts = question_inputs("compare")
                with gr.Column(scale=1):
                    cmp_btn = gr.Button("两个模型作答 Answer with both", variant="primary",
                                        elem_id="compare-submit")
                    cmp_status = gr.Markdown(elem_id="compare-status")
                    cmp_probs = gr.Dataframe(headers=["选项", "内容", "基座 Base", "微调 Tuned"],
                                             datatype=["str", "str", "str", "str"],
                                             label="选项概率 Option probabilities", interactive=False,
                                             visible=False, elem_id="compare-probs")
            side: dict[str, list[Any]] = {}
            # Not equal_height: stretching the shorter column spreads its boxes apart.
            with gr.Row():
                for key, title in (("base", "基座模型 Base model"), ("tuned", f"微调模型 Tuned · {name}")):
                    with gr.Column(scale=1, variant="panel"):
                        gr.Markdown(f"### {html.escape(title)}")
                        side[key] = [
                            letters_box(f"compare-{key}-letters"),
                            gr.Textbox(label="解释 Explanation", lines=3, max_lines=8, interactive=False,
                                       elem_id=f"compare-{key}-explanation"),
                            gr.Textbox(label="原始输出 Raw output", lines=3, max_lines=8,
                                       interactive=False, elem_id=f"compare-{key}-raw"),
                        ]

            def compare_ui(question: str, options_text: str) -> list[Any]:
                base_res, tuned_res = compare_handler(base_backend, backend, template, question,
                                                      options_text, params)
                error = base_res.error or tuned_res.error
                if error:
                    gr.Warning(error, duration=_TOAST_SECONDS)
                both = base_res.scores is not None and tuned_res.scores is not None and not error
                rows = (compare_probability_rows(tuned_res.options, base_res.scores, tuned_res.scores)
                        if both else [])
                out: list[Any] = [_status_markdown(base_res if base_res.error else tuned_res),
                                  gr.Dataframe(rows, visible=both)]
                for res in (base_res, tuned_res):
                    out += [_letters_html(res), res.explanation, res.output]
                return out

            cmp_btn.click(compare_ui, [cmp_q, cmp_opts], [cmp_status, cmp_probs, *side["base"],
                                                          *side["tuned"]],
                          api_name="compare", **_MODEL_QUEUE)


def _is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (the only binds reachable by this machine alone)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(
    demo: gradio.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> str:
    """Serve the demo on ``host:port``; never through a public share link.

    Args:
        demo: The app from ``build_demo``.
        host: Address to bind; loopback by default, since the demo has no login.
        port: TCP port.
        prevent_thread_lock: Return once the server is up (tests, notebooks) instead of blocking.
        quiet: Suppress gradio's startup printout.

    Returns:
        The local URL the demo is served at.
    """
    _import_gradio()  # sets GRADIO_ANALYTICS_ENABLED before gradio reads it at launch
    if not _is_loopback(host):
        log.warning("serving the demo on %s: anyone who can reach this address can use the model "
                    "(there is no login)", host)
    _, local_url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,  # explicit: GRADIO_SHARE=True in the environment would otherwise open a tunnel
        inbrowser=False,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        ssr_mode=False,  # explicit: GRADIO_SSR_MODE would start a Node server beside Python
        mcp_server=False,  # explicit: GRADIO_MCP_SERVER would expose the handlers as MCP tools
    )
    return local_url
