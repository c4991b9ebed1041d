r"""Answer extraction for multiple-choice outputs, plus answer/explanation splitting.

All functions are pure. Answers are letter strings in option order (``"ACD"``); ``""`` means
"no answer" and is scored as wrong (see docs/METRICS.md).

Two parsers are provided.

``strict`` (:func:`parse_strict`, :func:`strict_explanation`)
    Bug-compatible with the CMExam paper's evaluation code, for reproducing its table.
    *Answer*: if the output contains ``解释`` only its first line is used, else the whole
    output; option X is chosen iff the letter X or the first whitespace-separated token of X's
    text is a substring of that text. *Explanation*: an empty output (the paper's empty CSV
    cell) becomes the literal ``无答案``; if the output contains ``解释:`` (ASCII colon only)
    the explanation is ``output.split("解释:")[1].strip()``; otherwise it is the whole output,
    not stripped. No other marker is recognised.

``robust`` (:func:`read_answer`, :func:`parse_robust`; our default)
    :func:`read_answer` is the single entry point used by evaluation, the chat helpers and the
    RL exam reward. It finds the template's answer region (:func:`split_output`), reads it with
    the cascade below, falls back to the whole output when the region holds no answer, and
    reports conflicts as ``ambiguous``.

    0. **Prepare.** A thinking model's reasoning block is not its answer: :func:`read_answer`
       and :func:`parse_robust` read only the text after the last ``</think>`` (also
       ``</thinking>``, ``</reasoning>``); an unclosed ``<think>`` (cut off while thinking) leaves
       only the text before it, usually nothing. The explanation comes from the same text.
       Unicode NFKC (full-width ``Ａ``/``：``/``（`` become ASCII). Case is not folded globally: a lowercase letter only counts standing alone in an answer position.
       Base-model rambling is removed: a *new question the model invents* (a question line
       followed by option lines that are not this question's options, or a ``问题：``/
       ``题目：``/``Question:``/``第2题`` line after the first line) is cut off with
       everything after it; an invented question at the very start is dropped up to the next
       blank line. A *restated option list* (three or more ``X. <X's own text>`` entries in a
       row, separated only by whitespace or punctuation) is blanked, so neither its letters
       nor its texts are read.
    1. **JSON** (also inside a code fence): the value of ``answer``/``答案``/``正确答案``/
       ``正确选项``/``final_answer`` (else ``choice``/``选项``/``option``), given as ``"B"``,
       ``"A,C"``, ``["A", "C"]`` or an option text. Two different values → ambiguous. An
       explicit answer statement (step 2) outside the object is weighed against the JSON value
       like a second statement: a different one is a conflict unless it corrects it or declares
       the final answer (``{"answer": "ACD"}`` then ``答案：ABD`` → ambiguous).
    2. **Answer statements.** Every explicit answer marker followed by a letter group or an
       option text is a statement: ``答案``, ``正确答案``, ``正确选项``, ``最终答案``,
       ``参考答案`` (also bracketed: ``【答案】A``), ``答:``, ``选`` (not in ``选项``/``不选``/
       ``首选``/``筛选``/``候选``/``误选``/``漏选``/``可选``), ``正确的是``, ``应为``/``应该是``, ``可能是``,
       ``诊断为``, ``考虑为``, ``而是``, ``故``/``因此``/``所以``/``综上``/``总之``/``最终``,
       ``更正``/``改为``/``改选``, ``answer is``/``answer:``/``option is``/``options are``/
       ``choose``/``therefore``, and a clause opening with ``是`` after one rejecting a letter
       (``不是A，是B``); fillers such as ``是``/``为``/``应该选``/``本题``/``:``/``选项``/``**``
       may sit between. Weak cues count only when the letters end the sentence or line:
       ``…的是E。``, ``回到本题：E``. A negated marker (``因此不能诊断为…``) and an option text
       followed by a negation or by CMExam's ``（D错）`` state nothing; after a pure
       conclusion cue (``故``, ``因此``, ``更正``, ...) only letters count. After a marker
       naming the answer (``答案``, ``正确答案``, ``正确选项``, ``answer``) a phrase running to
       the end of its clause that lies in exactly one option's text, and is at least half of
       it, names that option (``答案是肌钙蛋白`` → ``心肌肌钙蛋白``). The letter group
       at the start of the text (``B\n理由：...``, ``AC。...``) is a statement too, unless it
       labels an option verdict (``A. 肺炎链球菌 ✗``) or the first line of an option-by-option
       analysis (``A. 胸部CT——不是首选`` / ``B. …`` / ``C. …``). A statement is *final* when
       its sentence holds a conclusion cue (``最终``, ``综上``, ``故``, ``因此``, ``所以``,
       ``therefore``, ...); the cue *declares* the final answer when it is ``最终``, ``综上``, ``总之``, ``更正``/``改为``/...,
       ``final`` or ``in conclusion`` (not a mere ``因此``/``所以``/``故``/``therefore``). A
       statement is *explicit* when made with ``答案``/``正确选项``/``答:``/``选``/``answer``/
       ``option``/``choose`` (or JSON), and *corrected* when a self-correction cue (``更正``,
       ``重新考虑``, ``改为``, ``不对``, ``错了``, an apology admitting a mistake such as
       ``抱歉，上面回答有误`` or ``sorry, … the correct answer is``, ``actually``, ``wait``, ...)
       lies between it and the previous statement.
       Resolution, left to right: a corrected statement replaces the current answer; a final
       one replaces a tentative one, except that a mere ``因此``/``所以`` does not overrule an
       earlier explicit answer (``答案是C。…因此答案是B。`` is a conflict; ``最终答案是B``
       overrules it); two different answers of the same rank (or a tentative answer
       contradicting a final one) are a **conflict** → ``""``, ambiguous. So the last final
       answer wins over earlier tentative ones.
    3. **Refusals** (``无法回答``, ``不知道``, ``抱歉``, ``作为AI``, ``I cannot``, ...) → ``""``:
       options a refusal mentions are not read as a choice. Only checked when steps 1-2 found
       nothing, so an explicit answer beats hedging wording. ``无法确定``/``难以判断``/... are a
       refusal only when said of the question or its answer -- opening their clause, after
       ``我``/``本题``/``这道题``/``题干``/..., or before ``答案``/``哪``/``选`` -- not in medical
       prose (``结节良恶性难以判断时，首选穿刺检查（E）。`` → ``E``).
    4. **Option verdicts** (no statement found): option-by-option judgements such as
       ``A …正确`` / ``B …错误``, ``A. xxx ✓`` / ``B. xxx ✗``, ``A项正确``, ``A错，B对``,
       ``C正确，A、B、D、E均不正确``, CMExam's ``（D对）``, verdicts on one line separated by
       spaces (``A错误 B错误 C正确``), or an option named by its text at the start of a line or
       clause (``呋塞米：会引起低钾 ✔``). A verdict on *the rest* applies to every option not
       judged explicitly (``B和E不对，其余都对`` → ``ACD``); ``除C外均正确`` judges C the other
       way (→ ``ABDE``). A bare ``对``/``错`` only counts when the clause ends (or the next label
       follows) right after it (``长春新碱对外周神经…`` is no verdict) and a ``×`` between
       numbers is a multiplication sign. The options judged correct are the
       answer (questions asking for the *wrong* statement cannot be told apart without the
       question, so verdicts are read with positive polarity). An option judged both ways →
       ambiguous. Options judged wrong are excluded from steps 5-6. Then, with no verdict
       found, letters offered as alternatives anywhere (``我觉得是A或者C``,
       ``It could be either B or C``) are a hedge (see below).
    5. **Bracketed letter ending a sentence**: ``…首选穿刺检查（E）。`` → ``E`` (the last such
       bracket, skipping ones in a negated clause such as ``不是…（A）``); when no bracket ends
       a sentence, the last one ending a clause (``…的病因是病毒性肝炎（B），西方国家则…`` →
       ``B``). An explicit bracketed letter beats option texts named elsewhere.
    6. **Option text matched whole**, longest first (a variant without a trailing parenthetical
       is tried too); a match inside an already matched longer option (``心绞痛`` inside
       ``变异型心绞痛``) is ignored; a negated match (``排除…``, ``…不是``) is not counted.
       Texts shorter than two characters only count when they are the whole output. When
       every option is mentioned (the model restated them all), only options mentioned again
       count. An option text ``<Latin>抑制剂`` is also named by the usual abbreviation with
       ``I`` for inhibitor (``ACE抑制剂`` ← ``ACEI``). Option texts offered as alternatives
       (``金黄色葡萄球菌或大肠埃希菌``) are a hedge.
    7. Nothing matched → ``""``.

    **Hedges are not answers**: a letter group naming every option of the question
    (``A B C D E``, ``ABCDE``; so a question whose gold answer is every option can never be
    scored right), alternatives (``A或B``, ``A or B``, ``A还是B``, ``可能是X或Y`` with option
    texts; in an output with no statement, also anywhere in it: ``我觉得是A或者C``) and a
    multi-letter group followed by a question mark (``A/B?``) read as ``""`` with ``ambiguous``
    set. A refusal is not a hedge (``I'm not sure. It could be B or D.`` is not flagged).

    **Ambiguity** (:attr:`AnswerReading.ambiguous`): a hedge; conflicting statements or JSON
    values (→ ``""``); an option judged both right and wrong; verdicts that contradict the
    stated answer under either polarity (the answer is kept); or, for a templated output, an
    answer stated around the answer region (e.g. in the explanation) that differs from the
    region's answer (→ ``""``, a conflict) -- unless that later statement is final or a
    self-correction, which then wins (``B\n理由：…更正：答案为C`` → ``C``, not ambiguous).
    Here any conclusion cue counts (``答案：B\n理由：……因此答案是C`` → ``C``): the slot is filled
    before the reasoning that follows it, unlike two answers stated in free text (step 2).
    Around the region only letters state answers: an option text in an explanation
    (``应诊断为房间隔缺损``) is discussion, unless a self-correction cue precedes it.

    Letter-group rules: forms ``A``, ``AC``, ``A、C``, ``A,C``, ``A/C``, ``A C``, ``A和C``,
    ``A与C``, ``A 及 C``, ``A and C``, ``(A)``, ``(A)(C)``, ``【A】``, ``"B"``, followed by
    anything (``ABD（C错误）`` reads ``ABD``). Every letter must be an option key, otherwise the
    whole run is rejected -- this keeps ``DNA``, ``HBsAg``, ``B12`` from selecting options. An
    unseparated run of several letters must be upper case; a lowercase letter must stand alone
    and not be followed by an English word (``answer is a combination``). At the start of a
    text or label a lone ``A`` followed by an English word is the article, and a multi-letter
    run followed by a CJK character (other than ``项``/``均``/``正确``/...) or an English word
    is a term (``ACE抑制剂``, ``ACE inhibitors``). A letter glued to a term suffix (``B超``,
    ``C反应蛋白``, ``B族``) or hyphenated to a word (``C-reactive protein``, ``B-cell``) is not
    an answer.

    Negations: a letter group followed by ``均不正确``, ``都不对``, ``错误``, ``不选``,
    ``排除``, ``is incorrect``, ... is not an answer (``A、B均不正确``); after a comma only the
    last letter is negated (``答案：B，C项错误`` → ``B``). An option text preceded by
    ``排除``/``不是``/``不选``/``并非``/``而非`` or followed by a negation is not counted.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

FALLBACK_EXPLANATION_MARKERS = ("解释:", "解释：", "理由：", "分析：")
STRICT_NO_ANSWER = "无答案"
"""What the paper's code puts in place of a missing output (scored as the explanation)."""

# ---------------------------------------------------------------------------------------------
# strict (paper-compatible)
# ---------------------------------------------------------------------------------------------


def parse_strict(output: str, options: Mapping[str, str]) -> str:
    """Extract an answer exactly like the CMExam paper's parser (bugs included).

    Args:
        output: The raw model output (``""`` stands for the paper's empty cell: no answer).
        options: Option letter → option text, in option order.

    Returns:
        The chosen letters in option order, or ``""`` when none is chosen.
    """
    # The paper keeps only the first line when an explanation is present; its substring test
    # then over-matches (``Answer: B`` → ``AB``). Both are kept on purpose for comparability.
    text = output.split("\n")[0] if "解释" in output else output
    chosen = []
    for key, option_text in options.items():
        tokens = option_text.split()
        if key in text or (tokens and tokens[0] in text):
            chosen.append(key)
    return "".join(chosen)


def strict_explanation(output: str | None) -> str:
    """Extract the explanation exactly like the CMExam paper's code (bugs included).

    Only ``解释:`` with an ASCII colon is a marker (``解释：``, ``理由：``, ``分析：`` are not).

    Args:
        output: The raw model output; ``""`` or ``None`` is the paper's empty CSV cell (NaN).

    Returns:
        ``无答案`` for an empty output; the text between the first and the second ``解释:``,
        stripped, when the output contains ``解释:``; otherwise the whole output *unstripped*
        (trailing spaces stay ROUGE tokens, as in the paper).
    """
    if not isinstance(output, str) or output == "":
        return STRICT_NO_ANSWER
    if "解释:" in output:
        return output.split("解释:")[1].strip()
    return output


# ---------------------------------------------------------------------------------------------
# robust: result type
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerReading:
    """What :func:`read_answer` read from one output.

    Attributes:
        letters: Chosen letters in option order; ``""`` when there is no (unhedged) answer.
        explanation: The explanation text that is scored (see :func:`split_output`).
        ambiguous: Conflicting answers were found (see the module docstring).
        method: The step that decided: ``json``, ``marker``, ``final``, ``correction``,
            ``leading``, ``verdicts``, ``bracket``, ``option_text``, ``hedge``, ``conflict``,
            ``refusal`` or ``none``.
        in_region: The letters come from the template's answer region (not from the
            whole-output fallback or a later self-correction).
    """

    letters: str
    explanation: str
    ambiguous: bool = False
    method: str = "none"
    in_region: bool = True


@dataclass
class _Analysis:
    letters: str = ""
    method: str = "none"
    ambiguous: bool = False
    final: bool = False  # decided by a final-answer or self-correction statement
    stated: bool = False  # an explicit statement or a JSON answer was found


@dataclass
class _Group:
    letters: str  # upper case, in reading order
    start: int
    end: int
    alt: bool  # "A或B", "A/B?": alternatives, i.e. a hedge
    negated: bool


@dataclass
class _Statement:
    letters: str
    start: int
    end: int
    final: bool
    hedge: bool
    leading: bool = False
    by_text: bool = False  # named by option text, not by letters
    firm: bool = False  # an explicit answer statement ("答案是C", "选C", "answer is C", JSON)
    strong: bool = False  # its sentence declares the final answer ("最终", "综上", "更正", "final")


class _Block(NamedTuple):
    question: int  # line of the question (the first option line when there is none)
    first: int
    last: int
    question_like: bool
    foreign: bool  # a question line followed by options that are mostly not ours


@dataclass
class _Context:
    keys: list[str]  # normalised option keys, in option order
    keyset: set[str]
    texts: dict[str, list[str]]  # key → folded option texts (full, then without parenthetical)
    longest: int = 0  # length of the longest option text
    # first (folded) characters of the texts of two or more characters: at any other position no
    # option text starts, which _option_text_at checks before folding a window (most positions)
    firsts: frozenset[str] = frozenset()
    # memo of _starts: what may start at a character (derived from the fields above only)
    starts: dict[str, int] = field(default_factory=dict)


_GROUP_START, _TEXT_START = 1, 2


def _starts(char: str, ctx: _Context) -> int:
    """What may start at ``char`` (a one-character string, or ``""`` past the end), as flags.

    ``_GROUP_START`` when it is a bracket or an option letter (_read_item's first check),
    ``_TEXT_START`` when an option text of two or more characters starts with it
    (_option_text_at's first check).
    """
    kind = ctx.starts.get(char)
    if kind is None:
        kind = ctx.starts[char] = (
            (_GROUP_START if char and (char in _OPEN or char.upper() in ctx.keyset) else 0)
            | (_TEXT_START if char and _fold_char(char) in ctx.firsts else 0))
    return kind


# ---------------------------------------------------------------------------------------------
# robust: patterns (all applied to NFKC-normalised text)
# ---------------------------------------------------------------------------------------------

_RUN_RE = re.compile(r"[A-Za-z0-9]+")
_OPEN, _CLOSE = "([【\"'“‘「", ")]】\"'”’」"
# An English word right after a letter means the letter is prose ("a combination", "A patient").
_ENGLISH_WORD_AFTER_RE = re.compile(r"[ \t]+(?!(?:and|or|is|are)\b)[a-z]")
# A letter glued to one of these is part of a medical term (B超, X线, C反应蛋白, B族维生素, B肝).
_TERM_SUFFIX_RE = re.compile(r"-?(?:超|线|型|族|反应|细胞|淋巴|因子|受体|抗原|抗体|蛋白|波|肝|类|级)")
# A letter hyphenated to a word is a term too (C-reactive, B-cell, X-ray); "B-D" is not.
_HYPHEN_TERM_RE = re.compile(r"-(?:[A-Za-z]{2}|[a-z])")
# A CJK character that may follow a multi-letter run in a label/answer position ("AC正确",
# "ABD项"); any other CJK character makes the run a term ("ACE抑制剂").
_AFTER_RUN_OK_RE = re.compile(r"项|选项|均|都|皆|正确|错误|不正确|不对|对|错|两项|三项|和|与|及|或")
_AND_SEP_RE = re.compile(
    r"[ \t]*(?:、|,|/|&|\+|和|与|與|以及|及|(?i:and)\b)[ \t]*"
    r"|[ \t]+(?=[A-Z](?![A-Za-z]))"  # "A C": space-separated upper-case letters
)
_ALT_CANDIDATE_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z](?![A-Za-z0-9])[ \t]*(?:或|还是|抑或|(?i:or)\b)")
_ALT_SEP_RE = re.compile(r"[ \t]*(?:或者|或是|或|还是|抑或|(?i:or)\b)[ \t]*")
_NEG_WORDS = (
    r"不完全正确|不正确|不对|错误|错(?![开过失位])|不选|不是|排除|除外|不符合|不符|不考虑"
    r"|incorrect|wrong|not\b|✗|✘|×|❌"
)
_NEG_AFTER_RE = re.compile(
    r"[ \t]*(?:选项|项)?[ \t]*(?:的)?(?:说法|描述|叙述|表述)?[ \t]*(?P<adv>均|都|皆|也|亦|全)?"
    r"[ \t]*(?:是|为|are\b|is\b)?[ \t]*(?:" + _NEG_WORDS + ")",
    re.IGNORECASE,
)
_NEG_BEFORE_RE = re.compile(r"(?:排除|不选|不是|并非|而非|不考虑|不属于|not)\s*(?:选项)?\s*$", re.IGNORECASE)
_NEG_CLAUSE_RE = re.compile(r"不是|排除|而非|并非|不选|不考虑|除外|不属于")

_MARKER_RE = re.compile(
    r"最终答案|正确答案|正确选项|参考答案|标准答案|答案|答(?=[ \t]*:)"
    r"|(?<![不首筛候误漏可])选(?!项)"
    r"|正确的(?:是|为|选项)|应该?(?:是|为)|(?:可能|诊断|考虑)(?:是|为)|而是|的是|故|因此|所以|综上所述|综上|总之|最终"
    r"|更正|改正|修正|纠正|改为|改选|(?<=[,;])是"
    r"|(?i:(?:final[ \t]+)?answers?\b[ \t]*(?:is\b|are\b|:|-)?|(?:options?|choices?)\b[ \t]*(?:is\b|are\b|:)"
    r"|\bchoose\b|\bselect\b|\bpick\b|\btherefore\b|\bthus\b|\bhence\b)"
)
# Every character a _MARKER_RE match can start with (keep the two in step; the English words
# under IGNORECASE so that the same case-insensitive equivalents count): see _markers. One
# character class, not an alternation of two, so that the engine scans for it character by
# character (IGNORECASE changes nothing for the CJK characters: they have no case).
_MARKER_START_RE = re.compile(r"(?i:[最正参标答选应可诊考而的故因所综总更改修纠是afocspth])")
# What may sit between a marker and the letters: "答案应该是：选项 B", "answer is: **B**".
_FILLER_RE = re.compile(
    r"(?:选项|选择|本题|此题|该题|的|[ \t\n:=*#>\-】\]是为為应應该該选選择擇就可能也,]"
    r"|(?i:option|choice|letter|would|should|be|is|are|probably|likely|the|correct|final|answer)\b)*"
)
_LEADING_RE = re.compile(r"[\s*#>\-]*(?:选项|(?i:option)\b)?\s*")
_FINAL_CUE_RE = re.compile(
    r"最终|综上|故|因此|所以|总之|更正|改正|修正|纠正|改为|改选|(?i:final|therefore|thus|hence|in conclusion)"
)
# Explicit answer markers: their statements are firm (a plain conclusion cue does not overrule them).
_FIRM_MARKER_RE = re.compile(
    r"(?:最终|正确|参考|标准)?答案|正确选项|答|选"
    r"|(?i:(?:final[ \t]+)?answers?\b.*|(?:options?|choices?)\b.*|choose|select|pick)",
    re.DOTALL,
)
# Markers naming the answer itself, after which a partial option text may follow ("答案是肌钙蛋白").
_ANSWER_WORD_RE = re.compile(r"(?:最终|正确|参考|标准)?答案|正确选项|(?i:(?:final[ \t]+)?answers?\b.*)", re.DOTALL)
# Cues that declare the final answer (not a mere "therefore"): the statement overrules firm ones.
_STRONG_FINAL_RE = re.compile(r"最终|综上|总之|更正|改正|修正|纠正|改为|改选|(?i:final|in conclusion)")
# An option text offered with another as an alternative: "金黄色葡萄球菌（B）或大肠埃希菌".
_TEXT_ALT_RE = re.compile(r"(?:[ \t]*\([ \t]*[A-Za-z][ \t]*\))?[ \t]*(?:或者|或是|或|还是|抑或|(?i:or)\b)[ \t]*")
# After an explicit answer marker, a phrase found in exactly one option's text names that option
# ("答案是肌钙蛋白" → "心肌肌钙蛋白"); the phrase runs to the end of its clause.
_PHRASE_END_RE = re.compile(r"[,.;:!?。、()\[\]【】\n]")
# Markers that only announce a conclusion: an option text after them is a statement of fact
# ("更正：维生素D同样是脂溶性维生素"), so only letters count there.
_CUE_ONLY_MARKER_RE = re.compile(r"故|因此|所以|综上所述|综上|总之|最终|更正|改正|修正|纠正")
# Weak cues: only an answer when the letters end the sentence or line ("鉴别意义最大的是E。",
# "回到本题：E"), not when they start more prose ("需要鉴别的是C项…").
_WEAK_MARKER_RE = re.compile(r"的是|:")
_COLON_RE = re.compile(r":")
# "因此不能诊断为…", "不应为…": the marker is negated.
# "不是A，是B": a clause opening with 是 states an answer only after a clause rejecting a letter.
_CONTRAST_NEG_RE = re.compile(r"(?:不是|并非|而非)[ \t]*[A-Z]")
_NEG_MARKER_RE = re.compile(r"(?:不能|不应该?|不可能?|不会|不是|并非|无法|不宜|不)[ \t]*$")
# CMExam's annotation right after an option text: "法洛四联症（D错）".
_BRACKET_NEG_RE = re.compile(r"[ \t]*\([ \t]*[A-Z、, ]*[ \t]*(?:错|不对|不正确|×|✗)")
_ENDS_SENTENCE_RE = re.compile(r"[ \t]*[。.!;,]?[ \t]*(?:\n|$)")
_CORRECTION_RE = re.compile(
    r"更正|改正|修正|纠正|改为|改选|重新考虑|重新分析|重新审题|再考虑|再想|再次分析|仔细(?:想|考虑|分析)"
    r"|(?<![A-Za-z项法述])不对|错了|搞错|看错"
    # an apology for, or an admission of, an earlier mistake: "抱歉，上面回答有误", "Sorry, the correct answer is"
    r"|(?:抱歉|对不起|不好意思)[^。\n无不]{0,12}?(?:有误|有错|错误|不对|更正|纠正|修正|正确答案|应为|应该是)"
    r"|(?:上面|上述|以上|前面|之前|刚才)的?(?:(?:回答|答案|分析|判断|选择)(?:有误|有错|错误|不对)|有误|有错)"
    r"|(?i:actually|wait\b|correction|on second thought|i was wrong|my mistake"
    r"|sorry\b[^.\n]{0,40}?(?:mistake|wrong|incorrect|error|correct answer))"
)
_REFUSAL_RE = re.compile(
    r"无法回答|无法作答|不能回答|不知道"
    r"|无法给出|不能给出|无法提供|不能提供|无法选择|我不确定|不太确定|抱歉|作为(?:一个)?(?:AI|人工智能|语言模型)"
    r"|(?i:I cannot|I can't|I can not|I don't know|I'm not sure|I am not sure|unable to|not able to|as an AI)"
)

# "无法确定"/"难以判断" is a refusal only when the model says it of the question or its answer
# ("我无法确定", "本题难以判断", "无法确定，…", "无法判断哪项"), not in medical prose
# ("结节良恶性难以判断时，首选穿刺").
_WEAK_REFUSAL_RE = re.compile(r"(?:无法|不能|难以)(?:判断|确定)")
_REFUSAL_SUBJECT_RE = re.compile(r"我|本题|此题|该题|这道题|这题|这个问题|题干|题目")
_REFUSAL_OBJECT_RE = re.compile(r"[ \t]*(?:答案|哪|选|正确|是[ \t]*[A-Z])")

# Option verdicts. A label is a letter group at the start of a line/clause (or "X项" anywhere).
_LABEL_AT_RE = re.compile(r"(?:^|(?<=[\n;。,:!?、(]))[ \t*#>\-•·]*(?:选项|(?i:option)[ \t]*)?", re.MULTILINE)
# The same label ends, found faster (see _label_at_ends): the look-behind above is tried at every
# character, the delimiter class below is a plain character scan.
_LABEL_TAIL = r"[ \t*#>\-•·]*(?:选项|(?i:option)[ \t]*)?"
_LABEL_DELIM_RE = re.compile(r"[\n;。,:!?、(]" + _LABEL_TAIL)
_LABEL_FIRST_RE = re.compile(_LABEL_TAIL)
_LABEL_XIANG_RE = re.compile(r"(?<![A-Za-z])(?=[A-Z][ \t]*(?:选项|项))")
# Verdicts on one line separated by spaces: "A错误 B错误 C正确".
_LABEL_AFTER_VERDICT_RE = re.compile(r"(?:正确|错误|不对|对|错|[✓✗✔✘√❌✅])[ \t]+(?=[A-Z])")
# A bare 对/错/符合 is a verdict only when a clause ends right after it ("A对，B错", "(D对)"):
# "长春新碱对外周神经…" uses 对 as a preposition. A × between numbers is a multiplication sign.
_CLAUSE_END = r"(?=[ \t]*(?:[,.;:。、)\]】!?\n]|$)|[ \t]+[A-Z](?![A-Za-z0-9]))"  # "A对 B错": a label follows
_TIMES = r"(?<![0-9A-Za-z.])×"
_VERDICT_IMM_RE = re.compile(
    r"[ \t]*(?:项|选项)?[ \t:.、,)\-—–=>→]*(?:的)?(?:说法|描述|叙述|表述)?[ \t]*(?:均|都|皆|也|亦|全|则)?"
    r"[ \t]*(?:是|为|(?i:is|are)\b)?[ \t]*"
    r"(?:(?P<neg>不完全正确|不正确|不对|错误|错" + _CLAUSE_END + r"|不符合(?:题意)?" + _CLAUSE_END
    + r"|✗|✘|" + _TIMES + r"|❌|(?i:incorrect|wrong|false|not correct)\b)"
    r"|(?P<pos>正确(?!答案|选项|的是|的选项)|对(?:的)?" + _CLAUSE_END + r"|✓|✔|√|✅|符合(?:题意)?" + _CLAUSE_END
    + r"|(?i:correct|right|true)\b))"
)
_VERDICT_SEG_RE = re.compile(
    r"(?P<neg>不完全正确|不正确|不对|错误|不符合|✗|✘|" + _TIMES + r"|❌|(?i:incorrect|wrong)\b)"
    r"|(?P<pos>正确(?!答案|选项|的是|的选项)|✓|✔|√|✅|(?i:correct)\b)"
)
_REST_WORDS = r"(?:其余|其他|其它|余下|剩下|剩余)(?:的)?(?:各|几)?(?:选项|项|个)?"
_ALL_VERDICT = (
    r"[ \t]*(?:的)?(?:说法|描述|叙述|表述)?[ \t]*(?:均|都|皆|全)[ \t]*(?:是|为)?[ \t]*"
    r"(?:(?P<neg>不正确|不对|错误|错" + _CLAUSE_END + r")|(?P<pos>正确|对" + _CLAUSE_END + r"))"
)
_REST_VERDICT_RE = re.compile(_REST_WORDS + _ALL_VERDICT)
_EXCEPT_VERDICT_RE = re.compile(
    r"除(?:了)?[ \t]*(?:选项)?[ \t]*(?P<letters>[A-Z](?:[ \t]*[、,和与及][ \t]*[A-Z])*)[ \t]*(?:项|选项)?[ \t]*(?:以)?外"
    r"[ \t,]*(?:" + _REST_WORDS + r")?" + _ALL_VERDICT
)
_SEGMENT_END_RE = re.compile(r"[\n。;]")
_LABEL_LINE_RE = re.compile(r"^[ \t*#>\-•·]*(?:选项)?[ \t]*([A-J])[ \t]*(?:[.、:)]|项|选项)[ \t]*\S", re.MULTILINE)

_BRACKET_RE = re.compile(
    r"[(\[【][ \t]*([A-Z](?:[ \t]*[、,][ \t]*[A-Z])*)[ \t]*(?:项|选项)?[ \t]*[)\]】](?=[ \t]*(?:[。.!;,\n]|$))"
)
_SENTENCE_END_AFTER_RE = re.compile(r"[ \t]*(?:[。.!;\n]|$)")

_JSON_PAIR_RE = re.compile(
    r"(?<![A-Za-z_])[\"'“”]?(?P<key>(?i:final_answer|correct_answer|answers?|choices?|options?)|最终答案|正确答案|正确选项|答案|选项|选择)"
    r"[\"'“”]?[ \t]*[:=][ \t]*"
    r"(?P<val>\[[^\[\]]*\]|\"[^\"\n]*\"|'[^'\n]*'|“[^”\n]*”|[A-Za-z](?:[ \t]*[,、][ \t]*[A-Za-z])*\b)"
)
_JSON_ANSWER_KEYS = {"final_answer", "correct_answer", "answer", "answers", "最终答案", "正确答案", "正确选项", "答案"}

# Invented questions and restated option lists.
_OPTION_LINE_RE = re.compile(r"^[ \t*#>\-]*[(\[]?([A-J])[)\]]?(?:[ \t]*[.、:)][ \t]*|[ \t]+)(\S.*?)[ \t]*$")
_INLINE_LABEL_RE = re.compile(r"[ \t][B-J][ \t]*[.、:)]")
_QUESTION_LINE_RE = re.compile(r"\?|哪|何种|什么|(?:是|为)[ \t]*(?:\([ \t]*\))?[ \t]*:?[ \t]*$")
_STRONG_CUE_RE = re.compile(
    r"^[ \t*#>]*(?:(?:问题|题目|试题|例题|(?i:question)|Q)[ \t]*\d*[ \t]*[:.]"
    r"|下一题|第[ \t]*[一二三四五六七八九十\d]+[ \t]*题)"
)
_VERDICT_WORD_RE = re.compile(r"正确|错误|对|错|✓|✗|✔|✘|√|×|❌|✅|(?i:correct|wrong)")
_LISTING_GAP_RE = re.compile(r"[\s,;、|/]*")
_GLOSS_RE = re.compile(r"[ \t]*\([^()]*\)")
_INHIBITOR_RE = re.compile(r"([a-z]{2,})[ \t]*抑制剂")  # on folded option text
_TRAILING_GLOSS_RE = re.compile(r"\s*\([^()]*\)\s*$")
_LISTING_LABEL_RE = re.compile(r"(?<![a-z])([a-z])[ \t]*[.、:)]?[ \t]*$")  # "a. " before an option text
_QUESTION_MARK_RE = re.compile(r"[ \t]*\?")
_LABEL_SKIP_RE = re.compile(r"[ \t]*(?:项|选项)?[ \t.、:)]*")
_JSON_ITEM_RE = re.compile(r"[\"'“]([^\"'”]*)[\"'”]|([A-Za-z])")
_NOT_LETTER_RE = re.compile(r"[^A-Z]")
# Reasoning blocks of thinking models: "<think>…</think>".
_REASONING_OPEN_RE = re.compile(r"<(?:think|thinking|reasoning)>", re.IGNORECASE)
_REASONING_CLOSE_RE = re.compile(r"</(?:think|thinking|reasoning)>", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# robust: helpers
# ---------------------------------------------------------------------------------------------


# Characters whose NFKC form is plain ASCII: full-width forms (，：（）Ａ), the ideographic space,
# circled and parenthesised numbers (①), super- and subscripts (², ₂), Roman numerals (Ⅱ), ...
# One of them in a text makes unicodedata.normalize rebuild all of it, and Chinese outputs hold
# them in nearly every sentence. NFKC decomposes character by character before composing, so
# writing such a character as its (already decomposed) ASCII form first changes nothing in the
# result; what is left usually passes normalize's quick check and comes back as it is.
_ASCII_COMPAT = {
    c: form for c in map(chr, (*range(0x00A0, 0x0100), *range(0x2000, 0x2500), 0x3000, *range(0xFF01, 0xFF5F)))
    if (form := unicodedata.normalize("NFKD", c)) != c and form.isascii()
}
_ASCII_COMPAT_RE = re.compile("[" + "".join(map(re.escape, _ASCII_COMPAT)) + "]")


def _nfkc(text: str) -> str:
    if text.isascii() or unicodedata.is_normalized("NFKC", text):
        return text  # (ASCII is its own NFKC form)
    for char in set(_ASCII_COMPAT_RE.findall(text)):
        text = text.replace(char, _ASCII_COMPAT[char])
    return unicodedata.normalize("NFKC", text)


def _fold_char(char: str) -> str:
    """``_fold(text)[i]`` for ``char = text[i]``: casefolding is per character, and one that grows is kept."""
    folded = char.casefold()
    return folded if len(folded) == 1 else char


def _fold(text: str) -> str:
    # casefold, keeping positions aligned with the input (a few characters such as ß grow)
    folded = text.casefold()
    if len(folded) == len(text):
        return folded
    return "".join(c.casefold() if len(c.casefold()) == 1 else c for c in text)


def drop_reasoning(output: str) -> str:
    """The output without its reasoning block (step 0 of the module docstring)."""
    closes = list(_REASONING_CLOSE_RE.finditer(output))
    if closes:
        return output[closes[-1].end():]
    opened = _REASONING_OPEN_RE.search(output)
    return output[: opened.start()] if opened else output


def _markers(text: str) -> list[re.Match[str]]:
    """``list(_MARKER_RE.finditer(text))``, trying the pattern only where a marker can start.

    Left to search, the regex engine tries all of _MARKER_RE's alternatives at every character,
    which was the largest single cost of reading an answer. Matching at the candidate positions
    from left to right, resuming after each match, finds the same matches: a match can only start
    at a character of _MARKER_START_RE, and no match is empty.
    """
    found = []
    pos = 0
    while (start := _MARKER_START_RE.search(text, pos)) is not None:
        m = _MARKER_RE.match(text, start.start())
        if m is None:
            pos = start.start() + 1
        else:
            found.append(m)
            pos = m.end()
    return found


def _is_latin(char: str) -> bool:
    return char.isascii() and char.isalnum()


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


_CONTEXT_CACHE: dict[tuple, _Context] = {}
_CONTEXT_CACHE_SIZE = 4096


def _context(options: Mapping[str, str]) -> _Context:
    """The folded keys and texts of ``options``, shared by every output read against the same options.

    Building them (NFKC, casefolding, variants) costs about as much as reading a short output, and
    an evaluation file repeats questions (several samples, several checkpoints). The context is
    never modified after it is built (but for its memo of :func:`_starts`, derived from it), and it
    depends on nothing but the options' keys and values in order, which is the cache key. Only
    text keys and values are cached: ``1`` and ``True`` are equal dict keys but different texts.
    """
    key = tuple(options.items())
    if not all(type(k) is str and type(v) is str for k, v in key):
        return _build_context(options)
    cached = _CONTEXT_CACHE.get(key)
    if cached is None:
        if len(_CONTEXT_CACHE) >= _CONTEXT_CACHE_SIZE:
            _CONTEXT_CACHE.clear()  # bounded: a file of unique questions does not grow it without end
        cached = _CONTEXT_CACHE[key] = _build_context(options)
    return cached


def _build_context(options: Mapping[str, str]) -> _Context:
    keys = [_nfkc(str(k)).strip().upper() for k in options]
    texts: dict[str, list[str]] = {}
    for key, value in zip(keys, options.values(), strict=True):
        full = _fold(_nfkc(str(value or ""))).strip().rstrip("。.")
        variants = [full] if full else []
        # "慢性阻塞性肺疾病(COPD)" is often answered without its parenthetical.
        core = _TRAILING_GLOSS_RE.sub("", full).strip()
        if core != full and len(core) >= 2:
            variants.append(core)
        # "ACE抑制剂" is written "ACEI" (inhibitor), as in ACEI, MAOI.
        variants += [m.group(1) + "i" for v in variants if (m := _INHIBITOR_RE.fullmatch(v))]
        texts[key] = variants
    longest = max((len(v) for vs in texts.values() for v in vs), default=0)
    firsts = frozenset(v[0] for vs in texts.values() for v in vs if len(v) >= 2)
    return _Context(keys, set(keys), texts, longest, firsts)


def _clause_start(text: str, pos: int) -> int:
    return max(text.rfind(c, 0, pos) for c in ",;。\n!?") + 1


def _is_refusal(text: str) -> bool:
    if _REFUSAL_RE.search(text):
        return True
    for m in _WEAK_REFUSAL_RE.finditer(text):
        before = text[_clause_start(text, m.start()): m.start()]
        if not before.strip(" \t*#>") or _REFUSAL_SUBJECT_RE.search(before) or _REFUSAL_OBJECT_RE.match(text, m.end()):
            return True
    return False


def _is_all(letters: str, ctx: _Context) -> bool:
    return len(ctx.keys) > 1 and set(letters) == ctx.keyset


def _read_item(text: str, pos: int, keys: set[str], leading: bool) -> tuple[str, int] | None:
    """Read one bracketed-or-bare letter run at ``pos``; return (upper-case letters, end)."""
    i = pos
    if i >= len(text):
        return None
    opened = text[i] in _OPEN
    if not opened and text[i].upper() not in keys:
        return None  # the run below would start with this character, and it must be an option letter
    if opened:
        i += 1
        while i < len(text) and text[i] in " \t":
            i += 1
    if i > 0 and text[i - 1].isascii() and text[i - 1].isalnum():
        return None  # the run would start inside a Latin word
    m = _RUN_RE.match(text, i)
    if not m:
        return None
    run, end = m.group(), m.end()
    # Whole run must be option letters: this rejects DNA, HBsAg, B12, "because", ... (the run is
    # ASCII, so upper-casing it whole is upper-casing it letter by letter)
    if not run.isalpha() or not (run.upper() in keys if len(run) == 1 else set(run.upper()) <= keys):
        return None
    if len(run) > 1 and not run.isupper():
        return None
    prose_after = bool(_ENGLISH_WORD_AFTER_RE.match(text, end))
    if run.islower() and prose_after:
        return None
    if leading and (run == "A" or len(run) > 1) and prose_after:
        return None  # "A patient ...", "ACE inhibitors ..."
    if leading and len(run) > 1 and end < len(text) and _is_cjk(text[end]) and not _AFTER_RUN_OK_RE.match(text, end):
        return None  # "ACE抑制剂 ..."
    if _TERM_SUFFIX_RE.match(text, end) or _HYPHEN_TERM_RE.match(text, end):
        return None  # "B超", "C反应蛋白", "C-reactive protein"
    if opened:
        while end < len(text) and text[end] in " \t":
            end += 1
        if end >= len(text) or text[end] not in _CLOSE:
            return None  # "(C错误)" is a comment, not a bracketed answer
        end += 1
    elif end < len(text) and text[end] in ")]】":
        end += 1  # "A) 肺炎链球菌"
    return run.upper(), end


def _read_group(text: str, pos: int, keys: set[str], leading: bool = False) -> _Group | None:
    """Read a letter group (``A``, ``AC``, ``A、C``, ``A C``, ``(A)(C)``, ``A或B``...) at ``pos``."""
    item = _read_item(text, pos, keys, leading)
    if item is None:
        return None
    items, seps = [item], []
    end = item[1]
    while True:
        nxt, sep = None, ("and", "")
        for sep_re, kind in ((_ALT_SEP_RE, "alt"), (_AND_SEP_RE, "and")):
            m = sep_re.match(text, end)
            if m and m.end() > end:
                nxt = _read_item(text, m.end(), keys, leading)
                if nxt is not None:
                    sep = (kind, m.group().strip())
                    break
        if nxt is None and end < len(text) and text[end] in _OPEN:
            nxt = _read_item(text, end, keys, leading)  # "(A)(C)"
        if nxt is None:
            break
        items.append(nxt)
        seps.append(sep)
        end = nxt[1]
    negated = False
    neg = _NEG_AFTER_RE.match(text, end)
    if neg:
        if len(items) > 1 and seps[-1][1] == "," and not neg.group("adv"):
            items.pop()  # "答案：B，C项错误": the negation belongs to C only
            seps.pop()
            end = items[-1][1]
        else:
            negated = True
    letters = items[0][0] if len(items) == 1 else "".join(i[0] for i in items)
    alt = bool(seps) and any(kind == "alt" for kind, _ in seps)
    if len(letters) > 1 and _QUESTION_MARK_RE.match(text, end):
        alt = True  # "A/B?": the model is asking, not answering
    return _Group(letters, pos, end, alt, negated)


def _option_text_at(text: str, pos: int, ctx: _Context) -> tuple[str, int] | None:
    """The option whose text (longest first) starts at ``pos``: ``(key, end)``."""
    if pos >= len(text) or _fold_char(text[pos]) not in ctx.firsts:
        return None  # no text of two or more characters starts with this character
    window = _fold(text[pos: pos + ctx.longest])  # folding the whole text each time is quadratic
    best = None
    for key in ctx.keys:
        for variant in ctx.texts[key]:
            if len(variant) >= 2 and window.startswith(variant) and (best is None or len(variant) > best[1] - pos):
                best = (key, pos + len(variant))
    return best


def _partial_option_at(text: str, pos: int, ctx: _Context) -> tuple[str, int] | None:
    """The one option whose text contains the phrase at ``pos`` (up to its clause end)."""
    m = _PHRASE_END_RE.search(text, pos, pos + ctx.longest + 8)
    end = m.start() if m else min(len(text), pos + ctx.longest + 8)
    phrase = _fold(text[pos:end]).strip(" \t*\"'“”")
    if len(phrase) < 2 or len(phrase) > ctx.longest or (m is None and end < len(text)):
        return None
    keys = [k for k in ctx.keys if any(phrase in v for v in ctx.texts[k])]
    if len(keys) != 1 or not any(phrase in v and 2 * len(phrase) >= len(v) for v in ctx.texts[keys[0]]):
        return None  # not unique, or too small a part of the option's text
    return keys[0], end


def _text_alternative(text: str, hit: tuple[str, int], ctx: _Context) -> str:
    """Options offered as an alternative to the option text ending at ``hit``, or ``""``.

    ``金黄色葡萄球菌（B）或大肠埃希菌``, ``肺炎或C``.
    """
    m = _TEXT_ALT_RE.match(text, hit[1])
    if m is None:
        return ""
    other = _option_text_at(text, m.end(), ctx)
    if other is None:
        group = _read_group(text, m.end(), ctx.keyset)
        letters = group.letters if group is not None and not group.negated else ""
    else:
        letters = other[0]
    return letters.replace(hit[0], "")


def _sentence_start(text: str, pos: int) -> int:
    # rfind within [0, pos) finds b exactly when b occurs in text[:pos], without copying it
    ends = [i + len(b) for b in ("。", "!", "?", "\n", ". ") if (i := text.rfind(b, 0, pos)) >= 0]
    return max(ends, default=0)


def _order(letters: str | set[str] | frozenset[str], ctx: _Context) -> str:
    return "".join(k for k in ctx.keys if k in letters)


# ---------------------------------------------------------------------------------------------
# robust: preparation (invented questions, restated option lists)
# ---------------------------------------------------------------------------------------------


def _is_our_option(line_text: str, ctx: _Context) -> bool:
    folded = _fold(line_text).strip()
    if _VERDICT_WORD_RE.search(folded):
        return True  # a verdict line analyses one of our options
    for variants in ctx.texts.values():
        for v in variants:
            if v and (folded.startswith(v) or (len(folded) >= 2 and v.startswith(folded))):
                return True
    return False


def _option_blocks(lines: list[str], ctx: _Context) -> list[_Block]:
    """The option blocks (consecutive option lines) of ``lines``."""
    blocks = []
    i = 0
    while i < len(lines):
        if not _OPTION_LINE_RE.match(lines[i]):
            i += 1
            continue
        j = i
        texts = []
        while j < len(lines) and (m := _OPTION_LINE_RE.match(lines[j])):
            texts.append(m.group(2))
            j += 1
        inline = len(texts) == 1 and _INLINE_LABEL_RE.search(texts[0])
        if len(texts) >= 2 or inline:
            ours = sum(_is_our_option(t, ctx) for t in texts)
            q = i - 1 if i > 0 and lines[i - 1].strip() else i
            question_like = q < i and bool(_QUESTION_LINE_RE.search(lines[q].strip()))
            foreign = question_like and ours * 2 < len(texts)
            blocks.append(_Block(q, i, j - 1, question_like, foreign))
        i = j
    return blocks


def _answered(lines: list[str], ctx: _Context) -> bool:
    return bool(_statements("\n".join(lines), ctx, set()))


def _cut_invented(text: str, ctx: _Context, after_answer: bool = False) -> str:
    """Drop questions the model invents (see step 0 of the module docstring)."""
    while True:
        lines = text.split("\n")
        content = [i for i, line in enumerate(lines) if line.strip()]
        if not content:
            return text
        first = content[0]
        blocks = _option_blocks(lines, ctx)
        lead = next((b for b in blocks if b.foreign and b.question == first), None)
        if lead is not None:
            # Invented question first: drop it with its answer paragraph, then read the rest.
            j = lead.last + 1
            while j < len(lines) and lines[j].strip():
                j += 1
            text = "\n".join(lines[j:])
            continue
        cut = len(lines)
        for b in blocks:
            # A new question after the answer was given, even one reusing our options.
            answered = after_answer or _answered(lines[: b.question], ctx)
            if b.question > first and (b.foreign or (b.question_like and answered)):
                cut = min(cut, b.question)
        for i in range(first + 1, cut):
            if _STRONG_CUE_RE.match(lines[i]):
                # A restated copy of *this* question before any answer is not invented.
                restated = any(i <= b.question <= i + 3 and not b.foreign for b in blocks)
                if not restated or after_answer or _answered(lines[:i], ctx):
                    cut = i
                    break
        return "\n".join(lines[:cut])


def _blank_listings(text: str, ctx: _Context) -> str:
    """Remove restated option lists (three or more ``X. <X's text>`` entries in a row)."""
    folded = _fold(text)
    spans = []
    for rank, key in enumerate(ctx.keys):
        if not ctx.texts[key]:
            continue
        text_of_key = ctx.texts[key][0]
        start = folded.find(text_of_key)
        while start != -1:
            # An entry is the option's own letter right before its text: "b. 金黄色葡萄球菌".
            label = _LISTING_LABEL_RE.search(folded, max(0, start - 8), start)
            if label and label.group(1) == key.casefold():
                spans.append((label.start(1), start + len(text_of_key), rank))
            start = folded.find(text_of_key, start + 1)
    spans.sort()
    runs, cur = [], []
    for span in spans:
        if cur and span[2] > cur[-1][2] and _LISTING_GAP_RE.fullmatch(folded, cur[-1][1], span[0]):
            cur.append(span)
        else:
            runs.append(cur)
            cur = [span]
    runs.append(cur)
    needed = min(3, len(ctx.keys))
    for run in reversed([r for r in runs if len(r) >= needed]):
        text = text[: run[0][0]] + "\n" + text[run[-1][1]:]
    return text


def _prepare(text: str, ctx: _Context, after_answer: bool = False) -> str:
    return _blank_listings(_cut_invented(_nfkc(text), ctx, after_answer), ctx)


# ---------------------------------------------------------------------------------------------
# robust: the steps
# ---------------------------------------------------------------------------------------------


def _read_value(value: str, ctx: _Context) -> _Group | None:
    value = value.strip()
    group = _read_group(value, 0, ctx.keyset)
    if group is not None and not group.negated:
        return group
    hit = _option_text_at(value, 0, ctx)
    return _Group(hit[0], 0, hit[1], False, False) if hit else None


def _from_json(text: str, ctx: _Context) -> _Analysis | None:
    if "{" not in text:
        return None
    ranked: dict[int, list[_Group]] = {0: [], 1: []}
    for m in _JSON_PAIR_RE.finditer(text):
        raw = m.group("val")
        if raw.startswith("["):
            items = _JSON_ITEM_RE.findall(raw[1:-1])
            raw = ",".join(a or b for a, b in items)
        else:
            raw = raw.strip("\"'“”")
        group = _read_value(raw, ctx)
        if group is not None:
            ranked[0 if m.group("key").lower() in _JSON_ANSWER_KEYS else 1].append(group)
    groups = ranked[0] or ranked[1]
    if not groups:
        return None
    values = {"?" if g.alt or _is_all(g.letters, ctx) else _order(g.letters, ctx) for g in groups}
    if len(values) > 1:
        return _Analysis(method="conflict", ambiguous=True, stated=True)
    (value,) = values
    if value == "?":
        return _Analysis(method="hedge", ambiguous=True, stated=True)
    return _Analysis(letters=value, method="json", stated=True)


def _blank_json(text: str) -> tuple[str, tuple[int, int]]:
    """``text`` with every JSON object holding an answer key blanked out, and the first one's span."""
    spans: list[tuple[int, int]] = []
    for m in _JSON_PAIR_RE.finditer(text):
        if spans and m.start() < spans[-1][1]:
            continue
        start = text.rfind("{", 0, m.start())
        if start < 0:
            continue
        depth, end = 0, len(text)
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
        spans.append((start, end))
    for start, end in spans:
        text = text[:start] + " " * (end - start) + text[end:]
    return text, min(spans, default=(0, 0))


def _label_at_ends(text: str) -> list[int]:
    """``[m.end() for m in _LABEL_AT_RE.finditer(text)]``, without the look-behind at every character.

    _LABEL_AT_RE matches at 0 and right after each delimiter, consuming only characters that are
    no delimiter; so its matches are the one at 0 and one per delimiter, each the same as
    _LABEL_DELIM_RE's match starting with that delimiter (tests/test_extract.py compares them).
    """
    return [_LABEL_FIRST_RE.match(text).end(), *map(re.Match.end, _LABEL_DELIM_RE.finditer(text))]


def _verdicts(text: str, ctx: _Context) -> tuple[set[str], set[str], set[int]]:
    """Option verdicts: ``(judged correct, judged wrong, label positions that carry a verdict)``."""
    labels: dict[int, _Group] = {}
    for pattern in (_LABEL_AT_RE, _LABEL_XIANG_RE, _LABEL_AFTER_VERDICT_RE):
        ends = _label_at_ends(text) if pattern is _LABEL_AT_RE else map(re.Match.end, pattern.finditer(text))
        for end in ends:
            if end not in labels:
                # Most label positions start a clause of prose. Only a bracket or an option letter
                # can start a letter group (_read_item), and only the first character of an option
                # text an option text (_option_text_at): the same checks, made before the calls.
                kind = _starts(text[end: end + 1], ctx)
                if not kind:
                    continue
                group = None
                if kind & _GROUP_START:
                    group = _read_group(text, end, ctx.keyset, leading=True)
                if group is None and pattern is _LABEL_AT_RE and kind & _TEXT_START:
                    # An option named by its text: "呋塞米：会引起低钾 ✔"
                    hit = _option_text_at(text, end, ctx)
                    if hit is not None:
                        negated = bool(_NEG_AFTER_RE.match(text, hit[1]))
                        group = _Group(hit[0], end, hit[1], False, negated)
                if group is not None:
                    labels[end] = group
    starts = sorted(labels)
    pos: set[str] = set()
    neg: set[str] = set()
    judged: set[int] = set()
    for n, start in enumerate(starts):
        group = labels[start]
        if group.negated:
            neg.update(group.letters)
            judged.add(start)
            continue
        q = group.end
        if len(group.letters) == 1:  # skip the option's own text: "A. 肺炎链球菌：错误"
            skip = _LABEL_SKIP_RE.match(text, q).end()
            hit = _option_text_at(text, skip, ctx)
            if hit and hit[0] == group.letters:
                q = hit[1]
        m = _VERDICT_IMM_RE.match(text, q)
        if m is None:
            seg_end = _SEGMENT_END_RE.search(text, q)
            limit = seg_end.start() if seg_end else len(text)
            if n + 1 < len(starts):
                limit = min(limit, starts[n + 1])
            m = _VERDICT_SEG_RE.search(text, q, max(q, limit))
        if m is not None:
            (pos if m.group("pos") else neg).update(group.letters)
            judged.add(start)
    # "B和E不对，其余都对": the options not judged otherwise get the rest's verdict.
    for m in _REST_VERDICT_RE.finditer(text):
        named = {k for k in pos | neg if k in ctx.keyset}
        if named:
            (pos if m.group("pos") else neg).update(ctx.keyset - named)
    # "除C外均正确": the options named are judged the other way.
    for m in _EXCEPT_VERDICT_RE.finditer(text):
        named = set(_NOT_LETTER_RE.sub("", m.group("letters")))
        if named and named < ctx.keyset:
            rest = ctx.keyset - named
            pos.update(rest if m.group("pos") else named)
            neg.update(named if m.group("pos") else rest)
    return pos, neg, judged


def _per_option_lines(text: str, lead: int, ctx: _Context) -> bool:
    """Whether the text opens an option-by-option analysis (``A. 胸部CT——不是首选``, ``B. …``).

    Then its first letter labels a line of analysis and is not an answer.
    """
    labels = {m.group(1) for m in _LABEL_LINE_RE.finditer(text) if m.group(1) in ctx.keyset}
    return len(labels) >= 3 and bool(_LABEL_LINE_RE.match(text, text.rfind("\n", 0, lead) + 1))


def _statements(text: str, ctx: _Context, judged: set[int]) -> list[_Statement]:
    found: dict[int, _Statement] = {}
    markers = sorted([*_markers(text), *_COLON_RE.finditer(text)], key=re.Match.start)
    for marker in markers:
        p = _FILLER_RE.match(text, marker.end()).end()
        if p in found or _NEG_MARKER_RE.search(text, max(0, marker.start() - 4), marker.start()):
            continue  # "故选B": 故 and 选 lead to the same letters; "不能诊断为" is no answer
        if marker.group() == "是" and not _CONTRAST_NEG_RE.search(
                text, _clause_start(text, marker.start() - 1), marker.start()):
            continue
        # _read_item's first check, made before the call: most markers are followed by prose
        group = _read_group(text, p, ctx.keyset) if _starts(text[p: p + 1], ctx) & _GROUP_START else None
        weak = bool(_WEAK_MARKER_RE.fullmatch(marker.group()))
        firm = bool(_FIRM_MARKER_RE.fullmatch(marker.group()))
        if weak and (group is None or group.negated or not _ENDS_SENTENCE_RE.match(text, group.end)):
            continue
        if group is not None:
            if group.negated:
                continue
            letters, end, hedge = group.letters, group.end, group.alt or _is_all(group.letters, ctx)
        else:
            hit = None if _CUE_ONLY_MARKER_RE.fullmatch(marker.group()) else _option_text_at(text, p, ctx)
            if hit is None and _ANSWER_WORD_RE.fullmatch(marker.group()):
                hit = _partial_option_at(text, p, ctx)
            if hit is None or _NEG_AFTER_RE.match(text, hit[1]) or _BRACKET_NEG_RE.match(text, hit[1]):
                continue
            letters, end, hedge = hit[0], hit[1], bool(_text_alternative(text, hit, ctx))
        sentence = _sentence_start(text, marker.start())
        final = bool(_FINAL_CUE_RE.search(text, sentence, p))
        strong = final and bool(_STRONG_FINAL_RE.search(text, sentence, p))
        found[p] = _Statement(_order(letters, ctx), p, end, final, hedge, by_text=group is None, firm=firm,
                              strong=strong)
    lead = _LEADING_RE.match(text).end()
    # (a text that does not start with a bracket or an option letter has no leading group: checked
    # first, it spares the scan of _per_option_lines on most texts)
    if (lead not in found and lead not in judged and _starts(text[lead: lead + 1], ctx) & _GROUP_START
            and not _per_option_lines(text, lead, ctx)):
        group = _read_group(text, lead, ctx.keyset, leading=True)
        if group is not None and not group.negated:
            hedge = group.alt or _is_all(group.letters, ctx)
            found[lead] = _Statement(_order(group.letters, ctx), lead, group.end, False, hedge, leading=True)
    return [found[p] for p in sorted(found)]


def _resolve(text: str, statements: list[_Statement], after_answer: bool = False) -> _Analysis:
    """Pick the answer among statements: corrections and final answers win, equals conflict.

    ``after_answer``: ``text`` follows an answer given earlier (the template's answer slot), so
    a correction cue before the first statement corrects that answer.
    """
    cur = statements[0]
    corrected = after_answer and bool(_CORRECTION_RE.search(text, 0, cur.start))
    cur_final, conflict = cur.final or corrected, False
    for prev, s in zip(statements, statements[1:], strict=False):
        fixes = bool(_CORRECTION_RE.search(text, prev.end, s.start))
        value, cur_value = ("?" if s.hedge else s.letters), ("?" if cur.hedge else cur.letters)
        if value == cur_value:
            cur_final = cur_final or s.final  # a repeated answer; a cue in between corrects nothing
        elif fixes or (s.final and not cur_final and (s.strong or not cur.firm)):
            # A self-correction, or a final answer after tentative ones: the later one wins. A mere
            # "因此/所以" does not overrule an earlier explicit answer ("答案是C。…因此答案是B").
            cur, cur_final, corrected, conflict = s, True, fixes, False
        else:
            conflict = True  # two different answers of the same rank, or tentative after final
            if s.final == cur_final:
                cur = s
    if conflict:
        return _Analysis(method="conflict", ambiguous=True, stated=True, final=cur_final)
    if cur.hedge:
        return _Analysis(method="hedge", ambiguous=True, stated=True, final=cur_final)
    method = "correction" if corrected else "final" if cur_final else "leading" if cur.leading else "marker"
    return _Analysis(letters=cur.letters, method=method, stated=True, final=cur_final)


def _has_alternatives(text: str, ctx: _Context) -> bool:
    """Whether the text offers options as alternatives anywhere ("我觉得是A或者C", "either B or C")."""
    for m in _ALT_CANDIDATE_RE.finditer(text):
        group = _read_group(text, m.start(), ctx.keyset)
        if group is not None and group.alt and not group.negated:
            return True
    return False


def _consistent(letters: str, pos: set[str] | frozenset[str], neg: set[str] | frozenset[str]) -> bool:
    """Whether verdicts agree with a stated answer under either question polarity."""
    chosen = set(letters)
    positive = pos <= chosen and not neg & chosen
    negative = neg <= chosen and not pos & chosen  # "which statement is wrong?" questions
    return positive or negative


def _from_brackets(text: str, ctx: _Context) -> str:
    """The letters of the last bracket ending a sentence, else of the last one ending a clause."""
    clause_final = ""
    for m in reversed(list(_BRACKET_RE.finditer(text))):
        letters = _NOT_LETTER_RE.sub("", m.group(1))
        if not letters or any(c not in ctx.keyset for c in letters):
            continue
        clause_start = max(text.rfind(c, 0, m.start()) for c in ",;。\n") + 1
        if _NEG_CLAUSE_RE.search(text, clause_start, m.start()):
            continue
        if _SENTENCE_END_AFTER_RE.match(text, m.end()):
            return _order(letters, ctx)
        clause_final = clause_final or _order(letters, ctx)
    return clause_final


def _from_option_texts(text: str, ctx: _Context, excluded: set[str]) -> tuple[str, bool]:
    """``(letters, hedge)`` from option texts mentioned whole in ``text``."""
    folded = _fold(text)
    whole = folded.strip().rstrip("。.!")
    candidates = [
        (key, v) for key in ctx.keys for v in ctx.texts[key] if len(v) >= 2 or (v and v == whole)
    ]
    candidates.sort(key=lambda kv: len(kv[1]), reverse=True)
    claimed: list[tuple[int, int]] = []
    counts: dict[str, int] = {}
    alternatives: set[str] = set()  # "XY": option X offered with option Y as an alternative
    for key, norm in candidates:
        start = folded.find(norm)
        while start != -1:
            end = start + len(norm)
            # Latin option texts must match whole words ("ACE" must not match inside "ACEI").
            glued = (_is_latin(norm[0]) and start > 0 and _is_latin(folded[start - 1])) or (
                _is_latin(norm[-1]) and end < len(folded) and _is_latin(folded[end]))
            inside = any(s <= start and end <= e for s, e in claimed)
            if not glued and not inside:
                # Claim the span even when negated, so a shorter option inside it stays unchosen;
                # a gloss right after it ("变异型心绞痛(Prinzmetal心绞痛)") belongs to it too.
                gloss = _GLOSS_RE.match(folded, end)
                claimed.append((start, gloss.end() if gloss else end))
                before = folded[max(0, start - 6):start]
                if not (_NEG_BEFORE_RE.search(before) or _NEG_AFTER_RE.match(folded, end)):
                    counts[key] = counts.get(key, 0) + 1
                    alternatives.update(key + other for other in _text_alternative(folded, (key, end), ctx))
            start = folded.find(norm, start + 1)
    chosen = {k for k in counts if k not in excluded}
    if any(set(pair) <= chosen for pair in alternatives):
        return "", True  # "金黄色葡萄球菌或大肠埃希菌": a hedge
    if _is_all(_order(chosen, ctx), ctx):
        # Every option named: the model restated them; options named again are its answer.
        again = {k for k in chosen if counts[k] >= 2}
        if not again or _is_all(_order(again, ctx), ctx):
            return "", True
        chosen = again
    return _order(chosen, ctx), False


def _analyse(text: str, ctx: _Context, statements_only: bool = False, after_answer: bool = False) -> _Analysis:
    """Run the cascade of the module docstring on one text (see :func:`_resolve` for ``after_answer``)."""
    t = _prepare(text, ctx, after_answer)
    found = _from_json(t, ctx)
    if found is not None:
        if found.letters:
            # An answer stated outside the JSON object must agree with it (or correct it).
            rest, (start, end) = _blank_json(t)
            # Explicit statements only: a letter opening the text after the object labels analysis.
            others = [s for s in _statements(rest, ctx, set()) if not s.leading and (s.firm or s.final)]
            if any(s.letters != found.letters or s.hedge for s in others):
                own = _Statement(found.letters, start, end, final=False, hedge=False, firm=True)
                return _resolve(rest, sorted([own, *others], key=lambda s: s.start), after_answer)
        return found
    pos, neg, judged = _verdicts(t, ctx)
    statements = _statements(t, ctx, judged)
    if statements_only:
        # Around the answer slot (in an explanation), an option named by its text is discussion
        # ("应诊断为…", "内服散剂应为细粉"); only letters, or a text after a self-correction
        # cue, state a (different) answer.
        statements = [s for s in statements if not s.by_text or _CORRECTION_RE.search(t, 0, s.start)]
    if statements:
        found = _resolve(t, statements, after_answer)
        if found.letters and not _consistent(found.letters, pos, neg):
            found.ambiguous = True
        return found
    if statements_only:
        return _Analysis()
    if _is_refusal(t):
        return _Analysis(method="refusal")
    chosen = pos - neg
    if chosen:
        if _is_all(_order(chosen, ctx), ctx):
            return _Analysis(method="hedge", ambiguous=True)
        return _Analysis(letters=_order(chosen, ctx), method="verdicts", ambiguous=bool(pos & neg))
    if _has_alternatives(t, ctx):
        return _Analysis(method="hedge", ambiguous=True)
    letters = _from_brackets(t, ctx)
    if letters:
        return _Analysis(letters=letters, method="bracket")
    letters, hedge = _from_option_texts(t, ctx, neg)
    if hedge:
        return _Analysis(method="hedge", ambiguous=True)
    method = "option_text" if letters else "conflict" if pos & neg else "none"
    return _Analysis(letters=letters, method=method, ambiguous=bool(pos & neg))


# ---------------------------------------------------------------------------------------------
# robust: entry points
# ---------------------------------------------------------------------------------------------


def read_answer(
    output: str,
    options: Mapping[str, str],
    answer_marker: str | None = None,
    explanation_marker: str | None = None,
    *,
    fallback_explanation: bool = False,
) -> AnswerReading:
    """Read the answer (and the explanation to score) from one model output.

    The single entry point shared by evaluation (``--parser robust``), the chat helpers and the
    RL exam reward, so all three read answers identically.

    Args:
        output: The raw model output.
        options: Option letter → option text, in option order.
        answer_marker: The template's answer cue (``None`` when the prompt ends with it).
        explanation_marker: The template's explanation cue, or ``None``.
        fallback_explanation: The template is unknown: the whole output is the answer region
            and the explanation is found with :func:`find_explanation`.

    Returns:
        The reading: letters in option order (``""`` for none or a hedge), the explanation,
        whether the output is ambiguous, the deciding step, and whether the letters came from
        the answer region (see the module docstring).
    """
    ctx = _context(options)
    output = drop_reasoning(output)
    if fallback_explanation:
        start, end, explanation = 0, len(output), find_explanation(output)
    else:
        start, end, raw_explanation = _spans(output, answer_marker, explanation_marker)
        explanation = raw_explanation.strip()
    region = _analyse(output[start:end], ctx)
    if not output[:start].strip() and not output[end:].strip():
        return AnswerReading(region.letters, explanation, region.ambiguous, region.method, True)
    if not region.letters and not region.ambiguous:
        # The answer may sit outside its expected place.
        whole = _analyse(output, ctx)
        return AnswerReading(whole.letters, explanation, whole.ambiguous, whole.method, False)

    letters, ambiguous, method, in_region = region.letters, region.ambiguous, region.method, True
    tail = _analyse(output[end:], ctx, statements_only=True, after_answer=True)
    if tail.stated and tail.final and (tail.letters != letters or tail.ambiguous):
        # A later final answer or self-correction replaces the one in the answer slot.
        letters, ambiguous, method, in_region = tail.letters, tail.ambiguous, tail.method, False
    else:
        head = _analyse(output[:start], ctx, statements_only=True)
        if any(a.stated and (a.letters != letters or a.ambiguous) for a in (head, tail)):
            # Another, different answer before or after the answer slot: a conflict.
            letters, ambiguous, method = "", True, "conflict"
    if letters:
        pos, neg, _ = _verdicts(_prepare(output, ctx), ctx)
        ambiguous = ambiguous or not _consistent(letters, pos, neg)
    return AnswerReading(letters, explanation, ambiguous, method, in_region)


def parse_robust(text: str, options: Mapping[str, str]) -> str:
    """Extract an answer with the documented cascade (see the module docstring).

    Args:
        text: The model output, or its answer region (see :func:`split_output`).
        options: Option letter → option text, in option order.

    Returns:
        The chosen letters in option order, or ``""`` when nothing (or only a hedge) parses.
    """
    ctx = _context(options)
    letters = _analyse(drop_reasoning(text), ctx).letters
    return "".join(k for k in options if _nfkc(str(k)).strip().upper() in letters)


# ---------------------------------------------------------------------------------------------
# answer / explanation split
# ---------------------------------------------------------------------------------------------


def _spans(output: str, answer_marker: str | None, explanation_marker: str | None) -> tuple[int, int, str]:
    """``(answer_start, answer_end, explanation)`` of :func:`split_output`, unstripped."""
    exp_at = output.find(explanation_marker) if explanation_marker else -1
    if exp_at >= 0:
        explanation = output[exp_at + len(explanation_marker):]
        if answer_marker and answer_marker in explanation:
            explanation = explanation[: explanation.index(answer_marker)]
    elif explanation_marker is None and answer_marker and answer_marker in output:
        # The prompt ended with the explanation cue (e.g. "分析："), so the output *starts* with
        # the explanation and the answer marker closes it.
        explanation = output[: output.index(answer_marker)]
    else:
        explanation = output

    ans_at = output.find(answer_marker) if answer_marker else -1
    if ans_at >= 0:
        start = ans_at + len(answer_marker)
        return start, exp_at if exp_at >= start else len(output), explanation
    return 0, exp_at if exp_at >= 0 else len(output), explanation


def split_output(output: str, answer_marker: str | None, explanation_marker: str | None) -> tuple[str, str]:
    """Split a model output into its answer region and its explanation.

    Args:
        output: The raw model output.
        answer_marker: The template's answer cue (e.g. ``"答案："``), or ``None`` when the prompt
            already ended with it, so the output starts with the answer.
        explanation_marker: The template's explanation cue (e.g. ``"解释："``), or ``None``.

    Returns:
        ``(answer_region, explanation)``, both stripped. The explanation is the text after the
        first explanation marker (cut where the answer marker appears after it); with no
        explanation marker in the template it is the output up to the answer marker; else the
        whole output. The answer region is the text after the first answer marker (up to the
        explanation marker if that comes later); without a (present) answer marker it is the
        output up to the explanation marker, or the whole output.
    """
    start, end, explanation = _spans(output, answer_marker, explanation_marker)
    return output[start:end].strip(), explanation.strip()


def find_explanation(output: str) -> str:
    """Return the explanation of an output produced without a known template.

    The first marker of :data:`FALLBACK_EXPLANATION_MARKERS` (in tuple order) that occurs in the
    output is used; when none occurs, the whole output (stripped) is the explanation.
    """
    for marker in FALLBACK_EXPLANATION_MARKERS:
        if marker in output:
            return split_output(output, None, marker)[1]
    return output.strip()
