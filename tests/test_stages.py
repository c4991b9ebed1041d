"""Training stages beyond SFT on the tiny model: pt, rm, dpo, and chaining pt → sft → dpo.

Each run goes through the real CLI with the shipped tiny recipes, so the recipes are exercised too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "medtune" / "configs"
EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "medtune" / "examples" / "medicalgpt"
CONTRACT = ("config.yaml", "template.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "trainer_state.json", "metrics.jsonl", "env.json", "data_summary.json", "train_results.json")
QUICK = ["train.save_steps=1000", "train.logging_steps=2", "train.report_to=none"]


def _train(recipe: str, model: Path | str, data: Path | str, out: Path, *extra: str) -> Path:
    rc = main(["train", str(CONFIGS / recipe), f"model.name_or_path={model}", f"data.train={data}",
               f"train.output_dir={out}", *QUICK, *extra])
    assert rc == 0
    return out


def _assert_contract(run_dir: Path) -> dict:
    for name in CONTRACT:
        assert (run_dir / name).exists(), name
    return json.loads((run_dir / "train_results.json").read_text())


def _assert_base_unchanged_adapter_trained(tiny_model_dir: Path, run_dir: Path) -> None:
    """The base checkpoint is byte-for-byte the same; the saved adapter's lora_B moved off zero."""
    base_after = load_file(tiny_model_dir / "model.safetensors")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # lora_B starts at zero
    from medtune.models import load_for_inference

    model, _ = load_for_inference(str(tiny_model_dir), str(run_dir / "adapter"), dtype="float32")
    merged_names = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                    for n, p in model.named_parameters() if "lora_" not in n}
    for name, tensor in base_after.items():
        assert torch.equal(merged_names[name].detach(), tensor), f"base weight {name} changed"


def _preference_file(path: Path, n: int) -> Path:
    """The first ``n`` pairs of the shipped sample whose texts are short (fast on CPU)."""
    rows = []
    for line in (EXAMPLES / "dpo_zh_500.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if len(row["chosen"]) + len(row["rejected"]) + len(json.dumps(row["conversations"])) < 600:
            rows.append(line)
        if len(rows) == n:
            break
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


# ---- pt --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pt_blocks_perplexity_and_contract(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    block, docs = 64, 120
    run_dir = _train("pt_lora_tiny.yaml", tiny_model_dir, EXAMPLES / "fever.txt", tmp_path / "pt",
                     f"pt.block_size={block}", f"data.max_samples={docs}", "train.epochs=6",
                     "train.batch_size=8", "data.val_fraction=0.1")
    results = _assert_contract(run_dir)
    _assert_base_unchanged_adapter_trained(tiny_model_dir, run_dir)

    # block count, computed here independently of the stage's code
    lines = [x.strip() for x in (EXAMPLES / "fever.txt").read_text(encoding="utf-8").splitlines()]
    kept = [x for x in lines if x][:docs]
    total = sum(len(tiny_tokenizer(x)["input_ids"]) + 1 for x in kept)  # + EOS after each document
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["source"]["total_tokens"] == total
    assert summary["source"]["blocks"] == total // block
    assert summary["source"]["dropped_tail_tokens"] == total % block
    assert summary["train_blocks"] + summary["validation_blocks"] == total // block
    assert summary["validation_blocks"] == round(total // block * 0.1)

    before, after = results["perplexity_before"], results["perplexity_after"]
    assert before and after and after < before, results
    assert yaml_kind(run_dir) == "none"
    # printed at the end of the run, not only written to train_results.json
    printed = capsys.readouterr().out
    assert (f"perplexity on {summary['validation_blocks']} held-out blocks: {before:.4g} before → "
            f"{after:.4g} after training") in printed


def yaml_kind(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "template.yaml").read_text())["kind"]


def test_pt_reads_text_and_jsonl_and_counts_what_it_leaves_out(tmp_path, tiny_tokenizer):
    from medtune.train.pt import make_blocks, read_texts, split_blocks

    txt = tmp_path / "a.txt"
    txt.write_text("发热\n\n咳嗽三天\n", encoding="utf-8")
    read = read_texts(txt)
    assert read.documents == ["发热", "咳嗽三天"] and read.blank_lines == 1
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "发热"}\n\nnot json\n{"text": "  "}\n[1]\n{"text": null}\n', encoding="utf-8")
    read = read_texts(jl)
    assert read.documents == ["发热"] and [s["line"] for s in read.skipped] == [3, 4, 5, 6]
    assert read.blank_lines == 1

    blocks = make_blocks(["发热", "咳嗽三天"] * 5, tiny_tokenizer, 4)
    assert blocks.total_tokens == len(blocks.blocks) * 4 + blocks.dropped_tail_tokens
    assert all(len(b) == 4 for b in blocks.blocks)
    train, held = split_blocks(blocks.blocks, 0.05, seed=0)
    assert len(held) == 1 and len(train) == len(blocks.blocks) - 1


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_pt_reads_json_lines_by_their_text_field_not_as_raw_lines(tmp_path, suffix):
    """detect places a .txt of {"text": ...} lines as pt-text; pt once trained on the braces and quotes."""
    from medtune.data.detect import detect
    from medtune.train.pt import read_texts

    path = tmp_path / f"corpus{suffix}"
    path.write_text('{"text": "发热三天"}\n\n{"text": "咳嗽，\\"夜间\\"加重", "source": "x"}\n', encoding="utf-8")
    assert detect(path).format == "pt-text"
    read = read_texts(path)
    assert read.documents == ["发热三天", '咳嗽，"夜间"加重'] and read.blank_lines == 1 and not read.skipped
    # a .txt of prose stays prose, even when a later line happens to be JSON
    prose = tmp_path / "prose.txt"
    prose.write_text('发热三天\n{"text": "x"}\n', encoding="utf-8")
    assert read_texts(prose).documents == ["发热三天", '{"text": "x"}']


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_pt_refuses_a_json_row_without_text_naming_file_and_line(tmp_path, suffix):
    from medtune.io import DataFileError
    from medtune.train.pt import read_texts

    path = tmp_path / f"corpus{suffix}"
    path.write_text('{"text": "发热"}\n\n{"title": "咳嗽"}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}, row 3, field 'text': missing in a JSON row "
                                            r"\(keys \['title'\]\)"):
        read_texts(path)
    path.write_text('{"text": ["发热"]}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"row 1, field 'text': expected a string, got list"):
        read_texts(path)


# ---- rm --------------------------------------------------------------------------------------------


class _LengthRewardModel(torch.nn.Module):
    """Toy seq-cls model: the reward is the number of real (unpadded) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids, attention_mask):  # noqa: D401 - mimics a HF model's forward
        return type("Out", (), {"logits": attention_mask.sum(dim=1, keepdim=True).float()})()


def test_pairwise_accuracy_hand_checked(tiny_tokenizer):
    from medtune.train.rm import pairwise_accuracy

    rows = [
        {"prompt": "问：", "chosen": "发热咳嗽三天", "rejected": "发热"},  # chosen longer: right
        {"prompt": "问：", "chosen": "发热", "rejected": "发热咳嗽三天"},  # chosen shorter: wrong
        {"prompt": "问：", "chosen": "咳嗽三天发热", "rejected": "咳嗽"},  # right
        {"prompt": "问：", "chosen": "发热", "rejected": "发热"},  # a tie counts as wrong
    ]
    model = _LengthRewardModel()
    assert pairwise_accuracy(model, tiny_tokenizer, rows, batch_size=3) == pytest.approx(2 / 4)
    assert pairwise_accuracy(model, tiny_tokenizer, [], batch_size=3) is None
    assert model.training  # restored after scoring


@pytest.mark.slow
def test_rm_trains_and_reports_heldout_accuracy(tmp_path, tiny_model_dir):
    data = _preference_file(tmp_path / "pairs.jsonl", 24)
    run_dir = _train("rm_lora_tiny.yaml", tiny_model_dir, data, tmp_path / "rm",
                     "data.max_samples=null", "data.val_fraction=0.25", "train.epochs=3", "train.batch_size=4",
                     "train.learning_rate=5e-3")
    results = _assert_contract(run_dir)
    assert results["validation_pairs"] == 6
    for key in ("pairwise_accuracy_before", "pairwise_accuracy_after"):
        assert 0.0 <= results[key] <= 1.0
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("score" in n for n in adapter)  # the new reward head is saved with the adapter
    _assert_base_unchanged_adapter_trained_rm(tiny_model_dir, run_dir)


def test_rm_unknown_target_module_is_one_line_not_a_peft_traceback(tmp_path, tiny_model_dir, capsys):
    """rm/dpo/rl once handed a wrong adapter.target_modules to peft, which failed with its own traceback."""
    data = _preference_file(tmp_path / "pairs.jsonl", 4)
    out = tmp_path / "rm"
    rc = main(["train", str(CONFIGS / "rm_lora_tiny.yaml"), f"model.name_or_path={tiny_model_dir}",
               f"data.train={data}", f"train.output_dir={out}", *QUICK, "data.val_fraction=0",
               "adapter.target_modules=[q_proj,qproj]", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2
    # the reward model's linear layers: its score head instead of lm_head
    assert err.strip().splitlines()[-1] == (
        "medtune train: error: adapter.target_modules: qproj not found in the model; model_type llama has the "
        "linear layers down_proj, gate_proj, k_proj, o_proj, q_proj, score, up_proj, v_proj (or use all-linear)")
    assert "Traceback" not in err and not out.exists()


def _assert_base_unchanged_adapter_trained_rm(tiny_model_dir: Path, run_dir: Path) -> None:
    """Like the causal-LM check, through a sequence-classification model (the rm's shape)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = load_file(tiny_model_dir / "model.safetensors")
    seq_cls = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model = PeftModel.from_pretrained(seq_cls, run_dir / "adapter")
    merged_names = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                    for n, p in model.named_parameters() if "lora_" not in n}
    shared = [n for n in base if n in merged_names]  # lm_head is not part of a seq-cls model
    assert len(shared) >= len(base) - 1
    for name in shared:
        assert torch.equal(merged_names[name].detach(), base[name]), f"base weight {name} changed"
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [t for n, t in adapter.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


# ---- dpo -------------------------------------------------------------------------------------------


def test_dpo_loss_type_is_checked():
    from medtune.train.dpo import check_loss_type

    assert check_loss_type("ipo") == "ipo"
    with pytest.raises(ValueError, match="separate trainer"):
        check_loss_type("orpo")
    with pytest.raises(ValueError, match="expected one of"):
        check_loss_type("nope")


@pytest.mark.slow
def test_dpo_runs_and_reports_preference_accuracy(tmp_path, tiny_model_dir):
    data = _preference_file(tmp_path / "pairs.jsonl", 16)
    run_dir = _train("dpo_lora_tiny.yaml", tiny_model_dir, data, tmp_path / "dpo",
                     "data.max_samples=null", "data.val_fraction=0.25", "train.epochs=2")
    results = _assert_contract(run_dir)
    assert 0.0 <= results["eval_rewards/accuracies"] <= 1.0 and results["validation_pairs"] == 4
    _assert_base_unchanged_adapter_trained(tiny_model_dir, run_dir)


# ---- chaining ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_chain_pt_sft_dpo_then_generate(tmp_path, tiny_model_dir, records_file):
    # pt as a full fine-tune: a chain may hold one adapter run on top of a full model (see
    # medtune.models.previous_run), and sft and dpo below each add one.
    pt = _train("pt_lora_tiny.yaml", tiny_model_dir, EXAMPLES / "fever.txt", tmp_path / "pt",
                "adapter.method=full", "data.max_samples=40", "train.max_steps=3", "train.learning_rate=1e-4")
    assert (pt / "model" / "model.safetensors").exists()
    sft = main(["train", str(CONFIGS / "quickstart.yaml"), f"model.name_or_path={pt}",
                f"data.train={records_file(8)}", f"train.output_dir={tmp_path / 'sft'}", "train.max_steps=3",
                *QUICK])
    assert sft == 0
    dpo = _train("dpo_lora_tiny.yaml", tmp_path / "sft", _preference_file(tmp_path / "pairs.jsonl", 8),
                 tmp_path / "dpo", "data.max_samples=null", "train.max_steps=2", "data.val_fraction=0.25")
    _assert_contract(dpo)

    from medtune.inference.base import GenerationParams
    from medtune.inference.loading import load_backend

    loaded = load_backend(run=str(dpo), kind="conversation")
    out = loaded.backend.generate(["发热怎么办？"], GenerationParams(max_new_tokens=5))
    assert len(out) == 1 and isinstance(out[0], str)
