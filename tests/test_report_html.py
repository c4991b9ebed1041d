"""Report plots (PNG) and the self-contained HTML report, on small hand-made eval directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from medtune.report import plots
from medtune.report.html import (
    list_plots,
    make_plots,
    markdown_plot_section,
    plots_dir_for,
    write_html_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


def _cell(value: str, n: int, correct: int) -> dict:
    acc = 100.0 * correct / n
    return {
        "value": value,
        "n": n,
        "correct": correct,
        "accuracy": acc,
        "ci_low": max(acc - 15.0, 0.0),
        "ci_high": min(acc + 15.0, 100.0),
    }


def _results(label: str, acc: float, shift: int) -> dict:
    letters = ["A", "B", "C", "D", "E"]
    matrix = [[(5 + shift if i == j else (1 if j == (i + 1) % 5 else 0)) for j in range(6)] for i in range(5)]
    return {
        "label": label,
        "accuracy": acc,
        "f1": acc - 1.5,
        "bleu_1": 12.3 + shift,
        "bleu_4": 4.5,
        "rouge_1": 30.1,
        "rouge_2": 12.0,
        "rouge_l": None if shift else 25.5,
        "n": 40,
        "n_no_answer": 3,
        "n_explanations_scored": 35,
        "n_explanations_excluded": 5,
        "n_unscorable": 0,
        "accuracy_single": acc + 2,
        "n_single": 36,
        "accuracy_multi": acc - 20,
        "n_multi": 4,
        "parser": "robust",
        "tokenizer": "characters",
        "templates": ["qa"],
        "breakdowns": {
            "by_answer_type": [_cell("single", 36, 20 + shift), _cell("multi", 4, 1)],
            "by_n_options": [_cell("5", 38, 20 + shift), _cell("4", 2, 1)],
            "by_annotation": {
                "Disease Group": [
                    _cell("呼吸系统疾病", 10, 6),
                    _cell("消化系统疾病", 12, 5 + shift),
                    _cell("中医内科", 18, 10),
                ],
                "Clinical Department": [_cell("内科", 25, 15), _cell("外科", 15, 6 + shift)],
            },
        },
        "confusion": {"gold_labels": letters, "pred_labels": [*letters, "—"], "matrix": matrix},
        "letter_distribution": {
            "gold": {"A": 8, "B": 9, "C": 7, "D": 8, "E": 8},
            "predicted": {"A": 15 - shift, "B": 8, "C": 6, "D": 5, "E": 3 + shift},
            "n_no_answer": 3,
        },
    }


def _scored_rows() -> list[dict]:
    return [
        {
            "id": "q1",
            "question": "有机整体的“中心”是 <script>alert(1)</script>",
            "options": {"A": "心", "B": "脑", "C": "五脏", "D": "经络", "E": "脏腑"},
            "answer": "C",
            "parsed": "C",
            "correct": True,
            "output": "答案：C\n理由：人体以五脏为中心。",
        },
        {
            "id": "q2",
            "question": "治疗风寒感冒的首选方剂是",
            "options": {"A": "桂枝汤", "B": "银翘散", "C": "麻黄汤", "D": "桑菊饮", "E": "小柴胡汤"},
            "answer": "C",
            "parsed": "A",
            "correct": False,
            "output": "A <b>bold?</b> & 'quote'",
        },
    ]


def _eval_dir(root: Path, name: str, acc: float, shift: int, extras: bool = True) -> Path:
    d = root / name
    d.mkdir(parents=True)
    results = _results(name, acc, shift)
    if not extras:  # results.json written before breakdowns existed
        for key in ("breakdowns", "confusion", "letter_distribution"):
            results.pop(key)
    (d / "results.json").write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")
    (d / "scored.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _scored_rows()), encoding="utf-8"
    )
    return d


def _run_dir(root: Path) -> Path:
    d = root / "run-sft"
    d.mkdir()
    lines = [
        {"step": s, "epoch": s / 12, "loss": 8.5 - s / 100, "learning_rate": 0.005} for s in (1, 40, 80, 120)
    ]
    lines += [
        {"step": 80, "eval_loss": 7.9},
        {"step": 120, "eval_loss": 7.5},
        {"step": 120, "epoch": 10.0, "train_runtime": 3.2, "train_loss": 7.9},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return d


@pytest.fixture
def evals(tmp_path) -> list[Path]:
    return [
        _eval_dir(tmp_path / "evals", "base", 35.0, 0),
        _eval_dir(tmp_path / "evals", "tuned-lora", 52.5, 3),
    ]


@pytest.fixture
def results_by_label(evals) -> dict[str, dict]:
    return {d.name: json.loads((d / "results.json").read_text(encoding="utf-8")) for d in evals}


def _is_png(path: Path | None) -> bool:
    return (
        path is not None
        and path.is_file()
        and path.stat().st_size > 1000
        and path.read_bytes()[:8] == PNG_MAGIC
    )


def test_setup_cjk_font_returns_name_or_warns():
    import warnings

    import matplotlib

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = plots.setup_cjk_font()
    if name is None:  # no CJK font on this machine: the caller was told how to fix it
        assert any("fonts-noto-cjk" in str(w.message) for w in caught) or plots._warned_no_cjk
    else:
        assert matplotlib.rcParams["font.sans-serif"][0] == name
        assert matplotlib.rcParams["axes.unicode_minus"] is False


def test_setup_cjk_font_warns_once_without_cjk_font(monkeypatch):
    monkeypatch.setattr(plots, "_cjk_font_in_list", lambda: None)
    monkeypatch.setattr(plots, "_rebuild_font_cache", lambda: None)
    monkeypatch.setattr(plots, "_font_cache_rebuilt", False)
    monkeypatch.setattr(plots, "_warned_no_cjk", False)
    with pytest.warns(RuntimeWarning, match="fonts-noto-cjk"):
        assert plots.setup_cjk_font() is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        assert plots.setup_cjk_font() is None


def test_plot_functions_write_pngs(tmp_path, results_by_label, evals):
    run = _run_dir(tmp_path)
    assert _is_png(plots.plot_category_accuracy(results_by_label, tmp_path / "cat.png"))
    assert _is_png(plots.plot_confusion(results_by_label["base"]["confusion"], tmp_path / "conf.png", "基线"))
    assert _is_png(plots.plot_loss_curve({"sft": run / "metrics.jsonl", "dir": run}, tmp_path / "loss.png"))
    assert _is_png(plots.plot_metric_comparison(results_by_label, tmp_path / "metrics.png"))
    assert _is_png(plots.plot_letter_distribution(results_by_label, tmp_path / "letters.png"))
    # One run only also works (no legend juggling errors).
    single = {"base": results_by_label["base"]}
    assert _is_png(plots.plot_category_accuracy(single, tmp_path / "cat1.png"))
    assert _is_png(plots.plot_letter_distribution(single, tmp_path / "letters1.png"))


def test_plot_functions_return_none_without_data(tmp_path):
    old = {"old": {"accuracy": None, "f1": None, "n": 3, "n_no_answer": 0}}
    assert plots.plot_category_accuracy(old, tmp_path / "a.png") is None
    assert (
        plots.plot_category_accuracy({"x": {"breakdowns": {"by_annotation": {}}}}, tmp_path / "a.png") is None
    )
    assert plots.plot_confusion(None, tmp_path / "b.png", "t") is None
    assert (
        plots.plot_confusion({"gold_labels": [], "pred_labels": [], "matrix": []}, tmp_path / "b.png") is None
    )
    assert (
        plots.plot_confusion(
            {"gold_labels": ["A"], "pred_labels": ["A", "B"], "matrix": [[1]]}, tmp_path / "b.png"
        )
        is None
    )  # malformed: row length mismatch
    assert plots.plot_loss_curve({"gone": tmp_path / "missing.jsonl"}, tmp_path / "c.png") is None
    summary_only = tmp_path / "m.jsonl"
    summary_only.write_text(json.dumps({"step": 5, "train_loss": 1.0}) + "\n", encoding="utf-8")
    assert plots.plot_loss_curve({"s": summary_only}, tmp_path / "c.png") is None
    assert plots.plot_metric_comparison(old, tmp_path / "d.png") is None
    assert plots.plot_letter_distribution(old, tmp_path / "e.png") is None
    assert not list(tmp_path.glob("*.png"))


def test_html_report_is_self_contained_and_escaped(tmp_path, evals):
    out = write_html_report(
        evals, tmp_path / "out" / "report.html", run_dirs={"tuned-lora": _run_dir(tmp_path)}
    )
    text = out.read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in text and 'lang="zh"' in text
    assert "base" in text and "tuned-lora" in text
    assert "61.60" in text  # the paper's GPT-4 row
    assert "data:image/png;base64," in text
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;bold?&lt;/b&gt; &amp; &#x27;quote&#x27;" in text
    assert "robust" in text and "characters" in text
    # Every plot is embedded once and saved beside the page; one confusion matrix per run.
    made = list_plots(out)
    assert len(made) == 6 and text.count("data:image/png;base64,") == 6
    assert all(_is_png(p) and p.parent == plots_dir_for(out) for p in made.values())


def test_html_report_skips_missing_plots_and_cleans_stale(tmp_path, evals):
    out = tmp_path / "report.html"
    write_html_report(evals, out)
    assert "Training loss" not in list_plots(out)  # no run_dirs → no loss curve
    old = _eval_dir(tmp_path / "old", "old-run", 20.0, 0, extras=False)
    write_html_report([old], out)
    made = list_plots(out)
    assert list(made) == ["Metrics by run"]  # no breakdowns/confusion/letters in old results
    assert sorted(p.name for p in plots_dir_for(out).glob("*.png")) == ["metrics.png"]
    assert out.read_text(encoding="utf-8").count("data:image/png;base64,") == 1


def test_make_plots_and_markdown_section(tmp_path, evals):
    made = make_plots(evals, tmp_path / "report_plots")
    md = markdown_plot_section(made, tmp_path)
    assert md.startswith("## Plots")
    assert "](report_plots/metrics.png)" in md
    assert md.count("![") == len(made)
    assert markdown_plot_section({}, tmp_path) == ""
    # Paths are relative to the markdown's folder, even from elsewhere, and spaces are encoded.
    spaced = tmp_path / "my plots" / "a.png"
    spaced.parent.mkdir()
    spaced.write_bytes(PNG_MAGIC)
    assert "](../my%20plots/a.png)" in markdown_plot_section({"A": spaced}, tmp_path / "md")


def test_duplicate_labels_are_kept_apart(tmp_path):
    a = _eval_dir(tmp_path / "x", "eval", 30.0, 0)
    b = _eval_dir(tmp_path / "y", "eval", 40.0, 2)
    for d in (a, b):  # same label in both results.json
        data = json.loads((d / "results.json").read_text(encoding="utf-8"))
        (d / "results.json").write_text(json.dumps({**data, "label": "same"}), encoding="utf-8")
    out = write_html_report([a, b], tmp_path / "r.html")
    assert "same (2)" in out.read_text(encoding="utf-8")
    assert len([t for t in list_plots(out) if t.startswith("Confusion")]) == 2


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(tmp_path, evals):
    out = write_html_report(evals, tmp_path / "report.html", run_dirs={"tuned-lora": _run_dir(tmp_path)})
    shot = tmp_path / "screenshot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        out.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    data = shot.read_bytes()
    assert data[:8] == PNG_MAGIC
    # A blank or error page compresses to a few KB; a page with tables, text and charts does not.
    assert len(data) > 50_000, len(data)
    if os.environ.get("MEDTUNE_SCREENSHOT_DIR"):
        dest = Path(os.environ["MEDTUNE_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "report_screenshot.png")


# ---- data inspection charts and tables (moved here from medtune.data.quality) --------------------


def test_data_plots_draw_the_inspect_charts(tmp_path):
    from medtune.data.quality import inspect
    from medtune.io import write_jsonl
    from medtune.records import Conversation
    from medtune.report import data_plots
    from medtune.report.data_report import inspect_markdown

    rows = [
        Conversation(f"c{i}", [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": "答" * i}],
                     {"task_dataset": "CMeEE" if i % 3 else "CHIP-CDN", "sample_id": f"s{i}"}).to_dict()
        for i in range(1, 36)
    ]
    path = tmp_path / "conv.jsonl"
    write_jsonl(path, rows)
    stats = inspect(path)
    pngs = data_plots.inspect_plots(stats, tmp_path)
    assert [p.name for p in pngs] == ["lengths_chars.png", "turns.png"]
    assert all(_is_png(p) for p in pngs)
    md = inspect_markdown(stats, [p.name for p in pngs])
    # 35 ids are more than inspect lists (30): counted, not tabled; the two tasks are tabled.
    assert "meta `sample_id`: 35 distinct values (not listed)" in md
    assert "### meta `task_dataset` (2 distinct)" in md
    assert "![turns.png](turns.png)" in md
    # Nothing to draw gives None, never an empty chart.
    assert data_plots.plot_answer_letters(stats, tmp_path) is None
    assert data_plots.plot_annotations(stats, tmp_path) is None
    assert data_plots.plot_lengths_tokens(stats, tmp_path) is None
