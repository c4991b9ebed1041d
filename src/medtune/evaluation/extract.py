r"""Answer extraction for multiple-choice outputs, plus answer/explanation splitting.

All functions are pure. Answers are letter strings in option order (``"ACD"``); ``""`` means
"no answer" and is scored as wrong (see docs/METRICS.md).

Two parsers are provided:

``parse_strict`` (name: ``strict``)
    Bug-compatible with the CMExam paper's parser, for reproducing its table: if the output
    contains ``解释`` only its first line is used, else the whole output; option X is chosen iff
    the letter X or the first whitespace-separated token of X's text is a substring of that text.

``parse_robust`` (name: ``robust``, our default)
    A cascade; the first step that yields an answer wins:

    0. **Normalise** with Unicode NFKC, so full-width letters and punctuation become ASCII
       (``Ａ``→``A``, ``：``→``:``, ``（``→``(``). Case is *not* folded globally: a lowercase
       letter only counts as a standalone token in an answer position (steps 1-2), so the
       letters of English words never become options.
    1. **Explicit answer markers** (``正确答案``, ``正确选项``, ``答案``, ``答:``, ``选``,
       ``answer is``, ``answer:``, ``option is``, ...): the letter group right after the marker
       (allowing fillers such as ``是``/``为``/``应该选``/``:``/``选项``). Markers are tried
       left to right; the first one followed by a valid, non-negated letter group wins.
       ``选`` is not a marker in ``选项``, ``不选``, ``首选``, ``筛选``, ``候选``.
    2. **Leading letter group** at the start of the text (after whitespace, markdown and an
       optional ``选项``/``option`` prefix), e.g. ``B\n理由：...`` or ``AC。...``.
    3. **Refusals** (``无法回答``, ``不知道``, ``无法确定``, ``I cannot``, ...) → ``""``.
       Checked only after steps 1-2, so an explicit answer beats hedging wording elsewhere,
       but option names mentioned in a refusal are not read as a choice.
    4. **Option text matched whole**, longest option text first; a match whose span lies inside
       an already matched (longer) option's span is ignored, so ``心绞痛`` inside
       ``变异型心绞痛`` does not add a second option. Option texts shorter than two characters
       only count when they are the whole output (a single character such as ``肝`` occurs in
       too many words). All non-negated matching options are returned.
    5. Nothing matched → ``""``.

    Letter-group rules (steps 1-2): forms ``A``, ``AC``, ``A、C``, ``A,C``, ``A/C``, ``A和C``,
    ``A与C``, ``A 及 C``, ``A and C``, ``(A)``, ``(A)(C)``, ``【A】``, followed by anything such
    as ``.``/``:``/text. Every letter must be one of the question's option keys, otherwise the
    whole run is rejected -- this is what keeps ``DNA``, ``HBsAg``, ``B12`` from selecting
    options. An unseparated run of several letters must be upper case; a lowercase letter must
    stand alone and not be followed by an English word (``answer is a combination``). At the
    start of the text a lone ``A`` followed by an English word is the article, and a multi-letter
    run followed by a CJK character or an English word is a term (``ACE抑制剂``,
    ``ACE inhibitors``). A letter directly followed by a term suffix (``B超``, ``C反应蛋白``,
    ``B族``) is not an answer.

    Negations: a letter group followed by ``均不正确``, ``都不对``, ``错误``, ``不选``, ``排除``,
    ``is incorrect``, ... is not counted (``A、B均不正确``); an option text preceded by
    ``排除``/``不是``/``不选``/``并非``/``而非`` or followed by one of those words is not counted.
"""

from __future__ import annotations

import re
import unicodedata

FALLBACK_EXPLANATION_MARKERS = ("解释:", "解释：", "理由：", "分析：")

# ---------------------------------------------------------------------------------------------
# strict (paper-compatible)
# ---------------------------------------------------------------------------------------------


def parse_strict(output: str, options: dict[str, str]) -> str:
    """Extract an answer exactly like the CMExam paper's parser (bugs included).

    Args:
        output: The raw model output.
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


# ---------------------------------------------------------------------------------------------
# robust (default)
# ---------------------------------------------------------------------------------------------

_MARKER_RE = re.compile(
    r"正确答案|正确选项|答案|答(?=\s*:)|(?<![不首筛候])选(?!项)"
    r"|(?:answer|option|choice)\s*(?:is\b|:)",
    re.IGNORECASE,
)
# What may sit between a marker and the letters: "答案应该是：选项 B", "answer is: **B**".
_FILLER_RE = re.compile(r"(?:选项|option\b|[\s:=*是为為应應该該选選择擇就可能也])*", re.IGNORECASE)
_LEADING_RE = re.compile(r"[\s*#>\-]*(?:选项|option\b)?\s*", re.IGNORECASE)
_SEP_RE = re.compile(r"\s*(?:、|,|/|&|\+|和|与|與|以及|及|and\b)\s*", re.IGNORECASE)
_RUN_RE = re.compile(r"[A-Za-z0-9]+")
_OPEN, _CLOSE = "([【", ")]】"
# An English word right after a letter means the letter is prose ("a combination", "A patient").
_ENGLISH_WORD_AFTER_RE = re.compile(r"[ \t]+(?!(?:and|or|is|are)\b)[a-z]")
# A letter glued to one of these is part of a medical term (B超, X线, C反应蛋白, B族维生素, B肝).
_TERM_SUFFIX_RE = re.compile(r"超|线|型|族|反应|细胞|淋巴|因子|受体|抗原|抗体|蛋白|波|肝|类|级")
_NEG_AFTER_RE = re.compile(
    r"\s*(?:选项|项)?\s*(?:均|都|皆|也|亦|是|为|are|is)?\s*"
    r"(?:不正确|不对|错误|错|不选|不是|排除|除外|不符合|incorrect|wrong|not\b)",
    re.IGNORECASE,
)
_NEG_BEFORE_RE = re.compile(r"(?:排除|不选|不是|并非|而非|not)\s*(?:选项)?\s*$", re.IGNORECASE)
_REFUSAL_RE = re.compile(
    r"无法回答|无法作答|不知道|无法确定|不能确定|无法判断"
    r"|I cannot|I can't|I can not|I don't know|unable to (?:answer|determine)",
    re.IGNORECASE,
)


def _is_latin(char: str) -> bool:
    return char.isascii() and char.isalnum()


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def _read_item(text: str, pos: int, keys: set[str], leading: bool) -> tuple[str, int] | None:
    """Read one bracketed-or-bare letter run at ``pos``; return (upper-case letters, end)."""
    i = pos
    if i < len(text) and text[i] in _OPEN:
        i += 1
    if i > 0 and _is_latin(text[i - 1]):
        return None  # the run would start inside a Latin word
    m = _RUN_RE.match(text, i)
    if not m:
        return None
    run, end = m.group(), m.end()
    # Whole run must be option letters: this rejects DNA, HBsAg, B12, "because", ...
    if not run.isalpha() or any(c.upper() not in keys for c in run):
        return None
    if len(run) > 1 and not run.isupper():
        return None
    prose_after = bool(_ENGLISH_WORD_AFTER_RE.match(text, end))
    if run.islower() and prose_after:
        return None
    if leading and (run == "A" or len(run) > 1) and prose_after:
        return None  # "A patient ...", "ACE inhibitors ..."
    if leading and len(run) > 1 and end < len(text) and _is_cjk(text[end]):
        return None  # "ACE抑制剂 ..."
    if _TERM_SUFFIX_RE.match(text, end):
        return None
    if end < len(text) and text[end] in _CLOSE:
        end += 1
    return run.upper(), end


def _read_group(text: str, pos: int, keys: set[str], leading: bool = False) -> tuple[str, int] | None:
    """Read a letter group (``A``, ``AC``, ``A、C``, ``(A)(C)``...) starting at ``pos``."""
    item = _read_item(text, pos, keys, leading)
    if item is None:
        return None
    letters, end = item
    while True:
        sep = _SEP_RE.match(text, end)
        nxt = _read_item(text, sep.end(), keys, leading) if sep else None
        if nxt is None and end < len(text) and text[end] in _OPEN:
            nxt = _read_item(text, end, keys, leading)  # "(A)(C)"
        if nxt is None:
            return letters, end
        letters += nxt[0]
        end = nxt[1]


def _from_markers(text: str, keys: set[str]) -> set[str] | None:
    for marker in _MARKER_RE.finditer(text):
        group = _read_group(text, _FILLER_RE.match(text, marker.end()).end(), keys)
        if group and not _NEG_AFTER_RE.match(text, group[1]):
            return set(group[0])
    return None


def _from_leading(text: str, keys: set[str]) -> set[str] | None:
    group = _read_group(text, _LEADING_RE.match(text).end(), keys, leading=True)
    if group and not _NEG_AFTER_RE.match(text, group[1]):
        return set(group[0])
    return None


def _from_option_texts(text: str, options: dict[str, str]) -> set[str]:
    folded = text.casefold()
    whole = folded.strip().rstrip("。.!！")
    candidates = []
    for key, option_text in options.items():
        norm = unicodedata.normalize("NFKC", option_text).casefold().strip().rstrip("。.")
        if len(norm) >= 2 or (norm and norm == whole):
            candidates.append((key, norm))
    candidates.sort(key=lambda kv: len(kv[1]), reverse=True)

    claimed: list[tuple[int, int]] = []
    chosen = set()
    for key, norm in candidates:
        start = folded.find(norm)
        while start != -1:
            end = start + len(norm)
            # Latin option texts must match whole words ("ACE" must not match inside "ACEI").
            glued = _is_latin(norm[0]) and start > 0 and _is_latin(folded[start - 1]) or (
                _is_latin(norm[-1]) and end < len(folded) and _is_latin(folded[end]))
            inside = any(s <= start and end <= e for s, e in claimed)
            if not glued and not inside:
                # Claim the span even when negated, so a shorter option inside it stays unchosen.
                claimed.append((start, end))
                before = folded[max(0, start - 6):start]
                if not (_NEG_BEFORE_RE.search(before) or _NEG_AFTER_RE.match(folded, end)):
                    chosen.add(key.strip().upper())
            start = folded.find(norm, start + 1)
    return chosen


def parse_robust(text: str, options: dict[str, str]) -> str:
    """Extract an answer with the documented cascade (see the module docstring).

    Args:
        text: The model output, or its answer region (see :func:`split_output`).
        options: Option letter → option text, in option order.

    Returns:
        The chosen letters in option order, or ``""`` when nothing parses.
    """
    keys = {unicodedata.normalize("NFKC", k).strip().upper() for k in options}
    norm = unicodedata.normalize("NFKC", text)
    letters = _from_markers(norm, keys)
    if letters is None:
        letters = _from_leading(norm, keys)
    if letters is None:
        if _REFUSAL_RE.search(norm):
            return ""
        letters = _from_option_texts(norm, options)
    return "".join(k for k in options if unicodedata.normalize("NFKC", k).strip().upper() in letters)


# ---------------------------------------------------------------------------------------------
# answer / explanation split
# ---------------------------------------------------------------------------------------------


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
        answer = output[start: exp_at if exp_at >= start else len(output)]
    else:
        answer = output[:exp_at] if exp_at >= 0 else output
    return answer.strip(), explanation.strip()


def find_explanation(output: str) -> str:
    """Return the explanation of an output produced without a known template.

    The first marker of :data:`FALLBACK_EXPLANATION_MARKERS` (in tuple order) that occurs in the
    output is used; when none occurs, the whole output (stripped) is the explanation.
    """
    for marker in FALLBACK_EXPLANATION_MARKERS:
        if marker in output:
            return split_output(output, None, marker)[1]
    return output.strip()
