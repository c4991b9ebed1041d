"""Answer extraction: one table of realistic outputs, scored by both parsers."""

import random

import pytest

from medtune.evaluation.extract import (
    FALLBACK_EXPLANATION_MARKERS,
    AnswerReading,
    find_explanation,
    parse_robust,
    parse_strict,
    read_answer,
    split_output,
)

BACTERIA = {"A": "肺炎链球菌", "B": "金黄色葡萄球菌", "C": "大肠埃希菌", "D": "铜绿假单胞菌", "E": "肺炎克雷伯菌"}
ANGINA = {"A": "稳定型心绞痛", "B": "变异型心绞痛", "C": "急性心肌梗死", "D": "心绞痛", "E": "主动脉夹层"}
DRUGS = {"A": "Aspirin", "B": "Beta blocker", "C": "Calcium channel blocker", "D": "Digoxin", "E": "Enalapril"}

# (output, options, strict_expected, robust_expected)
CASES = [
    # --- plain and templated answers ---
    ("答案：B", BACTERIA, "B", "B"),
    ("B\n理由：金黄色葡萄球菌可产生血浆凝固酶", BACTERIA, "B", "B"),
    ("A", BACTERIA, "A", "A"),
    ("**答案**：E", BACTERIA, "E", "E"),
    ("答：E", BACTERIA, "E", "E"),
    ("答案:【E】", BACTERIA, "E", "E"),
    ("答案：A：肺炎链球菌", BACTERIA, "A", "A"),
    ("故本题选D。", BACTERIA, "D", "D"),
    ("B\n解释：A项为革兰阳性球菌，不产生凝固酶", BACTERIA, "B", "B"),  # strict keeps only line 1
    ("解释：A项错误，B项错误。\n答案：C", BACTERIA, "AB", "C"),  # strict reads line 1 = explanation
    # --- multi-answer forms ---
    ("AC。两者均为常见病原体", BACTERIA, "AC", "AC"),
    ("答案：A、C", BACTERIA, "AC", "AC"),
    ("答案：A,C", BACTERIA, "AC", "AC"),
    ("答案：A和C", BACTERIA, "AC", "AC"),
    ("答案：A与C", BACTERIA, "AC", "AC"),
    ("答案：A 及 C", BACTERIA, "AC", "AC"),
    ("答案是：(A)(D)", BACTERIA, "AD", "AD"),
    ("正确选项为BD", BACTERIA, "BD", "BD"),
    ("本题应选A和D", BACTERIA, "AD", "AD"),
    # every option listed is a hedge, not an answer (robust); strict still reads all five
    ("答案：ABCDE", BACTERIA, "ABCDE", ""),
    # --- full-width and lowercase letters (missed by strict) ---
    ("答案：Ｂ", BACTERIA, "", "B"),
    ("答案：ｂ", BACTERIA, "", "B"),
    ("Ａ、Ｃ", BACTERIA, "", "AC"),
    ("根据题意，正确答案为 c。", BACTERIA, "", "C"),
    ("answer: c", DRUGS, "", "C"),
    # --- English: the "A" of "Answer" is a substring for strict ---
    ("Answer: B", DRUGS, "AB", "B"),
    ("Answer: D. Digoxin increases myocardial contractility.", DRUGS, "AD", "D"),
    ("The correct answer is B. Beta blockers reduce myocardial oxygen demand.", DRUGS, "B", "B"),
    ("The answer is (C).", DRUGS, "C", "C"),
    ("Answer: A and C", DRUGS, "AC", "AC"),
    ("Option B is correct", DRUGS, "B", "B"),
    ("I think it's Digoxin.", DRUGS, "D", "D"),
    ("The answer is a combination of drugs.", DRUGS, "", ""),
    ("A patient with chest pain needs an ECG first.", DRUGS, "ACE", ""),  # article A, ECG
    # --- letters inside Latin words and medical terms ---
    ("答案：C。大肠埃希菌为革兰阴性杆菌，其质粒DNA可携带耐药基因", BACTERIA, "ACD", "C"),
    ("HBsAg阳性提示乙型肝炎病毒感染", BACTERIA, "AB", ""),
    ("ACE抑制剂可引起干咳", BACTERIA, "ACE", ""),
    ("首选B超检查", BACTERIA, "B", ""),
    # --- negations ---
    ("C正确，A、B、D、E均不正确", BACTERIA, "ABCDE", "C"),
    ("A、B、D、E均不正确，故选C", BACTERIA, "ABCDE", "C"),
    ("A、B均不正确", BACTERIA, "AB", ""),
    ("答案：A错误，应选C", BACTERIA, "AC", "C"),
    ("不选A，应选B", BACTERIA, "AB", "B"),
    # --- option text, longest first ---
    ("变异型心绞痛", ANGINA, "BD", "B"),
    ("最可能的诊断是变异型心绞痛（夜间静息时发作，ST段抬高）", ANGINA, "BD", "B"),
    ("排除稳定型心绞痛，考虑变异型心绞痛", ANGINA, "ABD", "B"),
    ("心绞痛", ANGINA, "D", "D"),
    ("答案：B 变异型心绞痛", ANGINA, "BD", "B"),
    # --- refusals and unparseable ---
    ("我无法回答这个问题，建议咨询医生。", BACTERIA, "", ""),
    ("我不知道答案，可能是A或B", BACTERIA, "AB", ""),
    ("I cannot provide medical advice.", DRUGS, "", ""),
    ("这道题考查的是细菌学知识。", BACTERIA, "", ""),
    ("答案：AF", BACTERIA, "A", ""),  # F is not an option key
    ("", BACTERIA, "", ""),
    # --- hedges are not answers (robust); strict reads every letter ---
    ("A B C D E\n理由：都有可能", BACTERIA, "ABCDE", ""),
    ("A或B", BACTERIA, "AB", ""),
    ("答案：B/C?", BACTERIA, "BC", ""),
    # --- space-separated multi-answer, JSON, self-correction ---
    ("A C", BACTERIA, "AC", "AC"),
    ('{"answer": "B"}', BACTERIA, "B", "B"),
    ("答案：A\n更正：答案为C", BACTERIA, "AC", "C"),
    ("ABD（C错误）", BACTERIA, "ABCD", "ABD"),
]


@pytest.mark.parametrize(("output", "options", "strict_expected", "robust_expected"), CASES)
def test_parsers(output, options, strict_expected, robust_expected):
    assert parse_strict(output, options) == strict_expected
    assert parse_robust(output, options) == robust_expected


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_letters_returned_in_option_order():
    assert parse_robust("答案：D、A", BACTERIA) == "AD"
    assert parse_strict("D or A", BACTERIA) == "AD"


@pytest.mark.parametrize(
    ("output", "answer_marker", "explanation_marker", "expected"),
    [
        ("答案：B\n解释：凝固酶阳性。", "答案：", "解释：", ("B", "凝固酶阳性。")),
        # prompt ended with the answer cue: the output starts with the answer
        ("B\n解释：凝固酶阳性。", None, "解释：", ("B", "凝固酶阳性。")),
        # explanation first, answer last: explanation is cut at the answer marker
        ("解释：凝固酶阳性。\n答案：B", "答案：", "解释：", ("B", "凝固酶阳性。")),
        # explanation marker absent: explanation is the whole output
        ("答案：B", "答案：", "解释：", ("B", "答案：B")),
        # answer marker given but absent: answer region runs up to the explanation marker
        ("B\n解释：x", "答案：", "解释：", ("B", "x")),
        # first occurrence of the explanation marker wins
        ("答案：B 解释：一 解释：二", "答案：", "解释：", ("B", "一 解释：二")),
        (" B 因为凝固酶阳性 ", None, None, ("B 因为凝固酶阳性", "B 因为凝固酶阳性")),
        ("答案：B\n解释：", "答案：", "解释：", ("B", "")),
        # analysis_first: the prompt ended with "分析：", the output starts with the explanation
        ("凝固酶阳性。\n正确选项：B.金黄色葡萄球菌", "正确选项：", None, ("B.金黄色葡萄球菌", "凝固酶阳性。")),
    ],
)
def test_split_output(output, answer_marker, explanation_marker, expected):
    assert split_output(output, answer_marker, explanation_marker) == expected


def test_find_explanation():
    assert FALLBACK_EXPLANATION_MARKERS == ("解释:", "解释：", "理由：", "分析：")
    assert find_explanation("答案：A\n理由：常见病原体") == "常见病原体"
    assert find_explanation("A\n分析：常见病原体") == "常见病原体"
    assert find_explanation("A 解释: common") == "common"
    # markers are tried in tuple order, not by position in the text
    assert find_explanation("理由：甲\n解释：乙") == "乙"
    assert find_explanation("  没有标记的输出 ") == "没有标记的输出"


def test_split_then_parse():
    answer, explanation = split_output("答案：C\n解释：DNA病毒", "答案：", "解释：")
    assert parse_robust(answer, BACTERIA) == "C"
    assert explanation == "DNA病毒"


# ---- read_answer: the single entry point (evaluation, chat and the RL reward) -----------------


def test_read_answer_reads_the_region_first():
    reading = read_answer("B\n理由：凝固酶阳性", BACTERIA, None, "理由：")
    assert reading == AnswerReading("B", "凝固酶阳性", ambiguous=False, method="leading", in_region=True)
    # nothing in the region → the whole output, and the letters are not from the region
    reading = read_answer("嗯\n理由：答案是C", BACTERIA, None, "理由：")
    assert (reading.letters, reading.in_region, reading.explanation) == ("C", False, "答案是C")


def test_read_answer_later_correction_wins_and_a_bare_conflict_is_ambiguous():
    corrected = read_answer("B\n理由：……重新考虑，答案应为C", BACTERIA, None, "理由：")
    assert (corrected.letters, corrected.ambiguous, corrected.method, corrected.in_region) == (
        "C", False, "correction", False)
    final = read_answer("答案：A\n理由：……综上，选C", BACTERIA, "答案：", "理由：")
    assert (final.letters, final.ambiguous, final.method) == ("C", False, "final")
    conflict = read_answer("B\n理由：本题答案为C", BACTERIA, None, "理由：")
    assert (conflict.letters, conflict.ambiguous, conflict.method) == ("", True, "conflict")
    # the same letter again is no conflict
    assert read_answer("B\n理由：故选B", BACTERIA, None, "理由：").letters == "B"


def test_read_answer_hedges_and_verdict_contradictions():
    assert read_answer("A B C D E", BACTERIA) == AnswerReading("", "A B C D E", True, "hedge", True)
    assert read_answer("A/B?", BACTERIA).method == "hedge"
    # the stated answer is kept, but verdicts that fit neither polarity flag it
    reading = read_answer("答案：B\nA正确，B正确，C错误", BACTERIA)
    assert (reading.letters, reading.ambiguous) == ("B", True)
    # "which one is wrong?" questions: the answer is the option judged wrong -- no flag
    reading = read_answer("答案：B\nA正确，B错误，C正确", BACTERIA)
    assert (reading.letters, reading.ambiguous) == ("B", False)


def test_read_answer_without_a_template_uses_the_fallback_explanation():
    reading = read_answer("答案：C\n分析：大肠埃希菌", BACTERIA, fallback_explanation=True)
    assert (reading.letters, reading.explanation) == ("C", "大肠埃希菌")
    # with no markers at all the explanation is the whole output (split_output's rule)
    assert read_answer("答案：C\n分析：大肠埃希菌", BACTERIA).explanation == "答案：C\n分析：大肠埃希菌"


def test_parse_robust_is_read_answer_letters():
    for output in ("答案：D、A", "A或B", '{"answer": ["A", "C"]}', "变异型心绞痛"):
        for options in (BACTERIA, ANGINA):
            assert parse_robust(output, options) == read_answer(output, options).letters


# ---- general rules added after the blind held-out review (tests/test_answer_heldout.py) -------

HTN_DRUGS = {"A": "噻嗪类利尿剂", "B": "ACE抑制剂", "C": "钙通道阻滞剂", "D": "β受体阻滞剂"}


@pytest.mark.parametrize(
    ("output", "options", "letters", "ambiguous"),
    [
        # reasoning blocks are not the answer; a truncated one leaves no answer
        ("<think>可能是A？再想想</think>\n答案：C", BACTERIA, "C", False),
        ("<think>\n先看A，肺炎链球菌不产生凝固酶……再看B，金黄色", BACTERIA, "", False),
        # a bracketed answer marker; English plural "options are"; a hyphenated term is no letter
        ("【正确答案】B", BACTERIA, "B", False),
        ("The correct options are A and C.", BACTERIA, "AC", False),
        ("Answer: A, B-cell counts are normal.", BACTERIA, "A", False),
        # an apology admitting a mistake corrects the earlier answer
        ("答案：A\n不好意思，前面的答案错了，应选C。", BACTERIA, "C", False),
        # a plain "所以" does not overrule an explicit answer stated before (nor does JSON yield)
        ("答案：B\n\n解析：……所以答案是C。", BACTERIA, "", True),
        ("答案：B\n\n解析：……最终答案是C。", BACTERIA, "C", False),
        ('{"answer": "B"}\n答案：C', BACTERIA, "", True),
        # verdicts separated by spaces; complements of explicit verdicts
        ("A错 B错 C错 D对 E错", BACTERIA, "D", False),
        ("A、C不对，其余都对。", BACTERIA, "BDE", False),
        ("除A外均正确", BACTERIA, "BCDE", False),
        # "难以判断" in medical prose is no refusal; said of the question it is
        ("凝固酶结果难以判断时，应考虑金黄色葡萄球菌（B）。", BACTERIA, "B", False),
        ("本题难以判断。", BACTERIA, "", False),
        # a bracket ending a clause beats option texts named elsewhere
        ("能产生凝固酶的是金黄色葡萄球菌（B），大肠埃希菌则不能。", BACTERIA, "B", False),
        # a unique partial option text after an answer marker; the XI abbreviation of X抑制剂
        ("答案是金黄色葡萄", BACTERIA, "B", False),
        ("答案是球菌", BACTERIA, "", False),  # in two options: no answer
        ("ACEI能减少蛋白尿。", HTN_DRUGS, "B", False),
        # "不是X，是Y"
        ("不是C，是B。", BACTERIA, "B", False),
        # alternatives anywhere are a hedge; a refusal is not
        ("我猜是B或者D吧。", BACTERIA, "", True),
        ("It might be A or C.", BACTERIA, "", True),
        ("I'm not sure. Maybe A or C.", BACTERIA, "", False),
        ("可能是金黄色葡萄球菌或大肠埃希菌", BACTERIA, "", True),
    ],
)
def test_read_answer_general_rules(output, options, letters, ambiguous):
    reading = read_answer(output, options)
    assert (reading.letters, reading.ambiguous) == (letters, ambiguous), reading.method
    assert parse_robust(output, options) == letters


def test_read_answer_drops_the_reasoning_block_before_splitting():
    output = "<think>答案：A？不对。</think>\nB\n理由：凝固酶阳性"
    reading = read_answer(output, BACTERIA, None, "理由：")
    assert (reading.letters, reading.explanation, reading.in_region) == ("B", "凝固酶阳性", True)


# ---------------------------------------------------------------------------------------------
# shortcuts of the robust reader (evaluate reads 68,000 outputs): the same results as the plain calls


def _texts():
    from test_answer_table import ROWS

    rng = random.Random(0)
    pieces = ["答案", "正确答案是", "选", "选项", "不选", "故", "因此", "综上", "的是", "应为", "可能是", "诊断为",
              "更正", "改为", ",是", ";是", "answer is", "Answer:", "options are", "Choose", "select", "ſelect",
              "therefore", "Thus", "hence", "final answer", "A", "B", "C、D", "(E)", ":", "：", "，", "（", "）",
              "①", "Ⅱ", "²", "Ｂ", "\u3000", "℃", "e\u0301", "Ａ\u0301", " ", "\n", "心绞痛", "肺炎", "x"]
    texts = [row.output for row in ROWS] + [c[0] for c in CASES]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    return texts


def test_marker_search_finds_what_finditer_finds():
    from medtune.evaluation.extract import _MARKER_RE, _markers, _nfkc

    for text in _texts():
        for t in (text, _nfkc(text)):
            assert [m.span() for m in _markers(t)] == [m.span() for m in _MARKER_RE.finditer(t)], t


def test_nfkc_shortcut_equals_unicodedata():
    import unicodedata

    from medtune.evaluation.extract import _ASCII_COMPAT, _nfkc

    for text in [*_texts(), "".join(_ASCII_COMPAT), "".join(c + "\u0301" for c in _ASCII_COMPAT)]:
        assert _nfkc(text) == unicodedata.normalize("NFKC", text)


def test_fold_char_is_fold_per_character():
    from medtune.evaluation.extract import _fold, _fold_char

    for text in [*_texts(), "Straße ǅ İ ΣΑΣ ﬁ"]:
        assert "".join(map(_fold_char, text)) == _fold(text)


# The second round of shortcuts (evaluate of 68,000 outputs): the label scan without a look-behind,
# the marker-start class, the per-options context cache and the memo of what may start at a
# character. Each is compared with the plain form it replaces; then the whole reader is run with
# every shortcut switched off and must give the same readings.


def _label_texts():
    rng = random.Random(1)
    pieces = ["\n", ";", "。", ",", ":", "!", "?", "、", "(", ")", " ", "\t", "*", "#", ">", "-", "•", "·", "选项",
              "option", "Option ", "OPTION\t", "A", "B.", "C项", "D错", "(E对)", "正确", "错误", "心绞痛", "肺炎链球菌",
              "，", "：", "（", "\r\n", "x"]
    texts = [*_texts(), "", "\n", ",", "选项", "option"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(3000)]
    return texts


def test_label_ends_equal_the_look_behind_pattern():
    from medtune.evaluation.extract import _LABEL_AT_RE, _label_at_ends, _nfkc

    for text in _label_texts():
        for t in (text, _nfkc(text)):
            assert _label_at_ends(t) == [m.end() for m in _LABEL_AT_RE.finditer(t)], t


def test_marker_start_class_equals_the_alternation_on_every_character():
    import re
    import sys

    from medtune.evaluation.extract import _MARKER_START_RE

    alternation = re.compile(r"[最正参标答选应可诊考而的故因所综总更改修纠是]|(?i:[afocspth])")
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        assert bool(_MARKER_START_RE.fullmatch(char)) == bool(alternation.fullmatch(char)), hex(code)


def _option_sets():
    from test_answer_table import ROWS

    sets = [BACTERIA, ANGINA, DRUGS, *(row.options for row in ROWS)]
    sets += [{"A": "Ａ型（全角）", "B": "ß-受体阻滞剂", "C": "ACE抑制剂", "D": "慢性阻塞性肺疾病(COPD)"},
             {"a": "小写键", "B": "", "C": " 空格 "}]
    unique = {tuple(o.items()): o for o in sets}
    return list(unique.values())


def test_context_cache_gives_the_context_built_afresh():
    from dataclasses import replace

    from medtune.evaluation.extract import _CONTEXT_CACHE, _build_context, _context

    _CONTEXT_CACHE.clear()
    for options in _option_sets() * 2:  # the second round reads the cache
        cached = _context(options)
        assert replace(cached, starts={}) == _build_context(options)
    # 1 == True as dict keys, but str(1) != str(True): values that are not text are not cached
    assert _context({"A": 1, "B": "x"}).texts["A"] == ["1"]
    assert _context({"A": True, "B": "x"}).texts["A"] == ["true"]


def test_starts_memo_is_the_first_checks_of_the_calls_it_skips():
    from medtune.evaluation.extract import (
        _GROUP_START,
        _OPEN,
        _TEXT_START,
        _build_context,
        _fold_char,
        _starts,
    )

    chars = {c for t in _label_texts() for c in t} | set("AaBbEeJjß（Ａ") | {""}
    for options in _option_sets():
        ctx = _build_context(options)
        for char in sorted(chars):
            group = bool(char) and (char in _OPEN or char.upper() in ctx.keyset)
            text = bool(char) and _fold_char(char) in ctx.firsts
            assert _starts(char, ctx) == (_GROUP_START if group else 0) | (_TEXT_START if text else 0)


def test_reader_with_every_shortcut_off_reads_the_same(monkeypatch):
    import re

    from medtune.evaluation import extract

    outputs = [c[0] for c in CASES] + _label_texts()[::15]
    outputs += ["答案：" + letter + "\n分析：" + expl for letter in ("A", "Ｃ", "B、D", "") for expl in
                ("法洛四联症（D错）。", "A项正确，B错误；故选C。", "因此答案是E", "")]
    templates = [(None, "理由："), ("答案：", "解释："), (None, None)]
    fast = [read_answer(o, opts, a, e) for opts in _option_sets()[:4] for o in outputs for a, e in templates]
    monkeypatch.setattr(extract, "_label_at_ends", lambda text: [m.end() for m in extract._LABEL_AT_RE.finditer(text)])
    monkeypatch.setattr(extract, "_starts", lambda char, ctx: extract._GROUP_START | extract._TEXT_START)
    monkeypatch.setattr(extract, "_context", extract._build_context)
    monkeypatch.setattr(extract, "_MARKER_START_RE", re.compile(r"[\s\S]"))  # try the marker pattern everywhere
    plain = [read_answer(o, opts, a, e) for opts in _option_sets()[:4] for o in outputs for a, e in templates]
    assert fast == plain
