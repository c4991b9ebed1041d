"""Held-out, blind measurement of the answer reader (:func:`read_answer`).

The rows below were written without reading the parser's source or its own tests: each is a
realistic model output to a CMExam-style question (fine-tuned models, chat models, rambling base
models, reasoning models) together with what a careful human grader reads as the model's final
answer (letters in option order, ``""`` = no answer) and whether the output is ambiguous
(conflicting answers or a hedge).

Rows the reader gets wrong are kept in the table and marked ``xfail(strict=True)`` so the parser
team sees them; fixing one turns its xfail into an XPASS failure, which is the cue to drop the
mark. ``test_heldout_summary`` prints per-style accuracy.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from medtune.evaluation.extract import read_answer

# ---------------------------------------------------------------------------------- questions
# key -> (stem, options). Stems are for the reader of this file; read_answer only sees options.

QUESTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "liver": (
        "我国肝硬化最常见的病因是",
        {"A": "酒精性肝病", "B": "病毒性肝炎", "C": "胆汁淤积", "D": "药物或毒物", "E": "血吸虫病"},
    ),  # gold B
    "ami": (
        "诊断急性心肌梗死特异性最高的血清标志物是",
        {
            "A": "肌红蛋白",
            "B": "肌酸激酶同工酶（CK-MB）",
            "C": "心肌肌钙蛋白",
            "D": "天冬氨酸氨基转移酶",
            "E": "乳酸脱氢酶",
        },
    ),  # gold C
    "thy": (
        "鉴别甲状腺结节良恶性最可靠的方法是",
        {
            "A": "甲状腺功能测定",
            "B": "放射性核素扫描",
            "C": "B超检查",
            "D": "CT检查",
            "E": "细针穿刺细胞学检查",
        },
    ),  # gold E
    "ns": (
        "肾病综合征的诊断依据包括（多选）",
        {"A": "大量蛋白尿", "B": "低白蛋白血症", "C": "血尿", "D": "水肿", "E": "高脂血症"},
    ),  # gold ABDE
    "acei": (
        "糖尿病肾病合并高血压患者首选的降压药物是",
        {"A": "噻嗪类利尿剂", "B": "β受体阻滞剂", "C": "ACE抑制剂", "D": "钙通道阻滞剂", "E": "α受体阻滞剂"},
    ),  # gold C
    "b12": (
        "恶性贫血是由于缺乏",
        {"A": "铁", "B": "叶酸", "C": "维生素B12", "D": "维生素C", "E": "维生素K"},
    ),  # gold C
    "hbv": (
        "提示乙型肝炎病毒复制活跃、传染性强的血清学指标是",
        {"A": "HBsAg", "B": "抗-HBs", "C": "HBeAg", "D": "抗-HBc"},
    ),  # gold C (4 options)
    "gc": (
        "长期大量使用糖皮质激素可引起的不良反应有（多选）",
        {"A": "骨质疏松", "B": "低血糖", "C": "诱发或加重感染", "D": "消化性溃疡", "E": "高钾血症"},
    ),  # gold ACD
    "gn": (
        "小儿急性肾小球肾炎最常见的前驱感染是",
        {"A": "皮肤脓疱疮", "B": "呼吸道链球菌感染", "C": "病毒感染", "D": "泌尿道感染"},
    ),  # gold B (4 options)
    "mht": (
        "麻黄汤的功用是",
        {
            "A": "发汗解表，宣肺平喘",
            "B": "解表散寒，温肺化饮",
            "C": "解肌发表，调和营卫",
            "D": "辛凉透表，清热解毒",
            "E": "疏风清热，宣肺止咳",
        },
    ),  # gold A
    "vir": (
        "下列属于DNA病毒的是（多选）",
        {"A": "乙型肝炎病毒", "B": "单纯疱疹病毒", "C": "流感病毒", "D": "人类免疫缺陷病毒", "E": "腺病毒"},
    ),  # gold ABE
    "crp": (
        "细菌感染时明显升高、可用于与病毒感染鉴别的指标是",
        {"A": "血沉", "B": "C反应蛋白", "C": "淋巴细胞计数", "D": "嗜酸性粒细胞计数", "E": "血红蛋白"},
    ),  # gold B
}

# Template markers per style: (answer_marker, explanation_marker). Default: no markers.
MARKERS = {
    "qa": ("答案：", "理由："),  # model writes "答案：X\n理由：..."
    "qa_template": (None, "理由："),  # the shipped qa template: the prompt ends with 答案：
}

# ---------------------------------------------------------------------------------- the table
# (style, question, output, expected letters, expected ambiguous)

ROWS: list[tuple[str, str, str, str, bool]] = [
    # ---------------------------------------------------------------- plain single answers
    ("plain", "liver", "答案：B", "B", False),
    ("plain", "liver", "B", "B", False),
    ("plain", "ami", "正确答案是C。", "C", False),
    ("plain", "thy", "选E", "E", False),
    ("plain", "liver", "B. 病毒性肝炎", "B", False),
    (
        "plain",
        "ami",
        "答案：C\n解析：心肌肌钙蛋白（cTnT/cTnI）是诊断心肌坏死最特异和敏感的标志物，肌红蛋白出现最早但特异性差。",
        "C",
        False,
    ),
    ("plain", "hbv", "答案是：C", "C", False),
    (
        "plain",
        "mht",
        "答案：A。麻黄汤出自《伤寒论》，功能发汗解表，宣肺平喘，主治外感风寒表实证。",
        "A",
        False,
    ),
    ("plain", "gn", "本题答案为B。", "B", False),
    ("plain", "liver", "答案：A\n酒精性肝病是肝硬化最常见的原因。", "A", False),
    ("plain", "ami", "A", "A", False),
    ("plain", "thy", "答案：C", "C", False),
    ("plain", "acei", "C。", "C", False),
    ("plain", "b12", "答案：B（叶酸）", "B", False),
    ("plain", "ami", "答：D", "D", False),
    ("plain", "crp", "答案选B", "B", False),
    ("plain", "liver", "我认为答案是B，因为在我国乙型肝炎病毒感染是肝硬化的主要病因。", "B", False),
    ("plain", "mht", "【答案】A", "A", False),
    ("plain", "gn", "答案: B", "B", False),
    ("plain", "thy", "正确选项：E", "E", False),
    ("plain", "liver", "答案为（B）", "B", False),
    ("plain", "ami", "C 心肌肌钙蛋白", "C", False),
    ("plain", "hbv", "答案：c", "C", False),
    ("plain", "liver", "答案：Ｂ", "B", False),
    ("plain", "acei", "答案是 D 选项", "D", False),
    ("plain", "b12", "C选项正确。", "C", False),
    ("plain", "thy", "应选E。", "E", False),
    # ---------------------------------------------------------------- plain multi answers
    ("plain_multi", "ns", "答案：A、B、D、E", "ABDE", False),
    ("plain_multi", "gc", "ACD", "ACD", False),
    ("plain_multi", "gc", "A C D", "ACD", False),
    ("plain_multi", "vir", "答案：ABE", "ABE", False),
    ("plain_multi", "gc", "答案：A,C,D", "ACD", False),
    ("plain_multi", "vir", "正确答案是A、B和E。", "ABE", False),
    ("plain_multi", "gc", "答案：ABCD", "ABCD", False),
    ("plain_multi", "ns", "DABE", "ABDE", False),
    ("plain_multi", "vir", "选AE", "AE", False),
    (
        "plain_multi",
        "gc",
        "答案：A、C、D\n解析：糖皮质激素可升高血糖、导致低血钾，故B、E不选。",
        "ACD",
        False,
    ),
    ("plain_multi", "ns", "A，B，D，E", "ABDE", False),
    ("plain_multi", "vir", "AB", "AB", False),
    # ---------------------------------------------------------------- markdown
    ("markdown", "liver", "**B**", "B", False),
    (
        "markdown",
        "ami",
        "**答案：C**\n\n**解析：** 心肌肌钙蛋白在心肌坏死后3~4小时升高，特异性最高。",
        "C",
        False,
    ),
    (
        "markdown",
        "thy",
        "### 答案\nE\n\n### 解析\n细针穿刺细胞学检查（FNAC）是术前鉴别甲状腺结节良恶性最可靠的方法。",
        "E",
        False,
    ),
    (
        "markdown",
        "gc",
        "**正确答案：A、C、D**\n\n- A. 骨质疏松 ✔\n- C. 诱发或加重感染 ✔\n- D. 消化性溃疡 ✔",
        "ACD",
        False,
    ),
    ("markdown", "mht", "> 答案：A", "A", False),
    (
        "markdown",
        "acei",
        "## 分析\n糖尿病肾病患者首选ACEI/ARB，可降低尿蛋白、延缓肾功能恶化。\n\n## 答案\n**C. ACE抑制剂**",
        "C",
        False,
    ),
    ("markdown", "crp", "答案：**B. C反应蛋白**", "B", False),
    ("markdown", "hbv", "正确答案是 **C（HBeAg）**。HBsAg 仅提示感染，抗-HBs 为保护性抗体。", "C", False),
    ("markdown", "ns", "**答案**：ABDE", "ABDE", False),
    (
        "markdown",
        "liver",
        "| 选项 | 判断 |\n|---|---|\n| A | ✗ |\n| B | ✓ |\n| C | ✗ |\n| D | ✗ |\n| E | ✗ |\n\n**答案：B**",
        "B",
        False,
    ),
    # ---------------------------------------------------------------- long chat-model answers
    (
        "chat",
        "ami",
        "这道题考查急性心肌梗死的血清心肌标志物。\n\n1. **肌红蛋白**：起病后2小时内升高，出现最早，但特异性不高。\n"
        "2. **CK-MB**：适用于早期诊断和判断再梗死。\n3. **心肌肌钙蛋白（cTnT/cTnI）**：特异性和敏感性最高。\n\n"
        "因此，正确答案是 **C. 心肌肌钙蛋白**。",
        "C",
        False,
    ),
    (
        "chat",
        "ns",
        "肾病综合征的诊断标准包括：\n1. 大量蛋白尿（>3.5g/d）\n2. 低白蛋白血症（<30g/L）\n3. 水肿\n4. 高脂血症\n\n"
        "其中1、2为必需条件。血尿并非诊断依据。\n\n所以答案是：**A、B、D、E**",
        "ABDE",
        False,
    ),
    (
        "chat",
        "thy",
        "答案：E. 细针穿刺细胞学检查\n\n解析：\n- A. 甲状腺功能测定：多数甲状腺癌患者甲功正常，不能鉴别。\n"
        "- B. 放射性核素扫描：冷结节中仅10%~20%为恶性。\n- C. B超检查：可提示恶性征象，但不能确诊。\n"
        "- D. CT检查：主要用于评估侵犯范围。\n- E. 细针穿刺细胞学检查：准确率可达80%以上，是最可靠的方法。",
        "E",
        False,
    ),
    (
        "chat",
        "gc",
        "让我们逐一分析：\n\nA. 骨质疏松——正确，糖皮质激素抑制成骨细胞。\nB. 低血糖——错误，应为高血糖。\n"
        "C. 诱发或加重感染——正确，抑制免疫。\nD. 消化性溃疡——正确。\nE. 高钾血症——错误，应为低钾血症。\n\n综上，答案为ACD。",
        "ACD",
        False,
    ),
    (
        "chat",
        "mht",
        "麻黄汤是辛温解表的代表方，由麻黄、桂枝、杏仁、炙甘草组成。其功用为发汗解表、宣肺平喘，主治外感风寒表实证。\n\n"
        "- 选项B是小青龙汤的功用；\n- 选项C是桂枝汤的功用；\n- 选项D、E为辛凉解表方的功用。\n\n故正确答案为A。",
        "A",
        False,
    ),
    (
        "chat",
        "vir",
        "正确答案是：**A、B、E**\n\n- 乙型肝炎病毒（HBV）：嗜肝DNA病毒科 ✅\n- 单纯疱疹病毒（HSV）：疱疹病毒科，DNA病毒 ✅\n"
        "- 流感病毒：正黏病毒科，RNA病毒 ❌\n- 人类免疫缺陷病毒（HIV）：逆转录病毒科，RNA病毒 ❌\n- 腺病毒：DNA病毒 ✅",
        "ABE",
        False,
    ),
    (
        "chat",
        "gn",
        "小儿急性肾小球肾炎多为A组β溶血性链球菌感染后引起，前驱感染以呼吸道感染（如扁桃体炎、咽炎）最常见，"
        "其次为皮肤感染（脓疱疮）。\n\n答案：B",
        "B",
        False,
    ),
    (
        "chat",
        "liver",
        "您好！这是一道关于肝硬化病因的题目。\n\n在欧美国家，酒精性肝病是肝硬化的主要原因；而在我国，"
        "乙型肝炎病毒感染仍是最主要的病因。\n\n因此本题选择 **B. 病毒性肝炎**。希望对您有帮助！",
        "B",
        False,
    ),
    # ---------------------------------------------------------------- reasoning models (<think>)
    (
        "reasoning",
        "crp",
        "<think>\n题目问细菌感染时明显升高的指标。血沉也会升高但不特异，A不对。淋巴细胞是病毒感染升高，C不对。"
        "C反应蛋白是急性时相蛋白，细菌感染时明显升高，应该选B。\n</think>\n\n答案：B",
        "B",
        False,
    ),
    (
        "reasoning",
        "liver",
        "<think>\n嗯，这题问我国肝硬化最常见病因。欧美是酒精性，选A？不对，我国是乙肝大国，应该是病毒性肝炎，B。\n</think>\n\n"
        "**答案：B. 病毒性肝炎**",
        "B",
        False,
    ),
    (
        "reasoning",
        "gc",
        "<think>\n糖皮质激素的不良反应：骨质疏松(A)对，升高血糖所以B错，感染C对，溃疡D对，低钾所以E错。\n</think>\n答案：ACD",
        "ACD",
        False,
    ),
    (
        "reasoning",
        "ami",
        "<think>\n首先考虑A，肌红蛋白出现最早……但特异性差。再看C，肌钙蛋白",
        "",
        False,
    ),  # truncated at max_new_tokens inside the thinking: no final answer
    # ---------------------------------------------------------------- English
    ("english", "ami", "The answer is C.", "C", False),
    ("english", "liver", "Answer: (B) Viral hepatitis", "B", False),
    ("english", "ns", "The correct options are A, B, D and E.", "ABDE", False),
    (
        "english",
        "thy",
        "E. Fine-needle aspiration cytology is the most reliable method to differentiate benign from malignant thyroid nodules.",
        "E",
        False,
    ),
    (
        "english",
        "gc",
        "Answer: A, C, D. Glucocorticoids cause hyperglycemia, not hypoglycemia, and hypokalemia rather than hyperkalemia.",
        "ACD",
        False,
    ),
    (
        "english",
        "hbv",
        "The best answer is C (HBeAg), which indicates active viral replication and high infectivity. HBsAg (A) only indicates infection.",
        "C",
        False,
    ),
    ("english", "acei", "I would choose D.", "D", False),
    ("english", "mht", "Correct answer: A", "A", False),
    ("english", "liver", "Option B is correct.", "B", False),
    ("english", "crp", "The answer is B, C-reactive protein.", "B", False),
    ("english", "liver", "I think the answer is A.", "A", False),
    (
        "english",
        "ami",
        "Among the options, A (myoglobin) rises earliest, but the most specific marker is cardiac troponin. So the answer is C.",
        "C",
        False,
    ),
    # ---------------------------------------------------------------- self-corrections
    (
        "correction",
        "liver",
        "答案：A\n\n等等，我重新考虑一下。在我国，肝硬化最常见的病因是病毒性肝炎，尤其是乙型肝炎，所以应选B。",
        "B",
        False,
    ),
    (
        "correction",
        "ami",
        "初步判断为A，肌红蛋白出现最早。但题目问的是特异性最高，因此最终答案：C",
        "C",
        False,
    ),
    (
        "correction",
        "thy",
        "答案：C\n更正：B超只能初步判断，最可靠的是细针穿刺细胞学检查，答案应为E。",
        "E",
        False,
    ),
    ("correction", "gc", "答案：ABCD\n重新考虑：糖皮质激素升高血糖，B错误。最终答案：ACD", "ACD", False),
    (
        "correction",
        "acei",
        "D选项钙通道阻滞剂降压效果好，但对于糖尿病肾病，ACEI能减少蛋白尿、保护肾功能。综上，本题选C。",
        "C",
        False,
    ),
    (
        "correction",
        "hbv",
        "A项HBsAg阳性表示感染HBV；B项抗-HBs为保护性抗体；D项抗-HBc提示既往或现症感染；C项HBeAg阳性提示病毒复制活跃、传染性强。故选C。",
        "C",
        False,
    ),
    (
        "correction",
        "mht",
        "答案B。\n不对，B是小青龙汤的功用，麻黄汤应为发汗解表，宣肺平喘，故选A。",
        "A",
        False,
    ),
    ("correction", "ns", "答案：ABCDE\n更正：血尿并非肾病综合征诊断依据，正确答案为ABDE。", "ABDE", False),
    (
        "correction",
        "liver",
        "选E。血吸虫病在部分地区多见……不过从全国范围来看，病毒性肝炎才是最常见病因，最终答案是B。",
        "B",
        False,
    ),
    (
        "correction",
        "b12",
        "我的答案是B。\n\n重新考虑后：恶性贫血是由于内因子缺乏导致维生素B12吸收障碍，应选C。",
        "C",
        False,
    ),
    (
        "correction",
        "gn",
        "答案：A\n\n抱歉，上面回答有误。小儿急性肾小球肾炎最常见的前驱感染是呼吸道链球菌感染，正确答案是B。",
        "B",
        False,
    ),
    (
        "correction",
        "vir",
        "答案：ABD\n仔细核对：HIV是RNA病毒（逆转录病毒），D错误；腺病毒是DNA病毒。最终答案：ABE",
        "ABE",
        False,
    ),
    ("correction", "crp", "最初我倾向于A（血沉），但血沉特异性差。综上所述，答案为B。", "B", False),
    # ---------------------------------------------------------------- JSON
    ("json", "liver", '{"answer": "B"}', "B", False),
    ("json", "gc", '```json\n{"答案": ["A", "C", "D"]}\n```', "ACD", False),
    (
        "json",
        "ami",
        '{"choice": "C", "reason": "心肌肌钙蛋白特异性最高，A项肌红蛋白出现最早但特异性差"}',
        "C",
        False,
    ),
    (
        "json",
        "thy",
        '{"选项": "E", "解析": "B超检查（C）可初步判断结节性质，但确诊依赖细针穿刺"}',
        "E",
        False,
    ),
    ("json", "ns", '{"正确答案": "A、B、D、E"}', "ABDE", False),
    (
        "json",
        "hbv",
        '```json\n{\n  "answer": "C",\n  "explanation": "HBeAg阳性提示HBV复制活跃，传染性强；HBsAg阳性仅提示感染。"\n}\n```',
        "C",
        False,
    ),
    ("json", "acei", '{"answer": "D"}', "D", False),
    ("json", "vir", '{"answer": ["A", "B", "E"], "explanation": "流感病毒和HIV均为RNA病毒。"}', "ABE", False),
    ("json", "mht", '{"答案": "A. 发汗解表，宣肺平喘"}', "A", False),
    (
        "json",
        "gc",
        '{"answer": "ACD", "analysis": "B错误，糖皮质激素升高血糖；E错误，可致低钾血症。"}',
        "ACD",
        False,
    ),
    ("json", "crp", '```json\n{"choice": "B"}\n```\n答案为B。', "B", False),
    (
        "json",
        "liver",
        '根据题目分析，输出如下：\n```json\n{"answer": "B", "confidence": 0.92}\n```',
        "B",
        False,
    ),
    ("json", "b12", '{"正确答案": "C", "理由": "内因子缺乏致维生素B12吸收障碍"}', "C", False),
    ("json", "gn", "{'answer': 'B'}", "B", False),
    ("json", "ami", '{"answer": ["C"]}', "C", False),
    (
        "json",
        "thy",
        '{"answer": "C", "explanation": "B超检查无创、便捷，是甲状腺结节的首选检查。"}',
        "C",
        False,
    ),
    # ---------------------------------------------------------------- option-by-option verdicts
    (
        "verdicts",
        "liver",
        "A. 酒精性肝病——错误，西方国家常见。\nB. 病毒性肝炎——正确，我国以乙肝为主。\nC. 胆汁淤积——错误。\nD. 药物或毒物——错误。\nE. 血吸虫病——错误。",
        "B",
        False,
    ),
    ("verdicts", "gc", "A正确\nB错误\nC正确\nD正确\nE错误", "ACD", False),
    ("verdicts", "ns", "A ✓\nB ✓\nC ✗\nD ✓\nE ✓", "ABDE", False),
    (
        "verdicts",
        "vir",
        "A项正确，HBV是DNA病毒。B项正确，HSV是DNA病毒。C项错误，流感病毒是RNA病毒。D项错误，HIV是逆转录RNA病毒。E项正确，腺病毒是DNA病毒。因此答案为ABE。",
        "ABE",
        False,
    ),
    (
        "verdicts",
        "ami",
        "逐项分析：\nA. 肌红蛋白：出现最早，但特异性差，错误。\nB. CK-MB：特异性较高，但不如肌钙蛋白，错误。\nC. 心肌肌钙蛋白：特异性和敏感性最高，正确。\nD. AST：特异性差，错误。\nE. LDH：特异性差，错误。",
        "C",
        False,
    ),
    (
        "verdicts",
        "gc",
        "A. 骨质疏松 √\nB. 低血糖 ×\nC. 诱发或加重感染 √\nD. 消化性溃疡 √\nE. 高钾血症 ×",
        "ACD",
        False,
    ),
    ("verdicts", "hbv", "A错误 B错误 C正确 D错误", "C", False),
    (
        "verdicts",
        "thy",
        "A项甲状腺功能测定不能鉴别良恶性，错误；B项核素扫描冷结节也可能是良性，错误；C项B超可提示但不能确诊，错误；D项CT价值有限，错误；E项细针穿刺细胞学检查最可靠，正确。故本题选E。",
        "E",
        False,
    ),
    ("verdicts", "ns", "A正确；B正确；C正确；D正确；E错误。", "ABCD", False),
    (
        "verdicts",
        "gc",
        "A项正确。B项错误，应为高血糖。C项正确。D项正确。E项错误，应为低钾血症。",
        "ACD",
        False,
    ),
    # ---------------------------------------------------------------- brackets
    ("bracket", "ns", "ABDE（C错误）", "ABDE", False),
    ("bracket", "thy", "甲状腺结节良恶性难以判断时，首选穿刺检查（E）。", "E", False),
    ("bracket", "gc", "ACD（B、E错误）", "ACD", False),
    ("bracket", "liver", "我国肝硬化最常见的病因是病毒性肝炎（B），西方国家则以酒精性肝病为主。", "B", False),
    ("bracket", "ami", "特异性最高的是心肌肌钙蛋白（C）。肌红蛋白（A）出现最早但特异性差。", "C", False),
    ("bracket", "vir", "ABE（C、D为RNA病毒）", "ABE", False),
    ("bracket", "acei", "首选ACE抑制剂（C），可降低尿蛋白、延缓肾功能恶化。", "C", False),
    ("bracket", "hbv", "应选HBeAg（C）。", "C", False),
    ("bracket", "ns", "ABDE (C is not a diagnostic criterion)", "ABDE", False),
    # ---------------------------------------------------------------- answer given as option text
    ("option_text", "thy", "细针穿刺细胞学检查", "E", False),
    ("option_text", "liver", "病毒性肝炎", "B", False),
    ("option_text", "ami", "心肌肌钙蛋白是诊断急性心肌梗死特异性最高的标志物。", "C", False),
    ("option_text", "mht", "发汗解表，宣肺平喘", "A", False),
    ("option_text", "liver", "应该是病毒性肝炎（主要是乙型肝炎）", "B", False),
    ("option_text", "b12", "维生素B12", "C", False),
    ("option_text", "crp", "C反应蛋白", "B", False),
    ("option_text", "hbv", "HBeAg", "C", False),
    ("option_text", "acei", "ACE抑制剂", "C", False),
    ("option_text", "thy", "B超检查", "C", False),
    ("option_text", "ami", "答案是肌钙蛋白", "C", False),
    ("option_text", "gn", "呼吸道链球菌感染，以A组β溶血性链球菌为主", "B", False),
    ("option_text", "gc", "骨质疏松、诱发或加重感染、消化性溃疡", "ACD", False),
    ("option_text", "liver", "酒精性肝病", "A", False),
    ("option_text", "mht", "解肌发表，调和营卫（桂枝汤）", "C", False),
    # ---------------------------------------------------------------- base-model rambling
    (
        "rambling",
        "liver",
        "B\n\n我国肝硬化最常见的病因是\nA.酒精性肝病\nB.病毒性肝炎\nC.胆汁淤积\nD.药物或毒物\nE.血吸虫病",
        "B",
        False,
    ),
    (
        "rambling",
        "ami",
        "答案：C\n\n2. 急性心肌梗死最早出现的心肌标志物是\nA.肌红蛋白\nB.CK-MB\nC.肌钙蛋白\nD.AST\nE.LDH\n答案：A",
        "C",
        False,
    ),
    (
        "rambling",
        "thy",
        "E\n\n下列哪项不是甲状腺功能亢进症的临床表现\nA.怕热多汗\nB.心动过速\nC.体重增加\nD.手抖\nE.突眼\n答案：C\n\n下列",
        "E",
        False,
    ),
    (
        "rambling",
        "gc",
        "ACD\n\n【解析】糖皮质激素可引起医源性库欣综合征、骨质疏松、诱发感染、消化性溃疡等。\n\n"
        "【例题】下列哪项不是糖皮质激素的适应证（ ）\nA.感染性休克\nB.系统性红斑狼疮\nC.水痘\nD.肾病综合征\nE.支气管哮喘\n【答案】C",
        "ACD",
        False,
    ),
    (
        "rambling",
        "liver",
        "我国肝硬化最常见的病因是（ ）\nA.酒精性肝病\nB.病毒性肝炎\nC.胆汁淤积\nD.药物或毒物\nE.血吸虫病\n【答案】B\n"
        "【解析】我国以病毒性肝炎所致肝硬化为主。",
        "B",
        False,
    ),
    (
        "rambling",
        "mht",
        "麻黄汤的功用是发汗解表，宣肺平喘。麻黄汤由麻黄、桂枝、杏仁、甘草组成，主治外感风寒表实证。桂枝汤的功用是解肌发表，调和营卫。小青龙汤的功用是解表散寒，温肺化饮。",
        "A",
        False,
    ),
    ("rambling", "hbv", "C\nC\nC\nC\nC\nC", "C", False),
    ("rambling", "ami", "答案：C 答案：C 答案：C 答案：C", "C", False),
    (
        "rambling",
        "gn",
        "B。急性肾小球肾炎多见于儿童，常于链球菌感染后1~3周发病，A组β溶血性链球菌是最常见的致病菌。临床表现为血尿、蛋白尿、水肿和高血压。",
        "B",
        False,
    ),
    (
        "rambling",
        "ns",
        "ABDE\n\n肾病综合征诊断标准：①尿蛋白大于3.5g/d；②血浆白蛋白低于30g/L；③水肿；④血脂升高。其中①②两项为诊断所必需。\n\n"
        "1.肾病综合征最常见的并发症是\nA.感染\nB.血栓\nC.急性肾衰竭\nD.蛋白质营养不良\nE.内分泌紊乱\n答案：A",
        "ABDE",
        False,
    ),
    (
        "rambling",
        "acei",
        "糖尿病肾病合并高血压患者首选的降压药物是\nA.噻嗪类利尿剂\nB.β受体阻滞剂\nC.ACE抑制剂\nD.钙通道阻滞剂\nE.α受体阻滞剂",
        "",
        False,
    ),
    # ---------------------------------------------------------------- refusals
    (
        "refusal",
        "liver",
        "抱歉，我是一个AI语言模型，无法提供医学诊断建议。如有健康问题，请咨询专业医生。",
        "",
        False,
    ),
    (
        "refusal",
        "ami",
        "对不起，我无法回答这个问题。A、B、C、D、E各选项涉及的检测指标需由临床医生结合病情判断。",
        "",
        False,
    ),
    (
        "refusal",
        "thy",
        "作为AI助手，我不能替代专业医生的判断。关于甲状腺结节的检查，B超和细针穿刺都是常用手段，请遵医嘱。",
        "",
        False,
    ),
    (
        "refusal",
        "gc",
        "I'm sorry, but I can't provide medical advice. Please consult a healthcare professional regarding options A through E.",
        "",
        False,
    ),
    (
        "refusal",
        "hbv",
        "这个问题我无法确定答案，建议查阅《传染病学》教材中关于乙肝血清学标志物的章节。",
        "",
        False,
    ),
    ("refusal", "mht", "很抱歉，我不能回答中医方剂相关的问题。", "", False),
    # ---------------------------------------------------------------- hedges
    ("hedge", "liver", "A或B", "", True),
    ("hedge", "ami", "可能是A也可能是C", "", True),
    ("hedge", "thy", "C或E都可以", "", True),
    ("hedge", "hbv", "答案：A、B、C、D", "", True),
    ("hedge", "liver", "A、B、C、D、E都有可能，需要结合具体地区判断。", "", True),
    ("hedge", "gc", "不确定，可能是ACD，也可能是ABCD。", "", True),
    ("hedge", "mht", "我觉得是A或者C，两者都有解表作用。", "", True),
    ("hedge", "crp", "It could be either B or C.", "", True),
    ("hedge", "acei", "C或D均可作为首选。", "", True),
    # ---------------------------------------------------------------- unresolved conflicts
    ("conflict", "liver", "答案：A\n答案：B", "", True),
    ("conflict", "ami", "答案是C。\n\n解析：CK-MB对早期诊断意义大，因此答案是B。", "", True),
    ("conflict", "gc", '{"answer": "ACD"}\n\n答案：ABD', "", True),
    # ---------------------------------------------------------------- Latin letters that are not answers
    (
        "latin_terms",
        "thy",
        "鉴别良恶性最可靠的是细针穿刺细胞学检查，B超只能提供初步信息。答案：E",
        "E",
        False,
    ),
    ("latin_terms", "hbv", "HBsAg阳性仅表示感染，HBeAg阳性提示复制活跃。答案C。", "C", False),
    ("latin_terms", "vir", "HBV、HSV和腺病毒均为DNA病毒，流感病毒和HIV为RNA病毒。答案：ABE", "ABE", False),
    ("latin_terms", "acei", "ACE抑制剂能降低肾小球内压，减少蛋白尿，首选。答案：C", "C", False),
    ("latin_terms", "b12", "恶性贫血因内因子缺乏致维生素B12吸收障碍，故选C。", "C", False),
    ("latin_terms", "crp", "选B。C反应蛋白在细菌感染时明显升高，病毒感染时多正常或轻度升高。", "B", False),
    ("latin_terms", "ami", "CK-MB和cTnI都可用于诊断，但cTnI特异性更高，故答案为C。", "C", False),
    ("latin_terms", "thy", "患者应先行B超检查，发现可疑结节后行FNA。本题答案E。", "E", False),
    ("latin_terms", "liver", "HBV感染是我国肝硬化的主要病因，HCV次之。答案B", "B", False),
    ("latin_terms", "gc", "长期使用可致HPA轴抑制、骨质疏松、感染及溃疡。答案ACD", "ACD", False),
    ("latin_terms", "acei", "ACEI/ARB是首选，CCB可联合使用。选C", "C", False),
    ("latin_terms", "hbv", "HBeAg positivity indicates high infectivity. Answer: C", "C", False),
    ("latin_terms", "acei", "首选ACEI类药物，可减少尿蛋白。", "C", False),
    ("latin_terms", "crp", "CRP升高提示细菌感染，答案是B。", "B", False),
    # ---------------------------------------------------------------- negations
    ("negation", "ami", "A、B均不正确，答案C", "C", False),
    ("negation", "liver", "不是A，是B。", "B", False),
    ("negation", "thy", "本题不选C，B超不能确诊，应选E。", "E", False),
    ("negation", "gc", "B和E不对，其余都对。", "ACD", False),
    ("negation", "hbv", "A不对，B也不对，D也不对，答案是C。", "C", False),
    ("negation", "ns", "除C外均正确，答案ABDE。", "ABDE", False),
    ("negation", "crp", "答案不是C，而是B。", "B", False),
    ("negation", "mht", "答案不是B（那是小青龙汤），也不是C（那是桂枝汤），应为A。", "A", False),
    ("negation", "liver", "Not A; the answer is B.", "B", False),
    # ---------------------------------------------------------------- qa-shaped (answer/explanation markers)
    (
        "qa",
        "liver",
        "答案：B\n理由：我国肝硬化以病毒性肝炎（尤其是乙型肝炎）为主要病因，A项酒精性肝病在欧美国家多见。",
        "B",
        False,
    ),
    (
        "qa",
        "ami",
        "答案：C\n理由：心肌肌钙蛋白特异性最高，A项肌红蛋白出现早但特异性差，B项CK-MB次之。",
        "C",
        False,
    ),
    ("qa", "gc", "答案：A、C、D\n理由：糖皮质激素可升高血糖（B错误），可致低钾血症（E错误）。", "ACD", False),
    ("qa", "thy", "答案：E\n理由：B超检查（C）只能初步判断，确诊依赖细针穿刺细胞学检查。", "E", False),
    (
        "qa",
        "ns",
        "答案：ABDE\n理由：肾病综合征诊断标准为大量蛋白尿、低白蛋白血症、水肿和高脂血症，血尿不是诊断依据。",
        "ABDE",
        False,
    ),
    ("qa", "hbv", "根据题干分析，\n答案：C\n理由：HBeAg阳性提示病毒复制活跃。", "C", False),
    ("qa", "acei", "答案：D\n理由：钙通道阻滞剂降压效果确切，对糖脂代谢无不良影响。", "D", False),
    ("qa", "mht", "答案：A\n理由：麻黄汤发汗解表，宣肺平喘；B为小青龙汤功用，C为桂枝汤功用。", "A", False),
    ("qa", "vir", "答案：A、B、E\n理由：C流感病毒、D人类免疫缺陷病毒均为RNA病毒。", "ABE", False),
    ("qa", "liver", "答案：\n理由：在我国，肝硬化最常见病因为病毒性肝炎，故选B。", "B", False),
    ("qa", "gn", "答案：B\n理由：A组β溶血性链球菌引起的上呼吸道感染是最常见的前驱感染。", "B", False),
    ("qa", "crp", "答案：B\n理由：C反应蛋白在细菌感染时显著升高。", "B", False),
    ("qa", "b12", "答案：C\n理由：维生素B12吸收需要内因子，恶性贫血患者内因子缺乏。", "C", False),
    ("qa", "liver", "答案：A\n理由：酒精性肝病在西方多见，我国以病毒性肝炎为主，因此答案应为B。", "B", False),
    ("qa", "thy", "答案：C. B超检查\n理由：B超可明确结节大小、形态及血流。", "C", False),
    # ---------------------------------------------------------------- the shipped qa template (cue in prompt)
    ("qa_template", "liver", "B\n理由：我国肝硬化以病毒性肝炎为主。", "B", False),
    ("qa_template", "gc", "A、C、D\n理由：B错误，应为高血糖；E错误，应为低钾。", "ACD", False),
    ("qa_template", "thy", "E\n理由：B超不能确诊，细针穿刺细胞学检查最可靠。", "E", False),
    ("qa_template", "crp", "B\n理由：C反应蛋白是急性时相反应蛋白。", "B", False),
]

# Misses measured on the first run (keyed by output text), kept in the table; see the module docstring.
LETTER_MISSES: dict[str, str] = {
    # Needs the question stem (麻黄汤), which read_answer does not receive: every formula's 功用 is
    # stated the same way, so nothing in the output tells which option is the answer.
    "麻黄汤的功用是发汗解表，宣肺平喘。麻黄汤由麻黄、桂枝、杏仁、甘草组成，主治外感风寒表实证。桂枝汤的功用是解肌发表，调和营卫。小青龙汤的功用是解表散寒，温肺化饮。": "rambling naming other formulas' 功用 read as ABC",
}
AMBIGUITY_MISSES: dict[str, str] = {}

# Letters right on the first run (before any xfail marking): the summary's floor.
FIRST_RUN_LETTERS_RIGHT = 192  # of 207; flag right 202 of 207


def _row_id(i: int, row) -> str:
    return f"{i:03d}-{row[0]}-{row[1]}"


def _read(row):
    style, q, output, _, _ = row
    answer_marker, explanation_marker = MARKERS.get(style, (None, None))
    return read_answer(output, QUESTIONS[q][1], answer_marker, explanation_marker)


def _params(misses: dict[str, str]):
    out = []
    for i, row in enumerate(ROWS):
        output = row[2]
        reason = f"held-out miss: {misses[output]}" if output in misses else ""
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(i, id=_row_id(i, row), marks=marks))
    return out


def test_table_is_well_formed():
    assert len(ROWS) >= 120
    outputs = [row[2] for row in ROWS]
    assert len(set(outputs)) == len(outputs)  # misses are keyed by output text
    assert set(LETTER_MISSES) <= set(outputs) and set(AMBIGUITY_MISSES) <= set(outputs)
    for _style, q, output, expected, ambiguous in ROWS:
        options = QUESTIONS[q][1]
        assert output.strip()
        assert all(letter in options for letter in expected)
        assert expected == "".join(sorted(set(expected), key=list(options).index))
        if ambiguous:
            assert expected == ""


@pytest.mark.parametrize("i", _params(LETTER_MISSES))
def test_heldout_letters(i):
    row = ROWS[i]
    assert _read(row).letters == row[3]


@pytest.mark.parametrize("i", _params(AMBIGUITY_MISSES))
def test_heldout_ambiguity(i):
    row = ROWS[i]
    assert _read(row).ambiguous is row[4]


def test_heldout_summary(capsys):
    per_style: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # rows, letters right, flag right
    for row in ROWS:
        reading = _read(row)
        stats = per_style[row[0]]
        stats[0] += 1
        stats[1] += reading.letters == row[3]
        stats[2] += reading.ambiguous is row[4]
    total = sum(s[0] for s in per_style.values())
    right = sum(s[1] for s in per_style.values())
    flag_right = sum(s[2] for s in per_style.values())
    with capsys.disabled():
        print(f"\n{'style':<14}{'rows':>5}{'right':>7}{'letters%':>10}{'flag%':>8}")
        for style, (n, r, f) in per_style.items():
            print(f"{style:<14}{n:>5}{r:>7}{100 * r / n:>9.1f}%{100 * f / n:>7.1f}%")
        print(
            f"{'overall':<14}{total:>5}{right:>7}{100 * right / total:>9.1f}%{100 * flag_right / total:>7.1f}%"
        )
    assert total == len(ROWS)
    # Measured, not aspirational: the floor is what the first run got.
    assert right >= FIRST_RUN_LETTERS_RIGHT
