"""Reading-exam spreadsheets → training pairs for writing single-choice questions from a passage.

Input: an ``.xlsx`` workbook of Gaokao-style reading exams, typically one sheet per language
(语文 and 英语), with three columns:

* ``阅读文本`` — the passage;
* ``选项`` — the questions with their options, as free text (``1．下列……（3分）`` then
  ``A．……`` lines, or several options to a line);
* ``答案`` — the answers, as free text that may carry explanations (``1．C【解析】……``,
  ``32. B. The underlying ...``, ``答案：B``, ``21-24 BCAD``).

Each usable row becomes one ``Conversation``: the user message is a task instruction (the
``templates/question_generation/{zh,en}.txt`` data file of the chosen language, or a file of your
own — ``prompt_path``, ``medtune convert exam-xlsx --prompt FILE`` — with ``{n}`` replaced by the
number of questions) plus the passage (at ``{passage}`` when the instruction has it); the
assistant message is the questions, renumbered from 1, each with options A-D and an ``答案：X``
(zh) or ``answer: X`` (en) line, blocks separated by a blank line.

What the parser repairs, and why:

* Full-width digits and letters (``１``, ``Ａ``) and the full-width full stop ``．`` — typeset
  papers number questions and options with them. English text is mapped to ASCII punctuation
  entirely (``（`` → ``(``); Chinese text keeps its own punctuation (``（）：，`` are correct
  Chinese), only ``．`` becomes ``.``.
* OCR look-alike letters in option labels and answers: Cyrillic ``А В С Е Н`` and Greek
  ``Α Β Ε Η`` are read as Latin ``A B C E H``. Only labels and answers are mapped, never running
  text.
* Score marks such as ``（3分）``, ``(3 分)``, ``(2 points)`` are removed.
* Short-answer questions (a numbered question without options) are dropped and the remaining
  questions renumbered; their answers (``3．①……②……``) carry no letter and are ignored.
* Options given out of order (``A．… C．…`` / ``B．… D．…`` two to a line) are put back in A-D
  order under their own labels, so the answer letter still points at the same text.

A cell that ``medtune.io.is_missing`` judges missing (blank, or the text ``nan``/``None``/``null``
in any case, as pandas exports write for an empty cell) counts as empty: a row whose cells are all
missing is a blank row, and a missing passage, questions or answers cell rejects the row.

A row is kept only when every question with options has exactly the options A-D, a stem, and
exactly one answer letter. Answers are matched to questions by number when both sides are
numbered (a constant offset, e.g. questions 1-4 against answers 21-24, is accepted), otherwise by
position. Every other row is a reject ``{"row", "sheet", "field", "reason", "raw"}``; nothing is
dropped silently. The first non-blank row of the sheet is the header; completely blank rows are
not data and are skipped, but still counted in row numbers, which are 1-based below the header as
in ``medtune.data.cmexam`` (with the header on Excel row 1, data row 5 is Excel row 6).

Sheet choice: an explicit ``sheet`` name wins; otherwise the first sheet whose name names the
language (zh: 语文, 中文, 汉语, Chinese, or a ``zh``/``cn`` word; en: 英语, 英文, English, or an
``en`` word); otherwise the first sheet, with a warning.

``parse_generated`` reads a generated output of this task back into questions, options and answer
letters; ``medtune.evaluation.text_tasks.evaluate_question_generation`` scores outputs with it (the
share of well-formed outputs, the share whose every answer letter is A-D and names a non-empty
option, and ROUGE-L against the reference outputs).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openpyxl

from medtune.io import (
    DataFileError,
    convert_file,
    default_rejects_path,
    is_missing,
    missing_note,
    reading_workbook,
)
from medtune.records import Conversation, RecordError

__all__ = [
    "COLUMNS",
    "LANGS",
    "ExamXlsxResult",
    "GeneratedParse",
    "GeneratedQuestion",
    "Question",
    "QuestionParseError",
    "convert_exam_xlsx",
    "format_output",
    "load_instruction",
    "question_prompt",
    "parse_answers",
    "parse_generated",
    "parse_questions",
    "read_exam_xlsx",
    "select_sheet",
    "summary_lines",
]

log = logging.getLogger(__name__)

LANGS = ("zh", "en")
#: Required columns: passage, questions with options, answers.
COLUMNS = ("阅读文本", "选项", "答案")
_PASSAGE, _QUESTIONS, _ANSWERS = COLUMNS
OPTION_LETTERS = "ABCD"
_ON_INVALID = ("error", "skip")

# Words in a sheet name that say which language it holds. Two-letter codes must be a whole word
# ("en" is inside "Content" and "Sheet_green"), the rest may appear anywhere in the name.
_SHEET_WORDS = {"zh": ("语文", "中文", "汉语", "chinese"), "en": ("英语", "英文", "english")}
_SHEET_CODES = {"zh": ("zh", "cn"), "en": ("en",)}

# ---------------------------------------------------------------------------------------------
# Character-level normalisation
# ---------------------------------------------------------------------------------------------

# Letters that OCR (and Russian/Greek keyboard layouts) produce in place of Latin capitals.
_LOOKALIKES = "АВСЕНΑΒΕΗ"
_LOOKALIKE_TABLE = str.maketrans(_LOOKALIKES, "ABCEHABEH")
# Label letters: A-H rather than A-D so that a fifth option or an answer "E" is seen and
# reported instead of being glued onto option D or missed.
_L = "A-H" + _LOOKALIKES

# Full-width ASCII block U+FF01-U+FF5E maps to U+0021-U+007E by a fixed offset.
_FULLWIDTH_ALL = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
# In Chinese only digits, Latin letters and "．" (which is not a Chinese punctuation mark, just
# a typesetter's numbering dot) are mapped; "（，：" are the correct Chinese forms and stay.
_FULLWIDTH_ZH = {cp: cp - 0xFEE0 for cp in (*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B))}
_FULLWIDTH_ZH[0xFF0E] = ord(".")
_SPACES = {0x3000: " ", 0x00A0: " ", 0x2002: " ", 0x2003: " ", 0x2009: " "}

_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_CJK_GAP = re.compile(rf"(?<=[{_CJK}])[ \t]+(?=[{_CJK}])")
_SCORE_MARK = re.compile(
    r"[(（【\[]\s*(?:本题|本小题)?\s*(?:共|满分)?\s*\d+(?:\.\d+)?\s*(?:分|points?|pts?|marks?)\s*[)）】\]]",
    re.IGNORECASE,
)


def _check_lang(lang: str) -> str:
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    return lang


def _cell(value: Any) -> str:
    """Cell value as text; ``None`` (an empty cell) and float NaN become ``""``.

    Texts such as ``nan`` are kept here so that rejects show the cell as it was; whether a cell is
    missing is decided by ``medtune.io.is_missing`` where the row is judged.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _normalise(text: str, lang: str) -> str:
    """Line breaks, spaces and full-width forms made uniform before any pattern is applied."""
    # Some exports store line breaks as the two characters backslash + n; exam text never
    # contains a literal backslash-n, so unescaping is safe.
    text = text.replace("\\r\\n", "\n").replace("\\n", "\n").replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_SPACES)
    return text.translate(_FULLWIDTH_ALL if lang == "en" else _FULLWIDTH_ZH)


def _tidy(text: str, lang: str) -> str:
    """One line of text: runs of whitespace collapsed, OCR gaps between Chinese characters removed."""
    text = " ".join(text.split())
    if lang == "zh":
        text = _CJK_GAP.sub("", text)
    return text


def _tidy_passage(text: str, lang: str) -> str:
    # Paragraph breaks carry meaning in a passage, so lines are kept; indentation and blank
    # lines (often two ideographic spaces and an empty line per paragraph) are not.
    lines = (_tidy(line, lang) for line in _normalise(text, lang).split("\n"))
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------------------------
# Numbered items (questions, answers)
# ---------------------------------------------------------------------------------------------

# "1." "1、" "1:" "1)" "(1)" "（1）". The number may not follow a digit, a dot or a letter other
# than A-H (so "3.5", "No.2", "Figure2." never start an item), but may follow an answer letter, as
# in compact keys "1.C2.B3.A". (?!\d) keeps decimals and times ("10:30") out.
_NUMBER = re.compile(
    r"(?<![0-9a-zI-Z.,])(?:[(（]\s*(?P<p>\d{1,3})\s*[)）]|(?P<n>\d{1,3})\s*[.、:：)）](?!\d))"
)


_MAX_GAP = 5


@dataclass
class _Mark:
    start: int
    end: int
    number: int
    line_start: bool


def _is_line_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip(" \t")
    return not before or before.endswith("\n")


def _numbered_blocks(text: str) -> tuple[str, list[tuple[int, str]]]:
    """Split text at its item numbers: ``(preamble, [(number, body), ...])``.

    Numbers must rise from the first one, by 1 (or, at the start of a line, by up to
    ``_MAX_GAP``), which keeps stray numbers inside a stem or an explanation ("paragraph 3.",
    "第2．") from starting an item. A number at the start of a line
    beats the same number earlier inside a line, and the first item is the first number at the
    start of a line when there is one (a preamble may mention numbers inline).
    """
    marks = [
        _Mark(m.start(), m.end(), int(m.group("p") or m.group("n")), _is_line_start(text, m.start()))
        for m in _NUMBER.finditer(text)
    ]
    if not marks:
        return text, []
    first = next((m for m in marks if m.line_start), marks[0])
    chain = [first]
    for mark in marks:
        if mark.start <= chain[-1].start:
            continue
        step = mark.number - chain[-1].number
        # A gap is accepted only at the start of a line: answer keys skip the numbers of
        # short-answer questions ("2. B\n4. D"), but an inline "4." skipping ahead is text.
        if not (step == 1 or (mark.line_start and 1 < step <= _MAX_GAP)):
            continue
        if not mark.line_start and any(
            o.line_start and o.number == mark.number and o.start > mark.start for o in marks
        ):
            continue
        chain.append(mark)
    blocks = [
        (mark.number, text[mark.end: nxt.start if nxt else len(text)])
        for mark, nxt in zip(chain, [*chain[1:], None], strict=True)
    ]
    return text[: first.start], blocks


# ---------------------------------------------------------------------------------------------
# Options inside one question
# ---------------------------------------------------------------------------------------------

# An option label: "(A)" / "（A）", "A." "A．" "A、" "A:" "A)" (strong), or "A" followed by a space
# (weak: OCR often loses the dot, but "A few" in an English stem looks the same).
_LABEL = re.compile(
    rf"[(（]\s*(?P<p>[{_L}])\s*[)）]|(?P<s>[{_L}])\s*[.．、:：)）]|(?P<w>[{_L}])(?=\s)"
)
_SENTENCE_PUNCT = set("。？?！!；;，,：:…”\"'」）)】]_")


@dataclass
class _Label:
    start: int
    end: int
    letter: str
    tier: int  # 1 line start, 2 after space/punctuation, 3 after other text, 4 weak (no dot)


def _labels(body: str) -> list[_Label]:
    labels = []
    for m in _LABEL.finditer(body):
        raw = m.group("p") or m.group("s") or m.group("w")
        letter = raw.translate(_LOOKALIKE_TABLE)
        prev = body[m.start() - 1] if m.start() else "\n"
        if prev.isascii() and (prev.isalnum() or prev == "."):
            continue  # inside a word or an abbreviation: "U.S.A.", "ABC", "B.C."
        if m.group("w"):
            rest = body[m.end():].lstrip()
            if not (prev.isspace() or prev in _SENTENCE_PUNCT) or (rest[:1].isascii() and rest[:1].islower()):
                continue  # "A few", "a C grade": an article or a word, not a label
            tier = 4
        elif _is_line_start(body, m.start()):
            tier = 1
        elif prev.isspace() or prev in _SENTENCE_PUNCT:
            tier = 2
        else:
            tier = 3  # glued to Chinese text: "甲乙丙B．丁戊己"
        labels.append(_Label(m.start(), m.end(), letter, tier))
    return labels


def _ordered_chain(body: str, pool: list[_Label]) -> list[_Label] | None:
    # Walk backwards from the last D: the last C before it, the last B before that, ... so a
    # false label early on ("Plan A." in the stem, "200 B.C." inside option A) is skipped. A
    # candidate that would leave its option empty is passed over too: that is a false label at
    # the end of the previous option ("B. Vitamin B. C. ...", "D. Vitamin D.").
    chosen: list[_Label] = []
    limit = len(body)
    for letter in reversed(OPTION_LETTERS):
        found = [
            lb for lb in pool if lb.letter == letter and lb.start < limit and body[lb.end: limit].strip()
        ]
        if not found:
            return None
        chosen.append(found[-1])
        limit = found[-1].start
    return chosen[::-1]


def _distinct_tail(pool: list[_Label]) -> list[_Label]:
    # Options given out of order ("A C" / "B D" two to a line): the labels A-D that end the
    # question, taken from the end until a letter repeats.
    seen: dict[str, _Label] = {}
    for lb in reversed([lb for lb in pool if lb.letter in OPTION_LETTERS]):
        if lb.letter in seen:
            break
        seen[lb.letter] = lb
    return sorted(seen.values(), key=lambda lb: lb.start)


@dataclass
class _Split:
    stem: str
    options: dict[str, str]  # letters found, in A-D order (may be partial)
    in_order: bool  # labels appeared as A, B, C, D
    extra: list[str]  # labels beyond D after the options started (a fifth option, ...)
    kind: str  # "choice", "short" (no options: a short-answer question) or "partial"


def _split_options(body: str, lang: str) -> _Split:
    """Separate a question body into its stem and options, choosing among candidate labels."""
    labels = _labels(body)
    chosen: list[_Label] = []
    pool: list[_Label] = []
    # Prefer the most label-like candidates: spreadsheet cells usually have one option per line,
    # and only when that does not give A-D are labels inside lines (and then dot-less ones) used.
    for max_tier in (1, 2, 3, 4):
        pool = [lb for lb in labels if lb.tier <= max_tier]
        chosen = _ordered_chain(body, pool) or _distinct_tail(pool)
        if len(chosen) == len(OPTION_LETTERS):
            break
    else:
        pool = labels
        chosen = _distinct_tail(labels)
        # A short-answer stem may mention labels ("画线的A、B两句"); fewer than two distinct
        # letters standing where labels stand means there are no options at all.
        standalone = {lb.letter for lb in labels if lb.tier <= 2}
        if len(standalone) < 2:
            return _Split(_tidy(body, lang), {}, True, [], "short")

    stem = _tidy(body[: chosen[0].start], lang) if chosen else _tidy(body, lang)
    texts = {}
    for lb, nxt in zip(chosen, [*chosen[1:], None], strict=True):
        texts[lb.letter] = _tidy(body[lb.end: nxt.start if nxt else len(body)], lang)
    options = {letter: texts[letter] for letter in OPTION_LETTERS if letter in texts}
    extra = sorted({lb.letter for lb in pool if lb.letter not in OPTION_LETTERS and chosen and lb.start > chosen[0].start})
    in_order = [lb.letter for lb in chosen] == sorted(lb.letter for lb in chosen)
    kind = "choice" if len(options) == len(OPTION_LETTERS) else "partial"
    return _Split(stem, options, in_order, extra, kind)


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


@dataclass
class Question:
    """One single-choice question.

    Attributes:
        number: Position after short-answer questions were dropped (1, 2, ...): the number it is
            given in the training output.
        stem: The question text, score marks removed.
        options: ``{"A": text, "B": ..., "C": ..., "D": ...}`` in A-D order, whatever order
            the source listed them in.
        source_number: The number printed in the source (``None`` when it had none); answers
            are matched on it.
        reordered: The source listed the options out of A-D order.
    """

    number: int
    stem: str
    options: dict[str, str]
    source_number: int | None = None
    reordered: bool = False


class QuestionParseError(ValueError):
    """A question that has options but not exactly A-D (or no stem); the row cannot be used."""

    def __init__(self, source_number: int | None, reason: str):
        where = f"question {source_number}" if source_number is not None else "question"
        super().__init__(f"{where}: {reason}")
        self.source_number = source_number
        self.reason = reason


def _question_blocks(text: str, lang: str) -> list[tuple[int | None, str]]:
    # Score marks go first, replaced by a space: "是（3分）A．" must not glue "A" to "是".
    text = _SCORE_MARK.sub(" ", _normalise(text, lang))
    _, blocks = _numbered_blocks(text)
    if blocks:
        return list(blocks)
    return [(None, text)] if text.strip() else []


def _parse_questions_detailed(text: str, lang: str) -> tuple[list[Question], list[int | None]]:
    """Questions with options, plus the source numbers of dropped short-answer questions."""
    questions: list[Question] = []
    dropped: list[int | None] = []
    for source_number, body in _question_blocks(text, lang):
        split = _split_options(body, lang)
        if split.kind == "short":
            dropped.append(source_number)
            continue
        if split.kind == "partial":
            found = ", ".join(split.options) or "none"
            raise QuestionParseError(source_number, f"found options {found}; expected exactly A-D")
        if split.extra:
            raise QuestionParseError(
                source_number, f"has option(s) {', '.join(split.extra)} beyond D; expected exactly A-D"
            )
        if not split.stem:
            raise QuestionParseError(source_number, "has options but no stem")
        empty = [letter for letter, value in split.options.items() if not value]
        if empty:
            raise QuestionParseError(source_number, f"option {', '.join(empty)} has no text")
        questions.append(
            Question(len(questions) + 1, split.stem, split.options, source_number, not split.in_order)
        )
    return questions, dropped


def parse_questions(text: str, lang: str) -> list[Question]:
    """Extract the single-choice questions from a ``选项`` cell.

    Questions are found by their numbers (``1.`` ``1．`` ``1、`` ``(1)``, consecutive), options by
    their labels A-D (``A.`` ``A．`` ``A、`` ``(A)``, also with Cyrillic/Greek look-alike letters,
    one per line or several to a line, in any order). Short-answer questions (no options) are
    dropped and the rest renumbered from 1; score marks such as ``（3分）`` are removed.

    Args:
        text: The questions cell.
        lang: ``"zh"`` or ``"en"``: decides which full-width punctuation is mapped to ASCII.

    Returns:
        The questions with options, in source order.

    Raises:
        QuestionParseError: A question has options, but not exactly A-D, or has no stem.
        ValueError: Unknown ``lang``.
    """
    return _parse_questions_detailed(text, _check_lang(lang))[0]


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

# Letters at the start of an answer item: "B", "B.", "C【解析】", "(A)", "【B】", also "BD" (a
# multiple answer, reported later). The letters must end at punctuation, space or the end.
_LEAD = re.compile(rf"[(（【\[]?\s*(?P<l>[{_L}]{{1,4}})\s*[)）】\]]?(?=$|[\s.．、,，:：;；【。!！?？\-—])")
_MARKER = re.compile(
    rf"(?:参考答案|正确答案|答案|故选|应选|(?i:answers?|key))[】\]]?\s*(?:是|为|(?i:is))?\s*[:：]?\s*[【\[(（]?\s*"
    rf"(?P<l>[{_L}]{{1,4}})(?=$|[^A-Za-z])"
)
_LEADING_MARKER = re.compile(r"^\s*[【\[]?(?:参考答案|正确答案|答案|(?i:answers?|key))[】\]]?\s*[:：]?\s*")
_BARE = re.compile(rf"^\s*(?:[{_L}][\s,，、;；/|]*)+$")
# "21-24 BCAD", "1～4：BCAD": a range of numbers with one letter each.
_RANGE = re.compile(rf"(?<!\d)(\d{{1,3}})\s*[-—–~～至到]\s*(\d{{1,3}})\s*[.．:：、]?\s*([{_L}]{{2,}})(?![A-Za-z])")


def _not_a_word(text: str, end: int) -> bool:
    # "A good example" / "A the": an English article followed by a lowercase word, not a letter.
    rest = text[end:]
    return not (rest[:1].isspace() and rest.lstrip()[:1].isascii() and rest.lstrip()[:1].islower())


def _item_letters(body: str) -> str | None:
    """The answer letters of one answer item (text after its number), or ``None``."""
    body = body.strip()
    m = _LEAD.match(body)
    if m and _not_a_word(body, m.end("l")):
        return m.group("l").translate(_LOOKALIKE_TABLE)
    m = _MARKER.search(body)
    if m and _not_a_word(body, m.end("l")):
        return m.group("l").translate(_LOOKALIKE_TABLE)
    return None


def _expand_ranges(text: str) -> str:
    def expand(m: re.Match[str]) -> str:
        first, last, letters = int(m.group(1)), int(m.group(2)), m.group(3)
        if last - first + 1 != len(letters):
            return m.group(0)  # "1-4 AB" is not a range key; leave it for the other rules
        return "\n" + "\n".join(f"{first + i}. {letter}" for i, letter in enumerate(letters)) + "\n"

    return _RANGE.sub(expand, text)


def _answer_items(text: str, lang: str) -> list[tuple[int | None, str | None]]:
    """``(number, letters)`` per answer item; letters are ``None`` for e.g. short-answer answers."""
    text = _normalise(text, lang)
    bare = _LEADING_MARKER.sub("", text, count=1)
    if bare.strip() and _BARE.match(bare):
        # "BCAD", "B C A D", "答案：B、C、A、D": one letter per question, in order.
        return [(None, ch.translate(_LOOKALIKE_TABLE)) for ch in bare if not ch.isspace() and ch not in ",，、;；/|"]
    _, blocks = _numbered_blocks(_expand_ranges(text))
    if blocks:
        return [(number, _item_letters(body)) for number, body in blocks]
    markers = [m for m in _MARKER.finditer(text) if _not_a_word(text, m.end("l"))]
    if markers:
        return [(None, m.group("l").translate(_LOOKALIKE_TABLE)) for m in markers]
    # Last resort: unnumbered lines that each start with a letter ("B. The underlying ...").
    items = []
    for line in text.split("\n"):
        letters = _item_letters(line)
        if letters:
            items.append((None, letters))
    return items


def parse_answers(text: str, lang: str) -> list[str]:
    """Extract the answer letters from an ``答案`` cell, in order.

    Accepted shapes: numbered items with or without explanations (``32. B. The underlying ...``,
    ``1．C【解析】……``, ``1．答案：B……``), unnumbered markers (``答案：B``, ``Answer: B``), ranges
    (``21-24 BCAD``) and bare letters (``BCAD``, ``B、C、A、D``). Items without a letter — the
    answers of short-answer questions — are skipped. Look-alike Cyrillic/Greek letters are read
    as Latin.

    Args:
        text: The answers cell.
        lang: ``"zh"`` or ``"en"``.

    Returns:
        One string per lettered answer; normally one letter, several for a multiple answer
        (``"BD"``), which ``read_exam_xlsx`` rejects.

    Raises:
        ValueError: Unknown ``lang``.
    """
    return [letters for _, letters in _answer_items(text, _check_lang(lang)) if letters]


def _align(questions: list[Question], items: list[tuple[int | None, str | None]]) -> list[str]:
    """One answer letter per question, or ``_RowError`` saying why they cannot be matched."""
    lettered = [(number, letters) for number, letters in items if letters]
    if len(lettered) != len(questions):
        raise _RowError(
            _ANSWERS,
            f"{len(questions)} question(s) with options but {len(lettered)} answer letter(s); "
            "questions and answers must match in number",
        )
    q_numbers = [q.source_number for q in questions]
    a_numbers = [number for number, _ in lettered]
    if None not in q_numbers and None not in a_numbers:
        offsets = {a - q for q, a in zip(q_numbers, a_numbers, strict=True)}  # type: ignore[operator]
        if len(offsets) != 1:
            raise _RowError(
                _ANSWERS,
                f"answers numbered {', '.join(map(str, a_numbers))} do not match questions numbered "
                f"{', '.join(map(str, q_numbers))}",
            )
    answers = []
    for question, (_, letters) in zip(questions, lettered, strict=True):
        if len(letters) != 1:
            raise _RowError(
                _ANSWERS, f"question {question.number}: answer {letters!r} has more than one letter"
            )
        if letters not in question.options:
            raise _RowError(
                _ANSWERS, f"question {question.number}: answer {letters} is not one of {', '.join(question.options)}"
            )
        answers.append(letters)
    return answers


# ---------------------------------------------------------------------------------------------
# Training pairs
# ---------------------------------------------------------------------------------------------

_ANSWER_LINE = {"zh": "答案：{letter}", "en": "answer: {letter}"}


def format_output(questions: list[Question], answers: list[str], lang: str) -> str:
    """The assistant's target text: numbered questions, options A-D and answer lines.

    zh::

        1. 题干
        A. …
        B. …
        C. …
        D. …
        答案：B

    en is the same with ``answer: B``. Questions are numbered 1, 2, ... by position (the source
    numbers are not used) and separated by one blank line.

    Args:
        questions: The questions, options in A-D order.
        answers: One answer letter per question.
        lang: ``"zh"`` or ``"en"``.

    Returns:
        The formatted text, without a trailing newline.

    Raises:
        ValueError: Counts differ, or an answer is not one of its question's option letters.
    """
    _check_lang(lang)
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    blocks = []
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True), start=1):
        if answer not in question.options:
            raise ValueError(f"question {i}: answer {answer!r} is not one of {list(question.options)}")
        lines = [f"{i}. {question.stem}"]
        lines += [f"{letter}. {text}" for letter, text in question.options.items()]
        lines.append(_ANSWER_LINE[lang].format(letter=answer))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def load_instruction(lang: str, n: int = 4, path: str | os.PathLike | None = None) -> str:
    """The task instruction for ``lang`` with ``{n}`` replaced by the number of questions.

    The texts are the data files ``medtune/templates/question_generation/{zh,en}.txt``, or the
    file at ``path``; the number is filled in per row so the instruction never asks for more
    questions than the target holds (Chinese rows often keep 3 after short-answer questions are
    dropped).

    Args:
        lang: ``"zh"`` or ``"en"``.
        n: Number of questions asked for.
        path: An instruction file of your own (UTF-8; may use ``{n}`` and ``{passage}``).

    Returns:
        The instruction, stripped (``{passage}``, if there, left in place for ``question_prompt``).

    Raises:
        ValueError: Unknown ``lang``; ``medtune.templates.TemplateError`` for an unusable file.
    """
    from medtune.templates import prompt_text

    _check_lang(lang)
    # str.replace, not str.format: an edited instruction may contain other braces.
    return prompt_text("question_generation", lang, path).strip().replace("{n}", str(n))


def question_prompt(instruction: str, passage: str) -> str:
    """The user message: ``instruction`` with the passage at ``{passage}``, else after a blank line.

    Args:
        instruction: What ``load_instruction`` returned.
        passage: The tidied passage.
    """
    if "{passage}" in instruction:
        return instruction.replace("{passage}", passage)
    return instruction + "\n\n" + passage


# ---------------------------------------------------------------------------------------------
# Reading the workbook
# ---------------------------------------------------------------------------------------------


@dataclass
class ExamXlsxResult:
    """Outcome of reading one sheet of a reading-exam workbook.

    Attributes:
        records: One training pair per usable row, in sheet order.
        rejects: One dict per unusable row: ``{"row", "sheet", "field", "reason", "raw"}``;
            ``field`` is the column at fault (``None`` for the row as a whole) and ``raw`` the
            row's original cells.
        n_rows: Non-blank data rows in the sheet; always ``len(records) + len(rejects)``.
        sheet: The sheet that was read.
        lang: The language of the sheet.
        n_short_answer_dropped: Short-answer questions dropped from kept rows.
    """

    records: list[Conversation]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    n_rows: int = 0
    sheet: str = ""
    lang: str = "zh"
    n_short_answer_dropped: int = 0


class _RowError(Exception):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _sheet_matches(name: str, lang: str) -> bool:
    lowered = name.casefold()
    if any(word in lowered for word in _SHEET_WORDS[lang]):
        return True
    return any(code in re.split(r"[^a-z0-9]+", lowered) for code in _SHEET_CODES[lang])


def select_sheet(sheet_names: list[str], lang: str, sheet: str | None = None) -> str:
    """Which sheet to read: ``sheet`` if given, else the first naming ``lang``, else the first.

    Args:
        sheet_names: The workbook's sheet names, in order.
        lang: ``"zh"`` or ``"en"``.
        sheet: An explicit sheet name (exact, or equal ignoring case and surrounding spaces).

    Returns:
        The chosen sheet name.

    Raises:
        ValueError: ``sheet`` is not in the workbook, or the workbook has no sheets.
    """
    _check_lang(lang)
    if not sheet_names:
        raise ValueError("the workbook has no sheets")
    if sheet is not None:
        if sheet in sheet_names:
            return sheet
        loose = [s for s in sheet_names if s.strip().casefold() == sheet.strip().casefold()]
        if loose:
            return loose[0]
        raise ValueError(f"no sheet named {sheet!r}; sheets: {sheet_names}")
    for name in sheet_names:
        if _sheet_matches(name, lang):
            return name
    log.warning("no sheet name matches language %r; reading the first sheet %r", lang, sheet_names[0])
    return sheet_names[0]


def _read_sheet(path: Path, lang: str, sheet: str | None) -> tuple[str, list[tuple[int, tuple[Any, ...]]]]:
    """The chosen sheet's name and its non-blank rows as ``(sheet row number, values)``."""
    if path.suffix.lower() not in (".xlsx", ".xlsm"):
        raise DataFileError(path, None, None, f"unsupported extension {path.suffix!r}; expected .xlsx")
    try:
        # openpyxl rather than pandas: pandas silently skips blank rows, so its row numbers drift
        # from the sheet's, and rejects must point at the row a person will open.
        with reading_workbook(path):
            book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except FileNotFoundError:
        raise
    except OSError as exc:  # permissions, a directory: reading_workbook leaves these to us
        raise DataFileError(path, None, None, f"not a readable .xlsx workbook: {exc}") from None
    try:
        try:
            name = select_sheet(list(book.sheetnames), lang, sheet)
        except ValueError as exc:
            raise DataFileError(path, None, None, str(exc)) from None
        # read_only mode parses lazily: damage inside a sheet surfaces only while iterating.
        with reading_workbook(path):
            # A row whose every cell is missing ("nan" from a pandas export included) is blank.
            rows = [
                (number, values)
                for number, values in enumerate(book[name].iter_rows(values_only=True), start=1)
                if not all(is_missing(v) for v in values)
            ]
    finally:
        book.close()
    return name, rows


def _columns(path: Path, sheet: str, header: tuple[Any, ...]) -> dict[str, int]:
    """Column index of each required column in the header row."""
    # Headers typed by hand often carry stray (also full-width) spaces: "阅读文本 ".
    found: dict[str, int] = {}
    for index, value in enumerate(header):
        key = "".join(_cell(value).split())
        if key in COLUMNS and key not in found:
            found[key] = index
    missing = [c for c in COLUMNS if c not in found]
    if missing:
        raise DataFileError(
            path, None, missing[0],
            f"sheet {sheet!r} lacks column(s) {missing}; found {[_cell(v) for v in header if v is not None]}",
        )
    return found


def _row_record(
    stem: str, lang: str, sheet: str, row: int, cells: dict[str, str], n_questions: int | None,
    instruction: str,
) -> tuple[Conversation, int]:
    # ``instruction``: the instruction text as read (``{n}`` still in it), read once per sheet
    # A cell reading "nan"/"None"/"NULL" (medtune.io.is_missing) is as empty as a blank one.
    passage = "" if is_missing(cells[_PASSAGE]) else _tidy_passage(cells[_PASSAGE], lang)
    if not passage:
        raise _RowError(_PASSAGE, "empty passage" + missing_note(cells[_PASSAGE]))
    if is_missing(cells[_QUESTIONS]):
        raise _RowError(_QUESTIONS, "no questions" + missing_note(cells[_QUESTIONS]))
    if is_missing(cells[_ANSWERS]):
        raise _RowError(_ANSWERS, "no answers" + missing_note(cells[_ANSWERS]))
    try:
        questions, dropped = _parse_questions_detailed(cells[_QUESTIONS], lang)
    except QuestionParseError as exc:
        raise _RowError(_QUESTIONS, str(exc)) from None
    if not questions:
        raise _RowError(
            _QUESTIONS, f"no single-choice questions found ({len(dropped)} short-answer question(s) dropped)"
        )
    if n_questions is not None and len(questions) != n_questions:
        raise _RowError(_QUESTIONS, f"{len(questions)} single-choice question(s); expected {n_questions}")
    answers = _align(questions, _answer_items(cells[_ANSWERS], lang))
    conversation = Conversation(
        id=f"{stem}-{lang}-{row:04d}",
        messages=[
            {"role": "user", "content": question_prompt(instruction.replace("{n}", str(len(questions))), passage)},
            {"role": "assistant", "content": format_output(questions, answers, lang)},
        ],
        meta={"lang": lang, "n_questions": len(questions), "source_row": row, "source_sheet": sheet},
    )
    return conversation.validate(), len(dropped)


def read_exam_xlsx(
    path: str | os.PathLike,
    lang: str,
    on_invalid: str = "skip",
    sheet: str | None = None,
    n_questions: int | None = None,
    prompt_path: str | os.PathLike | None = None,
) -> ExamXlsxResult:
    """Read one sheet of a reading-exam workbook into question-generation training pairs.

    Args:
        path: The ``.xlsx`` file; the sheet needs the columns ``阅读文本``, ``选项``, ``答案``.
        lang: ``"zh"`` or ``"en"``: picks the sheet (see the module docstring), the instruction
            and the answer-line format.
        on_invalid: ``"skip"`` collects unusable rows in ``rejects``; ``"error"`` raises on the
            first.
        sheet: Read this sheet instead of choosing by language.
        n_questions: When set, rows with another number of single-choice questions are rejected
            (e.g. 4 to train only on four-question sets); by default any number is kept and the
            instruction states it.
        prompt_path: An instruction file of your own instead of the shipped one for ``lang``
            (``{n}``: the number of questions; ``{passage}``: where the passage goes, else after
            the instruction and a blank line).

    Returns:
        The training pairs (``Conversation``, id ``f"{file stem}-{lang}-{row:04d}"``), rejects
        and counts.

    Raises:
        DataFileError: File-level problems (extension, unreadable workbook, unknown sheet, missing
            column); with ``on_invalid="error"`` also the first unusable row (naming row and column).
        ValueError: Unknown ``lang`` or ``on_invalid``; ``medtune.templates.TemplateError`` for an
            unusable prompt file (before the workbook is opened).
    """
    from medtune.templates import prompt_text

    _check_lang(lang)
    if on_invalid not in _ON_INVALID:
        raise ValueError(f"on_invalid must be one of {_ON_INVALID}, got {on_invalid!r}")
    instruction = prompt_text("question_generation", lang, prompt_path).strip()
    path = Path(path)
    sheet_name, rows = _read_sheet(path, lang, sheet)
    if not rows:
        raise DataFileError(path, None, None, f"sheet {sheet_name!r} is empty: no header row")
    header_number, header = rows[0]
    columns = _columns(path, sheet_name, header)

    result = ExamXlsxResult(records=[], sheet=sheet_name, lang=lang)
    for number, values in rows[1:]:
        row = number - header_number
        cells = {name: _cell(values[i]) if i < len(values) else "" for name, i in columns.items()}
        result.n_rows += 1
        try:
            record, n_dropped = _row_record(path.stem, lang, sheet_name, row, cells, n_questions, instruction)
        except (_RowError, RecordError) as exc:
            if on_invalid == "error":
                raise DataFileError(path, row, exc.field, f"sheet {sheet_name!r}: {exc.reason}") from None
            result.rejects.append(
                {"row": row, "sheet": sheet_name, "field": exc.field, "reason": exc.reason, "raw": cells}
            )
            continue
        result.records.append(record)
        result.n_short_answer_dropped += n_dropped

    # Not a bare ``assert``: this guard must survive ``python -O``.
    if result.n_rows != len(result.records) + len(result.rejects):
        raise AssertionError("row accounting broke")
    return result


def convert_exam_xlsx(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    lang: str,
    sheet: str | None = None,
    on_invalid: str = "skip",
    rejects_path: str | os.PathLike | None = None,
    n_questions: int | None = None,
    prompt_path: str | os.PathLike | None = None,
) -> ExamXlsxResult:
    """Convert a reading-exam workbook into a JSON-lines file of ``Conversation`` records.

    Records go to ``out_path``; rejects, when there are any, to ``rejects_path`` (default
    ``<out stem>.rejects.jsonl`` beside it). When there are none, a rejects file left there by an
    earlier run is removed so it cannot be mistaken for this run's. Both are written atomically.

    Args:
        input_path: The ``.xlsx`` workbook.
        out_path: Records output (JSON lines, one ``Conversation.to_dict()`` a line).
        lang: ``"zh"`` or ``"en"``.
        sheet: Sheet name; default chosen by language.
        on_invalid: ``"skip"`` (default) or ``"error"``, as in ``read_exam_xlsx``.
        rejects_path: Where rejects go.
        n_questions: Keep only rows with this many questions, as in ``read_exam_xlsx``.
        prompt_path: An instruction file of your own, as in ``read_exam_xlsx``.

    Returns:
        The ``ExamXlsxResult``.

    Raises:
        DataFileError: As ``read_exam_xlsx``.
        ValueError: An output path equals the input, or records and rejects share a path.
    """
    return convert_file(input_path, out_path, rejects_path, lambda path: read_exam_xlsx(path, lang, on_invalid=on_invalid, sheet=sheet, n_questions=n_questions,
                                     prompt_path=prompt_path))


def summary_lines(
    result: ExamXlsxResult, input_path: str | os.PathLike, out_path: str | os.PathLike,
    rejects_path: str | os.PathLike | None = None,
) -> list[str]:
    """Human-readable lines for the command line after ``convert_exam_xlsx``.

    Args:
        result: What ``convert_exam_xlsx`` returned.
        input_path: The workbook.
        out_path: The records file.
        rejects_path: The rejects file, if not the default.

    Returns:
        Lines to print: rows → training pairs, rejects (with where their reasons are), dropped
        short-answer questions.
    """
    lines = [
        f"{input_path} [sheet {result.sheet!r}, {result.lang}]: {result.n_rows} rows → "
        f"{len(result.records)} training pairs written to {out_path}"
    ]
    if result.rejects:
        where = rejects_path or default_rejects_path(out_path)
        lines.append(f"  {len(result.rejects)} rows rejected (reasons in {where})")
    if result.n_short_answer_dropped:
        lines.append(f"  {result.n_short_answer_dropped} short-answer questions dropped from kept rows")
    return lines


# ---------------------------------------------------------------------------------------------
# Evaluating generated questions
# ---------------------------------------------------------------------------------------------

# The answer line of a generated question; the value is anything up to the end of the line so
# that "答案：E", "答案：BD" and "答案：无" are all seen and judged, not skipped.
_GEN_ANSWER = re.compile(r"(?:正确答案|答案|(?i:answer))\s*[:：]\s*(?P<v>[^\n]*)")
# One letter (any, so that "E" or "K" is seen and judged) or a run of option letters ("BD");
# a word such as "none" is not letters.
_GEN_LETTER = re.compile(
    rf"^[(（【\[]?\s*(?P<l>[A-J{_LOOKALIKES}]{{2,4}}|[A-Za-z{_LOOKALIKES}])\s*[)）】\]]?[.。]?\s*$"
)


@dataclass
class GeneratedQuestion:
    """What was found in one generated question.

    Attributes:
        number: The number the model wrote (``None`` if none).
        stem: The question text.
        options: Option letter → text for the letters A-D that were found, in A-D order.
        extra_options: Labels beyond D (``["E"]``) after the options started.
        answer: The answer value, upper-cased, as written after ``答案：``/``answer:`` when it
            is letters (``"B"``, ``"E"``, ``"BD"``); ``None`` when there is no answer line or
            its value is not letters.
        n_answer_lines: How many answer lines the question has.
        problems: Why the question is not well-formed (empty when it is).
    """

    number: int | None
    stem: str
    options: dict[str, str]
    extra_options: list[str] = field(default_factory=list)
    answer: str | None = None
    n_answer_lines: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def well_formed(self) -> bool:
        """A stem, exactly the options A-D and exactly one answer line holding one letter."""
        return not self.problems

    @property
    def answer_valid(self) -> bool:
        """The answer is one of A-D and names an option that has text."""
        return self.answer is not None and self.answer in OPTION_LETTERS and bool(self.options.get(self.answer))


@dataclass
class GeneratedParse:
    """What ``parse_generated`` found in one generated output.

    Attributes:
        questions: The questions, in output order.
        preamble: Text before the first numbered question (chat filler such as "好的：").
    """

    questions: list[GeneratedQuestion]
    preamble: str = ""

    def problems(self, n_questions: int) -> list[str]:
        """Every reason the output is not well-formed for ``n_questions`` questions."""
        out = []
        if len(self.questions) != n_questions:
            out.append(f"{len(self.questions)} questions; expected {n_questions}")
        for i, q in enumerate(self.questions, start=1):
            out += [f"question {i}: {p}" for p in q.problems]
        return out

    def well_formed(self, n_questions: int) -> bool:
        """``n_questions`` questions, each well-formed."""
        return not self.problems(n_questions)

    def answers_valid(self) -> bool:
        """Every question's answer is one of A-D and names a non-empty option."""
        return bool(self.questions) and all(q.answer_valid for q in self.questions)

    def to_dict(self, n_questions: int) -> dict[str, Any]:
        """Diagnostics for one output, JSON-ready."""
        well_formed = self.well_formed(n_questions)
        return {
            "n_questions": len(self.questions),
            "well_formed": well_formed,
            "answer_valid": self.answers_valid() if well_formed else None,
            "answers": [q.answer for q in self.questions],
            "problems": self.problems(n_questions),
        }


def _generated_question(number: int | None, body: str, lang: str) -> GeneratedQuestion:
    answer_lines = list(_GEN_ANSWER.finditer(body))
    # Options end where the first answer line starts; anything after it (an explanation the
    # model added) is not part of the question.
    question_text = body[: answer_lines[0].start()] if answer_lines else body
    split = _split_options(question_text, lang)
    answer = None
    if answer_lines:
        m = _GEN_LETTER.match(answer_lines[0].group("v").strip())
        if m:
            answer = m.group("l").translate(_LOOKALIKE_TABLE).upper()
    q = GeneratedQuestion(number, split.stem, split.options, split.extra, answer, len(answer_lines))
    if not q.stem:
        q.problems.append("no stem")
    missing = [letter for letter in OPTION_LETTERS if letter not in q.options]
    if missing:
        q.problems.append(f"missing option(s) {', '.join(missing)}")
    if q.extra_options:
        q.problems.append(f"extra option(s) {', '.join(q.extra_options)}")
    if not answer_lines:
        q.problems.append("no answer line")
    elif len(answer_lines) > 1:
        q.problems.append(f"{len(answer_lines)} answer lines")
    elif answer is None:
        q.problems.append(f"answer {answer_lines[0].group('v').strip()!r} is not a letter")
    elif len(answer) != 1:
        q.problems.append(f"answer {answer!r} is more than one letter")
    return q


def parse_generated(text: str, lang: str) -> GeneratedParse:
    """Find the questions, options and answer letters in a generated output.

    The parser is the one used for the source spreadsheets (so numbering and labels may vary as
    they do there), plus answer lines ``答案：X`` / ``answer: X`` (either language's marker is
    accepted; the value is kept even when it is not A-D, so that it can be judged).

    Args:
        text: A model output (or a reference output).
        lang: ``"zh"`` or ``"en"``.

    Returns:
        What was found; ``GeneratedParse.well_formed(n)`` and ``answers_valid()`` judge it.
    """
    text = _normalise(text or "", _check_lang(lang))
    preamble, blocks = _numbered_blocks(text)
    if not blocks:
        preamble, blocks = "", ([(None, text)] if text.strip() else [])
    return GeneratedParse(
        questions=[_generated_question(number, body, lang) for number, body in blocks],
        preamble=_tidy(preamble, lang),
    )
