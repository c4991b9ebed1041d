"""The command line: each subcommand's happy path and its clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medtune.cli import build_parser, main


def test_convert_error_names_file_row_field(sample_csv, tmp_path, capsys):
    rc = main(["convert", "cmexam", str(sample_csv), "--out", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "val_sample.csv" in err and "row 764" in err and "'answer'" in err
    assert not (tmp_path / "r.jsonl").exists()  # nothing half-written


def test_convert_skip_counts_and_writes_rejects(sample_csv, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["convert", "cmexam", str(sample_csv), "--out", str(out), "--on-invalid", "skip"]) == 0
    text = capsys.readouterr().out
    assert "1000 rows → 999 records" in text
    assert "1 rows rejected" in text and "159 records without an explanation" in text
    assert len(out.read_text(encoding="utf-8").splitlines()) == 999
    reject = json.loads((tmp_path / "r.rejects.jsonl").read_text(encoding="utf-8"))
    assert reject["row"] == 764 and reject["field"] == "answer"


def test_templates_lists_all(capsys):
    """Once only the exam templates: the conversation templates (data.conversation_format) were missing."""
    from medtune.templates import conversation_template, get_template

    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    sections: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            heading = line
            sections[heading] = []
        elif line:
            sections[heading].append(line)
    assert [h.split(" (")[0] for h in sections] == ["exam templates", "conversation templates"]
    assert all(h.endswith(":") for h in sections)
    exam, conversation = sections.values()
    assert [line.split()[0] for line in exam] == ["analysis_first", "chat", "cmexam_paper", "instructed", "qa"]
    assert [line.split()[0] for line in conversation] == ["alpaca", "chat", "instruct_zh", "plain"]
    # each with its version and description
    assert f"  plain{' ' * 11} v1  {conversation_template('plain').description}" in conversation
    assert f"  qa{' ' * 14} v1  {get_template('qa').description}" in exam


def test_train_bad_config_key(tmp_path, capsys):
    assert main(["train", "src/medtune/configs/quickstart.yaml", "train.lerning_rate=1"]) == 2
    assert "train.lerning_rate: unknown key; did you mean 'train.learning_rate'?" in capsys.readouterr().err


def test_predict_needs_run_or_model(tmp_path, capsys):
    assert main(["predict", "--data", "x.jsonl", "--out", str(tmp_path / "p.jsonl")]) == 2
    assert capsys.readouterr().err == "medtune predict: error: give either --run RUN_DIR or --model PATH\n"


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    assert main(["convert", "cmexam", str(missing), "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medtune convert: error: ") and str(missing) in err
    with pytest.raises(FileNotFoundError):
        main(["convert", "cmexam", str(missing), "--out", str(tmp_path / "r.jsonl"), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "convert", "cmexam", str(missing), "--out", str(tmp_path / "r.jsonl")])


def test_a_bug_is_reported_as_an_internal_error_in_one_line(monkeypatch, capsys):
    import medtune.templates

    def broken(kind="exam"):
        raise KeyError("boom")

    monkeypatch.setattr(medtune.templates, "available", broken)
    assert main(["templates"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("medtune templates: internal error: KeyError: 'boom' (rerun with --debug")


def test_init_tiny_model_loads_with_auto_classes(tmp_path, records_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    assert main(["init-tiny-model", str(out), "--data", str(records_file(50)), "--vocab-size", "600",
                 "--hidden-size", "32", "--layers", "1"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 1
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.chat_template
    text = "问题：下列哪种病变\nA: 带状疱疹\n答案：D"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round-trips exactly


@pytest.mark.parametrize("command", ["convert", "train", "predict", "evaluate", "report", "init-tiny-model",
                                     "quickstart", "templates"])
def test_every_subcommand_has_help(command):
    proc = subprocess.run([sys.executable, "-m", "medtune.cli", command, "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: medtune" in proc.stdout


def test_parser_lists_subcommands():
    help_text = build_parser().format_help()
    for command in ("convert", "train", "predict", "evaluate", "report", "quickstart"):
        assert command in help_text


def test_vllm_backend_without_vllm_gives_a_clear_error(tiny_model_dir, records_file, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    rc = main(["predict", "--model", str(tiny_model_dir), "--backend", "vllm", "--data", str(records_file(2)),
               "--out", str(tmp_path / "p.jsonl")])
    assert rc == 2
    assert "pip install 'medtune[vllm]'" in capsys.readouterr().err


def test_data_check_exit_code_on_leakage(records_file, tmp_path, capsys):
    train = records_file(30, "train.jsonl")
    test = records_file(10, "test.jsonl", start=25)  # 5 questions overlap with train
    assert main(["data", "check", str(train), str(test), "--out", str(tmp_path / "check.json")]) == 1
    out = capsys.readouterr().out
    assert "val in train 5" in out  # the second split is the validation split
    assert main(["data", "check", str(train), str(test), "--allow-leakage"]) == 0
    assert main(["data", "check", str(records_file(10, "a.jsonl")), str(records_file(10, "b.jsonl", 10))]) == 0


def test_data_inspect_writes_tables_and_plots(sample_csv, tmp_path, capsys):
    assert main(["data", "inspect", str(sample_csv), "--out", str(tmp_path / "insp")]) == 0
    out = capsys.readouterr().out
    assert "| Answer | 0 | 1 |" in out and "| Explanation | 0 | 159 |" in out  # raw CSV columns
    assert (tmp_path / "insp" / "inspect.json").exists()
    assert (tmp_path / "insp" / "answer_letters.png").read_bytes()[:4] == b"\x89PNG"


def test_convert_promptcblue_and_sharegpt(tmp_path, capsys):
    from importlib import resources

    root = resources.files("medtune") / "examples"
    assert main(["convert", "promptcblue", str(root / "promptcblue" / "train.json"), "--out",
                 str(tmp_path / "p.jsonl")]) == 0
    assert "80 rows → 80 records" in capsys.readouterr().out
    assert main(["convert", "auto", str(root / "medicalgpt" / "medical_sft_1K_format.jsonl"), "--out",
                 str(tmp_path / "s.jsonl")]) == 0
    assert "1000 rows → 1000 records" in capsys.readouterr().out
    first = json.loads((tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]


def test_an_error_during_a_progress_bar_starts_its_own_line(monkeypatch, capsys):
    from tqdm import tqdm

    import medtune.templates

    def fails_mid_progress(kind="exam"):
        bar = tqdm(total=10, desc="work")  # left open, like a Trainer bar when training raises
        bar.update(3)
        raise ValueError("it broke")

    monkeypatch.setattr(medtune.templates, "available", fails_mid_progress)
    assert main(["templates"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\nmedtune templates: error: it broke\n")
    assert not getattr(tqdm, "_instances", None)


def test_reader_closing_the_pipe_ends_quietly(tmp_path):
    """Symptom: ``medtune evaluate ... | head -3`` ended with "error: [Errno 32] Broken pipe", exit 2."""
    import subprocess
    import sys

    code = ("import sys; from medtune import cli\n"
            "def flood(args):\n"
            "    for i in range(200000): print('| row', i, '|')\n"
            "    return 0\n"
            "cli.cmd_templates = flood\n"
            "sys.exit(cli.main(['templates']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"| row 0 |")
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == ""
