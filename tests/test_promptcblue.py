"""Tests for PromptCBLUE: the converter, the post-processing per task family, and the scoring.

The key check: the dev set's gold target texts, fed as model outputs, score exactly 100 on every
task against the official structured gold (``dev_structured.json``) and against the reference
texts themselves.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
from pathlib import Path

import pytest

import medtune
from medtune.data.cmexam import default_rejects_path
from medtune.data.promptcblue import PROMPTCBLUE_TASKS, convert_promptcblue, read_promptcblue
from medtune.evaluation import promptcblue as pcb
from medtune.evaluation.promptcblue import (
    MDCFNPC_FALLBACK,
    SR_FALLBACK,
    basic_tokenize,
    match_choice,
    parse_output,
    postprocess,
    rouge_l_f1,
    score,
    score_against_structured,
)
from medtune.io import DataFileError, read_jsonl

EXAMPLES = Path(medtune.__file__).parent / "examples" / "promptcblue"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "promptcblue"
V1_TASKS = {
    "CMeEE-V2", "CMeIE", "CHIP-CDN", "CHIP-CDEE", "CHIP-STS", "CHIP-CTC", "CHIP-MDCFNPC", "KUAKE-IR",
    "KUAKE-QIC", "KUAKE-QQR", "KUAKE-QTR", "MedDG", "IMCS-V2-MRG", "IMCS-V2-NER", "IMCS-V2-DAC", "IMCS-V2-SR",
}


def line(**overrides) -> dict:
    base = {"input": "判断意图：\n头疼怎么办\n答：", "target": "治疗方案", "answer_choices": ["治疗方案", "病因分析"],
            "task_type": "cls", "task_dataset": "KUAKE-QIC", "sample_id": "x-1"}
    base.update(overrides)
    return base


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def dev_rows(output_of=lambda rec: rec.reply) -> list[dict]:
    """Prediction rows as predict writes them, with each output chosen by ``output_of``."""
    records = read_promptcblue(EXAMPLES / "dev.json").records
    return [{"id": r.id, "messages": r.prompt_messages, "reference": r.reply, "meta": r.meta,
             "output": output_of(r)} for r in records]


@pytest.fixture(scope="module")
def structured() -> dict:
    return json.loads((EXAMPLES / "dev_structured.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Shipped data and converter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train.json", "dev.json", "test.json", "dev_structured.json"])
def test_shipped_files_are_unchanged_copies(name):
    assert (EXAMPLES / name).is_file()
    assert (EXAMPLES / "PROVENANCE.md").is_file()
    if SHARED.is_dir():
        assert (EXAMPLES / name).read_bytes() == (SHARED / name).read_bytes()


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_converter_reads_every_split(split):
    result = read_promptcblue(EXAMPLES / f"{split}.json")
    assert result.n_rows == 80
    assert len(result.records) == 80 and result.rejects == []
    assert result.task_counts == {task: 5 for task in V1_TASKS}
    assert set(result.task_counts) <= set(PROMPTCBLUE_TASKS)
    if split == "test":
        # Every test target is empty: accepted as a test file, user message only.
        assert result.test_file and result.n_without_target == 80
        assert all(len(r.messages) == 1 and r.messages[0]["role"] == "user" for r in result.records)
    else:
        assert not result.test_file and result.n_without_target == 0
        assert all([m["role"] for m in r.messages] == ["user", "assistant"] for r in result.records)


def test_first_train_record_exact_fields():
    first = read_promptcblue(EXAMPLES / "train.json").records[0]
    raw = json.loads((EXAMPLES / "train.json").read_text(encoding="utf-8").split("\n")[0])
    assert first.id == "train-35923"
    assert first.messages == [{"role": "user", "content": raw["input"]},
                              {"role": "assistant", "content": "风险评估"}]
    assert first.messages[0]["content"].startswith("3）汉密尔顿抑郁量表17项（HAMD-17）评分≥18分；")
    assert first.meta["task_dataset"] == "CHIP-CTC"
    assert first.meta["task_type"] == "cls"
    assert first.meta["answer_choices"] == raw["answer_choices"]
    assert len(first.meta["answer_choices"]) == 32 and first.meta["answer_choices"][7] == "风险评估"
    assert set(first.meta) == {"task_dataset", "task_type", "answer_choices"}


def test_type_alias_and_cmeie_names(tmp_path):
    rows = [line(sample_id="a"), {**{k: v for k, v in line(sample_id="b").items() if k != "task_dataset"},
                                  "type": "KUAKE-QIC"},
            line(sample_id="c", task_dataset="CMeIE"), line(sample_id="d", task_dataset="CMeIE-V2")]
    result = read_promptcblue(write_lines(tmp_path / "x.json", rows))
    assert [r.meta["task_dataset"] for r in result.records] == ["KUAKE-QIC", "KUAKE-QIC", "CMeIE", "CMeIE-V2"]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"target": ""}, "target"),
        ({"task_dataset": "CMeEE"}, "task_dataset"),
        ({"input": "  "}, "input"),
        ({"sample_id": ""}, "sample_id"),
        ({"answer_choices": 3}, "answer_choices"),  # a string is a label list now (see the tests below)
        ({"answer_choices": ["治疗方案", 1]}, "answer_choices"),
    ],
)
def test_invalid_line_names_file_line_and_field(tmp_path, bad, field):
    path = write_lines(tmp_path / "bad.json", [line(sample_id="a"), "", line(**{"sample_id": "b", **bad})])
    with pytest.raises(DataFileError) as info:
        read_promptcblue(path)
    err = info.value
    assert err.path == str(path) and err.row == 3 and err.field == field
    assert "bad.json" in str(err) and "row 3" in str(err) and f"field '{field}'" in str(err)


def test_invalid_json_and_duplicates_become_rejects_with_skip(tmp_path):
    path = write_lines(tmp_path / "x.json", [line(sample_id="a"), "{broken", line(sample_id="a")])
    result = read_promptcblue(path, on_invalid="skip")
    assert result.n_rows == 3 and len(result.records) == 1
    assert [(r["row"], r["field"]) for r in result.rejects] == [(2, None), (3, "sample_id")]


def test_empty_targets_mixed_need_require_target_false(tmp_path):
    path = write_lines(tmp_path / "x.json", [line(sample_id="a"), line(sample_id="b", target="")])
    with pytest.raises(DataFileError):
        read_promptcblue(path)
    result = read_promptcblue(path, require_target=False)
    assert not result.test_file and result.n_without_target == 1
    assert result.records[1].messages == [{"role": "user", "content": line()["input"]}]


def test_all_empty_targets_accepted_as_test_file(tmp_path):
    path = write_lines(tmp_path / "t.json", [line(sample_id="a", target=""), line(sample_id="b", target="")])
    result = read_promptcblue(path)  # require_target=True, yet accepted: it is a test file
    assert result.test_file and len(result.records) == 2


def test_convert_writes_records_and_rejects(tmp_path):
    out = tmp_path / "dev.records.jsonl"
    result = convert_promptcblue(EXAMPLES / "dev.json", out)
    rows = read_jsonl(out)
    assert len(rows) == 80 and rows[0] == result.records[0].to_dict()
    assert set(rows[0]) == {"id", "messages", "meta"}
    assert not default_rejects_path(out).exists()

    bad = write_lines(tmp_path / "in.json", [line(sample_id="a"), line(sample_id="b", target="")])
    result = convert_promptcblue(bad, out, on_invalid="skip")
    assert len(read_jsonl(out)) == 1
    assert read_jsonl(default_rejects_path(out))[0]["field"] == "target"
    with pytest.raises(ValueError, match="overwrite"):
        convert_promptcblue(bad, bad)


# --------------------------------------------------------------------------------------------
# Post-processing, per family
# --------------------------------------------------------------------------------------------


def test_ner_lines_with_mentions():
    text = "上述句子中的实体包含：\n疾病实体：糖尿病，高血压\n症状实体：\n药物实体：二甲双胍"
    assert postprocess("CMeEE-V2", text, ["疾病", "症状", "药物"]) == [
        {"entity": "糖尿病", "type": "疾病"}, {"entity": "高血压", "type": "疾病"},
        {"entity": "二甲双胍", "type": "药物"},
    ]
    # A label that is not in the choices is ignored; a prefix-sharing label is not confused.
    assert postprocess("IMCS-V2-NER", "药物类别实体：抗生素\n其他实体：X", ["药物", "药物类别"]) == [
        {"entity": "抗生素", "type": "药物类别"}]


def test_half_width_separators_are_read_as_full_width():
    # Official HEAD would return the mention "疾病实体:糖尿病,高血压".
    assert postprocess("CMeEE-V2", "疾病实体:糖尿病,高血压", ["疾病"]) == [
        {"entity": "糖尿病", "type": "疾病"}, {"entity": "高血压", "type": "疾病"}]
    # Between two digits a comma is content (a chemical name), not a separator.
    assert postprocess("CMeEE-V2", "药物实体:1,25-二羟维生素D3,钙剂", ["药物"]) == [
        {"entity": "1,25-二羟维生素D3", "type": "药物"}, {"entity": "钙剂", "type": "药物"}]
    event = postprocess("CHIP-CDEE", "事件如下:\n主体词:疼痛;发生状态:否定;描述词:胀痛,持续性;解剖部位:腹", None)
    assert event == [{"主体词": "疼痛", "发生状态": "否定", "描述词": ["胀痛", "持续性"], "解剖部位": ["腹"]}]
    assert postprocess("IMCS-V2-SR", "如下:\n发热:患有该症状", ["没有患有该症状", "患有该症状"]) == [
        {"entity": "发热", "attr": "患有该症状"}]
    assert postprocess("IMCS-V2-MRG", "报告如下：\n主诉:发热,咳嗽", None) == {"主诉": "发热,咳嗽"}


def test_half_width_dev_targets_still_score_100(structured):
    # Every separator of the extraction tasks' gold texts written half-width: nothing is lost.
    extraction = {"CMeEE-V2", "IMCS-V2-NER", "CMeIE", "CHIP-CDN", "CHIP-CDEE", "CHIP-MDCFNPC", "IMCS-V2-SR"}
    table = str.maketrans({"：": ":", "，": ",", "；": ";"})
    rows = dev_rows(lambda r: r.reply.translate(table) if r.meta["task_dataset"] in extraction else r.reply)
    assert rows[1]["output"] != rows[1]["reference"]  # the CDEE sample really changed
    assert score_against_structured(rows, structured)["overall"] == 100.0


def test_cmeie_triples():
    text = ("具有药物治疗关系的头尾实体对如下：头实体为心力衰竭，尾实体为伊伐布雷定。头实体为心衰，尾实体为利尿剂。\n"
            "具有相关（症状）关系的头尾实体对如下：")
    assert postprocess("CMeIE", text, ["药物治疗", "相关（症状）"]) == [
        {"predicate": "药物治疗", "subject": "心力衰竭", "object": "伊伐布雷定"},
        {"predicate": "药物治疗", "subject": "心衰", "object": "利尿剂"},
    ]
    assert postprocess("CMeIE-V2", text, None) == postprocess("CMeIE", text, None)


def test_cdn_last_line_and_choice_filter():
    choices = ["咳嗽", "呼吸道感染", "上呼吸道感染"]
    out = postprocess("CHIP-CDN", "归一化结果：\n咳嗽，呼吸道感染，肺炎，咳嗽\n", choices)
    assert out == [{"entity": "咳嗽", "type": "normalization"}, {"entity": "呼吸道感染", "type": "normalization"}]
    assert postprocess("CHIP-CDN", "咳嗽\n没有对应的标准化实体", choices) == []  # only the last line counts
    assert postprocess("CHIP-CDN", "咳嗽,上呼吸道感染", choices) == [
        {"entity": "咳嗽", "type": "normalization"}, {"entity": "上呼吸道感染", "type": "normalization"}]


def test_cdee_events_and_trailing_blank_line():
    text = ("上述句子中的临床发现事件如下：\n主体词：疼痛；发生状态：；描述词：胀痛，持续性；解剖部位：腹\n"
            "主体词：呕吐；发生状态：否定；描述词：；解剖部位：\n\n")
    assert postprocess("CHIP-CDEE", text, None) == [
        {"主体词": "疼痛", "发生状态": "", "描述词": ["胀痛", "持续性"], "解剖部位": ["腹"]},
        {"主体词": "呕吐", "发生状态": "否定", "描述词": [], "解剖部位": []},
    ]  # the official code adds a third, empty event for the trailing blank line
    # Without the intro line, the first event is still read (official drops line 1 blindly).
    assert len(postprocess("CHIP-CDEE", text.split("\n", 1)[1], None)) == 2


def test_attribute_fallbacks_and_stripping():
    md_choices = ["已有症状疾病或者假设未来可能发生的疾病等", "未患有症状疾病",
                  "没有回答、不知道、回答不明确或者模棱两可不好推断", MDCFNPC_FALLBACK]
    text = "判别如下：\n腹泻： 未患有症状疾病 \n发热：不清楚\n拉肚子：阳性，已有症状疾病或者假设未来可能发生的疾病等"
    assert postprocess("CHIP-MDCFNPC", text, md_choices) == [
        {"entity": "腹泻", "attr": "未患有症状疾病"},  # stripped
        {"entity": "发热", "attr": MDCFNPC_FALLBACK},  # a valid label, not HEAD's "不标注"
        {"entity": "拉肚子", "attr": "已有症状疾病或者假设未来可能发生的疾病等"},  # the one contained choice
    ]
    sr_choices = ["没有患有该症状", "患有该症状", SR_FALLBACK]
    assert postprocess("IMCS-V2-SR", "如下：\n咳嗽：没有患有该症状\n发烧：有点\n体温：38:5：患有该症状",
                       sr_choices) == [
        {"entity": "咳嗽", "attr": "没有患有该症状"},
        {"entity": "发烧", "attr": SR_FALLBACK},
        {"entity": "体温：38:5", "attr": "患有该症状"},  # split at the last colon
    ]
    # A first line that is itself an answer line is kept (no intro).
    assert postprocess("IMCS-V2-SR", "咳嗽：患有该症状", sr_choices) == [{"entity": "咳嗽", "attr": "患有该症状"}]


@pytest.mark.parametrize(
    ("task", "output", "choices", "expected"),
    [
        ("CHIP-STS", "相同", ["是的", "不是"], "是的"),
        ("CHIP-STS", "不同", ["是的", "不是"], "不是"),
        ("CHIP-STS", " 不是 ", ["是的", "不是"], "不是"),
        ("KUAKE-IR", "不相关", ["相关", "不相关"], "不相关"),  # 相关 is inside 不相关
        ("KUAKE-IR", "答案是：相关。", ["相关", "不相关"], "相关"),
        ("KUAKE-QIC", "这是就医建议类的问题", ["治疗方案", "就医建议"], "就医建议"),
        ("KUAKE-QIC", "治疗方案或就医建议", ["治疗方案", "就医建议"], "治疗方案或就医建议"),  # ambiguous: raw
        ("CHIP-CTC", "非上述类型。", ["性别", "年龄"], "非上述类型"),
        ("KUAKE-QTR", "", ["完全匹配", "部分匹配"], ""),
    ],
)
def test_classification_answers_matched_to_choices(task, output, choices, expected):
    assert postprocess(task, output, choices) == expected


def test_match_choice_rules():
    assert match_choice(" 部分匹配 ", ["部分匹配", "完全匹配"]) == "部分匹配"
    assert match_choice("都不是", ["是的", "不是"]) == "不是"
    assert match_choice("", ["是的"]) is None and match_choice("是的", None) is None


def test_mrg_sections():
    text = ("上述问诊对话的诊疗报告如下：\n主诉：咳嗽三天。\n现病史：患儿咳嗽，诊断：待查。\n辅助检查：\n"
            "诊断：支气管炎。\n建议：多喝水。\n诊断：小儿支气管炎。")
    assert postprocess("IMCS-V2-MRG", text, None) == {
        "主诉": "咳嗽三天。", "现病史": "患儿咳嗽，诊断：待查。", "辅助检查": "",
        "诊断": "小儿支气管炎。", "建议": "多喝水。"}  # a repeated section: last line wins


def test_meddg_is_stripped_text():
    assert postprocess("MedDG", "  多喝水。\n", None) == "多喝水。"


def test_text2dt_parses_triples_without_eval(monkeypatch):
    def no_eval(*args, **kwargs):
        raise AssertionError("eval() called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    text = ("根据给定的指南文本抽取的诊疗决策树如下：\n"
            '节点1：role=C；logical_rel=null；triples=[["高血压", "临床表现", "头痛"]]\n'
            "这一行是坏的\n"
            "节点2：role=D；logical_rel=and；triples=[('患者', '药物治疗', 'ACEI'), ('x', 'y')]\n"
            "节点3:role=D;logical_rel=null;triples=__import__('os').system('echo pwned')\n")
    parsed = parse_output("Text2DT", text, None)
    assert parsed.malformed_lines == 1
    assert parsed.answer == [
        {"role": "C", "logical_rel": "null", "triples": [["高血压", "临床表现", "头痛"]]},
        {"role": "D", "logical_rel": "and", "triples": [["患者", "药物治疗", "ACEI"]]},
        {"role": "D", "logical_rel": "null", "triples": []},
    ]
    assert postprocess("Text2DT", "garbage only", None) == [{"role": "D", "logical_rel": "null", "triples": []}]


def test_module_never_calls_eval_or_exec():
    tree = ast.parse(inspect.getsource(pcb))
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"eval", "exec", "compile"}


def test_cmedcausal_conditional_subject_and_malformed_lines():
    text = ("因果关系三元组如下：\n头实体：吸烟；尾实体：肺癌\n没有头实体的一行\n条件关系三元组如下：\n"
            "头实体：长期；尾三元组：头实体：饮酒；尾实体：肝硬化；关系：因果关系\n头实体：缺；尾三元组：坏\n"
            "上下位关系三元组如下：\n头实体:肿瘤;尾实体:肺癌\n给定的文本没有指定关系的三元组\n头实体：后面；尾实体：不读")
    parsed = parse_output("CMedCausal", text, None)
    assert parsed.malformed_lines == 2
    assert parsed.answer == [
        {"predicate": "因果关系", "subject": "吸烟", "object": "肺癌"},
        {"predicate": "条件关系", "subject": "长期",  # official: "长期；尾三元组："
         "object": {"predicate": "因果关系", "subject": "饮酒", "object": "肝硬化"}},
        {"predicate": "上下位关系", "subject": "肿瘤", "object": "肺癌"},
    ]


def test_unknown_task_raises_and_malformed_output_never_does():
    with pytest.raises(ValueError, match="unknown PromptCBLUE task"):
        postprocess("CMeEE", "x", None)
    junk = ["", "\n\n", "：：：", None, "；" * 50, "头实体为，尾实体为", "[[[", "role="]
    for task in PROMPTCBLUE_TASKS:
        for text in junk:
            postprocess(task, text, ["a", "b"])


# --------------------------------------------------------------------------------------------
# Tokenisation and ROUGE-L
# --------------------------------------------------------------------------------------------


def test_basic_tokenize_matches_bert_basic_tokenizer():
    texts = ["Hello, 世界！CRP正常 Ésta\tBIEN…\n", "1,25-二羟维生素D3（口服）", "  ", "a\x00b\u200bc 〇"]
    assert basic_tokenize(texts[0]) == ["hello", ",", "世", "界", "！", "crp", "正", "常", "esta", "bien", "…"]
    try:
        from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer
    except ImportError:
        try:
            from transformers.models.bert.tokenization_bert import BasicTokenizer
        except ImportError:
            pytest.skip("transformers has no BasicTokenizer to compare with")
    reference = BasicTokenizer(do_lower_case=True)
    for text in texts:
        assert basic_tokenize(text) == reference.tokenize(text)


def test_rouge_l_exact():
    assert rouge_l_f1("多喝水。", "多喝水。") == 1.0  # exactly, no 1e-8 term
    assert rouge_l_f1("", "") == 1.0  # both read as "无 。"
    assert rouge_l_f1("多喝水", "多喝热水") == pytest.approx(2 * 3 / (3 + 4))
    assert rouge_l_f1("abc", "多喝水") == 0.0


# --------------------------------------------------------------------------------------------
# Scoring: the gold check
# --------------------------------------------------------------------------------------------


def test_gold_targets_score_100_against_official_structured_gold(structured):
    result = score_against_structured(dev_rows(), structured)
    assert set(result["tasks"]) == V1_TASKS
    for task, entry in result["tasks"].items():
        assert entry["score"] == 100.0, task
        assert entry["n"] == 5
    assert result["overall"] == 100.0
    assert result["n"] == 80 and result["n_missing_predictions"] == 0
    assert result["tasks"]["CMeEE-V2"]["metric"] == "micro_f1"
    assert result["tasks"]["CHIP-CTC"]["metric"] == "macro_f1"
    assert result["tasks"]["CHIP-STS"]["metric"] == "weighted_f1"
    assert result["tasks"]["MedDG"]["metric"] == "rouge_l"
    assert result["differences_from_official"]


def test_postprocessed_gold_targets_equal_official_structures(structured):
    # Stronger than the score: item for item, our parse of each target is the official answer.
    gold = {e["sample_id"]: e["answer"] for entries in structured.values() for e in entries}
    key = lambda x: json.dumps(x, ensure_ascii=False, sort_keys=True)  # noqa: E731
    for rec in read_promptcblue(EXAMPLES / "dev.json").records:
        ours = postprocess(rec.meta["task_dataset"], rec.reply, rec.meta["answer_choices"])
        theirs = gold[rec.id]
        if isinstance(theirs, list):
            assert sorted(map(key, ours)) == sorted(map(key, theirs)), rec.id
        else:
            assert ours == theirs, rec.id


def test_gold_targets_score_100_against_reference_texts():
    result = score(dev_rows())
    assert all(entry["score"] == 100.0 for entry in result["tasks"].values())
    assert result["overall"] == 100.0 and result["n"] == 80


def test_reference_can_come_from_messages():
    rows = dev_rows()
    for row in rows:
        row["messages"] = row["messages"] + [{"role": "assistant", "content": row.pop("reference")}]
    assert score(rows)["overall"] == 100.0


def test_wrong_prediction_lowers_exactly_its_task(structured):
    wrong = "dev-39492"  # CMeEE-V2: gold has 3 身体部位 mentions; predict one correct, one wrong
    output = "上述句子中的实体包含：\n身体部位实体：体细胞中，心脏"
    rows = dev_rows(lambda r: output if r.id == wrong else r.reply)
    for result in (score_against_structured(rows, structured), score(rows)):
        changed = {t: e["score"] for t, e in result["tasks"].items() if e["score"] != 100.0}
        assert set(changed) == {"CMeEE-V2"}
        entry = result["tasks"]["CMeEE-V2"]
        # The other 4 samples are right: count items exactly.
        n_gold = sum(len(e["answer"]) for e in structured["CMeEE-V2"])
        tp, fp, fn = n_gold - 2, 1, 2
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        assert entry["score"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
        assert result["overall"] == pytest.approx((15 * 100 + entry["score"]) / 16)


def test_wrong_label_lowers_macro_f1(structured):
    rows = dev_rows(lambda r: "就医建议" if r.id == "dev-19056" else r.reply)  # CHIP-CTC gold 非上述类型
    result = score_against_structured(rows, structured)
    assert {t for t, e in result["tasks"].items() if e["score"] != 100.0} == {"CHIP-CTC"}
    assert result["tasks"]["CHIP-CTC"]["score"] < 100.0


def test_missing_predictions_are_scored_empty(structured):
    rows = [r for r in dev_rows() if r["id"] != "dev-83507"]  # one MedDG answer missing
    result = score_against_structured(rows, structured)
    assert result["n_missing_predictions"] == 1
    assert result["tasks"]["MedDG"]["score"] < 100.0 and result["tasks"]["MedDG"]["n"] == 5


def test_score_row_errors():
    rows = dev_rows()[:2]
    with pytest.raises(ValueError, match="duplicate"):
        score([rows[0], rows[0]])
    with pytest.raises(ValueError, match="output"):
        score([{k: v for k, v in rows[0].items() if k != "output"}])
    with pytest.raises(ValueError, match="no rows"):
        score([])
    with pytest.raises(ValueError, match="not in the structured gold"):
        score_against_structured([{**rows[0], "id": "nope"}], {"MedDG": []})


def test_empty_classification_answer_uses_evaluator_default():
    # An empty prediction for STS counts as 是的 (the official evaluator's default).
    rows = [{"id": "1", "reference": "是的", "output": "", "meta": {"task_dataset": "CHIP-STS",
                                                                    "answer_choices": ["是的", "不是"]}}]
    assert score(rows)["tasks"]["CHIP-STS"]["score"] == 100.0


# --------------------------------------------------------------------------------------------
# Missing values: "nan", "None", "null" and null are missing
# --------------------------------------------------------------------------------------------


def test_promptcblue_nan_target_is_an_empty_target_not_text(tmp_path):
    rows = [
        line(sample_id="a"),
        line(sample_id="b", target="nan"),
        line(sample_id="c", input="None"),
        line(sample_id="NULL"),
        line(sample_id="d", task_dataset="nan"),
        line(sample_id="e", input=None),
    ]
    path = write_lines(tmp_path / "x.json", rows)
    result = read_promptcblue(path, on_invalid="skip")
    assert [r.id for r in result.records] == ["a"]
    tasks = list(PROMPTCBLUE_TASKS)
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (2, "target", "empty target ('nan' counts as missing) while other lines have one: a line without a target can be predicted, not trained on; fill it in, or leave such lines out (data.on_invalid=skip in train, --on-invalid skip in convert)"),
        (3, "input", "missing or empty prompt ('None' counts as missing)"),
        (4, "sample_id", "missing or empty ('NULL' counts as missing)"),
        (5, "task_dataset", f"missing task name ('nan' counts as missing); expected one of {tasks}"),
        (6, "input", "missing or empty prompt"),
    ]
    with pytest.raises(DataFileError) as info:
        read_promptcblue(path)
    assert str(info.value) == (
        f"{path}, row 2, field 'target': empty target ('nan' counts as missing) "
        "while other lines have one: a line without a target can be predicted, not trained on; fill it in, or leave such lines out (data.on_invalid=skip in train, --on-invalid skip in convert)"
    )
    # Without a target requirement the "nan" target is no reply, never the reply "nan".
    kept = read_promptcblue(write_lines(tmp_path / "y.json", rows[:2]), require_target=False)
    assert kept.records[1].messages == [{"role": "user", "content": line()["input"]}]
    assert kept.n_without_target == 1


def test_promptcblue_test_file_with_null_and_nan_targets(tmp_path):
    rows = [line(sample_id="a", target=None), line(sample_id="b", target="NaN"),
            line(sample_id="c", target="", task_type="null")]
    result = read_promptcblue(write_lines(tmp_path / "test.json", rows))
    assert result.test_file and result.n_without_target == 3
    assert [r.messages for r in result.records] == [[{"role": "user", "content": line()["input"]}]] * 3
    assert [r.meta["task_type"] for r in result.records] == ["cls", "cls", None]


def test_promptcblue_nan_float_target_rejects_file_is_valid_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(line(sample_id="a")) + "\n" + json.dumps(line(sample_id="b", target=float("nan")))
                    + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = convert_promptcblue(path, out, on_invalid="skip")
    assert [(r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        (2, "target", "empty target (NaN counts as missing) while other lines have one: a line without a target can be predicted, not trained on; fill it in, or leave such lines out (data.on_invalid=skip in train, --on-invalid skip in convert)"),
    ]
    text = default_rejects_path(out).read_text(encoding="utf-8")
    assert "NaN" not in text.replace("(NaN counts", "")  # no bare NaN token: strict JSON readers accept it
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in rejects"))["raw"]["target"] is None


# --------------------------------------------------------------------------------------------
# Shapes seen in the wild: string answer_choices, "type" as the task type, official submissions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "labels"),
    [
        ("治疗方案，病因分析", ["治疗方案", "病因分析"]),                 # as the prompts list them
        (' ["治疗方案", "病因分析"] ', ["治疗方案", "病因分析"]),         # a JSON array stored as text
        ("治疗方案, 病因分析", ["治疗方案", "病因分析"]),
        ("1,25-二羟维生素D3，维生素B12", ["1,25-二羟维生素D3", "维生素B12"]),  # a digit comma is content
        ("治疗方案", ["治疗方案"]),
        ("  ", None),
        ("nan", None),
        (None, None),
    ],
)
def test_answer_choices_given_as_a_string_are_read_as_labels(tmp_path, value, labels):
    result = read_promptcblue(write_lines(tmp_path / "x.json", [line(sample_id="a", answer_choices=value)]))
    assert result.records[0].meta["answer_choices"] == labels


def test_answer_choices_string_is_used_for_matching_when_scoring():
    row = {"id": "1", "reference": "病因分析", "output": "这属于病因分析。",
           "meta": {"task_dataset": "KUAKE-QIC", "answer_choices": "治疗方案，病因分析"}}
    assert score([row])["tasks"]["KUAKE-QIC"]["score"] == 100.0
    with pytest.raises(ValueError, match=r"row 1: field 'answer_choices': expected a list of strings"):
        score([{**row, "meta": {"task_dataset": "KUAKE-QIC", "answer_choices": 5}}])


def test_type_is_the_task_type_when_task_dataset_names_the_dataset(tmp_path):
    readme_shape = {k: v for k, v in line(sample_id="a").items() if k != "task_type"} | {"type": "cls"}
    both = line(sample_id="b", type="ner")  # task_type given too: it wins
    only_type = {k: v for k, v in line(sample_id="c").items() if k not in ("task_type", "task_dataset")}
    result = read_promptcblue(write_lines(tmp_path / "x.json", [readme_shape, both, only_type | {"type": "KUAKE-QIC"}]))
    assert [(r.meta["task_dataset"], r.meta["task_type"]) for r in result.records] == [
        ("KUAKE-QIC", "cls"), ("KUAKE-QIC", "cls"), ("KUAKE-QIC", None)]
    with pytest.raises(DataFileError, match=r"field 'type': unknown task 'cls'.*'type' is the task type"):
        read_promptcblue(write_lines(tmp_path / "y.json", [only_type | {"type": "cls"}]))
    # scoring reads the dataset from task_dataset even when a "type" (the task type) is there too
    row = {"id": "1", "reference": "病因分析", "output": "病因分析", "type": "cls",
           "meta": {"type": "cls", "answer_choices": ["治疗方案", "病因分析"]}, "task_dataset": "KUAKE-QIC"}
    assert set(score([row])["tasks"]) == {"KUAKE-QIC"}


def submission_rows(skip: int = 0) -> list[dict]:
    """The official submission shape: sample_id, task_dataset, answer_choices, and the text in target."""
    raw = [json.loads(x) for x in (EXAMPLES / "dev.json").read_text(encoding="utf-8").splitlines() if x.strip()]
    return [{"sample_id": r["sample_id"], "task_dataset": r["task_dataset"], "type": r["task_type"],
             "answer_choices": "，".join(r["answer_choices"]) if r["answer_choices"] else None,
             "target": r["target"]} for r in raw[skip:]]


def test_official_submission_rows_score_against_the_structured_gold(structured):
    result = score_against_structured(submission_rows(), structured)
    assert result["overall"] == 100.0 and result["n"] == 80
    assert (result["n_missing_predictions"], result["missing_predictions"]) == (0, [])
    assert (result["n_not_in_gold"], result["not_in_gold"]) == (0, [])


def test_unpaired_ids_are_counted_and_named_instead_of_no_rows_to_score(structured):
    rows = submission_rows(skip=3) + [{"sample_id": "dev-999999", "task_dataset": "MedDG", "target": "多喝水"}]
    result = score_against_structured(rows, structured)
    # dev.json starts with dev-83507 (MedDG), dev-2107 (CHIP-CDEE), dev-5126 (KUAKE-QTR); named in gold order
    order = [e["sample_id"] for entries in structured.values() for e in entries]
    missing = sorted(["dev-83507", "dev-2107", "dev-5126"], key=order.index)
    assert (result["n_missing_predictions"], result["missing_predictions"]) == (3, missing)
    assert (result["n_not_in_gold"], result["not_in_gold"]) == (1, ["dev-999999"])
    assert {t for t, e in result["tasks"].items() if e["score"] != 100.0} == {"MedDG", "CHIP-CDEE", "KUAKE-QTR"}
    assert result["n"] == 80  # every gold entry is scored, the missing ones as empty outputs

    test_rows = [{"sample_id": f"test-{i}", "task_dataset": "MedDG", "target": "好"} for i in range(4)]
    with pytest.raises(ValueError) as info:
        score_against_structured(test_rows, structured)
    assert str(info.value) == (
        "no prediction row matches the structured gold: 4 prediction ids ('test-0', 'test-1', 'test-2', …) not in "
        f"the structured gold, 80 gold ids ({', '.join(repr(i) for i in order[:3])}, …) without a prediction "
        "(are the predictions and the gold of the same split?)")
    with pytest.raises(ValueError, match=r"no prediction rows to score \(the structured gold has 80 ids\)"):
        score_against_structured([], structured)


def test_evaluate_cli_scores_a_submission_against_gold(tmp_path, capsys):
    from medtune.cli import main

    rows = submission_rows(skip=3) + [{"sample_id": "dev-999999", "task_dataset": "MedDG", "target": "多喝水"}]
    preds = write_lines(tmp_path / "preds.json", rows)
    gold = EXAMPLES / "dev_structured.json"
    assert main(["evaluate", str(preds), "--out", str(tmp_path / "ev")]) == 2
    assert "official submission rows (sample_id, target)" in capsys.readouterr().err
    assert main(["evaluate", str(preds), "--task", "promptcblue", "--gold", str(gold), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "3 gold id(s) without a prediction (scored as empty outputs): " in printed
    assert "1 prediction id(s) not in the gold (not scored): dev-999999" in printed
    saved = json.loads((tmp_path / "ev" / "results.json").read_text(encoding="utf-8"))
    assert saved["n_not_in_gold"] == 1 and saved["n_missing_predictions"] == 3 and saved["n_predictions"] == 78
    assert saved["gold"] == str(gold) and saved["tokenizer"].startswith("BERT BasicTokenizer")
    # the data file itself (gold texts in target) scores 100 against its structured gold
    assert main(["evaluate", str(EXAMPLES / "dev.json"), "--gold", str(gold), "--out", str(tmp_path / "ev2")]) == 0
    assert json.loads((tmp_path / "ev2" / "results.json").read_text(encoding="utf-8"))["overall"] == 100.0
