"""predict's options: sampling settings, .txt question lists, prompt wrapping, CSV copies."""

from __future__ import annotations

import csv
import io
import json

import pytest

from medtune.cli import main
from medtune.inference.base import FakeBackend, GenerationParams
from medtune.inference.predict import (
    CSV_COLUMNS,
    PredictionFileError,
    PromptWrapping,
    default_csv_path,
    describe_producer,
    meta_path,
    predict,
    predict_conversations,
    read_question_lines,
    write_predictions_csv,
)
from medtune.io import DataFileError, read_jsonl
from medtune.records import Conversation
from medtune.templates import conversation_template, get_template

QUESTIONS = "发热怎么办？\n\n  咳嗽一周，夜间加重  \n \r\n头痛\n"


@pytest.fixture
def records(sample_records):
    return sample_records[:6]


def _conversations() -> list[Conversation]:
    return [Conversation("c1", [{"role": "user", "content": "发热怎么办？"}, {"role": "assistant", "content": "多喝水"}]),
            Conversation("c2", [{"role": "user", "content": "咳嗽"}])]


def _read_csv(path) -> list[list[str]]:
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # BOM: spreadsheet programs then read the Chinese as UTF-8
    return list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))


# ---- sampling settings are part of the producer ------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ({"temperature": 0.7, "seed": 1}, {"temperature": 0.7, "seed": 2}, "generation.seed: 1 → 2"),
        ({"temperature": 0.7}, {"temperature": 0.9}, "generation.temperature: 0.7 → 0.9"),
        ({"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7, "top_p": 0.8}, "generation.top_p: 0.9 → 0.8"),
        ({"temperature": 0.7}, {"temperature": 0.7, "top_k": 40}, "generation.top_k: 0 → 40"),
        ({}, {"repetition_penalty": 1.1}, "generation.repetition_penalty: 1.0 → 1.1"),
    ],
)
def test_rerun_with_another_sampling_setting_is_refused_naming_it(records, tmp_path, first, second, message):
    out = tmp_path / "p.jsonl"
    predict(records, FakeBackend(default="A"), "qa", out, GenerationParams(**first), progress=False)
    before = out.read_bytes()
    backend = FakeBackend(default="B")
    with pytest.raises(PredictionFileError, match=message):
        predict(records, backend, "qa", out, GenerationParams(**second), progress=False)
    assert backend.calls == [] and out.read_bytes() == before
    # the same settings continue the file
    assert predict(records, FakeBackend(), "qa", out, GenerationParams(**first), progress=False)["already_done"] == 6


def test_sampling_settings_are_recorded_in_the_meta_file(records, tmp_path):
    out = tmp_path / "p.jsonl"
    params = GenerationParams(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.05,
                              seed=42)
    predict(records, FakeBackend(), "qa", out, params, progress=False)
    assert json.loads(meta_path(out).read_text(encoding="utf-8"))["generation"] == {
        "max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "stop": [], "top_k": 40,
        "repetition_penalty": 1.05, "seed": 42}


def test_resumed_seeded_run_samples_what_an_uninterrupted_run_would(sample_records, tmp_path, tiny_model_dir):
    from medtune.inference.hf import HFBackend
    from medtune.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir), None)
    backend = HFBackend(model, tokenizer)
    recs = sample_records[:7]
    params = GenerationParams(max_new_tokens=6, temperature=1.0, seed=123)
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    predict(recs, backend, "qa", whole, params, batch_size=4, progress=False)
    predict(recs[:3], backend, "qa", parts, params, batch_size=2, progress=False)  # "interrupted" after 3
    assert predict(recs, backend, "qa", parts, params, batch_size=3, progress=False)["already_done"] == 3
    outputs = lambda path: {row["id"]: row["output"] for row in read_jsonl(path)}  # noqa: E731
    assert outputs(parts) == outputs(whole)
    other = tmp_path / "other.jsonl"
    predict(recs, backend, "qa", other, GenerationParams(max_new_tokens=6, temperature=1.0, seed=124),
            batch_size=4, progress=False)
    assert all(outputs(other)[i] != o for i, o in outputs(whole).items())


def test_cli_refuses_sampling_options_without_temperature_and_bad_values(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "q.txt"
    data.write_text(QUESTIONS, encoding="utf-8")
    base = ["predict", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "p.jsonl")]
    assert main([*base, "--seed", "3", "--top-k", "5"]) == 2
    assert capsys.readouterr().err.strip() == ("medtune predict: error: --top-k, --seed only apply when sampling: "
                                               "add --temperature T (T > 0), or leave them out for greedy decoding")
    assert main([*base, "--temperature", "0.5", "--top-p", "1.5"]) == 2
    assert "generation settings: top_p must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_cli_rerun_with_another_seed_is_refused_before_loading(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "q.txt"
    data.write_text(QUESTIONS, encoding="utf-8")
    base = ["predict", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "p.jsonl"),
            "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "20"]
    assert main([*base, "--seed", "3"]) == 0
    first = read_jsonl(tmp_path / "p.jsonl")
    assert main([*base, "--seed", "3"]) == 0  # the same producer continues (nothing left to do)
    assert "0 predicted, 3 already there" in capsys.readouterr().out
    assert main([*base, "--seed", "4"]) == 2
    assert "generation.seed: 3 → 4" in capsys.readouterr().err
    assert read_jsonl(tmp_path / "p.jsonl") == first


# ---- .txt question lists -----------------------------------------------------------------------------


def test_txt_question_list_skips_and_counts_blank_lines(tmp_path):
    path = tmp_path / "q.txt"
    path.write_bytes(b"\xef\xbb\xbf" + QUESTIONS.encode("utf-8"))  # with a BOM, as Notepad writes it
    result = read_question_lines(path)
    assert (result.n_lines, result.n_blank) == (5, 2)
    assert [(r.id, r.messages, r.meta) for r in result.records] == [
        ("line-1", [{"role": "user", "content": "发热怎么办？"}], {"line": 1}),
        ("line-3", [{"role": "user", "content": "咳嗽一周，夜间加重"}], {"line": 3}),
        ("line-5", [{"role": "user", "content": "头痛"}], {"line": 5}),
    ]
    path.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="no questions: all 2 lines are blank"):
        read_question_lines(path)


def test_txt_question_list_is_predicted_as_conversations(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "q.txt"
    data.write_text(QUESTIONS, encoding="utf-8")
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"{data}: question list, 5 lines → 3 questions (2 blank lines skipped)" in printed
    assert "(template plain; greedy)" in printed
    rows = read_jsonl(out)
    assert sorted(row["id"] for row in rows) == ["line-1", "line-3", "line-5"]
    by_id = {row["id"]: row for row in rows}
    # plain format, one user turn: the prompt is the question exactly
    assert by_id["line-3"]["prompt"] == "咳嗽一周，夜间加重"
    assert by_id["line-3"]["messages"] == [{"role": "user", "content": "咳嗽一周，夜间加重"}]
    assert by_id["line-3"]["reference"] == "" and by_id["line-3"]["meta"] == {"line": 3}
    assert json.loads(meta_path(out).read_text(encoding="utf-8"))["kind"] == "conversation"


# ---- prompt wrapping ---------------------------------------------------------------------------------


def test_instruction_with_input_placeholder_wraps_each_conversation_input(tmp_path):
    out = tmp_path / "p.jsonl"
    backend = FakeBackend(default="好")
    wrapping = PromptWrapping(instruction="请简要回答{注意}：{input}\n答：")
    predict_conversations(_conversations(), backend, conversation_template("plain"), out, wrapping=wrapping,
                          progress=False)
    rows = {row["id"]: row for row in read_jsonl(out)}
    assert rows["c1"]["prompt"] == "请简要回答{注意}：发热怎么办？\n答："  # other braces are text
    assert rows["c2"]["prompt"] == "请简要回答{注意}：咳嗽\n答："
    assert rows["c1"]["messages"] == [{"role": "user", "content": "发热怎么办？"}]  # the data as given
    meta = json.loads(meta_path(out).read_text(encoding="utf-8"))
    assert meta["instruction"] == "请简要回答{注意}：{input}\n答：" and "system" not in meta


def test_instruction_without_placeholder_and_system_go_before_the_input(tmp_path):
    out = tmp_path / "p.jsonl"
    wrapping = PromptWrapping(instruction="请简要回答。", system="你是一名医生。")
    predict_conversations(_conversations(), FakeBackend(), conversation_template("plain"), out, wrapping=wrapping,
                          progress=False)
    rows = {row["id"]: row for row in read_jsonl(out)}
    # plain: system_format "{system}\n", then instruction_format "{instruction}\n{user}"
    assert rows["c2"]["prompt"] == "你是一名医生。\n请简要回答。\n咳嗽"


def test_rerun_with_another_instruction_is_refused_naming_it(tmp_path):
    out = tmp_path / "p.jsonl"
    tpl = conversation_template("plain")
    predict_conversations(_conversations(), FakeBackend(), tpl, out, wrapping=PromptWrapping("甲：{input}"),
                          progress=False)
    with pytest.raises(PredictionFileError, match='instruction: "甲：{input}" → "乙：{input}"'):
        predict_conversations(_conversations(), FakeBackend(), tpl, out, wrapping=PromptWrapping("乙：{input}"),
                              progress=False)
    with pytest.raises(PredictionFileError, match=r'instruction: "甲：\{input\}" → "\(absent\)"'):
        predict_conversations(_conversations(), FakeBackend(), tpl, out, progress=False)


def test_instruction_wraps_exam_prompts_through_the_template(records, tmp_path):
    tpl = get_template("qa")
    out = tmp_path / "p.jsonl"
    predict(records, FakeBackend(), tpl, out, wrapping=PromptWrapping(instruction="只写字母{A-E}：{input}"),
            progress=False)
    for row, rec in zip(sorted(read_jsonl(out), key=lambda r: r["id"]), sorted(records, key=lambda r: r.id),
                        strict=True):
        assert row["prompt"] == "只写字母{A-E}：" + tpl.render_prompt(rec)
    source = json.loads(meta_path(out).read_text(encoding="utf-8"))
    assert source["instruction"] == "只写字母{A-E}：{input}"
    assert source["template"]["sha256"] != describe_producer(None, tpl, GenerationParams(), "exam")["template"]["sha256"]
    # check_resumable's description (the CLI's early check) is the one predict wrote
    assert describe_producer({"backend": "fake"}, tpl, GenerationParams(), "exam",
                             PromptWrapping(instruction="只写字母{A-E}：{input}"))["key"] == source["key"]


def test_system_text_for_exam_templates(records, tmp_path, tiny_tokenizer):
    plain = get_template("qa")
    out = tmp_path / "plain.jsonl"
    predict(records[:1], FakeBackend(), plain, out, wrapping=PromptWrapping(system="你是考官。"), progress=False)
    assert read_jsonl(out)[0]["prompt"] == "你是考官。\n" + plain.render_prompt(records[0])
    chat = get_template("chat")
    out = tmp_path / "chat.jsonl"
    predict(records[:1], FakeBackend(), chat, out, wrapping=PromptWrapping(system="你是考官。"),
            tokenizer=tiny_tokenizer, progress=False)
    expected = tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "你是考官。\n" + chat.system},
         {"role": "user", "content": chat.prompt.format(question=records[0].question,
                                                        options=chat.render_options(records[0].options))}],
        tokenize=False, add_generation_prompt=True)
    assert read_jsonl(out)[0]["prompt"] == expected


def test_blank_instruction_is_refused():
    with pytest.raises(ValueError, match="the instruction is empty"):
        PromptWrapping(instruction="  ")
    with pytest.raises(ValueError, match="the system is empty"):
        PromptWrapping(system="")


# ---- CSV copies --------------------------------------------------------------------------------------


def test_csv_copy_of_exam_predictions_in_input_order(records, tmp_path):
    out = tmp_path / "p.jsonl"
    csv_path = default_csv_path(out)
    assert csv_path == tmp_path / "p.csv"
    backend = FakeBackend({r.question: f"答案：{r.answer}" for r in records})
    predict(records, backend, "qa", out, csv_path=csv_path, progress=False)
    assert [row["id"] for row in read_jsonl(out)] != [r.id for r in records]  # generation order differs
    rows = _read_csv(csv_path)
    assert rows[0] == list(CSV_COLUMNS["exam"]) == ["id", "question", "options", "answer", "output"]
    assert rows[1:] == [[r.id, r.question, "\n".join(f"{k} {v}" for k, v in r.options.items()), r.answer,
                         f"答案：{r.answer}"] for r in records]
    assert b"\r\n" in csv_path.read_bytes()


def test_csv_copy_is_rewritten_on_resume_and_removed_by_overwrite(records, tmp_path):
    out = tmp_path / "p.jsonl"
    csv_path = tmp_path / "p.csv"
    predict(records[:2], FakeBackend(default="A"), "qa", out, csv_path=csv_path, progress=False)
    assert len(_read_csv(csv_path)) == 3
    predict(records, FakeBackend(default="A"), "qa", out, csv_path=csv_path, progress=False)
    assert [row[0] for row in _read_csv(csv_path)[1:]] == [r.id for r in records]

    class Failing(FakeBackend):
        def generate(self, prompts, params, add_special_tokens=True):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        predict(records, Failing(), "qa", out, csv_path=csv_path, overwrite=True, progress=False)
    assert not csv_path.exists()  # no copy of predictions that were thrown away


def test_csv_copy_of_conversation_predictions(tmp_path):
    out = tmp_path / "p.jsonl"
    predict_conversations(_conversations(), FakeBackend(default="多休息"), conversation_template("plain"), out,
                          wrapping=PromptWrapping(instruction="答：{input}"), csv_path=tmp_path / "p.csv",
                          progress=False)
    assert _read_csv(tmp_path / "p.csv") == [["id", "input", "reference", "output"],
                                             ["c1", "发热怎么办？", "多喝水", "多休息"],
                                             ["c2", "咳嗽", "", "多休息"]]


def test_csv_out_name_is_refused_because_the_jsonl_is_the_record(tmp_path):
    with pytest.raises(ValueError, match="the predictions file is JSON lines"):
        default_csv_path(tmp_path / "p.csv")
    out = tmp_path / "p.jsonl"
    predict_conversations(_conversations(), FakeBackend(), conversation_template("plain"), out, progress=False)
    path, n = write_predictions_csv(out, order=["c2", "c1"])
    assert (path, n) == (tmp_path / "p.csv", 2)
    assert [row[0] for row in _read_csv(path)[1:]] == ["c2", "c1"]


def test_csv_copy_does_not_let_spreadsheets_run_outputs_as_formulas(tmp_path):
    """CSV injection: an output starting with = + - @ (or tab/CR) is a formula in Excel; prefix a '."""
    formulas = {"c1": '=HYPERLINK("http://x","y")', "c2": "-1+2", "c3": "+1", "c4": "@SUM(A1)",
                "c5": "\tx", "c6": "\r=1"}
    convs = [Conversation(i, [{"role": "user", "content": f"q{i}"}]) for i in formulas]
    convs.append(Conversation("c7", [{"role": "user", "content": "=2+3"}, {"role": "assistant", "content": "-1"}]))
    out = tmp_path / "p.jsonl"
    backend = FakeBackend({f"q{i}": text for i, text in formulas.items()}, default="正常 -1 = ok")
    predict_conversations(convs, backend, conversation_template("plain"), out, csv_path=tmp_path / "p.csv",
                          progress=False)
    rows = _read_csv(tmp_path / "p.csv")
    outputs = {row[0]: row[3] for row in rows[1:]}
    assert outputs == {**{i: "'" + text for i, text in formulas.items()}, "c7": "正常 -1 = ok"}
    # the data's cells too (input, reference), and the JSON lines keep the exact text
    assert rows[-1] == ["c7", "'=2+3", "'-1", "正常 -1 = ok"]
    assert {r["id"]: r["output"] for r in read_jsonl(out)}["c1"] == '=HYPERLINK("http://x","y")'


def test_cli_format_csv_writes_both_files(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "q.txt"
    data.write_text(QUESTIONS, encoding="utf-8")
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "3", "--format", "csv", "--instruction", "请回答：{input}"]) == 0
    assert f"csv: {tmp_path / 'p.csv'}" in capsys.readouterr().out
    rows = _read_csv(tmp_path / "p.csv")
    assert [r[:3] for r in rows] == [["id", "input", "reference"], ["line-1", "发热怎么办？", ""],
                                     ["line-3", "咳嗽一周，夜间加重", ""], ["line-5", "头痛", ""]]
    by_id = {row["id"]: row for row in read_jsonl(out)}
    assert [r[3] for r in rows[1:]] == [by_id[i]["output"] for i in ("line-1", "line-3", "line-5")]
    assert by_id["line-5"]["prompt"] == "请回答：头痛"
    assert main(["predict", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "x.csv"),
                 "--format", "csv"]) == 2
