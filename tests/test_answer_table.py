"""The robust answer reader on a large table of realistic outputs, and the RL exam reward on it.

Every row is one output a model could plausibly give to a real-looking CMExam-style question,
tagged with its style, with the letters the robust reader must return ("" = no answer) and
whether it must flag the output as ambiguous. Rows are read the way evaluation reads them for
the row's template (``qa`` unless stated), through :func:`medtune.evaluation.extract.read_answer`.
Wrong answers, hedges and refusals are included on purpose: the reader must return what the
model said, not the gold answer.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import pytest

from medtune.evaluation.extract import read_answer
from medtune.templates import get_template
from medtune.train.rewards import exam_reward, has_answer_format

# ---- questions ------------------------------------------------------------------------------

# 可产生血浆凝固酶的细菌是 (B)
BACT = {"A": "肺炎链球菌", "B": "金黄色葡萄球菌", "C": "大肠埃希菌", "D": "铜绿假单胞菌", "E": "肺炎克雷伯菌"}
# 下列哪种病变引起的胸痛常沿一侧肋间神经分布 (D)
CHEST = {"A": "胸肌劳损", "B": "流行性胸痛", "C": "颈椎病", "D": "带状疱疹", "E": "皮下蜂窝组织炎"}
# 下列属于脂溶性维生素的是 (AC; four options)
VIT = {"A": "维生素A", "B": "维生素C", "C": "维生素D", "D": "维生素B1"}
# 夜间静息时发作胸痛，发作时ST段抬高，最可能的诊断是 (B)
ANGINA = {"A": "稳定型心绞痛", "B": "变异型心绞痛", "C": "急性心肌梗死", "D": "心绞痛", "E": "主动脉夹层"}
# 怀疑结核性胸腔积液，首选的检查是 (E)
PLEURAL = {"A": "胸部CT", "B": "结核菌素试验", "C": "胸部X线", "D": "痰涂片抗酸染色", "E": "胸腔穿刺抽液检查"}
# 长期吸烟，咳嗽咳痰20年，FEV1/FVC<70%，最可能的诊断是 (B)
COPD = {"A": "支气管哮喘", "B": "慢性阻塞性肺疾病（COPD）", "C": "支气管扩张症", "D": "肺结核", "E": "间质性肺疾病"}
# 可引起血沉明显增快的是 (ACD; multi-answer)
ESR = {"A": "结核病活动期", "B": "心绞痛", "C": "急性心肌梗死", "D": "多发性骨髓瘤", "E": "单纯性肥胖"}
# 甲状腺功能亢进症首选的实验室检查是 (A; four options)
THYROID = {"A": "血清TSH测定", "B": "甲状腺摄131I率", "C": "血清TT4测定", "D": "甲状腺B超"}
# 下列属于糖皮质激素不良反应的是 (ABD; four options)
STEROID = {"A": "骨质疏松", "B": "向心性肥胖", "C": "低血糖", "D": "消化性溃疡"}
# 高血压合并糖尿病肾病，首选的降压药是 (C)
HTN = {"A": "氢氯噻嗪", "B": "美托洛尔", "C": "依那普利（ACEI）", "D": "硝苯地平", "E": "呋塞米"}
# Which drug lowers mortality after myocardial infarction? (B)
DRUGS = {"A": "Aspirin", "B": "Beta blocker", "C": "Calcium channel blocker", "D": "Digoxin", "E": "Enalapril"}
# 女性，30岁，间断尿路刺激症状两年，尿白细胞管型，尿细菌培养阳性。其诊断是 (C)
KIDNEY = {"A": "急性肾盂肾炎", "B": "慢性肾炎", "C": "慢性肾盂肾炎", "D": "急性膀胱炎", "E": "肾结核"}
# 下列诊断支气管哮喘的依据，错误的是 (B; the question asks for the wrong statement)
ASTHMA = {"A": "有反复发作喘息的病史", "B": "发作时有吸气性呼吸困难", "C": "肺部弥漫性哮鸣音", "D": "支气管扩张药治疗有效",
          "E": "必要时进行支气管激发试验"}
# 对急性支气管炎与流行性感冒的鉴别，最有意义的是 (E)
FLU = {"A": "发热", "B": "咳痰", "C": "肺部啰音", "D": "白细胞计数", "E": "流行病学史"}
# 男，30岁。高热、寒战2天，胸痛，咳嗽，痰中带血，右肺中部湿啰音。应首先考虑的是 (B)
PNEU = {"A": "急性支气管炎", "B": "肺炎", "C": "肺结核", "D": "肺癌", "E": "支气管哮喘"}
# 可引起低钾血症的利尿药是 (AB; four options)
DIUR = {"A": "呋塞米", "B": "氢氯噻嗪", "C": "螺内酯", "D": "氨苯蝶啶"}


class Row(NamedTuple):
    style: str
    output: str
    options: dict[str, str]
    gold: str
    expected: str  # letters the reader must return; "" = no answer
    ambiguous: bool = False
    template: str = "qa"
    xfail: str = ""  # why the reader gets this row wrong (the row must keep failing)


def R(style, options, gold, output, expected, ambiguous=False, template="qa", xfail=""):  # noqa: N802 -- shorthand
    return Row(style, output, options, gold, expected, ambiguous, template, xfail)


ROWS: list[Row] = [
    # ---- plain: canonical template outputs, right and wrong ------------------------------------
    R("plain", BACT, "B", "B\n理由：金黄色葡萄球菌可产生血浆凝固酶。", "B"),
    R("plain", CHEST, "D", "D\n理由：带状疱疹沿一侧肋间神经分布。", "D"),
    R("plain", CHEST, "D", "A\n理由：胸肌劳损可引起局部胸痛。", "A"),
    R("plain", VIT, "AC", "答案：AC\n理由：维生素A、D为脂溶性维生素。", "AC", template="chat"),
    R("plain", ANGINA, "B", "变异型心绞痛多在夜间静息时发作，发作时ST段抬高。\n正确选项：B.变异型心绞痛", "B",
      template="analysis_first"),
    R("plain", PLEURAL, "E", "答案: E 胸腔穿刺抽液检查. \n 解释:可明确积液性质。", "E", template="cmexam_paper"),
    R("plain", PLEURAL, "E", "答案: A 胸部CT. \n 解释:CT可显示少量积液。", "A", template="cmexam_paper"),
    R("plain", ESR, "ACD", "ACD\n理由：结核病活动期、急性心肌梗死、多发性骨髓瘤均可致血沉增快。", "ACD"),
    R("plain", BACT, "B", "b\n理由：凝固酶阳性。", "B"),
    R("plain", BACT, "B", "Ｂ\n理由：凝固酶阳性。", "B"),
    R("plain", BACT, "B", "**答案：B**\n**理由**：金黄色葡萄球菌产生凝固酶。", "B"),
    R("plain", BACT, "B", "C\n理由：大肠埃希菌是常见的条件致病菌。", "C"),
    R("plain", BACT, "B", "正确答案是B。", "B"),
    R("plain", THYROID, "A", "答案：A\n答案：A", "A"),
    # ---- self-correction: the last final answer wins ---------------------------------------------
    R("self_correction", BACT, "B", "A\n理由：肺炎链球菌……不对，肺炎链球菌不产生凝固酶，更正：答案为B。", "B"),
    R("self_correction", BACT, "B", "答案：A。\n再仔细分析：血浆凝固酶是金黄色葡萄球菌的特征性酶，故选B。", "B"),
    R("self_correction", BACT, "B", "初步考虑C，大肠埃希菌较常见。但题干强调血浆凝固酶，最终答案：B", "B"),
    R("self_correction", BACT, "B", "答案：C\n理由：大肠埃希菌较常见。重新考虑，凝固酶阳性的是金黄色葡萄球菌，应选B。", "B"),
    R("self_correction", BACT, "B", "答案：B\n理由：金黄色葡萄球菌可产生凝固酶，但铜绿假单胞菌也可致化脓感染，综上，选D。", "D"),
    R("self_correction", CHEST, "D", "我先选B，流行性胸痛也可出现胸痛。\n不对，沿肋间神经分布的是带状疱疹，因此选D。", "D"),
    R("self_correction", CHEST, "D", "答案：D\n理由：带状疱疹沿肋间神经分布，疼痛剧烈。因此本题选D。", "D"),
    R("self_correction", ANGINA, "B", "最可能是A。等等，患者夜间静息发作且ST段抬高，这是变异型心绞痛的特点，更正为B。", "B"),
    R("self_correction", ANGINA, "B",
      "答案：C\n理由：ST段抬高提示心肌梗死。\n更正：胸痛夜间静息发作、可自行缓解，应为变异型心绞痛，答案改为B。", "B"),
    R("self_correction", VIT, "AC", "答案：A\n理由：维生素A是脂溶性维生素。\n更正：维生素D同样是脂溶性维生素，正确答案应为AC。",
      "AC"),
    R("self_correction", VIT, "AC", "答案：ACD\n理由：不对，维生素B1是水溶性维生素。最终答案：AC", "AC"),
    R("self_correction", BACT, "B",
      "The answer is A. Wait, pneumococcus does not produce coagulase; the correct answer is B.", "B"),
    R("self_correction", BACT, "B", "答案：E\n理由：肺炎克雷伯菌……\n答案修正为B", "B"),
    R("self_correction", PLEURAL, "E", "首选胸部CT（A）。\n再考虑一下，明确积液性质需抽液化验，故最终选E。", "E"),
    R("self_correction", PLEURAL, "E", "答案：E\n理由：穿刺可明确性质，但考虑到安全性，最终答案：A", "A"),
    R("self_correction", COPD, "B", "答案：A\n理由：喘息……\n重新审题，患者FEV1/FVC<70%且长期吸烟，所以选B。", "B"),
    # ---- JSON and code-fenced JSON -------------------------------------------------------------
    R("json", BACT, "B", '{"answer": "B", "reason": "金黄色葡萄球菌可产生血浆凝固酶"}', "B"),
    R("json", BACT, "B", '```json\n{\n  "答案": "B",\n  "解释": "A项肺炎链球菌不产生凝固酶"\n}\n```', "B"),
    R("json", VIT, "AC", '{"answer": ["A", "C"]}', "AC"),
    R("json", VIT, "AC", '{"正确答案": "A,C", "理由": "维生素A、D为脂溶性"}', "AC"),
    R("json", VIT, "AC", '{"choice": "A"}', "A"),
    R("json", CHEST, "D", '{"选项": "D", "分析": "带状疱疹沿肋间神经分布"}', "D"),
    R("json", CHEST, "D", '{"answer": "B"}', "B"),
    R("json", ANGINA, "B", '```json\n{"correct_answer": "B", "explanation": "Prinzmetal angina"}\n```', "B"),
    R("json", BACT, "B", '{"answer": "A或B"}', "", True),
    R("json", BACT, "B", '{"answer": ["A", "B", "C", "D", "E"]}', "", True),
    R("json", PLEURAL, "E", '{"正确选项": "E. 胸腔穿刺抽液检查"}', "E"),
    R("json", PLEURAL, "E", '{"answer": "胸腔穿刺抽液检查", "reason": "可明确积液性质"}', "E"),
    R("json", ESR, "ACD", '{"answer": "A、C、D", "confidence": 0.8}', "ACD"),
    R("json", BACT, "B", '{"initial_answer": "A", "final_answer": "B"}', "B"),
    R("json", CHEST, "D", "{'Answer': 'd', 'Reason': 'herpes zoster'}", "D"),
    R("json", STEROID, "ABD", '好的，结果如下：\n```\n{"answer": "ABD"}\n```', "ABD"),
    # ---- option-by-option verdicts, no closing sentence ---------------------------------------
    R("verdicts", BACT, "B",
      "A. 肺炎链球菌 ✗\nB. 金黄色葡萄球菌 ✓\nC. 大肠埃希菌 ✗\nD. 铜绿假单胞菌 ✗\nE. 肺炎克雷伯菌 ✗", "B"),
    R("verdicts", BACT, "B",
      "A 肺炎链球菌：错误，不产生凝固酶。\nB 金黄色葡萄球菌：正确，可产生血浆凝固酶。\nC 大肠埃希菌：错误。\n"
      "D 铜绿假单胞菌：错误。\nE 肺炎克雷伯菌：错误。", "B"),
    R("verdicts", VIT, "AC", "A项正确；B项错误；C项正确；D项错误。", "AC"),
    R("verdicts", VIT, "AC", "A项正确，B项错误，C项错误，D项错误", "A"),
    R("verdicts", CHEST, "D", "A错，B错，C错，D对，E错", "D"),
    R("verdicts", CHEST, "D",
      "胸肌劳损（A错）、流行性胸痛（B错）、颈椎病（C错）均不沿肋间神经分布；带状疱疹（D对）沿肋间神经分布。", "D"),
    R("verdicts", STEROID, "ABD", "A 骨质疏松 √\nB 向心性肥胖 √\nC 低血糖 ×\nD 消化性溃疡 √", "ABD"),
    R("verdicts", ANGINA, "B",
      "选项A：稳定型心绞痛多于劳累时发作，错误。\n选项B：变异型心绞痛静息时发作伴ST段抬高，正确。\n"
      "选项C：急性心肌梗死ST段持续抬高，错误。", "B"),
    R("verdicts", PLEURAL, "E",
      "A. 胸部CT——不是首选\nB. 结核菌素试验——仅作辅助\nC. 胸部X线——只能显示积液\n"
      "D. 痰涂片抗酸染色——阳性率低\nE. 胸腔穿刺抽液检查——正确，可明确积液性质", "E"),
    R("verdicts", VIT, "AC", "A. 维生素A：脂溶性 ✓\nB. 维生素C：水溶性 ✗\nC. 维生素D：脂溶性 ✓\nD. 维生素B1：水溶性 ✗", "AC"),
    R("verdicts", DRUGS, "B",
      "A. Aspirin - incorrect\nB. Beta blocker - correct\nC. Calcium channel blocker - incorrect\nD. Digoxin - incorrect", "B"),
    R("verdicts", CHEST, "D", "胸痛常沿一侧肋间神经分布的是带状疱疹（D对），带状疱疹可见沿神经分布的疱疹，疼痛剧烈。", "D"),
    R("verdicts", STEROID, "ABD", "A选项正确，B选项正确，C选项错误，D选项正确", "ABD"),
    R("verdicts", BACT, "B", "A ✓ 肺炎链球菌\nB ✗ 金黄色葡萄球菌\nC ✗ 大肠埃希菌\nD ✗ 铜绿假单胞菌\nE ✗ 肺炎克雷伯菌", "A"),
    R("verdicts", VIT, "AC", "A ✓\nB ✓\nC ✓\nD ✓", "", True),
    R("verdicts", ANGINA, "B", "A项说法不正确；B项说法正确；C项说法不正确；D项说法不正确；E项说法不正确。", "B"),
    # ---- letter list with an excluded letter in brackets ---------------------------------------
    R("excluded_bracket", STEROID, "ABD", "ABD（C错误）", "ABD"),
    R("excluded_bracket", STEROID, "ABD", "ABD（C：低血糖不是糖皮质激素的不良反应，应为高血糖）", "ABD"),
    R("excluded_bracket", VIT, "AC", "AC（B、D为水溶性维生素）", "AC"),
    R("excluded_bracket", ESR, "ACD", "ACD（B、E错误）\n理由：心绞痛和单纯性肥胖不引起血沉明显增快", "ACD"),
    R("excluded_bracket", ESR, "ACD", "AD（C错误）", "AD"),
    R("excluded_bracket", BACT, "B", "B（A、C、D、E均不产生血浆凝固酶）", "B"),
    R("excluded_bracket", STEROID, "ABD", "答案：ABD（C项错误，糖皮质激素升高血糖）", "ABD"),
    R("excluded_bracket", VIT, "AC", "A、C（排除B、D）", "AC"),
    R("excluded_bracket", STEROID, "ABD", "正确答案：A、B、D（不选C）", "ABD"),
    R("excluded_bracket", CHEST, "D", "D（A、B、C、E均不沿肋间神经分布）", "D"),
    # ---- a letter in brackets after a statement -------------------------------------------------
    R("bracket_letter", PLEURAL, "E", "结核性胸腔积液需明确积液性质，应首选穿刺检查（E）。", "E"),
    R("bracket_letter", CHEST, "D", "沿一侧肋间神经分布的胸痛见于带状疱疹（D）。", "D"),
    R("bracket_letter", ANGINA, "B", "夜间静息发作、ST段一过性抬高，符合变异型心绞痛（B）", "B"),
    R("bracket_letter", ANGINA, "B", "胸痛持续不缓解，考虑急性心肌梗死（C）。", "C"),
    R("bracket_letter", BACT, "B", "不是肺炎链球菌（A），而是金黄色葡萄球菌（B）。", "B"),
    R("bracket_letter", VIT, "AC", "维生素A和维生素D均为脂溶性维生素（A、C）。", "AC"),
    R("bracket_letter", THYROID, "A", "甲亢首选检查为血清TSH测定（A）。", "A"),
    R("bracket_letter", COPD, "B", "吸烟史加持续气流受限，诊断慢阻肺（B）。", "B"),
    R("bracket_letter", PLEURAL, "E", "首选检查：胸腔穿刺抽液（E）\n理由：可明确积液性质", "E"),
    R("bracket_letter", HTN, "C", "高血压合并糖尿病肾病首选ACEI类药物，如依那普利（C）。", "C"),
    R("bracket_letter", BACT, "B", "能产生血浆凝固酶的是金葡菌【B】。", "B"),
    # ---- answer given only as option text -------------------------------------------------------
    R("option_text", BACT, "B", "金黄色葡萄球菌", "B"),
    R("option_text", BACT, "B", "应该是金黄色葡萄球菌吧，它能产生血浆凝固酶。", "B"),
    R("option_text", BACT, "B", "金黄色葡萄球菌（凝固酶阳性葡萄球菌）", "B"),
    R("option_text", CHEST, "D", "带状疱疹。沿肋间神经分布的成簇疱疹伴剧烈疼痛。", "D"),
    R("option_text", ANGINA, "B", "变异型心绞痛（Prinzmetal心绞痛）", "B"),
    R("option_text", ANGINA, "B", "考虑为变异型心绞痛，而非稳定型心绞痛。", "B"),
    R("option_text", COPD, "B", "慢性阻塞性肺疾病", "B"),
    R("option_text", COPD, "B", "该患者应诊断为慢性阻塞性肺疾病，需行支气管舒张试验进一步确认。", "B"),
    R("option_text", COPD, "B", "支气管哮喘可能性大", "A"),
    R("option_text", VIT, "AC", "维生素A和维生素D", "AC"),
    R("option_text", THYROID, "A", "首选血清TSH测定，因为TSH是反映甲状腺功能最敏感的指标。", "A"),
    R("option_text", PLEURAL, "E", "胸腔穿刺抽液检查，可送检ADA、常规和生化。", "E"),
    R("option_text", HTN, "C", "依那普利（ACEI），可减少蛋白尿。", "C"),
    R("option_text", HTN, "C", "首选ACE抑制剂依那普利", "C"),
    R("option_text", DRUGS, "B", "I would choose digoxin.", "D"),
    R("option_text", ESR, "ACD", "结核病活动期、急性心肌梗死和多发性骨髓瘤都会出现血沉明显增快。", "ACD"),
    R("option_text", CHEST, "D", "颈椎病", "C"),
    R("option_text", BACT, "B", "答：肺炎克雷伯菌", "E"),
    # ---- base-model rambling that restates all options -----------------------------------------
    R("restated_options", BACT, "B",
      "A. 肺炎链球菌\nB. 金黄色葡萄球菌\nC. 大肠埃希菌\nD. 铜绿假单胞菌\nE. 肺炎克雷伯菌\n答案：B", "B"),
    R("restated_options", CHEST, "D",
      "选项有：A 胸肌劳损，B 流行性胸痛，C 颈椎病，D 带状疱疹，E 皮下蜂窝组织炎。其中沿肋间神经分布的是带状疱疹。", "D"),
    R("restated_options", VIT, "AC",
      "A: 维生素A\nB: 维生素C\nC: 维生素D\nD: 维生素B1\n脂溶性维生素包括维生素A、D、E、K，所以选AC。", "AC"),
    R("restated_options", ANGINA, "B",
      "问题：夜间静息时发作胸痛，发作时ST段抬高，最可能的诊断是\nA. 稳定型心绞痛\nB. 变异型心绞痛\nC. 急性心肌梗死\n"
      "D. 心绞痛\nE. 主动脉夹层\n答案：B\n解析：变异型心绞痛常在夜间静息时发作。", "B"),
    R("restated_options", BACT, "B",
      "在肺炎链球菌、金黄色葡萄球菌、大肠埃希菌、铜绿假单胞菌和肺炎克雷伯菌中，能产生血浆凝固酶的是金黄色葡萄球菌。", "B"),
    R("restated_options", BACT, "B", "A. 肺炎链球菌 B. 金黄色葡萄球菌 C. 大肠埃希菌 D. 铜绿假单胞菌 E. 肺炎克雷伯菌", ""),
    R("restated_options", BACT, "B", "本题涉及肺炎链球菌、金黄色葡萄球菌、大肠埃希菌、铜绿假单胞菌、肺炎克雷伯菌等常见病原菌。",
      "", True),
    R("restated_options", PLEURAL, "E", "A.胸部CT B.结核菌素试验 C.胸部X线 D.痰涂片抗酸染色 E.胸腔穿刺抽液检查\n我选C", "C"),
    R("restated_options", BACT, "B",
      "B\n理由：金黄色葡萄球菌可产生凝固酶。\nA. 肺炎链球菌\nB. 金黄色葡萄球菌\nC. 大肠埃希菌\nD. 铜绿假单胞菌\nE. 肺炎克雷伯菌",
      "B"),
    R("restated_options", STEROID, "ABD",
      "A、骨质疏松\nB、向心性肥胖\nC、低血糖\nD、消化性溃疡\n糖皮质激素升高血糖，故C错误，本题选ABD。", "ABD"),
    R("restated_options", BACT, "B",
      "问题：可产生血浆凝固酶的细菌是\nA: 肺炎链球菌\nB: 金黄色葡萄球菌\nC: 大肠埃希菌\nD: 铜绿假单胞菌\nE: 肺炎克雷伯菌\n答案：",
      ""),
    R("restated_options", ESR, "ACD", "A 结核病活动期\nB 心绞痛\nC 急性心肌梗死\nD 多发性骨髓瘤\nE 单纯性肥胖\nACD", "ACD"),
    # ---- base-model rambling that invents a new question -----------------------------------------
    R("invented_question", BACT, "B",
      "B\n理由：金黄色葡萄球菌可产生血浆凝固酶。\n\n问题：下列哪种细菌是革兰阴性杆菌？\nA. 肺炎链球菌\n"
      "B. 金黄色葡萄球菌\nC. 大肠埃希菌\n答案：C", "B"),
    R("invented_question", BACT, "B",
      "答案：B\n\n2. 引起伤寒的病原体是\nA. 伤寒沙门菌\nB. 痢疾志贺菌\nC. 霍乱弧菌\n答案：A", "B"),
    R("invented_question", CHEST, "D",
      "带状疱疹。\n下列哪项是带状疱疹的典型表现？\nA. 沿神经分布的簇集水疱\nB. 全身散在红斑\nC. 对称性关节痛\n答案：A", "D"),
    R("invented_question", BACT, "B",
      "下列哪种细菌可引起猩红热？\nA. A群链球菌\nB. 草绿色链球菌\nC. 表皮葡萄球菌\n答案：A\n\n本题答案：B", "B"),
    R("invented_question", CHEST, "D",
      "D\n理由：带状疱疹沿肋间神经分布。\n问题：带状疱疹的病原体是什么？答案：水痘-带状疱疹病毒", "D"),
    R("invented_question", VIT, "AC",
      "答案：AC\n理由：维生素A、D为脂溶性。\n\n问题：下列属于水溶性维生素的是\nA. 维生素B1\nB. 维生素C\nC. 维生素K\n答案：AB",
      "AC"),
    R("invented_question", ANGINA, "B",
      "B\n\n3. 急性心肌梗死最早出现的心电图改变是\nA. 病理性Q波\nB. ST段抬高\nC. T波高尖\n答案：C", "B"),
    R("invented_question", PLEURAL, "E",
      "C\n\n问题：结核性胸膜炎首选的治疗是\nA. 抗结核治疗\nB. 手术治疗\nC. 胸腔闭式引流\n答案：A", "C"),
    R("invented_question", ESR, "ACD",
      "问题：下列哪种疾病可引起血沉增快？\nA. 风湿热\nB. 贫血\nC. 红细胞增多症\n答案：A", ""),
    R("invented_question", THYROID, "A",
      "A\n理由：TSH是最敏感的指标。\n下一题：甲亢危象的首选治疗药物是？\nA. 丙硫氧嘧啶\nB. 甲巯咪唑\n答案：A", "A"),
    R("invented_question", CHEST, "D", "D\nQuestion 2: Which virus causes shingles?\nA. VZV\nB. HSV\nAnswer: A", "D"),
    R("invented_question", STEROID, "ABD",
      "ABD\n理由：糖皮质激素可致骨质疏松、向心性肥胖和消化性溃疡。\n\n下列哪项是糖皮质激素的禁忌证？\nA. 活动性消化性溃疡\n"
      "B. 过敏性休克\nC. 支气管哮喘\nD. 肾病综合征\n答案：A", "ABD"),
    # ---- refusals that still mention options ------------------------------------------------------
    R("refusal", BACT, "B", "抱歉，我无法判断是A还是C，建议咨询专业医生。", ""),
    R("refusal", BACT, "B", "作为AI助手，我不能提供医疗诊断。选项B金黄色葡萄球菌和选项E肺炎克雷伯菌都需要结合临床判断。", ""),
    R("refusal", BACT, "B", "我不确定这道题的答案，A、B、C、D、E都有可能。", "", True),  # also a hedge
    R("refusal", BACT, "B", "这个问题超出了我的知识范围，无法回答。", ""),
    R("refusal", CHEST, "D", "I'm not sure. It could be B or D.", ""),
    R("refusal", ANGINA, "B", "无法确定，题干信息不足以区分稳定型心绞痛和变异型心绞痛。", ""),
    R("refusal", CHEST, "D", "对不起，我不是医生，不能给出诊断建议。如有带状疱疹样皮疹请及时就医。", ""),
    R("refusal", CHEST, "D", "根据现有信息，我无法作答。可能的选项包括B和D。", ""),
    R("refusal", CHEST, "D", "我不能提供医疗建议，但从考试角度，答案是D。", "D"),
    R("refusal", BACT, "B", "我不知道答案。", ""),
    R("refusal", VIT, "AC", "Sorry, I can't answer medical questions. Options A and C are both possible.", ""),
    R("refusal", ANGINA, "B", "这道题我无法确定，倾向于选C。", "C"),
    # ---- hedges: every option, or alternatives --------------------------------------------------
    R("hedge", BACT, "B", "A B C D E\n理由：这些细菌都可能引起感染。", "", True),
    R("hedge", BACT, "B", "A或B", "", True),
    R("hedge", CHEST, "D", "答案：B或D", "", True),
    R("hedge", CHEST, "D", "B/D?", "", True),
    R("hedge", BACT, "B", "The answer is A or B.", "", True),
    R("hedge", VIT, "AC", "ABCD", "", True),
    R("hedge", VIT, "AC", "答案：A、B、C、D", "", True),
    R("hedge", ANGINA, "B", "B还是C？需要更多信息", "", True),
    R("hedge", ANGINA, "B", "可能是B，也可能是C", "", True),
    R("hedge", ESR, "ACD", "A、B、C、D、E均可引起血沉增快", "", True),
    R("hedge", PLEURAL, "E", "A/C/E都可以作为检查手段", "ACE"),
    R("hedge", BACT, "B", "Answer: B/C?", "", True),
    R("hedge", BACT, "B", "答案：A 或 C", "", True),
    R("hedge", BACT, "B", "答案：A B C D E\n理由：无法确定", "", True, "chat"),
    R("hedge", CHEST, "D", "选A或者选D都对", "", True),
    # ---- space-separated multi-answers ----------------------------------------------------------
    R("multi_space", VIT, "AC", "A C\n理由：维生素A和维生素D是脂溶性维生素", "AC"),
    R("multi_space", VIT, "AC", "A C", "AC"),
    R("multi_space", STEROID, "ABD", "A B D\n理由：糖皮质激素可致骨质疏松、向心性肥胖、消化性溃疡", "ABD"),
    R("multi_space", ESR, "ACD", "答案：A C D", "ACD"),
    R("multi_space", ESR, "ACD", "A D", "AD"),
    R("multi_space", VIT, "AC", "A B", "AB"),
    R("multi_space", STEROID, "ABD", "答案：A B D\n理由：低血糖不是其不良反应。", "ABD", template="chat"),
    # ---- conflicting answers -------------------------------------------------------------------
    R("conflict", BACT, "B", "答案：B\n答案：C", "", True),
    R("conflict", BACT, "B", "答案：B\n理由：金黄色葡萄球菌可产生血浆凝固酶，本题答案为C。", "", True),
    R("conflict", CHEST, "D", "综上，选D。\n综上，选B。", "", True),
    R("conflict", VIT, "AC", "答案：AC\n理由：A正确，B正确，C错误，D错误", "AC", True),
    R("conflict", ANGINA, "B", "答案：B\n理由：A项正确，B项错误，C项错误，D项错误，E项错误。", "B", True),
    R("conflict", BACT, "B", "金黄色葡萄球菌可产生凝固酶，故选B。\n正确选项：C.大肠埃希菌", "", True,
      template="analysis_first"),
    R("conflict", PLEURAL, "E", "选A。选E。", "", True),
    R("conflict", CHEST, "D", "D\n理由：带状疱疹沿肋间神经分布，因此答案为D。", "D"),
    # ---- letters inside terms, negations --------------------------------------------------------
    R("terms_negations", THYROID, "A", "首选甲状腺B超检查", "D"),
    R("terms_negations", BACT, "B", "大肠埃希菌的质粒DNA可携带耐药基因，答案：C", "C"),
    R("terms_negations", HTN, "C", "ACE抑制剂（依那普利）可减少尿蛋白，为首选。", "C"),
    R("terms_negations", BACT, "B", "HBsAg阳性与本题无关，答案为B", "B"),
    R("terms_negations", BACT, "B", "A、C、D、E均不产生凝固酶，故选B", "B"),
    R("terms_negations", CHEST, "D", "A、B均不正确", ""),
    R("terms_negations", ANGINA, "B", "排除稳定型心绞痛，考虑变异型心绞痛", "B"),
    R("terms_negations", BACT, "B", "C反应蛋白升高提示细菌感染，选B", "B"),
    R("terms_negations", VIT, "AC", "维生素B1属于水溶性维生素，不选D；答案AC", "AC"),
    R("terms_negations", BACT, "B", "不选A，应选B", "B"),
    R("terms_negations", THYROID, "A", "TSH测定最敏感，答案A", "A"),
    R("terms_negations", BACT, "B", "答案：B，C项错误", "B"),
    # ---- English --------------------------------------------------------------------------------
    R("english", DRUGS, "B", "Answer: B", "B"),
    R("english", DRUGS, "B", "The correct answer is (B).", "B"),
    R("english", DRUGS, "B", "B. Beta blocker", "B"),
    R("english", DRUGS, "B", "I think the answer is D, digoxin.", "D"),
    R("english", DRUGS, "B", "Options A and C are incorrect; the answer is B.", "B"),
    R("english", DRUGS, "B", "Final answer: E", "E"),
    R("english", DRUGS, "B", "A patient after myocardial infarction should receive a beta blocker.", "B"),
    R("english", DRUGS, "B", "Answer: A and C", "AC"),
    # ---- held out: written after the rows above, run once before any further tuning ----------
    # (39 of these 45 were right on that first run; three general gaps were then fixed).
    R("self_correction", KIDNEY, "C", "答案：A\n理由：尿路刺激症状……但病程两年、反复发作，且有白细胞管型，应考虑慢性肾盂肾炎，故答案应更正为C。", "C"),
    R("self_correction", FLU, "E", "我的答案是D。\n\n等一下，白细胞计数两者都可能异常，真正有鉴别意义的是流行病学史。所以最终答案是E。", "E"),
    R("plain", PNEU, "B", "B\n理由：高热寒战、湿啰音提示肺炎。", "B"),
    R("self_correction", DIUR, "AB", "答案：ABC\n理由：……螺内酯为保钾利尿剂，不会引起低钾，修正答案为AB。", "AB"),
    R("json", FLU, "E", '```\n{"answer":"E","analysis":"流行性感冒有明显流行病学史"}\n```', "E"),
    R("json", DIUR, "AB", '{"选项": ["A", "B"], "理由": "呋塞米与氢氯噻嗪均为排钾利尿剂"}', "AB"),
    R("json", KIDNEY, "C", '{\n "question_type": "单选题",\n "answer": "C",\n "confidence": "high"\n}', "C"),
    R("json", PNEU, "B", '{"answer": "B. 肺炎"}', "B"),
    R("json", ASTHMA, "B", '结果：{"答案": "B"}，理由是哮喘为呼气性呼吸困难。', "B"),
    R("verdicts", ASTHMA, "B",
      "A. 有反复发作喘息的病史 —— 正确\n"
      "B. 发作时有吸气性呼吸困难 —— 错误，应为呼气性呼吸困难\n"
      "C. 肺部弥漫性哮鸣音 —— 正确\nD. 支气管扩张药治疗有效 —— 正确\n"
      "E. 必要时进行支气管激发试验 —— 正确",
      "B", False, "qa", xfail="verdict polarity: the question asks for the wrong statement, which only the question text tells"),
    R("verdicts", PNEU, "B", "A错误：急性支气管炎一般无湿啰音。\nB正确：高热寒战、咳嗽、湿啰音，符合肺炎。\nC错误：肺结核多为低热盗汗。\nD错误。\nE错误。", "B"),
    R("verdicts", DIUR, "AB", "呋塞米：会引起低钾 ✔\n氢氯噻嗪：会引起低钾 ✔\n螺内酯：保钾 ✘\n氨苯蝶啶：保钾 ✘", "AB"),
    R("verdicts", FLU, "E",
      "A（发热）：两者均可有，无鉴别意义；B（咳痰）：无鉴别意义；C：无鉴别意义；D：意义不大；"
      "E（流行病学史）：最有意义。",
      "E", False, "qa", xfail="free-form judgements (无鉴别意义 / 最有意义) are not verdict words; the leading A is read"),
    R("excluded_bracket", DIUR, "AB", "AB（C、D为保钾利尿药）", "AB"),
    R("excluded_bracket", KIDNEY, "C", "C（A、D为急性病程，B、E不符合）", "C"),
    R("bracket_letter", PNEU, "B", "结合高热、寒战、胸痛、咳铁锈色痰，应首先考虑肺炎（B）", "B"),
    R("bracket_letter", FLU, "E", "两者鉴别最有意义的是流行病学史(E).", "E"),
    R("bracket_letter", KIDNEY, "C", "综合分析，该患者为慢性肾盂肾炎【C】", "C"),
    R("option_text", KIDNEY, "C", "慢性肾盂肾炎。依据：病程超过半年，反复发作，尿中白细胞管型。", "C"),
    R("option_text", FLU, "E", "流行病学史最有鉴别意义", "E"),
    R("option_text", PNEU, "B", "肺炎可能性最大，需完善胸片。", "B"),
    R("option_text", DIUR, "AB", "呋塞米和氢氯噻嗪", "AB"),
    R("restated_options", PNEU, "B", "A.急性支气管炎\nB.肺炎\nC.肺结核\nD.肺癌\nE.支气管哮喘\n正确答案：B", "B"),
    R("restated_options", FLU, "E", "题目选项：A 发热 B 咳痰 C 肺部啰音 D 白细胞计数 E 流行病学史。鉴别意义最大的是E。", "E"),
    R("invented_question", KIDNEY, "C",
      "C\n理由：慢性肾盂肾炎病程超过半年。\n\n【例题2】急性肾盂肾炎最常见的致病菌是\n"
      "A. 大肠埃希菌\nB. 变形杆菌\nC. 葡萄球菌\n答案：A", "C"),
    R("invented_question", PNEU, "B",
      "答案：B\n理由：……\n\n下列哪项是肺炎链球菌肺炎的典型痰液？\nA. 铁锈色痰\n"
      "B. 砖红色胶冻样痰\nC. 粉红色泡沫痰\n正确答案：A", "B"),
    R("invented_question", FLU, "E", "以下哪项是流感的特点？\nA. 起病急\nB. 无发热\n答案：A\n\n回到本题：E", "E"),
    R("refusal", PNEU, "B", "很抱歉，仅凭这些信息我无法确诊，肺炎和肺结核都有可能，建议进一步检查。", ""),
    R("refusal", KIDNEY, "C",
      "I cannot give a diagnosis. Chronic pyelonephr"
      "itis (C) or acute pyelonephritis (A) should b"
      "e considered by a doctor.", ""),
    R("hedge", PNEU, "B", "B或C", "", True),
    R("hedge", DIUR, "AB", "A B C D", "", True),
    R("hedge", FLU, "E", "D/E", "DE"),
    R("hedge", KIDNEY, "C", "可能是A，也可能是C，需要尿培养鉴别", "", True),
    R("multi_space", DIUR, "AB", "A B\n理由：呋塞米、氢氯噻嗪为排钾利尿剂", "AB"),
    R("multi_space", DIUR, "AB", "答案是 A B", "AB"),
    R("self_correction", PNEU, "B", "答案：B\n理由：……因此答案是C", "C"),
    R("conflict", KIDNEY, "C", "正确答案：C\n正确答案：A", "", True),
    R("terms_negations", FLU, "E", "白细胞计数（WBC）升高多见于细菌感染，答案：E", "E"),
    R("terms_negations", PNEU, "B", "胸部X线检查可见片状阴影，B超无意义，选B", "B"),
    R("english", PNEU, "B", "The most likely diagnosis is pneumonia (B).", "B"),
    R("english", DIUR, "AB", "Furosemide and hydrochlorothiazide cause hypokalemia: A, B.", "AB"),
    R("plain", KIDNEY, "C", "答案：C\n理由：病程长，反复发作。", "C", False, "chat"),
    R("plain", FLU, "E", "流感有明显的流行病学史，这是与急性支气管炎鉴别的关键。\n正确选项：E.流行病学史", "E", False, "analysis_first"),
    R("plain", PNEU, "B", "答案: B 肺炎. \n 解释:高热、寒战、湿啰音。", "B", False, "cmexam_paper"),
    R("self_correction", ASTHMA, "B", "答案：A\n理由：反复发作喘息是哮喘的特点，A正确，所以A不是答案。哮喘为呼气性呼吸困难，B错误，故本题选B。", "B"),
]

STYLES = (
    "plain", "self_correction", "json", "verdicts", "excluded_bracket", "bracket_letter", "option_text",
    "restated_options", "invented_question", "refusal", "hedge", "multi_space", "conflict", "terms_negations",
    "english",
)

def _read(row: Row):
    tpl = get_template(row.template)
    return read_answer(row.output, row.options, tpl.answer_marker, tpl.explanation_marker)


def row_is_right(row: Row) -> bool:
    reading = _read(row)
    return reading.letters == row.expected and reading.ambiguous == row.ambiguous


def per_style_scores(rows: list[Row]) -> dict[str, tuple[int, int, float]]:
    """``style → (rows, right, % right)`` of the reader on ``rows``, plus ``"overall"``."""
    total, right = Counter(), Counter()
    for row in rows:
        ok = row_is_right(row)
        for key in (row.style, "overall"):
            total[key] += 1
            right[key] += ok
    return {k: (total[k], right[k], 100.0 * right[k] / total[k]) for k in total}


def _params():
    for i, row in enumerate(ROWS):
        marks = [pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else []
        yield pytest.param(row, id=f"{i:03d}-{row.style}", marks=marks)


@pytest.mark.parametrize("row", list(_params()))
def test_row(row: Row):
    reading = _read(row)
    assert (reading.letters, reading.ambiguous) == (row.expected, row.ambiguous), reading.method


def test_table_size_styles_and_overall_score(capsys):
    assert len(ROWS) >= 150
    assert {r.style for r in ROWS} == set(STYLES)
    assert all(sum(r.style == s for r in ROWS) >= 5 for s in STYLES)
    # Single- and multi-answer questions, 4- and 5-option questions, wrong answers, hedges.
    assert any(len(r.gold) > 1 for r in ROWS) and any(len(r.gold) == 1 for r in ROWS)
    assert {len(r.options) for r in ROWS} == {4, 5}
    assert sum(r.expected not in ("", r.gold) for r in ROWS) >= 20
    scores = per_style_scores(ROWS)
    with capsys.disabled():
        print()
        for style in (*STYLES, "overall"):
            n, ok, pct = scores[style]
            print(f"{style:18s} {ok:3d}/{n:3d}  {pct:5.1f}%")
    assert scores["overall"][2] >= 95.0
    assert scores["overall"][1] == len(ROWS) - sum(bool(r.xfail) for r in ROWS)


# ---- the RL exam reward on the same table ---------------------------------------------------


@pytest.mark.parametrize("row", [p for p in _params() if not p.marks])
def test_exam_reward_row(row: Row):
    tpl = get_template(row.template)
    (reward,) = exam_reward([row.output], [row.options], [row.gold], tpl, format_bonus=0.1)
    well_formed = has_answer_format(row.output, row.options, tpl)
    # The bonus only goes to outputs that give an answer: hedges and refusals never earn it.
    assert not well_formed or row.expected
    expected = (1.0 if row.expected == row.gold else 0.0) + (0.1 if well_formed else 0.0)
    assert reward == pytest.approx(expected)


QA = get_template("qa")


@pytest.mark.parametrize(("output", "options", "gold", "expected"), [
    ("A B C D E\n理由：这些细菌都可能引起感染。", BACT, "B", 0.0),  # hedge: every option
    ("A或B", BACT, "B", 0.0),
    ("A或B\n理由：两者都有可能", BACT, "B", 0.0),  # no format bonus for a hedge either
    ("ABCD\n理由：都对", VIT, "AC", 0.0),
    ("A C\n理由：维生素A、D为脂溶性", VIT, "AC", 1.1),  # space-separated multi-answer
    ("A C", VIT, "AC", 1.0),
    ('{"answer": "B"}', BACT, "B", 1.0),  # JSON with the right letter
    ('{"answer": ["A", "C"]}', VIT, "AC", 1.0),
    ('{"answer": "C"}', BACT, "B", 0.0),
    ("答案：B\n答案：C", BACT, "B", 0.0),  # conflicting answers: no credit
])
def test_exam_reward_refuses_hedges_and_reads_real_styles(output, options, gold, expected):
    (got,) = exam_reward([output], [options], [gold], QA, format_bonus=0.1)
    assert got == pytest.approx(expected)


# ---- evaluation: the same reader, and the ambiguity count -------------------------------------


def test_evaluate_reads_like_the_table_and_counts_ambiguous(tmp_path):
    from medtune.evaluation.evaluate import evaluate, summarise
    from medtune.io import read_jsonl, write_jsonl

    picked = [r for r in ROWS if not r.xfail][::7]  # every 7th row: all kinds of outputs
    rows = [{"id": f"r{i}", "question": "q", "options": r.options, "answer": r.gold, "explanation": "",
             "template": r.template, "output": r.output} for i, r in enumerate(picked)]
    path = tmp_path / "p.jsonl"
    write_jsonl(path, rows)
    robust = evaluate(path, tmp_path / "r")
    scored = read_jsonl(tmp_path / "r" / "scored.jsonl")
    assert [(s["parsed"], s["ambiguous"]) for s in scored] == [(r.expected, r.ambiguous) for r in picked]
    assert robust["n_ambiguous"] == sum(r.ambiguous for r in picked) > 0
    assert robust["accuracy"] == pytest.approx(100 * sum(r.expected == r.gold for r in picked) / len(picked))

    strict = evaluate(path, tmp_path / "s", parser="strict")
    assert strict["n_ambiguous"] == 0
    assert not any(s["ambiguous"] for s in read_jsonl(tmp_path / "s" / "scored.jsonl"))
    # Rows without the field (log-likelihood scoring) count as not ambiguous.
    assert summarise([{"answer": "A", "parsed": "A", "options": VIT}], [], tokenizer=None)["n_ambiguous"] == 0
