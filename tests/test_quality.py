"""Tests for medtune.data.quality: inspect on the real samples, check on duplicate/leak fixtures."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest

import medtune
from medtune.data.instructions import convert_instructions
from medtune.data.quality import (
    _dedup_text,
    check,
    check_exit_code,
    inspect,
    jaccard,
    load_data,
    near_duplicate_pairs,
    normalise_text,
    shingles,
)
from medtune.io import DataFileError, write_jsonl
from medtune.records import Conversation, ExamRecord
from medtune.report.data_report import write_inspect_report

EXAMPLES = Path(medtune.__file__).parent / "examples"
CMEXAM = EXAMPLES / "cmexam" / "val_sample.csv"
SFT = EXAMPLES / "medicalgpt" / "medical_sft_1K_format.jsonl"
DPO = EXAMPLES / "medicalgpt" / "dpo_zh_500.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# inspect: the CMExam sample
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cmexam_stats():
    return inspect(CMEXAM)


def test_inspect_cmexam_counts(cmexam_stats):
    s = cmexam_stats
    assert (s["kind"], s["source_format"]) == ("exam", "cmexam")
    assert (s["n_rows"], s["n_records"], s["n_malformed"]) == (1000, 999, 1)
    assert s["malformed"] == [{"row": 764, "field": "answer", "reason": "no answer"}]
    assert s["fields"] == {
        "Question": {"missing": 0, "empty": 0},
        "Options": {"missing": 0, "empty": 0},
        "Answer": {"missing": 0, "empty": 1},
        "Explanation": {"missing": 0, "empty": 159},
    }


def test_inspect_cmexam_answers(cmexam_stats):
    exam = cmexam_stats["exam"]
    assert exam["answer_type"] == {"single": 936, "multi": 63}
    # Every letter of every answer (a multi answer "BCD" counts B, C and D once each).
    assert exam["answer_letters"] == {"A": 234, "B": 257, "C": 257, "D": 224, "E": 170}
    assert exam["answer_letters_single"] == {"A": 185, "B": 213, "C": 214, "D": 181, "E": 143}
    assert exam["answer_length"] == {"1": 936, "2": 12, "3": 26, "4": 21, "5": 4}
    assert exam["n_options"] == {"4": 30, "5": 969}
    assert exam["annotations"] == {}
    assert exam["missing_explanation"] == 159


def test_inspect_cmexam_lengths(cmexam_stats):
    lengths = cmexam_stats["lengths_chars"]
    assert set(lengths) == {"question", "options", "explanation", "total"}
    q = lengths["question"]
    assert q["n"] == 999
    assert q["min"] <= q["p50"] <= q["p90"] <= q["p99"] <= q["max"]
    assert lengths["explanation"]["min"] == 0  # the 159 rows without explanation
    assert cmexam_stats["lengths_tokens"] is None
    hist = cmexam_stats["histograms"]["chars"]["question"]
    assert sum(hist["counts"]) == 999 and len(hist["edges"]) == len(hist["counts"]) + 1


def test_write_inspect_report_cmexam(cmexam_stats, tmp_path):
    paths = write_inspect_report(cmexam_stats, tmp_path / "report")
    names = [p.name for p in paths]
    assert names[:2] == ["inspect.json", "inspect.md"]
    assert {"lengths_chars.png", "answer_letters.png"} <= set(names)
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "report" / "inspect.json").read_text(encoding="utf-8")) == cmexam_stats
    md = (tmp_path / "report" / "inspect.md").read_text(encoding="utf-8")
    assert "| B | 257 | 22.5% |" in md
    assert "| 764 | answer | no answer |" in md
    assert "![answer_letters.png](answer_letters.png)" in md


class CharTokenizer:
    """One token per character: token lengths must then equal character lengths."""

    name_or_path = "char-tokenizer"

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [list(range(len(t))) for t in texts]}


def test_inspect_token_lengths_with_char_tokenizer(tmp_path):
    stats = inspect(CMEXAM, tokenizer=CharTokenizer(), max_lengths=(256, 512))
    from medtune.data.exam import load_exam_file

    records, _ = load_exam_file(CMEXAM, on_invalid="skip")
    totals = [len("\n".join(p for p in (r.question, "\n".join(f"{k} {v}" for k, v in r.options.items()),
                                         r.explanation) if p)) for r in records]
    tokens = stats["lengths_tokens"]["total"]
    assert stats["tokenizer"] == "char-tokenizer" and stats["max_lengths"] == [256, 512]
    assert tokens["over"] == {"256": sum(t > 256 for t in totals), "512": sum(t > 512 for t in totals)}
    assert tokens["max"] == max(totals) == stats["lengths_chars"]["total"]["max"]
    assert {k: tokens[k] for k in ("p50", "p90", "p99")} == {
        k: stats["lengths_chars"]["total"][k] for k in ("p50", "p90", "p99")
    }
    paths = write_inspect_report(stats, tmp_path)
    assert (tmp_path / "lengths_tokens.png") in paths


def test_inspect_with_real_tokenizer(tiny_tokenizer):
    stats = inspect(SFT, tokenizer=tiny_tokenizer)
    tokens = stats["lengths_tokens"]
    assert set(tokens) == {"prompt", "reply", "total"}
    total = tokens["total"]
    assert 0 < total["p50"] <= total["p90"] <= total["max"]
    assert total["over"]["512"] >= total["over"]["1024"] >= total["over"]["2048"]


# --------------------------------------------------------------------------------------------
# inspect: conversations, preferences, records files
# --------------------------------------------------------------------------------------------


def test_inspect_sft_sample(tmp_path):
    stats = inspect(SFT)
    assert (stats["kind"], stats["source_format"]) == ("conversation", "sharegpt")
    assert (stats["n_rows"], stats["n_records"], stats["n_malformed"]) == (1000, 1000, 0)
    assert stats["fields"] == {"conversations": {"missing": 0, "empty": 0}}
    conv = stats["conversation"]
    assert conv["turns"] == {"1": 1000}
    assert conv["n_multi_turn"] == 0 and conv["n_with_system"] == 0
    # The converted records file is read the same way.
    out = tmp_path / "sft.jsonl"
    convert_instructions(SFT, out)
    again = inspect(out)
    assert again["source_format"] == "messages"
    assert again["lengths_chars"] == stats["lengths_chars"]
    assert (tmp_path / "r" / "turns.png") in write_inspect_report(again, tmp_path / "r")


def test_inspect_dpo_sample():
    stats = inspect(DPO)
    assert stats["kind"] == "preference" and stats["n_records"] == 500
    pref = stats["preference"]
    assert pref["turns"] == {"1": 500}
    assert pref["n_with_system"] == 84
    assert (pref["n_chosen_longer"], pref["n_rejected_longer"], pref["n_same_length"]) == (289, 211, 0)
    assert set(stats["lengths_chars"]) == {"prompt", "chosen", "rejected", "total"}


def test_inspect_conversation_meta_and_malformed(tmp_path):
    rows = [
        Conversation(f"c{i}", [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": "答"}],
                     {"task_dataset": task, "sample_id": i}).to_dict()
        for i, task in enumerate(["CMeEE", "CMeEE", "CHIP-CDN", "CMeEE"])
    ]
    rows.append({"id": "bad", "messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": ""}]})
    path = tmp_path / "conv.jsonl"
    write_jsonl(path, rows)
    stats = inspect(path)
    assert stats["n_records"] == 4 and stats["n_malformed"] == 1
    assert stats["malformed"] == [{"row": 5, "field": "messages[1].content", "reason": "empty reply"}]
    conv = stats["conversation"]
    assert conv["meta_keys"] == {"sample_id": 4, "task_dataset": 4}
    assert conv["meta_values"]["task_dataset"] == {"n_distinct": 2, "counts": {"CMeEE": 3, "CHIP-CDN": 1}}
    assert stats["fields"]["meta"] == {"missing": 1, "empty": 0}


def test_inspect_promptcblue_lines(tmp_path):
    def line(i: int, task: str, target: str = "答案") -> dict:
        return {"input": f"找出实体：病人{i}发热", "target": target, "answer_choices": None,
                "task_type": "ner", "task_dataset": task, "sample_id": f"dev-{i}"}

    path = tmp_path / "dev.json"
    write_jsonl(path, [line(1, "CMeEE-V2"), line(2, "CMeEE-V2"), line(3, "CHIP-CDN"), line(4, "CHIP-CDN", target="")])
    stats = inspect(path)
    assert (stats["kind"], stats["source_format"]) == ("conversation", "promptcblue")
    assert stats["n_records"] == 3 and [m["row"] for m in stats["malformed"]] == [4]
    assert stats["conversation"]["meta_values"]["task_dataset"]["counts"] == {"CMeEE-V2": 2, "CHIP-CDN": 1}


def test_inspect_exam_records_file(tmp_path, sample_records):
    rows = [r.to_dict() for r in sample_records[:5]]
    rows[1]["answer"] = "Z"
    rows[2] = {k: v for k, v in rows[2].items() if k != "explanation"}
    rows[3]["annotations"] = {"Difficulty level": 3}
    path = tmp_path / "records.jsonl"
    write_jsonl(path, rows)
    stats = inspect(path)
    assert (stats["kind"], stats["source_format"]) == ("exam", "records")
    assert stats["n_records"] == 4
    assert stats["malformed"] == [{"row": 2, "field": "answer", "reason": "answer 'Z' is not a string of letters A-J"}]
    assert stats["fields"]["explanation"] == {"missing": 1, "empty": 0}
    assert stats["exam"]["annotations"] == {"Difficulty level": {"3": 1}}


def test_inspect_unknown_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "纯文本"}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match="unknown data shape"):
        inspect(path)


# --------------------------------------------------------------------------------------------
# Normalisation and the near-duplicate join
# --------------------------------------------------------------------------------------------


def test_normalise_text():
    assert normalise_text("  Ａ，b　C。\n") == "abc"
    assert normalise_text("患者，男，45岁。") == normalise_text("患者 男 45 岁")
    assert normalise_text("体温↑ 39℃") == "体温↑39°c"  # symbols kept (NFKC turns ℃ into °C)
    assert normalise_text("零\u200b宽") == "零宽"
    assert normalise_text("。，！") == ""


def test_shingles_and_jaccard():
    assert shingles("abcd") == {"abc", "bcd"}
    assert shingles("ab") == {"ab"}
    assert shingles("") == set()
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8, 0.9, 1.0])
def test_near_join_matches_brute_force(sample_records, threshold):
    rng = random.Random(threshold)
    texts = [_dedup_text(r) for r in sample_records[:150]]
    # Add edited copies so there is something to find at every threshold.
    for text in texts[:40]:
        chars = list(text)
        for i in rng.sample(range(len(chars)), rng.randint(1, 6)):
            chars[i] = "药"
        texts.append("".join(chars))
    texts += ["短", "ab", texts[0]]
    fast = near_duplicate_pairs(texts, threshold)
    grams = [shingles(t) for t in texts]
    brute = [
        (i, j, jaccard(grams[i], grams[j]))
        for i, j in itertools.combinations(range(len(texts)), 2)
        if jaccard(grams[i], grams[j]) >= threshold - 1e-9
    ]
    assert [(i, j) for i, j, _ in fast] == [(i, j) for i, j, _ in brute]
    assert len(fast) > 0


def test_near_join_rejects_bad_threshold():
    with pytest.raises(ValueError):
        near_duplicate_pairs(["abc"], 0)


# --------------------------------------------------------------------------------------------
# check: duplicates and leakage
# --------------------------------------------------------------------------------------------


def shuffled_copy(rec: ExamRecord, new_id: str) -> ExamRecord:
    """The same question re-typed: spaces/full-width punctuation, options in reverse order."""
    texts = list(rec.options.values())[::-1]
    letters = list(rec.options)
    answer_texts = {rec.options[a] for a in rec.answer}
    options = dict(zip(letters, texts, strict=True))
    answer = "".join(k for k, v in options.items() if v in answer_texts)
    question = " " + rec.question.replace("，", ",") + "  "
    return dataclasses.replace(rec, id=new_id, question=question, options=options, answer=answer)


def one_char_changed(rec: ExamRecord, new_id: str) -> ExamRecord:
    middle = len(rec.question) // 2
    changed = "肺" if rec.question[middle] != "肺" else "肝"
    return dataclasses.replace(rec, id=new_id, question=rec.question[:middle] + changed + rec.question[middle + 1 :])


@pytest.fixture
def split_files(tmp_path, sample_records):
    # Long questions, so that one changed character keeps the 3-gram Jaccard above 0.9.
    long = [r for r in sample_records[:200] if len(_dedup_text(r)) >= 90]
    train_base, test_base = long[:20], long[20:30]
    dup_of, near_of, leak_of, near_leak_of = train_base[2], train_base[5], train_base[7], train_base[9]
    train = [*train_base, shuffled_copy(dup_of, "train-dup"), one_char_changed(near_of, "train-near")]
    test = [*test_base, dataclasses.replace(leak_of, id="test-leak"), one_char_changed(near_leak_of, "test-near-leak")]
    paths = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl", "clean": tmp_path / "clean.jsonl"}
    write_jsonl(paths["train"], [r.to_dict() for r in train])
    bad = {**test_base[0].to_dict(), "id": "bad", "answer": "Z"}
    write_jsonl(paths["test"], [*(r.to_dict() for r in test), bad])
    write_jsonl(paths["clean"], [r.to_dict() for r in test_base])
    return paths, {"dup": dup_of, "near": near_of, "leak": leak_of, "near_leak": near_leak_of}


def test_check_finds_duplicates_and_leaks(split_files):
    paths, src = split_files
    report = check(paths["train"], test=paths["test"])
    counts = report["counts"]
    assert counts["records"] == {"train": 22, "test": 12}
    assert counts["exact_within"] == {"train": 1, "test": 0}
    assert counts["near_within"] == {"train": 1, "test": 0}
    assert counts["test_in_train"] == 2 and counts["leaked"] == 2
    assert counts["val_in_train"] == 0 and counts["test_in_val"] == 0

    (exact,) = report["exact_duplicates"]["within"]["train"]
    assert (exact["a_id"], exact["b_id"], exact["similarity"], exact["match"]) == (src["dup"].id, "train-dup", 1.0, "exact")
    assert (exact["a_row"], exact["b_row"]) == (3, 21)
    assert exact["same_target"] is True  # options reordered, answer text unchanged

    (near,) = report["near_duplicates"]["within"]["train"]
    assert {near["a_id"], near["b_id"]} == {src["near"].id, "train-near"}
    assert 0.9 <= near["similarity"] < 1.0 and near["match"] == "near"

    leaks = {p["a_id"]: p for p in report["leakage"]["test_in_train"]}
    assert leaks["test-leak"]["b_id"] == src["leak"].id and leaks["test-leak"]["match"] == "exact"
    assert leaks["test-leak"]["a_split"] == "test" and leaks["test-leak"]["b_split"] == "train"
    assert leaks["test-near-leak"]["b_id"] == src["near_leak"].id and leaks["test-near-leak"]["match"] == "near"
    assert 0.9 <= leaks["test-near-leak"]["similarity"] < 1.0
    assert [(p["a_id"], p["b_id"]) for p in report["exact_duplicates"]["across"]] == [(src["leak"].id, "test-leak")]
    assert [(p["a_id"], p["b_id"]) for p in report["near_duplicates"]["across"]] == [
        (src["near_leak"].id, "test-near-leak")
    ]

    assert report["malformed"] == [
        {"split": "test", "row": 13, "field": "answer", "reason": "answer 'Z' is not a string of letters A-J"}
    ]
    assert report["splits"]["test"]["n_malformed"] == 1
    json.dumps(report)  # JSON-ready

    assert check_exit_code(report) == 1
    assert check_exit_code(report, allow_leakage=True) == 0


def test_check_clean_split_exits_zero(split_files):
    paths, _ = split_files
    report = check(paths["train"], val=paths["clean"])
    assert report["counts"]["leaked"] == 0
    assert report["counts"]["exact_within"]["train"] == 1  # duplicates alone do not fail
    assert check_exit_code(report) == 0


def test_check_val_and_test_in_val(split_files):
    paths, _ = split_files
    report = check(paths["train"], val=paths["clean"], test=paths["test"])
    assert report["counts"]["test_in_val"] == 10  # test_base is the whole clean val split
    assert report["counts"]["leaked"] == report["counts"]["test_in_train"] == 2
    assert check_exit_code(report) == 1


def test_check_threshold_changes_near_pairs(split_files):
    paths, _ = split_files
    strict = check(paths["train"], test=paths["test"], near_threshold=1.0)
    assert strict["counts"]["near_within"]["train"] == 0
    assert strict["counts"]["test_in_train"] == 1
    with pytest.raises(ValueError):
        check(paths["train"], near_threshold=1.5)


def test_check_cmexam_sample_against_itself():
    report = check(CMEXAM, test=CMEXAM)
    assert report["counts"]["exact_within"] == {"train": 0, "test": 0}
    assert report["counts"]["test_in_train"] == 999
    assert report["malformed"][0] == {"split": "train", "row": 764, "field": "answer", "reason": "no answer"}


def test_check_conversations_with_leak(tmp_path):
    def sharegpt(question: str, answer: str) -> dict:
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}

    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    write_jsonl(train, [sharegpt("发烧三天，体温三十九度，伴有咳嗽，需要做什么检查？", "血常规"), sharegpt("头痛怎么办？", "休息")])
    # Same question, different punctuation/spacing and a different system prompt: still a leak.
    write_jsonl(test, [
        {"system": "你是医生", **sharegpt("发烧三天 体温三十九度 伴有咳嗽 需要做什么检查", "胸片")},
        sharegpt("腹泻吃什么？", "补液"),
    ])
    report = check(train, test=test)
    (leak,) = report["leakage"]["test_in_train"]
    assert (leak["a_id"], leak["b_id"], leak["match"]) == ("test-00001", "train-00001", "exact")
    assert leak["same_target"] is False  # same question, different answer: a label conflict
    assert check_exit_code(report) == 1


def test_check_accepts_in_memory_records(sample_records):
    report = check(sample_records[:50], test=sample_records[40:60])
    assert report["counts"]["test_in_train"] == 10
    assert report["splits"]["train"]["kind"] == "exam"


def test_load_data_kinds(tmp_path):
    assert load_data(CMEXAM).kind == "exam"
    assert load_data(SFT).kind == "conversation"
    assert load_data(DPO).kind == "preference"


def test_load_data_uses_the_shared_detector(tmp_path):
    """inspect/check place files with medtune.data.detect, like predict and train do."""
    csv = load_data(CMEXAM)
    assert (csv.source_format, csv.shape.format, csv.shape.layout) == ("cmexam", "cmexam-csv", "table")
    assert load_data(SFT).shape.format == load_data(SFT).source_format == "sharegpt"
    # JSON lines in a .txt file are still inspected as JSON lines...
    lines = tmp_path / "sft.txt"
    lines.write_text(SFT.read_text(encoding="utf-8"), encoding="utf-8")
    assert len(load_data(lines).records) == 1000
    # ...while plain text (pre-training data) is refused in one line, saying what it is.
    plain = tmp_path / "docs.txt"
    plain.write_text("患者发热三天。\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="unknown data shape for exam, conversation or preference data"):
        inspect(plain)
    with pytest.raises(DataFileError, match="this is pt-text data"):
        check(plain)


def test_load_data_reads_exam_records_from_a_json_array(tmp_path, sample_records):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([r.to_dict() for r in sample_records[:3]], ensure_ascii=False), encoding="utf-8")
    data = load_data(path)
    assert (data.kind, data.source_format, data.shape.layout) == ("exam", "records", "array")
    assert data.records == sample_records[:3] and data.rows == [1, 2, 3]


def test_data_inspect_writes_its_report_with_the_report_module_not_a_data_wrapper(tmp_path, monkeypatch, capsys):
    """medtune.data.quality kept a write_inspect_report wrapper that only the CLI went through."""
    import medtune.data.quality as quality
    from medtune.cli import main
    from medtune.report import data_report

    assert not hasattr(quality, "write_inspect_report") and "write_inspect_report" not in quality.__all__
    calls = []
    real = data_report.write_inspect_report
    monkeypatch.setattr(data_report, "write_inspect_report", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(["data", "inspect", str(CMEXAM), "--out", str(tmp_path / "r")]) == 0
    assert len(calls) == 1 and (tmp_path / "r" / "inspect.md").exists()
    assert "written: " in capsys.readouterr().out
