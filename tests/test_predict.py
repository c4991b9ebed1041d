"""Batch prediction with the fake backend (resume, crash recovery) and the JSON-lines helpers."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from medtune.inference.base import FakeBackend, GenerationParams
from medtune.inference.predict import predict
from medtune.io import (
    DataFileError,
    JsonlAppender,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    read_jsonl,
    read_jsonl_tolerant,
    write_jsonl,
)
from medtune.templates import get_template

KEYS = ["id", "question", "options", "answer", "explanation", "annotations", "template", "prompt", "output", "source"]


@pytest.fixture
def records(sample_records):
    recs = sample_records[:10]
    assert len({r.id for r in recs}) == 10
    return recs


def _backend(records) -> FakeBackend:
    # Each question text maps to its own reply, so every output can be traced to its record.
    return FakeBackend({r.question: f"{r.answer}\n理由：{r.id}" for r in records})


def _lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _prompt_ids(prompts_by_id: dict[str, str], calls) -> list[str]:
    by_prompt = {p: i for i, p in prompts_by_id.items()}
    return [by_prompt[p] for batch in calls for p in batch]


def test_predict_writes_one_row_per_record(records, tmp_path):
    tpl = get_template("qa")
    backend = _backend(records)
    out = tmp_path / "pred" / "predictions.jsonl"
    summary = predict(records, backend, "qa", out, batch_size=3, progress=False)
    assert summary == {"total": 10, "already_done": 0, "predicted": 10}

    rows = [json.loads(line) for line in _lines(out)]
    assert len(rows) == 10
    by_id = {r.id: r for r in records}
    assert sorted(row["id"] for row in rows) == sorted(by_id)
    for row in rows:
        assert list(row) == KEYS
        rec = by_id[row["id"]]
        assert row["question"] == rec.question
        assert row["options"] == rec.options
        assert row["answer"] == rec.answer
        assert row["explanation"] == rec.explanation
        assert row["annotations"] == rec.annotations
        assert row["template"] == "qa"
        assert row["prompt"] == tpl.render_prompt(rec)
        assert row["output"] == f"{rec.answer}\n理由：{rec.id}"

    # Batches of 3, shortest prompts first (less padding); the file is in generation order.
    assert [len(b) for b in backend.calls] == [3, 3, 3, 1]
    flat = [p for batch in backend.calls for p in batch]
    assert [len(p) for p in flat] == sorted(len(p) for p in flat)
    assert [row["prompt"] for row in rows] == flat


def test_rerun_does_not_call_backend_again(records, tmp_path):
    out = tmp_path / "predictions.jsonl"
    backend = _backend(records)
    predict(records, backend, get_template("qa"), out, progress=False)
    before = out.read_bytes()
    calls = [list(b) for b in backend.calls]

    summary = predict(records, backend, "qa", out, progress=False)
    assert summary == {"total": 10, "already_done": 10, "predicted": 0}
    assert backend.calls == calls
    assert out.read_bytes() == before
    ids = [row["id"] for row in read_jsonl(out)]
    assert len(ids) == 10 and len(set(ids)) == 10


def test_resume_after_crash_with_torn_last_line(records, tmp_path):
    tpl = get_template("qa")
    out = tmp_path / "predictions.jsonl"
    predict(records, _backend(records), tpl, out, batch_size=4, progress=False)
    lines = _lines(out)
    kept = lines[:4]
    torn = lines[4][: len(lines[4]) // 2]
    out.write_text("".join(line + "\n" for line in kept) + torn, encoding="utf-8")
    done_ids = [json.loads(line)["id"] for line in kept]

    backend = _backend(records)
    summary = predict(records, backend, tpl, out, batch_size=4, progress=False)
    assert summary == {"total": 10, "already_done": 4, "predicted": 6}
    prompts = {r.id: tpl.render_prompt(r) for r in records}
    redone = _prompt_ids(prompts, backend.calls)
    assert sorted(redone) == sorted(set(prompts) - set(done_ids))
    assert json.loads(lines[4])["id"] in redone  # the torn row is predicted again

    rows = read_jsonl(out)  # strict reader: every line parses
    ids = [row["id"] for row in rows]
    assert len(ids) == 10 and sorted(ids) == sorted(prompts)
    assert ids[:4] == done_ids
    assert out.read_text(encoding="utf-8").endswith("\n")


def test_new_records_are_appended(records, tmp_path):
    out = tmp_path / "predictions.jsonl"
    predict(records[:6], _backend(records), "qa", out, progress=False)
    backend = _backend(records)
    summary = predict(records, backend, "qa", out, progress=False)
    assert summary == {"total": 10, "already_done": 6, "predicted": 4}
    assert sum(len(b) for b in backend.calls) == 4
    ids = [row["id"] for row in read_jsonl(out)]
    assert sorted(ids[:6]) == sorted(r.id for r in records[:6])
    assert sorted(ids[6:]) == sorted(r.id for r in records[6:])


def test_duplicate_ids_rejected(records, tmp_path):
    out = tmp_path / "predictions.jsonl"
    dup = [*records[:3], dataclasses.replace(records[3], id=records[0].id)]
    backend = FakeBackend()
    with pytest.raises(ValueError, match=r"1 id\(s\) occur more than once: .val_sample-00001. \(records 1, 4\)"):
        predict(dup, backend, "qa", out, progress=False)
    assert backend.calls == []
    assert not out.exists()


def test_chat_template_prompt_and_no_extra_special_tokens(records, tmp_path, tiny_tokenizer):
    seen = []

    class Recording(FakeBackend):
        def generate(self, prompts, params, add_special_tokens=True):
            seen.append((add_special_tokens, params))
            return super().generate(prompts, params, add_special_tokens)

    tpl = get_template("chat")
    out = tmp_path / "p.jsonl"
    params = GenerationParams(max_new_tokens=7)
    predict(records[:2], Recording(default="答案：A"), tpl, out, params=params, tokenizer=tiny_tokenizer,
            progress=False)
    rows = read_jsonl(out)
    assert {row["id"]: row["prompt"] for row in rows} == {
        r.id: tpl.render_prompt(r, tiny_tokenizer) for r in records[:2]
    }
    assert rows[0]["prompt"].startswith("<|im_start|>system\n")
    assert all(row["template"] == "chat" and row["output"] == "答案：A" for row in rows)
    assert seen == [(False, params)]


# ------------------------------------------------------------------------------------------------
# io helpers
# ------------------------------------------------------------------------------------------------


def test_atomic_write_text_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "一\n")
    atomic_write_text(path, "二\n")
    assert path.read_text(encoding="utf-8") == "二\n"
    assert os.listdir(path.parent) == ["a.txt"]
    atomic_write_json(tmp_path / "sub" / "b.json", {"k": "值"})
    assert (tmp_path / "sub" / "b.json").read_text(encoding="utf-8") == '{\n  "k": "值"\n}\n'
    assert sorted(os.listdir(path.parent)) == ["a.txt", "b.json"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "bad \ud800 surrogate")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_write_jsonl_and_iter_jsonl_line_numbers(tmp_path):
    path = tmp_path / "r.jsonl"
    assert write_jsonl(path, [{"a": 1}, {"b": "二"}]) == 2
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "二"}\n'
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n   \n{\"c\": 3}\n")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (2, {"b": "二"}), (5, {"c": 3})]


def test_iter_jsonl_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(DataFileError) as exc:
        list(iter_jsonl(path))
    assert exc.value.row == 2 and exc.value.path == str(path)
    assert str(exc.value).startswith(f"{path}, row 2: invalid JSON")
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"row 2: expected a JSON object per line"):
        read_jsonl(path)


def test_read_jsonl_tolerant(tmp_path):
    path = tmp_path / "log.jsonl"
    assert read_jsonl_tolerant(path) == []  # missing file: nothing done yet
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "out', encoding="utf-8")
    assert read_jsonl_tolerant(path) == [{"id": 1}, {"id": 2}]
    path.write_text('{"id": 1}\n{"id": 2, "ou\n{"id": 3}\n', encoding="utf-8")
    with pytest.raises(DataFileError) as exc:
        read_jsonl_tolerant(path)
    assert exc.value.row == 2 and str(path) in str(exc.value)


def test_appender_cuts_torn_tail_and_appends(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, "ou', encoding="utf-8")
    with JsonlAppender(path) as sink:
        sink.write({"id": "三"})
    assert path.read_text(encoding="utf-8") == '{"id": 1}\n{"id": "三"}\n'
    with JsonlAppender(tmp_path / "new" / "log.jsonl") as sink:
        sink.write({"id": 1})
    assert (tmp_path / "new" / "log.jsonl").read_text(encoding="utf-8") == '{"id": 1}\n'


def test_complete_last_line_without_newline_is_kept(tmp_path, sample_records):
    from medtune.inference.base import FakeBackend
    from medtune.inference.predict import predict

    out = tmp_path / "p.jsonl"
    records = sample_records[:10]
    predict(records, FakeBackend(), "qa", out, progress=False)
    out.write_bytes(out.read_bytes()[:-1])  # drop only the final newline
    backend = FakeBackend()
    stats = predict(records, backend, "qa", out, progress=False)
    assert stats["already_done"] == 10 and backend.calls == []
    assert len(out.read_text(encoding="utf-8").splitlines()) == 10


# ---- a predictions file continues only as itself (issue: "predict resumes by id only") ------------

def test_rerun_with_another_template_is_refused_naming_it(records, tmp_path):
    from medtune.inference.predict import PredictionFileError

    out = tmp_path / "p.jsonl"
    predict(records, _backend(records), "qa", out, progress=False)
    before = out.read_bytes()
    backend = _backend(records)
    with pytest.raises(PredictionFileError, match=r'template.name: "qa" → "analysis_first".*--overwrite'):
        predict(records, backend, "analysis_first", out, progress=False)
    assert backend.calls == [] and out.read_bytes() == before


def test_rerun_with_other_generation_settings_is_refused(records, tmp_path):
    from medtune.inference.predict import PredictionFileError

    out = tmp_path / "p.jsonl"
    predict(records, _backend(records), "qa", out, GenerationParams(max_new_tokens=64), progress=False)
    with pytest.raises(PredictionFileError, match="generation.max_new_tokens: 64 → 128"):
        predict(records, _backend(records), "qa", out, GenerationParams(max_new_tokens=128), progress=False)


def test_rerun_with_another_model_is_refused_and_overwrite_starts_over(records, tmp_path):
    from medtune.inference.predict import PredictionFileError, meta_path

    out = tmp_path / "p.jsonl"
    predict(records, FakeBackend(default="A"), "qa", out, source={"model": {"id": "base"}}, progress=False)
    with pytest.raises(PredictionFileError, match='model.id: "base" → "tuned"'):
        predict(records, FakeBackend(default="B"), "qa", out, source={"model": {"id": "tuned"}}, progress=False)
    assert {row["output"] for row in read_jsonl(out)} == {"A"}  # untouched
    summary = predict(records, FakeBackend(default="B"), "qa", out, source={"model": {"id": "tuned"}},
                      overwrite=True, progress=False)
    assert summary["predicted"] == 10
    assert {row["output"] for row in read_jsonl(out)} == {"B"}
    assert json.loads(meta_path(out).read_text())["model"] == {"id": "tuned"}


def test_file_without_its_description_is_refused(records, tmp_path):
    from medtune.inference.predict import PredictionFileError, meta_path

    out = tmp_path / "p.jsonl"
    predict(records[:3], _backend(records), "qa", out, progress=False)
    meta_path(out).unlink()  # e.g. written by an older medtune, or by another tool
    with pytest.raises(PredictionFileError, match=r"already has 3 predictions but no p.meta.json"):
        predict(records, _backend(records), "qa", out, progress=False)


def test_lines_from_another_producer_are_refused(records, tmp_path):
    from medtune.inference.predict import PredictionFileError

    out = tmp_path / "p.jsonl"
    predict(records[:3], _backend(records), "qa", out, progress=False)
    other = tmp_path / "other.jsonl"
    predict(records[3:4], _backend(records), "qa", other, source={"model": {"id": "x"}}, progress=False)
    with open(out, "a", encoding="utf-8") as fh:  # someone concatenated two files
        fh.write(other.read_text(encoding="utf-8"))
    with pytest.raises(PredictionFileError, match=r"1 line\(s\) \(first: line 4\) were not written by the producer"):
        predict(records, _backend(records), "qa", out, progress=False)


def test_changed_question_is_not_resumed_from_its_old_output(records, tmp_path):
    from medtune.inference.predict import PredictionFileError

    out = tmp_path / "p.jsonl"
    predict(records, _backend(records), "qa", out, progress=False)
    edited = [dataclasses.replace(records[0], question=records[0].question + "（修订）"), *records[1:]]
    with pytest.raises(PredictionFileError, match=r"line \d+: id 'val_sample-00001' was predicted from a different prompt"):
        predict(edited, _backend(records), "qa", out, progress=False)


def test_second_writer_is_refused_while_the_first_runs(records, tmp_path):
    import subprocess
    import sys
    import time

    from medtune.inference.predict import PredictionFileError

    out = tmp_path / "p.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from medtune.inference.predict import _exclusive\n"
         f"with _exclusive(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        backend = _backend(records)
        with pytest.raises(PredictionFileError, match=rf"being written by another process \(pid {holder.pid}, lock "):
            predict(records, backend, "qa", out, progress=False)
        assert backend.calls == [] and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    assert predict(records, _backend(records), "qa", out, progress=False)["predicted"] == 10  # released on death


def test_prompts_longer_than_the_context_are_warned_and_marked(records, tmp_path, caplog):
    backend = FakeBackend(default="D", context_length=130)  # one token per character
    tpl = get_template("qa")
    lengths = {r.id: len(tpl.render_prompt(r)) for r in records}
    long_ids = {i for i, n in lengths.items() if n + 8 > 130}
    assert 0 < len(long_ids) < len(records)  # the test needs both kinds
    out = tmp_path / "p.jsonl"
    with caplog.at_level("WARNING", logger="medtune.inference.predict"):
        predict(records, backend, tpl, out, GenerationParams(max_new_tokens=8), progress=False)
    assert f"{len(long_ids)} of 10 prompts plus up to 8 new tokens exceed the model's context of 130 tokens" in caplog.text
    assert {row["id"] for row in read_jsonl(out) if row.get("over_context")} == long_ids


def test_conversation_outputs_are_cut_at_the_templates_end_marker(tmp_path):
    from medtune.inference.predict import predict_conversations
    from medtune.records import Conversation
    from medtune.templates import conversation_template

    tpl = conversation_template("instruct_zh")
    assert tpl.reply_end.strip() == "### 结束"
    convs = [Conversation("c1", [{"role": "user", "content": "发热三天怎么办"}]),
             Conversation("c2", [{"role": "user", "content": "咳嗽"}])]
    backend = FakeBackend({"发热": "多饮水，注意休息。\n### 结束\n### 指令\n新的问题"}, default="观察")
    out = tmp_path / "p.jsonl"
    predict_conversations(convs, backend, tpl, out, progress=False)
    rows = {row["id"]: row for row in read_jsonl(out)}
    assert rows["c1"]["output"] == "多饮水，注意休息。"
    assert rows["c1"]["raw_output"] == "多饮水，注意休息。\n### 结束\n### 指令\n新的问题"
    assert rows["c2"]["output"] == "观察" and "raw_output" not in rows["c2"]
