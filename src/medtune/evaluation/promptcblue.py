"""PromptCBLUE: turn generated text into structured answers, and score them per task.

Re-implemented from the description of the official post-processing and evaluation
(``docs/PROMPTCBLUE.md`` in the project's shared docs), not from its code. Every task is parsed
by its family:

========================  =========================================  ============================
family                    tasks                                      primary metric
========================  =========================================  ============================
entities (NER)            CMeEE-V2, IMCS-V2-NER                      micro-F1 over item sets
relation triples          CMeIE, CMeIE-V2                            micro-F1 over item sets
normalisation             CHIP-CDN                                   micro-F1 over item sets
events                    CHIP-CDEE                                  micro-F1 over item sets
finding + attribute       CHIP-MDCFNPC, IMCS-V2-SR                   micro-F1 over item sets
causal triples            CMedCausal                                 micro-F1 over item sets
single label (macro)      CHIP-CTC, KUAKE-QIC, IMCS-V2-DAC           macro-F1 (sklearn)
single label (weighted)   CHIP-STS, KUAKE-IR, KUAKE-QQR, KUAKE-QTR   weighted F1 (sklearn)
report generation         IMCS-V2-MRG                                ROUGE-L F, per section pair
dialogue response         MedDG                                      ROUGE-L F
decision tree             Text2DT                                    node micro-F1 (see below)
========================  =========================================  ============================

Gold answers are made by passing the reference text through the same ``postprocess`` as the
model output (``score``), or are read from the official structured gold file
(``score_against_structured``), which is how we check that our parsing agrees with the official
one: on the shipped dev set both give exactly 100 on every task when the reference texts are
used as outputs.

Separators are full-width (``：`` ``，`` ``；`` ``。``). Half-width ``: , ;`` in a model's output
are read as the full-width separator only where a separator is parsed (see difference 1), so
ASCII that is content is left alone: free text (MedDG, report section values, labels) is never
rewritten, Text2DT's JSON triples are never touched, and a ``,`` or ``:`` between two ASCII
digits (``1,25-二羟维生素D3``, ``10:30``) is always content.

Differences from the official code
----------------------------------
1. Half-width ``: , ;`` are accepted as separators. The official HEAD code only knows the
   full-width ones (its v1 script converted them globally), so an output with ASCII punctuation
   silently loses most items there. We convert them per family, only the characters that family
   uses as separators, and never between two ASCII digits. Trade-off: a half-width comma
   between two items that end and start with a digit (``维生素B12,1型糖尿病``) is read as content.
2. CHIP-MDCFNPC: an attribute that matches no choice falls back to
   ``无实际意义的不标注或者和病人当前的状态独立不标注`` (the v1 script's fallback, a real
   label), not HEAD's ``不标注``, which is not a label and so always scores as wrong.
3. CHIP-MDCFNPC / IMCS-V2-SR: the attribute is stripped and matched to the choices like a
   classification answer before the fallback is used; a line is split at its *last* colon, so an
   entity that contains a colon is kept (the official code drops the line).
4. CHIP-CDEE: blank lines (e.g. a trailing newline) and lines with no event field never become
   events. The official code turns every line after the first into an event, adding an empty
   ``{"主体词": "", ...}`` event for a trailing blank line.
5. Intro lines are recognised rather than dropped blindly: CDEE and MDCFNPC/SR skip a first line
   only when it is not itself an answer line, IMCS-V2-MRG reads sections from every line, and
   CHIP-CDN reads the last *non-blank* line, so a model that leaves out the intro line or adds a
   trailing newline loses nothing.
6. Classification answers (CTC, QIC, DAC, STS, IR, QQR, QTR) are matched to ``answer_choices``
   (plus ``非上述类型`` for CTC/QIC/DAC): exact match after strip; else the one choice contained in
   the output (a choice contained in another contained choice, like ``相关`` in ``不相关``, does not
   count); else the stripped raw text. The official code compares the raw text, so any extra
   word makes a new, wrong class.
7. Text2DT and CMedCausal never crash: a malformed line is skipped and counted
   (``malformed_lines``) instead of raising and ending the whole run. Text2DT triples are parsed
   with ``json.loads`` / ``ast.literal_eval`` only; the official code calls ``eval()`` on model
   output.
8. CMedCausal conditional lines (``头实体：H；尾三元组：头实体：A；尾实体：B；关系：因果关系``) give
   subject ``H``; the official code gives ``H；尾三元组：``. A nested relation other than
   ``因果关系`` is kept as an (incorrect) item instead of raising an AssertionError.
9. Items are serialised with ``json.dumps(sort_keys=True)`` including nested dicts; the official
   code does not sort nested keys (CMedCausal), so key order could change a match there.
10. IMCS-V2-MRG section values are the text after the *leading* section name (the official code
    takes the text after its last occurrence in the line).
11. ROUGE-L is the exact LCS F1 ``2·LCS / (|hyp| + |ref|)`` over BasicTokenizer-style tokens of the
    whole text. The official code goes through the ``rouge_chinese`` package, whose F adds 1e-8 to
    the denominator (identical texts give 99.9999995 there, 100 here); its sentence handling on
    multi-sentence texts was not re-checked (the package is not a dependency of this project).
12. Text2DT is scored by micro-F1 over nodes ``(role, logical_rel, lower-cased triples)``, not the
    official tree edit-distance ratio (TreeLenvRatio); there are no Text2DT samples to validate
    either against.
13. Both ``CMeIE`` (v1) and ``CMeIE-V2`` are accepted (HEAD rejects ``CMeIE``); the overall score is
    the mean over the tasks present, not over a hard-coded list of 18. Predictions are paired with
    the structured gold by ``sample_id``, not by position, and ids that do not pair up are counted
    and named (HEAD fails on the first mismatch): a gold id without a prediction scores as an
    empty output, a prediction id the gold lacks is not scored.
14. ``answer_choices`` may also be one string (labels joined by ``，``, or a JSON array as text;
    ``medtune.data.promptcblue.parse_answer_choices``); the official code expects a list (or null).
"""

from __future__ import annotations

import ast
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sklearn.metrics import f1_score

from medtune.data.promptcblue import PROMPTCBLUE_TASKS, parse_answer_choices

__all__ = [
    "DIFFERENCES_FROM_OFFICIAL",
    "MDCFNPC_FALLBACK",
    "SR_FALLBACK",
    "TASK_FAMILIES",
    "Parsed",
    "basic_tokenize",
    "match_choice",
    "parse_output",
    "postprocess",
    "rouge_l_f1",
    "score",
    "score_against_structured",
]

#: Task name → parsing/scoring family.
TASK_FAMILIES: dict[str, str] = {
    "CMeEE-V2": "ner",
    "IMCS-V2-NER": "ner",
    "CMeIE": "triples",
    "CMeIE-V2": "triples",
    "CHIP-CDN": "normalization",
    "CHIP-CDEE": "events",
    "CHIP-MDCFNPC": "attributes",
    "IMCS-V2-SR": "attributes",
    "CHIP-CTC": "classification",
    "KUAKE-QIC": "classification",
    "IMCS-V2-DAC": "classification",
    "CHIP-STS": "classification",
    "KUAKE-IR": "classification",
    "KUAKE-QQR": "classification",
    "KUAKE-QTR": "classification",
    "IMCS-V2-MRG": "report",
    "MedDG": "dialogue",
    "Text2DT": "decision_tree",
    "CMedCausal": "causal",
}
if set(TASK_FAMILIES) != set(PROMPTCBLUE_TASKS):  # keep the converter and the scorer in step
    raise AssertionError("TASK_FAMILIES and PROMPTCBLUE_TASKS disagree")

#: The label CTC, QIC and DAC use for "none of the listed classes" (it is not in the choices).
NONE_OF_THE_ABOVE = "非上述类型"
_NONE_OF_THE_ABOVE_TASKS = frozenset({"CHIP-CTC", "KUAKE-QIC", "IMCS-V2-DAC"})
_MACRO_TASKS = _NONE_OF_THE_ABOVE_TASKS
#: The official evaluator's replacement for an empty classification answer (first label of its
#: fixed per-task list).
EMPTY_ANSWER_DEFAULTS: dict[str, str] = {
    "CHIP-CTC": NONE_OF_THE_ABOVE,
    "KUAKE-QIC": NONE_OF_THE_ABOVE,
    "IMCS-V2-DAC": NONE_OF_THE_ABOVE,
    "CHIP-STS": "是的",
    "KUAKE-IR": "相关",
    "KUAKE-QQR": "完全一致",
    "KUAKE-QTR": "完全不匹配或者没有参考价值",
}
#: Fallback attribute when a CHIP-MDCFNPC line's label matches no choice (difference 2).
MDCFNPC_FALLBACK = "无实际意义的不标注或者和病人当前的状态独立不标注"
#: Fallback attribute for IMCS-V2-SR (the official one).
SR_FALLBACK = "无法根据上下文确定病人是否患有该症状"
_STS_SYNONYMS = {"相同": "是的", "不同": "不是"}
MRG_SECTIONS = ("主诉", "现病史", "辅助检查", "既往史", "诊断", "建议")
CDEE_FIELDS = ("主体词", "发生状态", "描述词", "解剖部位")
_CDEE_LIST_FIELDS = ("描述词", "解剖部位")
_TEXT2DT_SKIP = "根据给定的指南文本抽取的诊疗决策树"
_TEXT2DT_DEFAULT = [{"role": "D", "logical_rel": "null", "triples": []}]
_EMPTY_GENERATION = "无 。"  # what the official scorer puts in place of an empty text

#: Short statements of how this module departs from the official code (see the module docstring).
DIFFERENCES_FROM_OFFICIAL: tuple[str, ...] = (
    "half-width ': , ;' accepted as separators where each task parses one (never between two ASCII digits)",
    f"CHIP-MDCFNPC fallback label is '{MDCFNPC_FALLBACK}' (a valid label), not '不标注'",
    "MDCFNPC/SR attribute labels stripped and matched to the choices; lines split at the last colon",
    "blank or field-less lines never become CHIP-CDEE events (official: a trailing blank line adds an empty event)",
    "intro lines recognised, not dropped blindly (CDEE, MDCFNPC/SR, MRG); CHIP-CDN reads the last non-blank line",
    "classification answers matched to answer_choices (exact, else the single contained choice), else raw text",
    "malformed Text2DT/CMedCausal lines skipped and counted instead of crashing; no eval() of model output",
    "CMedCausal conditional subject cut at '；尾三元组：' (official keeps it in the subject)",
    "items serialised with sorted keys, nested dicts included",
    "IMCS-V2-MRG section value is the text after the leading section name",
    "ROUGE-L is exact LCS F1 without rouge_chinese's 1e-8 term (identical texts score 100)",
    "Text2DT scored by node micro-F1, not the official tree edit-distance ratio",
    "CMeIE and CMeIE-V2 both accepted; overall = mean over tasks present; gold paired by sample_id, "
    "unpaired ids counted and named",
    "answer_choices accepted as one string (labels joined by '，', or a JSON array as text)",
)


@dataclass(frozen=True)
class Parsed:
    """A structured answer and how many lines of the text could not be parsed.

    Attributes:
        answer: The structured answer (shape depends on the task family; see ``postprocess``).
        malformed_lines: Non-blank lines skipped because they did not have the expected shape
            (counted for Text2DT and CMedCausal, the families whose official parser crashes on
            them; 0 elsewhere).
    """

    answer: Any
    malformed_lines: int = 0


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def postprocess(task: str, output: str, answer_choices: Sequence[str] | None = None) -> Any:
    """Turn a model's output text into the structured answer for its task.

    Answer shapes (as in the official structured gold):

    * NER: ``[{"entity", "type"}]``; triples: ``[{"predicate", "subject", "object"}]``;
      CHIP-CDN: ``[{"entity", "type": "normalization"}]``; CHIP-CDEE:
      ``[{"主体词": str, "发生状态": str, "描述词": [str], "解剖部位": [str]}]``; MDCFNPC/SR:
      ``[{"entity", "attr"}]``; CMedCausal: ``[{"predicate", "subject", "object"}]`` where a
      conditional relation's object is itself such a dict; Text2DT: ``[{"role", "logical_rel",
      "triples": [[s, r, o]]}]``.
    * Classification: the label string (``""`` for an empty output).
    * IMCS-V2-MRG: ``{section: text}`` for the sections found; MedDG: the stripped text.

    Args:
        task: PromptCBLUE task name (``task_dataset``), e.g. ``"CMeEE-V2"``.
        output: Generated text (``None`` is read as ``""``).
        answer_choices: The sample's ``answer_choices`` (labels, relation types, candidate terms).

    Returns:
        The structured answer.

    Raises:
        ValueError: Unknown task name. Malformed *output* never raises.
    """
    return parse_output(task, output, answer_choices).answer


def parse_output(task: str, output: str, answer_choices: Sequence[str] | None = None) -> Parsed:
    """Like ``postprocess``, but also return the number of malformed lines skipped.

    Args:
        task: PromptCBLUE task name.
        output: Generated text (``None`` is read as ``""``).
        answer_choices: The sample's ``answer_choices``.

    Returns:
        ``Parsed(answer, malformed_lines)``.

    Raises:
        ValueError: Unknown task name.
    """
    family = _family(task)
    text = "" if output is None else str(output)
    choices = _unique(answer_choices)
    if family == "ner":
        return Parsed(_parse_ner(text, choices))
    if family == "triples":
        return Parsed(_parse_triples(text))
    if family == "normalization":
        return Parsed(_parse_cdn(text, choices))
    if family == "events":
        return Parsed(_parse_cdee(text))
    if family == "attributes":
        fallback = MDCFNPC_FALLBACK if task == "CHIP-MDCFNPC" else SR_FALLBACK
        return Parsed(_parse_attributes(text, choices, fallback))
    if family == "classification":
        return Parsed(_parse_label(task, text, choices))
    if family == "report":
        return Parsed(_parse_report(text))
    if family == "dialogue":
        return Parsed(text.strip())
    if family == "decision_tree":
        return _parse_text2dt(text)
    return _parse_causal(text)


def match_choice(text: str, choices: Sequence[str] | None) -> str | None:
    """The choice a free-text answer names, or None.

    Exact match after stripping first; otherwise the single choice that occurs in the text. A
    choice that only occurs as part of another occurring choice is ignored, so ``不相关`` names
    ``不相关`` although it contains ``相关``. Two or more distinct choices → None (ambiguous).

    Args:
        text: The answer text.
        choices: Candidate labels.

    Returns:
        The matching choice, or None.
    """
    choices = _unique(choices)
    answer = text.strip()
    if not choices or not answer:
        return None
    if answer in choices:
        return answer
    found = [c for c in choices if c in answer]
    found = [c for c in found if not any(c != other and c in other for other in found)]
    return found[0] if len(found) == 1 else None


def _family(task: str) -> str:
    family = TASK_FAMILIES.get(task)
    if family is None:
        raise ValueError(f"unknown PromptCBLUE task {task!r}; expected one of {list(TASK_FAMILIES)}")
    return family


def _unique(choices: Iterable[Any] | None) -> list[str]:
    # Choice lists can repeat a label (IMCS-V2-DAC does); a repeat would only duplicate items.
    if not choices:
        return []
    return list(dict.fromkeys(c.strip() for c in choices if isinstance(c, str) and c.strip()))


_FULL_WIDTH = {":": "：", ",": "，", ";": "；"}


def _full_width(text: str, chars: str) -> str:
    """Replace the half-width separators in ``chars`` by full-width ones, except between digits.

    A separator flanked by ASCII digits on both sides is content (``1,25-二羟维生素D3``,
    ``10:30``, ``1:1``), so it is kept; everywhere else an ASCII ``:``/``,``/``;`` in a position
    the family parses is a separator written the wrong width by the model.
    """
    cls = "[" + re.escape(chars) + "]"
    pattern = re.compile(rf"(?<![0-9]){cls}|{cls}(?![0-9])")
    return pattern.sub(lambda m: _FULL_WIDTH[m.group(0)], text)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n")]


def _parse_ner(text: str, labels: list[str]) -> list[dict[str, str]]:
    # Colon after "X实体" and commas between mentions are the separators here.
    text = _full_width(text, ":,")
    items: list[dict[str, str]] = []
    for line in _lines(text):
        if labels:
            heads = [(label, line[len(label) + 2 :]) for label in labels if line.startswith(label + "实体")]
        else:
            # No choice list: read any "X实体：" line rather than nothing.
            m = re.match(r"^(.+?)实体(?=\s*：)", line)
            heads = [(m.group(1).strip(), line[m.end() :])] if m else []
        for label, rest in heads:
            rest = rest.lstrip()
            if not rest.startswith("："):
                continue  # "X实体" not followed by a colon is prose, not an answer line
            for mention in rest[1:].split("，"):
                mention = mention.strip()
                if mention:
                    items.append({"entity": mention, "type": label})
    return items


_RELATION_LINE = re.compile(r"^(?:具有)?(.+?)关系的头尾实体对(?:如下)?\s*：?(.*)$")


def _parse_triples(text: str) -> list[dict[str, str]]:
    text = _full_width(text, ":,")
    items: list[dict[str, str]] = []
    for line in _lines(text):
        m = _RELATION_LINE.match(line)
        if m is None:
            continue
        predicate = m.group(1).strip()
        for piece in m.group(2).split("。"):
            if "，尾实体为" not in piece:
                continue
            subject, obj = piece.split("，尾实体为", 1)
            subject = subject.strip().removeprefix("头实体为").strip()
            items.append({"predicate": predicate, "subject": subject, "object": obj.strip()})
    return items


def _parse_cdn(text: str, choices: list[str]) -> list[dict[str, str]]:
    lines = [line for line in _lines(text) if line]
    last = lines[-1] if lines else ""
    # Candidates from both readings: a standard term that itself contains an ASCII comma survives
    # the raw split, and terms joined by an ASCII comma survive the normalised one.
    pieces = {p.strip() for p in last.split("，")} | {p.strip() for p in _full_width(last, ",").split("，")}
    pieces.discard("")
    if choices:
        kept = [c for c in choices if c in pieces]  # choice order: deterministic, duplicates gone
    else:
        kept = sorted(pieces - {"没有对应的标准化实体"})
    return [{"entity": w, "type": "normalization"} for w in kept]


def _parse_cdee(text: str) -> list[dict[str, Any]]:
    text = _full_width(text, ":,;")
    events: list[dict[str, Any]] = []
    for line in _lines(text):
        if not line:
            continue  # difference 4: a blank line is not an event
        event: dict[str, Any] = {"主体词": "", "发生状态": "", "描述词": [], "解剖部位": []}
        found = False
        for part in line.split("；"):
            part = part.strip()
            for name in CDEE_FIELDS:
                if part.startswith(name + "："):
                    value = part[len(name) + 1 :].strip()
                    if name in _CDEE_LIST_FIELDS:
                        event[name] = [v.strip() for v in value.split("，") if v.strip()]
                    else:
                        event[name] = value
                    found = True
                    break
        if found:  # the intro line and chatter carry no field (difference 5)
            events.append(event)
    return events


def _parse_attributes(text: str, choices: list[str], fallback: str) -> list[dict[str, str]]:
    text = _full_width(text, ":")
    items: list[dict[str, str]] = []
    first = True
    for line in _lines(text):
        if not line:
            continue
        is_first, first = first, False
        if "：" not in line:
            continue
        # The label never contains a colon, so the last colon separates entity and label.
        entity, attr = (part.strip() for part in line.rsplit("：", 1))
        if is_first and attr not in choices:
            continue  # the intro line ("…判别如下：") unless it is itself an answer line
        if not entity:
            continue
        label = match_choice(attr, choices)
        items.append({"entity": entity, "attr": label if label is not None else fallback})
    return items


def _parse_label(task: str, text: str, choices: list[str]) -> str:
    answer = text.strip()
    if task == "CHIP-STS":
        answer = _STS_SYNONYMS.get(answer, answer)
    candidates = choices + [NONE_OF_THE_ABOVE] if task in _NONE_OF_THE_ABOVE_TASKS else choices
    label = match_choice(answer, candidates)
    return label if label is not None else answer


_SECTION_LINE = re.compile(r"^(" + "|".join(MRG_SECTIONS) + r")\s*[：:](.*)$", re.DOTALL)


def _parse_report(text: str) -> dict[str, str]:
    report: dict[str, str] = {}
    for line in _lines(text):
        m = _SECTION_LINE.match(line)
        if m:
            report[m.group(1)] = m.group(2).strip()  # a repeated section: the last line wins
    return report


def _literal_triples(text: str) -> list[list[str]]:
    """Triples from ``[["s","r","o"], ...]`` via JSON, else a Python literal; never ``eval``."""
    text = text.strip()
    value: Any = None
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except Exception:  # literal_eval raises many kinds (SyntaxError, ValueError, RecursionError…)
            return []
    if not isinstance(value, (list, tuple)):
        return []
    return [[str(x) for x in item] for item in value if isinstance(item, (list, tuple)) and len(item) == 3]


def _parse_text2dt(text: str) -> Parsed:
    nodes: list[dict[str, Any]] = []
    malformed = 0
    for line in _lines(text):
        if not line or _TEXT2DT_SKIP in line:
            continue
        head, has_triples, triples_text = line.partition("triples=")
        # Only the part before "triples=" is normalised: the triples are JSON, whose ASCII
        # commas must stay as they are.
        head = _full_width(head, ":;")
        role = re.search(r"role=([^；]*)", head)
        if role is None:
            malformed += 1  # the official code raises IndexError here and ends the run
            continue
        logical = re.search(r"logical_rel=([^；]*)", head)
        nodes.append({
            "role": role.group(1).strip(),
            "logical_rel": logical.group(1).strip() if logical else "null",
            "triples": _literal_triples(triples_text) if has_triples else [],
        })
    return Parsed(nodes or [dict(n) for n in _TEXT2DT_DEFAULT], malformed)


def _parse_causal(text: str) -> Parsed:
    text = _full_width(text, ":;")
    items: list[dict[str, Any]] = []
    relation: str | None = None
    malformed = 0
    for line in _lines(text):
        if not line:
            continue
        if "因果关系三元组如下" in line:
            relation = "因果关系"
            continue
        if "条件关系三元组" in line:
            relation = "条件关系"
            continue
        if "上下位关系" in line:
            relation = "上下位关系"
            continue
        if "给定的文本没有指定关系的三元组" in line:
            break
        item = _causal_item(line, relation)
        if item is None:
            malformed += 1  # the official code raises IndexError/AssertionError on these
            continue
        items.append(item)
    return Parsed(items, malformed)


def _causal_item(line: str, relation: str | None) -> dict[str, Any] | None:
    if relation is None or "头实体：" not in line:
        return None
    body = line.split("头实体：", 1)[1]
    if relation == "条件关系":
        # Cut the subject at the nested triple first (difference 8).
        if "；尾三元组：" not in body:
            return None
        subject, nested = body.split("；尾三元组：", 1)
        if "头实体：" not in nested:
            return None
        nested = nested.split("头实体：", 1)[1]
        if "；尾实体：" not in nested:
            return None
        n_subject, rest = nested.split("；尾实体：", 1)
        if "；关系：" not in rest:
            return None
        n_object, n_relation = rest.split("；关系：", 1)
        obj: Any = {"predicate": n_relation.strip(), "subject": n_subject.strip(), "object": n_object.strip()}
    else:
        if "；尾实体：" not in body:
            return None
        subject, obj = body.split("；尾实体：", 1)
        obj = obj.strip()
    return {"predicate": relation, "subject": subject.strip(), "object": obj}


# ---------------------------------------------------------------------------------------------
# Tokenisation and ROUGE-L
# ---------------------------------------------------------------------------------------------


def _is_cjk(cp: int) -> bool:
    # The CJK ideograph blocks BERT's BasicTokenizer splits into single characters.
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _is_punct(ch: str) -> bool:
    # All non-alphanumeric printable ASCII counts as punctuation, plus Unicode category P*.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def basic_tokenize(text: str) -> list[str]:
    """Tokens as BERT's ``BasicTokenizer(do_lower_case=True)`` makes them.

    Control characters are dropped, whitespace is normalised, every CJK ideograph is its own
    token, the rest is split on whitespace, lower-cased with accents stripped, and every
    punctuation character becomes its own token. Implemented here because transformers has
    moved the class between modules across versions; a test checks it against transformers'.

    Args:
        text: Any text.

    Returns:
        The tokens.
    """
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            cleaned.append(" ")
        elif unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    tokens: list[str] = []
    for word in unicodedata.normalize("NFC", "".join(cleaned)).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for ch in word:
            if _is_punct(ch):
                if current:
                    tokens.append(current)
                    current = ""
                tokens.append(ch)
            else:
                current += ch
        if current:
            tokens.append(current)
    return [t for t in tokens if t.strip()]


def _rouge_tokens(text: str) -> list[str]:
    tokens = basic_tokenize(text)
    return tokens if tokens else _EMPTY_GENERATION.split(" ")


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l_f1(hypothesis: str, reference: str) -> float:
    """Exact ROUGE-L F1 (0–1) on BasicTokenizer tokens; an empty text counts as ``无 。``.

    ``F = 2·P·R / (P + R) = 2·LCS / (|hyp| + |ref|)``, with no smoothing term, so identical
    texts give exactly 1.0.

    Args:
        hypothesis: Generated text.
        reference: Gold text.

    Returns:
        The F1 in [0, 1].
    """
    hyp, ref = _rouge_tokens(hypothesis), _rouge_tokens(reference)
    lcs = _lcs_length(hyp, ref)
    return 2.0 * lcs / (len(hyp) + len(ref)) if lcs else 0.0


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _item_key(item: Any) -> str:
    return json.dumps(item, ensure_ascii=False, sort_keys=True)


def _node_key(node: Any) -> str:
    # Text2DT: triples are lower-cased before comparison, as the official scorer does.
    if isinstance(node, dict) and isinstance(node.get("triples"), list):
        node = dict(node)
        node["triples"] = [[str(x).lower() for x in t] if isinstance(t, (list, tuple)) else t
                           for t in node["triples"]]
    return _item_key(node)


def _micro_f1(golds: list[Any], preds: list[Any], key: Any = _item_key) -> dict[str, float]:
    tp = fp = fn = 0
    for gold, pred in zip(golds, preds, strict=True):
        g = {key(x) for x in (gold or [])}
        p = {key(x) for x in (pred or [])}
        tp += len(g & p)
        fp += len(p - g)
        fn += len(g - p)
    if tp == 0:  # official convention: 0 when nothing matched (even when both sides are empty)
        return {"score": 0.0, "precision": 0.0, "recall": 0.0}
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"score": 100.0 * 2 * precision * recall / (precision + recall),
            "precision": 100.0 * precision, "recall": 100.0 * recall}


def _label_f1(task: str, golds: list[Any], preds: list[Any]) -> float:
    default = EMPTY_ANSWER_DEFAULTS[task]
    gold = [str(g).strip() or default for g in golds]
    pred = [str(p).strip() or default for p in preds]
    labels = sorted(set(gold) | set(pred))
    average = "macro" if task in _MACRO_TASKS else "weighted"
    return 100.0 * float(f1_score(gold, pred, labels=labels, average=average, zero_division=0))


def _score_task(task: str, golds: list[Any], preds: list[Any], malformed: int) -> dict[str, Any]:
    family = TASK_FAMILIES[task]
    result: dict[str, Any]
    if family == "classification":
        metric = "macro_f1" if task in _MACRO_TASKS else "weighted_f1"
        result = {"metric": metric, "score": _label_f1(task, golds, preds)}
    elif family == "dialogue":
        scores = [rouge_l_f1(str(p or ""), str(g or "")) for g, p in zip(golds, preds, strict=True)]
        result = {"metric": "rouge_l", "score": 100.0 * math.fsum(scores) / len(scores)}
    elif family == "report":
        scores = []
        for gold, pred in zip(golds, preds, strict=True):
            gold = gold if isinstance(gold, dict) else {}
            pred = pred if isinstance(pred, dict) else {}
            # One pair per gold section; a section the prediction lacks is read as "".
            scores.extend(rouge_l_f1(str(pred.get(k) or ""), str(v or "")) for k, v in gold.items())
        result = {"metric": "rouge_l", "score": 100.0 * math.fsum(scores) / len(scores) if scores else 0.0,
                  "n_pairs": len(scores)}
    elif family == "decision_tree":
        result = {"metric": "node_micro_f1", **_micro_f1(golds, preds, key=_node_key)}
    else:
        result = {"metric": "micro_f1", **_micro_f1(golds, preds)}
    result["n"] = len(golds)
    if family in ("decision_tree", "causal"):
        result["malformed_lines"] = malformed
    return result


def _summary(by_task: dict[str, tuple[list[Any], list[Any], int]]) -> dict[str, Any]:
    order = {name: i for i, name in enumerate(PROMPTCBLUE_TASKS)}
    tasks = {
        task: _score_task(task, golds, preds, malformed)
        for task, (golds, preds, malformed) in sorted(by_task.items(), key=lambda kv: order[kv[0]])
    }
    if not tasks:
        raise ValueError("no rows to score")
    return {
        "overall": math.fsum(t["score"] for t in tasks.values()) / len(tasks),
        "tasks": tasks,
        "n": sum(t["n"] for t in tasks.values()),
        "differences_from_official": list(DIFFERENCES_FROM_OFFICIAL),
    }


def _row_id(row: dict[str, Any], index: int) -> str:
    value = row.get("id", row.get("sample_id"))
    if value is None or not str(value).strip():
        raise ValueError(f"row {index + 1}: field 'id': missing")
    return str(value)


def _row_task(row: dict[str, Any], index: int, required: bool = True) -> str | None:
    meta = row.get("meta") or {}
    # task_dataset names the dataset; "type" does only where there is no task_dataset (next to
    # one it is the task type, e.g. "cls"), so it is read last and only when it is a dataset name.
    task = meta.get("task_dataset") or row.get("task_dataset")
    if not task:
        task = next((t for t in (meta.get("type"), row.get("type")) if t in TASK_FAMILIES), None)
    if task is None:
        if required:
            raise ValueError(f"row {index + 1}: field 'meta.task_dataset': missing")
        return None
    if task not in TASK_FAMILIES:
        raise ValueError(f"row {index + 1}: field 'meta.task_dataset': unknown task {task!r}")
    return task


def _row_choices(row: dict[str, Any], index: int = 0) -> list[str] | None:
    meta = row.get("meta") or {}
    try:
        return parse_answer_choices(meta.get("answer_choices", row.get("answer_choices")))
    except ValueError as exc:
        raise ValueError(f"row {index + 1}: field 'answer_choices': {exc}") from None


def _row_output(row: dict[str, Any], index: int, target_is_output: bool = False) -> str:
    """The model's text: ``output``; with ``target_is_output``, else ``target`` (official submissions)."""
    key = "output" if "output" in row or not target_is_output else "target"
    if key not in row:
        raise ValueError(f"row {index + 1}: field 'output': missing" + (
            " (an official submission row has the model's text in 'target')" if target_is_output else ""))
    value = row[key]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"row {index + 1}: field '{key}': expected the model's text, got {value!r}")
    return "" if value is None else value  # None: generation failed → no answer


def _row_reference(row: dict[str, Any], index: int) -> str:
    if isinstance(row.get("reference"), str):
        return row["reference"]
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        return str(messages[-1].get("content") or "")
    raise ValueError(f"row {index + 1}: field 'reference': missing (and messages do not end with a reply)")


def score(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Score predictions against the reference texts, each task by its family.

    Accepted row shape (what ``medtune.inference.predict`` writes for conversations)::

        {"id": "dev-39492",                      # or "sample_id"
         "messages": [...] | "prompt": "...",    # ignored
         "reference": "gold target text",        # else the final assistant message of "messages"
         "output": "generated text",             # None counts as an empty output
         "meta": {"task_dataset": "CMeEE-V2",    # or "type"; top-level "task_dataset" also read
                  "answer_choices": [...] | None, ...}}

    The gold structured answer is ``postprocess`` of the reference text; the prediction is
    ``postprocess`` of the output, both with the row's ``answer_choices``.

    Args:
        rows: Prediction rows.

    Returns:
        ``{"overall": mean of the task scores, "tasks": {task: {"metric", "score", "n", ...}},
        "n": rows scored, "differences_from_official": [...]}``. Scores are × 100. List tasks
        also report ``precision``/``recall``; MRG ``n_pairs``; Text2DT/CMedCausal
        ``malformed_lines`` (of the predictions).

    Raises:
        ValueError: No rows, a duplicate id, a missing field or an unknown task (naming the row).
    """
    by_task: dict[str, tuple[list[Any], list[Any], int]] = {}
    seen: set[str] = set()
    for index, row in enumerate(rows):
        row_id = _row_id(row, index)
        if row_id in seen:
            raise ValueError(f"row {index + 1}: field 'id': duplicate id {row_id!r}")
        seen.add(row_id)
        task = _row_task(row, index)
        choices = _row_choices(row, index)
        gold = postprocess(task, _row_reference(row, index), choices)
        pred = parse_output(task, _row_output(row, index), choices)
        golds, preds, malformed = by_task.get(task, ([], [], 0))
        golds.append(gold)
        preds.append(pred.answer)
        by_task[task] = (golds, preds, malformed + pred.malformed_lines)
    return _summary(by_task)


def score_against_structured(rows: Iterable[dict[str, Any]], structured: dict[str, list[dict[str, Any]]]
                             ) -> dict[str, Any]:
    """Score predictions against the official structured gold (``dev_structured.json``).

    Rows may have the shape ``score`` accepts (``reference`` is not needed) or the official
    submission shape: ``sample_id``, the model's text in ``target``, ``task_dataset`` and
    ``answer_choices`` (a list or a string, see ``parse_answer_choices``). A row with an
    ``output`` is scored on it; a row without one on its ``target``.

    Each row is paired with the gold entry of the same ``sample_id``; the gold entry's task
    decides the family. What does not pair up is reported, not guessed at: a gold entry with no
    prediction is scored as an empty output (so a partial file cannot score higher than a full
    one) and named in ``missing_predictions``; a prediction whose id the gold lacks is not scored
    and is named in ``not_in_gold``.

    Args:
        rows: Prediction rows.
        structured: ``{task: [{"sample_id", "answer"}, ...]}`` as in the official gold file.

    Returns:
        As ``score``, plus ``n_missing_predictions``, ``missing_predictions`` (gold ids without a
        prediction, in gold order), ``n_not_in_gold`` and ``not_in_gold`` (prediction ids the gold
        lacks, in row order).

    Raises:
        ValueError: No rows, or no row whose id is in the gold (both counted, with examples);
            a duplicate id; a row whose task disagrees with the gold's family; an unknown task
            in the gold; a malformed row (naming it).
    """
    gold_by_id: dict[str, tuple[str, Any]] = {}
    for task, entries in structured.items():
        _family(task)
        for entry in entries:
            gold_by_id[str(entry["sample_id"])] = (task, entry["answer"])

    predicted: dict[str, Parsed] = {}
    seen: set[str] = set()
    not_in_gold: list[str] = []
    for index, row in enumerate(rows):
        row_id = _row_id(row, index)
        if row_id in seen:
            raise ValueError(f"row {index + 1}: field 'id': duplicate id {row_id!r}")
        seen.add(row_id)
        if row_id not in gold_by_id:
            not_in_gold.append(row_id)
            continue
        gold_task = gold_by_id[row_id][0]
        task = _row_task(row, index, required=False) or gold_task
        if TASK_FAMILIES[task] != TASK_FAMILIES[gold_task]:
            raise ValueError(f"row {index + 1}: task {task!r} but the gold has {row_id!r} under {gold_task!r}")
        predicted[row_id] = parse_output(gold_task, _row_output(row, index, target_is_output=True),
                                         _row_choices(row, index))
    missing = [row_id for row_id in gold_by_id if row_id not in predicted]
    if not seen:
        raise ValueError(f"no prediction rows to score (the structured gold has {len(gold_by_id)} ids)")
    if not predicted:
        raise ValueError(
            f"no prediction row matches the structured gold: {_count_named(not_in_gold, 'prediction id')} "
            f"not in the structured gold, {_count_named(missing, 'gold id')} without a prediction "
            "(are the predictions and the gold of the same split?)")

    by_task: dict[str, tuple[list[Any], list[Any], int]] = {}
    for row_id, (task, gold) in gold_by_id.items():
        pred = predicted.get(row_id) or parse_output(task, "", None)
        golds, preds, malformed = by_task.get(task, ([], [], 0))
        golds.append(gold)
        preds.append(pred.answer)
        by_task[task] = (golds, preds, malformed + pred.malformed_lines)
    result = _summary(by_task)
    result.update(n_missing_predictions=len(missing), missing_predictions=missing,
                  n_not_in_gold=len(not_in_gold), not_in_gold=not_in_gold)
    return result


def _count_named(ids: list[str], what: str, shown: int = 3) -> str:
    """``"2 gold ids ('a', 'b')"``: a count with the first few ids, for messages."""
    if not ids:
        return f"0 {what}s"
    names = ", ".join(repr(i) for i in ids[:shown]) + (", …" if len(ids) > shown else "")
    return f"{len(ids)} {what}{'s' if len(ids) != 1 else ''} ({names})"
