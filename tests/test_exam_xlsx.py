"""Tests for medtune.data.exam_xlsx: reading-exam workbooks → question-generation pairs.

No public copy of these spreadsheets exists, so the fixture below is written by hand in their
shape: one sheet per language, columns 阅读文本 / 选项 / 答案, with the quirks found in real
copies (score marks, full-width numbering, OCR look-alike letters, short-answer questions mixed
in, options out of order, answers with explanations) and rows that must be rejected.
"""

from __future__ import annotations

import json
from pathlib import Path

import openpyxl
import pytest

from medtune.data.exam_xlsx import (
    ExamXlsxResult,
    Question,
    QuestionParseError,
    convert_exam_xlsx,
    format_output,
    load_instruction,
    parse_answers,
    parse_generated,
    parse_questions,
    read_exam_xlsx,
    select_sheet,
    summary_lines,
)
from medtune.evaluation.text_tasks import evaluate_question_generation
from medtune.io import DataFileError, read_jsonl
from medtune.records import Conversation

HEADER = ["阅读文本", "选项", "答案"]

# ---------------------------------------------------------------------------------------------
# 语文 sheet
# ---------------------------------------------------------------------------------------------

ZH_PASSAGE_1 = (
    "　　青蒿素的发现，常被看作传统医药与现代科学相遇的范例。二十世纪六七十年代，疟原虫对氯喹等药物"
    "普遍产生抗药性，寻找新的抗疟药物成为紧迫任务。\n\n"
    "　　研究团队翻检了大量古代医籍，在东晋葛洪《肘后备急方》中读到“青蒿一握，以水二升渍，绞取汁，"
    "尽服之”的记载。这句话提示：青蒿的有效成分也许怕热，传统的煎煮反而会破坏它。团队据此改用低沸点"
    "的乙醚提取，终于得到了对鼠疟原虫抑制率很高的提取物。\n\n"
    "　　不过，古籍只提供了线索，真正的突破仍然依靠严格的化学分离、结构测定和临床试验。把经验转化为"
    "证据，才是这一发现留给我们的启示。"
)
# Quirks: full-width "．" after numbers and letters, "（3分）" score marks, a short-answer
# question (3) between choice questions, Cyrillic А В С as labels of question 4, and question 5
# with options two to a line (A C / B D) separated by ideographic spaces.
ZH_QUESTIONS_1 = (
    "1．下列关于原文内容的理解和分析，不正确的一项是（3分）\n"
    "A．青蒿素的发现被看作传统医药与现代科学相遇的范例。\n"
    "B．疟原虫对氯喹普遍产生抗药性，使寻找新药变得紧迫。\n"
    "C．古代医籍中的记载可以直接代替现代药理实验。\n"
    "D．改用乙醚提取，是因为研究者推测有效成分怕热。\n"
    "2．根据原文内容，下列说法正确的一项是（3分）\n"
    "A．葛洪在《肘后备急方》中已经提出了低温提取的方法。\n"
    "B．“绞取汁”的做法提示煎煮可能破坏青蒿的有效成分。\n"
    "C．乙醚提取物对人体疟原虫的抑制率已在古代得到证明。\n"
    "D．青蒿素的结构测定先于提取物的发现。\n"
    "3．文章第二段引用《肘后备急方》的记载有什么作用？请简要分析。（4分）\n"
    "4．下列对原文论证的相关分析，不正确的一项是（3分）\n"
    "\u0410．文章以青蒿素的发现为例，论述传统经验与现代科学的关系。\n"
    "\u0412．文章按照时间顺序，介绍了发现青蒿素的过程。\n"
    "\u0421．文章引用古籍原文，增强了论证的说服力。\n"
    "D．文章最后一段否定了古籍在这一发现中的作用。\n"
    "5．下列选项中，最能体现文章结尾“启示”的一项是（3分）\n"
    "A．凡是古书记载的方法都值得直接推广　　C．把经验转化为证据需要严格的科学检验\n"
    "B．现代科学研究不需要借鉴传统经验　　　D．新药研发只能依靠偶然的灵感"
)
ZH_ANSWERS_1 = (
    "1．C【解析】C项“可以直接代替现代药理实验”错误，原文说“古籍只提供了线索，真正的突破仍然依靠"
    "严格的化学分离、结构测定和临床试验”。\n"
    "2．B【解析】A项“已经提出了低温提取的方法”于文无据；C项“已在古代得到证明”错误；D项顺序颠倒。\n"
    "3．①为研究团队改用低温提取提供了线索；②说明传统医药经验具有启发价值；③增强了论证的说服力。"
    "（答出两点即可）\n"
    "4．D【解析】D项“否定了古籍在这一发现中的作用”错误，原文是说古籍“提供了线索”。\n"
    "5．C【解析】文章结尾强调“把经验转化为证据”。"
)

ZH_PASSAGE_2 = (
    "老城区的街角有一棵三百多岁的银杏。修路的时候，工程师把道路向东挪了两米，只为给它的根系留出"
    "空间。居民说，这棵树记得整条街的历史。"
)
# Three choice questions but answers for only two: rejected.
ZH_QUESTIONS_2 = (
    "1．下列对文中银杏的理解，正确的一项是（3分）\n"
    "A．银杏是修路时新栽的。\nB．道路为银杏向东挪了两米。\nC．银杏的根系已被切断。\nD．居民希望砍掉银杏。\n"
    "2．文中“这棵树记得整条街的历史”运用的修辞手法是（3分）\n"
    "A．比喻\nB．拟人\nC．夸张\nD．对偶\n"
    "3．下列最适合作本文标题的一项是（3分）\n"
    "A．修路\nB．街角的银杏\nC．工程师\nD．老城区"
)
ZH_ANSWERS_2 = "1．B\n2．B"

ZH_PASSAGE_4 = (
    "针灸是中国传统医学的重要组成部分。它通过刺激人体特定的穴位来调整身体机能。近年来，越来越多的"
    "临床研究开始用随机对照试验的方法检验针灸的疗效，一些研究显示针灸对缓解慢性疼痛有帮助，但研究者"
    "也提醒，样本量小、难以设置真正的安慰对照，是这类研究面临的主要困难。"
)
# Quirks: "1、" numbering, a blank "（　　）" in the stems, and answers given as "答案：X" lines
# without numbers.
ZH_QUESTIONS_4 = (
    "1、针灸调整身体机能的方式是（　　）\n"
    "A．服用药物 B．刺激穴位 C．外科手术 D．改善饮食\n"
    "2、下列关于针灸研究的说法，符合原文的一项是（　　）\n"
    "A．所有研究都证明针灸无效\nB．针灸研究样本量普遍很大\n"
    "C．一些研究显示针灸有助于缓解慢性疼痛\nD．设置安慰对照非常容易\n"
    "3、研究者提醒的困难不包括（　　）\n"
    "A．样本量小\nB．难以设置安慰对照\nC．缺少临床研究的兴趣\nD．真正的安慰对照难以实现"
)
ZH_ANSWERS_4 = "答案：B\n解析：原文说“通过刺激人体特定的穴位”。\n答案：C\n解析：见第三句。\n答案：C\n解析：原文未提及。"

# ---------------------------------------------------------------------------------------------
# 英语 sheet
# ---------------------------------------------------------------------------------------------

EN_PASSAGE_1 = (
    "When the town of Millbrook lost its only bookshop, a retired teacher named Ruth Evans turned her "
    "garage into a free library. She started with two hundred of her own books and a handwritten sign.\n"
    "Within a year, neighbours had added more than three thousand books. Children came after school to "
    "read, and older residents met there on Sunday afternoons to swap novels and stories.\n"
    "Ruth says the library was never really about books. \"People needed a place to meet,\" she explains. "
    "\"The books just gave them a reason to come.\""
)
# Quirks: question numbers 32-35 (as in the real paper), a full-width "33．", Greek Α Β labels in
# question 34, a full-width score mark "（2分）" that English normalisation turns into "(2分)".
EN_QUESTIONS_1 = (
    "32. Why did Ruth Evans start the library?\n"
    "A. To sell her old books.\nB. To replace the bookshop the town had lost.\n"
    "C. To earn money after retiring.\nD. To teach children to write.\n"
    "33．How many books had neighbours added within a year?（2分）\n"
    "A. About two hundred.\nB. About one thousand.\nC. About two thousand.\nD. More than three thousand.\n"
    "34. Who met in the library on Sunday afternoons?\n"
    "\u0391. Older residents.\n\u0392. Schoolteachers.\nC. Bookshop owners.\nD. Visiting writers.\n"
    "35. What does Ruth think the library was mainly about?\n"
    "A. Selling books.\nB. Teaching reading.\nC. Bringing people together.\nD. Keeping her garage tidy."
)
EN_ANSWERS_1 = (
    "32. B. The underlying reason is given in Paragraph 1: the town had lost its only bookshop.\n"
    "33. D. Paragraph 2 says \"more than three thousand books\".\n"
    "34. A. The older residents met there to swap novels.\n"
    "35. C. She says people needed a place to meet."
)

EN_PASSAGE_2 = (
    "Honeybees communicate the location of food through a movement called the waggle dance. The angle "
    "of the dance shows the direction of the flowers relative to the sun, and its length shows the "
    "distance. Scientists decoded the dance in the 1940s."
)
# Quirks: options on one line after the stem, a range answer key "24-26 CAD".
EN_QUESTIONS_2 = (
    "24. What does the waggle dance tell other bees? A. The age of the hive. B. Where food can be found. "
    "C. When to leave the hive. D. How to build a nest.\n"
    "25. What does the angle of the dance show? A. The direction of the flowers. B. The number of "
    "flowers. C. The colour of the flowers. D. The time of day.\n"
    "26. When was the dance decoded? A. In the 1840s. B. In the 1890s. C. In the 1920s. D. In the 1940s."
)
EN_ANSWERS_2 = "24-26 BAD"

# OCR lost option C of question 22: rejected.
EN_PASSAGE_3 = "The first public park in the city opened in 1858. It was designed to give workers fresh air."
EN_QUESTIONS_3 = (
    "21. When did the first public park open?\nA. In 1808.\nB. In 1838.\nC. In 1858.\nD. In 1888.\n"
    "22. Why was the park designed?\nA. To attract tourists.\nB. To give workers fresh air.\nD. To grow food."
)
EN_ANSWERS_3 = "21. C\n22. B"

# Answers numbered 21, 22, 24 against questions 21-23: rejected.
EN_PASSAGE_4 = "Tea was first drunk in China. It reached Europe in the seventeenth century and became popular in Britain."
EN_QUESTIONS_4 = (
    "21. Where was tea first drunk?\nA. In India.\nB. In China.\nC. In Britain.\nD. In Japan.\n"
    "22. When did tea reach Europe?\nA. In the 15th century.\nB. In the 16th century.\n"
    "C. In the 17th century.\nD. In the 18th century.\n"
    "23. Where did tea become popular?\nA. In Britain.\nB. In Spain.\nC. In Russia.\nD. In Italy."
)
EN_ANSWERS_4 = "21. B\n22. C\n24. A"

ZH_ROWS = [
    (ZH_PASSAGE_1, ZH_QUESTIONS_1, ZH_ANSWERS_1),
    (ZH_PASSAGE_2, ZH_QUESTIONS_2, ZH_ANSWERS_2),
    ("", ZH_QUESTIONS_2, "1．B\n2．B\n3．B"),  # empty passage: rejected
    (ZH_PASSAGE_4, ZH_QUESTIONS_4, ZH_ANSWERS_4),
]
EN_ROWS = [
    (EN_PASSAGE_1, EN_QUESTIONS_1, EN_ANSWERS_1),
    (EN_PASSAGE_2, EN_QUESTIONS_2, EN_ANSWERS_2),
    (EN_PASSAGE_3, EN_QUESTIONS_3, EN_ANSWERS_3),
    (EN_PASSAGE_4, EN_QUESTIONS_4, EN_ANSWERS_4),
]

ZH_OUTPUT_1 = """1. 下列关于原文内容的理解和分析，不正确的一项是
A. 青蒿素的发现被看作传统医药与现代科学相遇的范例。
B. 疟原虫对氯喹普遍产生抗药性，使寻找新药变得紧迫。
C. 古代医籍中的记载可以直接代替现代药理实验。
D. 改用乙醚提取，是因为研究者推测有效成分怕热。
答案：C

2. 根据原文内容，下列说法正确的一项是
A. 葛洪在《肘后备急方》中已经提出了低温提取的方法。
B. “绞取汁”的做法提示煎煮可能破坏青蒿的有效成分。
C. 乙醚提取物对人体疟原虫的抑制率已在古代得到证明。
D. 青蒿素的结构测定先于提取物的发现。
答案：B

3. 下列对原文论证的相关分析，不正确的一项是
A. 文章以青蒿素的发现为例，论述传统经验与现代科学的关系。
B. 文章按照时间顺序，介绍了发现青蒿素的过程。
C. 文章引用古籍原文，增强了论证的说服力。
D. 文章最后一段否定了古籍在这一发现中的作用。
答案：D

4. 下列选项中，最能体现文章结尾“启示”的一项是
A. 凡是古书记载的方法都值得直接推广
B. 现代科学研究不需要借鉴传统经验
C. 把经验转化为证据需要严格的科学检验
D. 新药研发只能依靠偶然的灵感
答案：C"""


def write_book(path: Path, sheets: dict[str, list[tuple[str, str, str]]], header=HEADER) -> Path:
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        ws = book.create_sheet(name)
        ws.append(list(header))
        for row in rows:
            ws.append(list(row))
    book.save(path)
    return path


@pytest.fixture
def exams(tmp_path) -> Path:
    return write_book(tmp_path / "gaokao_reading.xlsx", {"语文": ZH_ROWS, "英语": EN_ROWS})


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


def test_short_answer_question_dropped_and_rest_renumbered():
    questions = parse_questions(ZH_QUESTIONS_1, "zh")
    assert [q.number for q in questions] == [1, 2, 3, 4]
    assert [q.source_number for q in questions] == [1, 2, 4, 5]
    assert all("请简要分析" not in q.stem for q in questions)


def test_score_marks_and_fullwidth_numbering_removed():
    q1 = parse_questions(ZH_QUESTIONS_1, "zh")[0]
    assert q1.stem == "下列关于原文内容的理解和分析，不正确的一项是"
    assert q1.options == {
        "A": "青蒿素的发现被看作传统医药与现代科学相遇的范例。",
        "B": "疟原虫对氯喹普遍产生抗药性，使寻找新药变得紧迫。",
        "C": "古代医籍中的记载可以直接代替现代药理实验。",
        "D": "改用乙醚提取，是因为研究者推测有效成分怕热。",
    }
    # English: "33．" numbers the question and "（2分）" is removed.
    q33 = parse_questions(EN_QUESTIONS_1, "en")[1]
    assert (q33.source_number, q33.stem) == (33, "How many books had neighbours added within a year?")
    assert q33.options["D"] == "More than three thousand."


def test_cyrillic_and_greek_labels_read_as_latin():
    q4 = parse_questions(ZH_QUESTIONS_1, "zh")[2]
    assert q4.stem == "下列对原文论证的相关分析，不正确的一项是"
    assert list(q4.options) == ["A", "B", "C", "D"]
    assert q4.options["A"] == "文章以青蒿素的发现为例，论述传统经验与现代科学的关系。"
    assert q4.options["C"] == "文章引用古籍原文，增强了论证的说服力。"
    q34 = parse_questions(EN_QUESTIONS_1, "en")[2]
    assert q34.options == {
        "A": "Older residents.", "B": "Schoolteachers.", "C": "Bookshop owners.", "D": "Visiting writers.",
    }


def test_options_out_of_order_are_reordered():
    q5 = parse_questions(ZH_QUESTIONS_1, "zh")[3]
    assert q5.reordered
    assert q5.stem == "下列选项中，最能体现文章结尾“启示”的一项是"
    assert list(q5.options.items()) == [
        ("A", "凡是古书记载的方法都值得直接推广"),
        ("B", "现代科学研究不需要借鉴传统经验"),
        ("C", "把经验转化为证据需要严格的科学检验"),
        ("D", "新药研发只能依靠偶然的灵感"),
    ]
    # A C B D on one line as well.
    q = parse_questions("1. Pick one. A. one C. three B. two D. four", "en")[0]
    assert list(q.options.items()) == [("A", "one"), ("B", "two"), ("C", "three"), ("D", "four")]
    assert q.reordered


def test_inline_options_and_blank_parentheses():
    q24 = parse_questions(EN_QUESTIONS_2, "en")[0]
    assert q24.stem == "What does the waggle dance tell other bees?"
    assert q24.options == {
        "A": "The age of the hive.", "B": "Where food can be found.",
        "C": "When to leave the hive.", "D": "How to build a nest.",
    }
    q1 = parse_questions(ZH_QUESTIONS_4, "zh")[0]
    assert q1.stem == "针灸调整身体机能的方式是（）"
    assert q1.options == {"A": "服用药物", "B": "刺激穴位", "C": "外科手术", "D": "改善饮食"}


def test_false_labels_inside_text_are_not_options():
    # "Plan A." in the stem and "B.C." inside an option must not be taken for labels.
    text = "1. What is Plan A. in the text?\nA. A year, 200 B.C. or so\nB. A map\nC. A road\nD. A river"
    q = parse_questions(text, "en")[0]
    assert q.stem == "What is Plan A. in the text?"
    assert q.options == {"A": "A year, 200 B.C. or so", "B": "A map", "C": "A road", "D": "A river"}
    # A label-like ending of an option ("Vitamin B.", "Vitamin D.") is text, not the next label.
    q = parse_questions("1. Which? A. Vitamin C. B. Vitamin B. C. Vitamin D. D. Iron.", "en")[0]
    assert q.options == {"A": "Vitamin C.", "B": "Vitamin B.", "C": "Vitamin D.", "D": "Iron."}


def test_short_answer_mentioning_letters_is_still_short_answer():
    text = "1．文中画线的A、B两句有什么作用？请简要分析。（4分）\n2．题干（3分）\nA．甲\nB．乙\nC．丙\nD．丁"
    questions = parse_questions(text, "zh")
    assert [(q.number, q.source_number, q.stem) for q in questions] == [(1, 2, "题干")]


def test_partial_options_raise():
    with pytest.raises(QuestionParseError, match="question 22: found options A, B, D; expected exactly A-D"):
        parse_questions(EN_QUESTIONS_3, "en")


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def test_answers_with_chinese_explanations():
    # Answer 3 (short-answer, "①…②…") carries no letter and is skipped.
    assert parse_answers(ZH_ANSWERS_1, "zh") == ["C", "B", "D", "C"]


def test_answers_with_english_explanations():
    # "Paragraph 1:" inside the explanation of 32 must not start a new item.
    assert parse_answers(EN_ANSWERS_1, "en") == ["B", "D", "A", "C"]
    assert parse_answers("32. B. The underlying reason is in Paragraph 3. 33. C. See line 2.", "en") == ["B", "C"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("答案：B", ["B"]),
        (ZH_ANSWERS_4, ["B", "C", "C"]),
        ("【答案】C【解析】略", ["C"]),
        ("24-26 BAD", ["B", "A", "D"]),
        ("BCAD", ["B", "C", "A", "D"]),
        ("答案：B、C、A、D", ["B", "C", "A", "D"]),
        ("1.C2.B3.A", ["C", "B", "A"]),
        ("1．\u0421【解析】略\n2．\u0392", ["C", "B"]),  # Cyrillic С, Greek Β
        ("21. Answer: D", ["D"]),
        ("1. A good guess, not a key.\n2. B", ["B"]),  # the article "A" is not an answer
        ("1．BD", ["BD"]),  # a multiple answer is returned as found; rows reject it
    ],
)
def test_answer_shapes(text, expected):
    assert parse_answers(text, "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en") == expected


# ---------------------------------------------------------------------------------------------
# Output and instruction
# ---------------------------------------------------------------------------------------------


def test_format_output_english():
    q = Question(1, "Why?", {"A": "a", "B": "b", "C": "c", "D": "d"})
    assert format_output([q, q], ["B", "D"], "en") == (
        "1. Why?\nA. a\nB. b\nC. c\nD. d\nanswer: B\n\n2. Why?\nA. a\nB. b\nC. c\nD. d\nanswer: D"
    )
    with pytest.raises(ValueError, match="1 questions but 2 answers"):
        format_output([q], ["A", "B"], "en")
    with pytest.raises(ValueError, match="answer 'E'"):
        format_output([q], ["E"], "en")


def test_instructions_are_template_files():
    assert load_instruction("zh") == "请阅读下面的文章，并根据文章内容出4道单项选择题，每题包括题干、A-D四个选项和答案。"
    assert load_instruction("en", 3) == (
        "Read the passage below and write 3 multiple-choice questions about it. "
        "Each question has a stem, four options A-D and the answer."
    )
    with pytest.raises(ValueError, match="lang"):
        load_instruction("fr")


# ---------------------------------------------------------------------------------------------
# Workbook → records
# ---------------------------------------------------------------------------------------------


def test_read_chinese_sheet(exams):
    result = read_exam_xlsx(exams, "zh")
    assert isinstance(result, ExamXlsxResult)
    assert (result.sheet, result.n_rows, len(result.records), len(result.rejects)) == ("语文", 4, 2, 2)
    assert result.n_short_answer_dropped == 1

    first = result.records[0]
    assert isinstance(first, Conversation)
    assert first.id == "gaokao_reading-zh-0001"
    assert first.meta == {"lang": "zh", "n_questions": 4, "source_row": 1, "source_sheet": "语文"}
    assert first.messages[0]["role"] == "user"
    assert first.messages[0]["content"] == load_instruction("zh", 4) + "\n\n" + (
        "青蒿素的发现，常被看作传统医药与现代科学相遇的范例。二十世纪六七十年代，疟原虫对氯喹等药物"
        "普遍产生抗药性，寻找新的抗疟药物成为紧迫任务。\n"
        "研究团队翻检了大量古代医籍，在东晋葛洪《肘后备急方》中读到“青蒿一握，以水二升渍，绞取汁，"
        "尽服之”的记载。这句话提示：青蒿的有效成分也许怕热，传统的煎煮反而会破坏它。团队据此改用低沸点"
        "的乙醚提取，终于得到了对鼠疟原虫抑制率很高的提取物。\n"
        "不过，古籍只提供了线索，真正的突破仍然依靠严格的化学分离、结构测定和临床试验。把经验转化为"
        "证据，才是这一发现留给我们的启示。"
    )
    assert first.reply == ZH_OUTPUT_1

    fourth = result.records[1]
    assert fourth.id == "gaokao_reading-zh-0004"
    assert fourth.meta["n_questions"] == 3
    assert fourth.messages[0]["content"].startswith(load_instruction("zh", 3) + "\n\n针灸是")
    assert fourth.reply.endswith("3. 研究者提醒的困难不包括（）\nA. 样本量小\nB. 难以设置安慰对照\n"
                                 "C. 缺少临床研究的兴趣\nD. 真正的安慰对照难以实现\n答案：C")

    assert [(r["row"], r["sheet"], r["field"], r["reason"]) for r in result.rejects] == [
        (2, "语文", "答案",
         "3 question(s) with options but 2 answer letter(s); questions and answers must match in number"),
        (3, "语文", "阅读文本", "empty passage"),
    ]
    assert result.rejects[0]["raw"]["答案"] == ZH_ANSWERS_2


def test_read_english_sheet(exams):
    result = read_exam_xlsx(exams, "en")
    assert (result.sheet, result.n_rows, len(result.records)) == ("英语", 4, 2)
    assert [r.id for r in result.records] == ["gaokao_reading-en-0001", "gaokao_reading-en-0002"]
    reply = result.records[0].reply
    assert reply.startswith(
        "1. Why did Ruth Evans start the library?\nA. To sell her old books.\n"
        "B. To replace the bookshop the town had lost.\nC. To earn money after retiring.\n"
        "D. To teach children to write.\nanswer: B\n\n2. How many books had neighbours added within a year?\n"
    )
    assert [line for line in reply.split("\n") if line.startswith("answer:")] == [
        "answer: B", "answer: D", "answer: A", "answer: C",
    ]
    assert result.records[1].reply.endswith("D. In the 1940s.\nanswer: D")
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (3, "选项", "question 22: found options A, B, D; expected exactly A-D"),
        (4, "答案", "answers numbered 21, 22, 24 do not match questions numbered 21, 22, 23"),
    ]


def test_multiple_answer_and_no_choice_questions_rejected(tmp_path):
    rows = [
        ("文章。", "1．题干\nA．甲\nB．乙\nC．丙\nD．丁", "1．BD"),
        ("文章。", "1．请概括文章内容。（4分）", "1．略"),
        (None, None, None),  # a blank row is not data, but keeps its place in the numbering
        ("文章。", "1．题干\nA．甲\nB．乙\nC．丙\nD．丁", ""),
        ("文章。", "1．题干\nA．甲\nB．乙\nC．丙\nD．丁", "1．E"),
    ]
    result = read_exam_xlsx(write_book(tmp_path / "x.xlsx", {"语文": rows}), "zh")
    assert result.n_rows == 4 and not result.records
    assert [(r["row"], r["reason"]) for r in result.rejects] == [
        (1, "question 1: answer 'BD' has more than one letter"),
        (2, "no single-choice questions found (1 short-answer question(s) dropped)"),
        (4, "no answers"),
        (5, "question 1: answer E is not one of A, B, C, D"),
    ]


def test_answer_key_without_short_answer_numbers(tmp_path):
    # Many keys leave out the short-answer question (3) entirely: "1. 2. 4. 5." still match.
    answers = "1．C\n2．B\n4．D\n5．C"
    result = read_exam_xlsx(write_book(tmp_path / "x.xlsx", {"语文": [(ZH_PASSAGE_1, ZH_QUESTIONS_1, answers)]}), "zh")
    assert result.records[0].reply == ZH_OUTPUT_1


def test_answers_numbered_with_an_offset_are_matched(tmp_path):
    rows = [("Text.", "1. Q1\nA. a\nB. b\nC. c\nD. d\n2. Q2\nA. a\nB. b\nC. c\nD. d", "21. C\n22. A")]
    result = read_exam_xlsx(write_book(tmp_path / "x.xlsx", {"English": rows}), "en")
    assert [line for line in result.records[0].reply.split("\n") if "answer" in line] == ["answer: C", "answer: A"]


def test_n_questions_filter(exams):
    result = read_exam_xlsx(exams, "zh", n_questions=4)
    assert [r.id for r in result.records] == ["gaokao_reading-zh-0001"]
    assert result.rejects[-1]["reason"] == "3 single-choice question(s); expected 4"


def test_on_invalid_error_names_row_and_column(exams):
    with pytest.raises(DataFileError, match=r"row 2, field '答案': sheet '语文': 3 question") as info:
        read_exam_xlsx(exams, "zh", on_invalid="error")
    assert (info.value.row, info.value.field) == (2, "答案")


def test_convert_writes_records_and_rejects(exams, tmp_path):
    out = tmp_path / "out" / "pairs.jsonl"
    result = convert_exam_xlsx(exams, out, "zh")
    lines = read_jsonl(out)
    assert [line["id"] for line in lines] == ["gaokao_reading-zh-0001", "gaokao_reading-zh-0004"]
    assert Conversation.from_dict(lines[0]).reply == ZH_OUTPUT_1
    rejects = read_jsonl(tmp_path / "out" / "pairs.rejects.jsonl")
    assert [(r["row"], r["reason"]) for r in rejects] == [(r["row"], r["reason"]) for r in result.rejects]
    assert summary_lines(result, exams, out) == [
        f"{exams} [sheet '语文', zh]: 4 rows → 2 training pairs written to {out}",
        f"  2 rows rejected (reasons in {tmp_path / 'out' / 'pairs.rejects.jsonl'})",
        "  1 short-answer questions dropped from kept rows",
    ]

    # A clean sheet removes the stale rejects file of the previous run.
    clean = write_book(tmp_path / "clean.xlsx", {"英语": EN_ROWS[:2]})
    convert_exam_xlsx(clean, out, "en")
    assert not (tmp_path / "out" / "pairs.rejects.jsonl").exists()
    assert len(read_jsonl(out)) == 2

    with pytest.raises(ValueError, match="refusing to overwrite"):
        convert_exam_xlsx(exams, exams, "zh")


def test_sheet_selection(exams, tmp_path):
    assert select_sheet(["语文", "英语"], "en") == "英语"
    assert select_sheet(["Reading (EN)", "Reading (ZH)"], "zh") == "Reading (ZH)"
    assert select_sheet(["Chinese reading", "English reading"], "en") == "English reading"
    # "en" inside a word ("Content") does not count; nothing matches, so the first sheet is read.
    assert select_sheet(["Content", "Sheet2"], "en") == "Content"
    assert select_sheet(["a", "b"], "zh", sheet=" B ") == "b"
    with pytest.raises(ValueError, match="no sheet named 'c'"):
        select_sheet(["a", "b"], "zh", sheet="c")

    # An explicit sheet overrides the language: English rows read as Chinese are still parsed.
    result = read_exam_xlsx(exams, "zh", sheet="英语")
    assert result.sheet == "英语" and len(result.records) == 2
    with pytest.raises(DataFileError, match="no sheet named"):
        read_exam_xlsx(exams, "zh", sheet="数学")


def test_file_level_errors(tmp_path):
    with pytest.raises(DataFileError, match=r"lacks column\(s\) \['答案'\]"):
        read_exam_xlsx(write_book(tmp_path / "x.xlsx", {"语文": []}, header=["阅读文本 ", "选项"]), "zh")
    bad = tmp_path / "bad.xlsx"
    bad.write_text("not a workbook", encoding="utf-8")
    with pytest.raises(DataFileError, match="not a readable .xlsx"):
        read_exam_xlsx(bad, "zh")
    with pytest.raises(DataFileError, match="unsupported extension"):
        read_exam_xlsx(tmp_path / "x.csv", "zh")
    with pytest.raises(ValueError, match="lang"):
        read_exam_xlsx(tmp_path / "x.xlsx", "de")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

MALFORMED_3 = ZH_OUTPUT_1.rsplit("\n\n", 1)[0]  # only the first three questions
ANSWER_E = ZH_OUTPUT_1.replace("答案：D", "答案：E")


def test_parse_generated_reports_what_it_found():
    parsed = parse_generated(ZH_OUTPUT_1, "zh")
    assert [q.answer for q in parsed.questions] == ["C", "B", "D", "C"]
    assert parsed.well_formed(4) and parsed.answers_valid()
    assert parsed.questions[3].options["C"] == "把经验转化为证据需要严格的科学检验"

    wrong = parse_generated(ANSWER_E, "zh")
    assert wrong.well_formed(4) and not wrong.answers_valid()
    assert wrong.questions[2].answer == "E"

    messy = parse_generated(
        "Sure! Here are the questions:\n1. Q\nA. a\nB. b\nC.\nD. d\nE. e\nanswer: C\n2. Q2\nA. a\nB. b\nC. c\nD. d\nanswer: none",
        "en",
    )
    assert messy.preamble == "Sure! Here are the questions:"
    assert messy.questions[0].extra_options == ["E"]
    assert messy.questions[0].problems == ["extra option(s) E"]
    assert not messy.questions[0].answer_valid  # option C is empty
    assert messy.questions[1].problems == ["answer 'none' is not a letter"]
    assert messy.problems(2) == ["question 1: extra option(s) E", "question 2: answer 'none' is not a letter"]


def test_evaluate_question_generation():
    outputs = [ZH_OUTPUT_1, MALFORMED_3, ANSWER_E]
    scores = evaluate_question_generation(outputs, [ZH_OUTPUT_1] * 3, "zh")
    assert scores["n"] == 3
    assert scores["n_well_formed"] == 2
    assert scores["well_formed"] == pytest.approx(200 / 3)
    assert scores["answer_valid"] == pytest.approx(50.0)  # the E answer names no option
    per = scores["per_output"]
    assert [(d["well_formed"], d["answer_valid"]) for d in per] == [(True, True), (False, None), (True, False)]
    assert per[1]["problems"] == ["3 questions; expected 4"]
    assert per[2]["answers"] == ["C", "B", "E", "C"]
    # ROUGE-L is the metrics module's: 100 for the identical output, lower for the others.
    from medtune.evaluation.metrics import rouge_l

    assert scores["rouge_l"] == pytest.approx(rouge_l(outputs, [ZH_OUTPUT_1] * 3))
    assert evaluate_question_generation([ZH_OUTPUT_1], [ZH_OUTPUT_1], "zh")["rouge_l"] == pytest.approx(100.0)
    assert 0 < rouge_l([MALFORMED_3], [ZH_OUTPUT_1]) < 100

    # An explicit count overrides the reference's.
    assert evaluate_question_generation([MALFORMED_3], [ZH_OUTPUT_1], "zh", n_questions=3)["well_formed"] == 100.0
    none_ok = evaluate_question_generation(["no questions here"], [ZH_OUTPUT_1], "zh")
    assert none_ok["well_formed"] == 0.0 and none_ok["answer_valid"] is None
    with pytest.raises(ValueError, match="2 outputs but 1 references"):
        evaluate_question_generation(["a", "b"], ["c"], "zh")


def test_records_round_trip_through_json(exams, tmp_path):
    out = tmp_path / "pairs.jsonl"
    convert_exam_xlsx(exams, out, "en")
    line = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert set(line) == {"id", "messages", "meta"}
    assert [m["role"] for m in line["messages"]] == ["user", "assistant"]


# ---------------------------------------------------------------------------------------------
# Missing values and damaged workbooks
# ---------------------------------------------------------------------------------------------

GOOD_QUESTION = "1．题干\nA．甲\nB．乙\nC．丙\nD．丁"


def test_exam_xlsx_nan_cells_are_missing_not_text(tmp_path):
    rows = [
        ("文章。", GOOD_QUESTION, "1．B"),  # 1: kept
        ("nan", GOOD_QUESTION, "1．B"),  # 2
        ("文章。", "None", "1．B"),  # 3
        ("文章。", GOOD_QUESTION, "NULL"),  # 4
        ("nan", "None", "null"),  # 5: every cell missing: a blank row, not data
        ("文章。", GOOD_QUESTION, None),  # 6: a real empty cell
        (" NaN ", GOOD_QUESTION, "1．B"),  # 7
    ]
    result = read_exam_xlsx(write_book(tmp_path / "x.xlsx", {"语文": rows}), "zh")
    assert result.n_rows == 6  # row 5 is blank, but keeps its place in the numbering
    assert [r.id for r in result.records] == ["x-zh-0001"]
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (2, "阅读文本", "empty passage ('nan' counts as missing)"),
        (3, "选项", "no questions ('None' counts as missing)"),
        (4, "答案", "no answers ('NULL' counts as missing)"),
        (6, "答案", "no answers"),
        (7, "阅读文本", "empty passage ('NaN' counts as missing)"),
    ]
    assert result.rejects[0]["raw"]["阅读文本"] == "nan"  # the cell as written, for a person to find


def test_exam_xlsx_nan_answer_error_mode_message(tmp_path):
    path = write_book(tmp_path / "x.xlsx", {"语文": [("文章。", GOOD_QUESTION, "nan")]})
    with pytest.raises(DataFileError) as info:
        read_exam_xlsx(path, "zh", on_invalid="error")
    assert str(info.value) == f"{path}, row 1, field '答案': sheet '语文': no answers ('nan' counts as missing)"


def test_exam_xlsx_truncated_workbook_is_one_clear_error(tmp_path):
    import medtune

    real = Path(medtune.__file__).parent / "examples" / "exam_xlsx" / "gaokao_reading.xlsx"
    data = real.read_bytes()
    path = tmp_path / "half.xlsx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError) as info:
        read_exam_xlsx(path, "zh")
    assert str(info.value) == (
        f"{path}: not a readable .xlsx workbook (BadZipFile: File is not a zip file); expected an Excel "
        "workbook: the file may be truncated or corrupt, re-save it from Excel"
    )


def test_exam_xlsx_corrupt_sheet_fails_while_reading_rows_with_one_clear_error(tmp_path):
    # read_only openpyxl opens the workbook fine and fails only while iterating the damaged sheet.
    import zipfile

    good = write_book(tmp_path / "good.xlsx", {"语文": [("文章。", GOOD_QUESTION, "1．B")]})
    bad = tmp_path / "bad.xlsx"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            body = src.read(name)
            dst.writestr(name, body[: len(body) // 2] if name == "xl/worksheets/sheet1.xml" else body)
    with pytest.raises(DataFileError) as info:
        read_exam_xlsx(bad, "zh")
    message = str(info.value)
    assert message.startswith(f"{bad}: not a readable .xlsx workbook (")
    assert message.endswith("expected an Excel workbook: the file may be truncated or corrupt, re-save it from Excel")


def test_english_question_generation_rouge_is_on_words_not_characters():
    # An unrelated English output shares most letters with any reference: on characters its ROUGE-L is
    # far from 0; on words (the default for en) it is exactly 0, since no word is shared.
    reference = "1. Who built the bridge?\nA. Romans\nB. Greeks\nC. Persians\nD. Egyptians\nanswer: A"
    unrelated = "stock markets rallied sharply on friday"
    scores = evaluate_question_generation([unrelated], [reference], "en")
    assert (scores["tokenization"], scores["rouge_l"], scores["lang"]) == ("word", 0.0, "en")
    assert evaluate_question_generation([unrelated], [reference], "en", tokenization="char")["rouge_l"] > 20
    assert evaluate_question_generation([reference], [reference], "en")["rouge_l"] == pytest.approx(100.0)
    # zh keeps characters, the numbers of earlier releases
    assert evaluate_question_generation([ZH_OUTPUT_1], [ZH_OUTPUT_1], "zh")["tokenization"] == "char"


def test_question_generation_with_failed_generations_reports_zero_well_formed():
    # None (a failed generation) and the base model's free text: 0 well-formed, the rest still scored.
    scores = evaluate_question_generation([None, "黄帝内经"], [ZH_OUTPUT_1] * 2, "zh")
    assert (scores["n"], scores["n_well_formed"], scores["well_formed"], scores["answer_valid"]) == (2, 0, 0.0, None)
    assert scores["per_output"][0]["problems"] == ["0 questions; expected 4"]
    assert scores["rouge_l"] > 0
