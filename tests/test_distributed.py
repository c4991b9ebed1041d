"""A real two-process data-parallel training run on CPU (torchrun + gloo DDP) via medtune.launch.

What is checked: both processes finish; they formed ONE job of world size 2 (16 examples, batch 2
per process → global batch 4 → 4 optimizer steps; two independent runs would each take 8); only
rank 0 wrote the run directory; and a rerun of the identical command resumes from the last
checkpoint under DDP. The resume case is a finished run rerun, not a crash mid-run (killing one
rank of a DDP job reliably is a different test).
"""

from __future__ import annotations

import json
import sys

import pytest

N_EXAMPLES, BATCH, NPROC = 16, 2, 2
STEPS = N_EXAMPLES // (BATCH * NPROC)  # 4; one process alone would take 8


def _overrides(tiny_model_dir, data, out) -> list[str]:
    return [f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"train.output_dir={out}",
            "train.epochs=1", f"train.batch_size={BATCH}", "train.save_steps=2", "train.logging_steps=1",
            "train.report_to=none", "train.save_total_limit=null", "data.max_length=512"]


def _loss_steps(out) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def test_launch_command_shapes():
    from medtune.launch import launch_command

    cmd = launch_command("c.yaml", ["a=1"], 2)
    assert cmd[cmd.index("--standalone"):][:3] == ["--standalone", "--nproc-per-node", "2"]
    assert cmd[-5:] == ["-m", "medtune.cli", "train", "c.yaml", "a=1"]
    assert "--nproc" not in cmd[cmd.index("medtune.cli"):]  # children train, they never launch again
    acc = launch_command("c.yaml", [], 4, accelerate_config="z3.yaml")
    assert acc[acc.index("--config_file") + 1] == "z3.yaml" and acc[acc.index("--num_processes") + 1] == "4"
    with pytest.raises(ValueError):
        launch_command("c.yaml", [], 0)


@pytest.mark.slow
def test_two_process_ddp_run_and_resume(tmp_path, tiny_model_dir, records_file):
    from medtune.launch import run_distributed
    from medtune.quickstart import config_path

    data, out = records_file(N_EXAMPLES), tmp_path / "run"
    overrides = _overrides(tiny_model_dir, data, out)
    assert run_distributed(config_path("quickstart"), overrides, NPROC) == 0

    summary = json.loads((out / "data_summary.json").read_text())["train"]
    assert summary["examples"] == N_EXAMPLES, summary  # max_length 512: nothing skipped, so 4 steps
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS, "not one DDP job of world size 2 (independent runs take 8 steps)"
    assert state["epoch"] == pytest.approx(1.0)
    # rank 0 alone wrote the run directory: each step logged once, no line written twice
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    assert _loss_steps(out) == list(range(1, STEPS + 1))
    assert len(list(out.glob("env.json*"))) == 1 and (out / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    first_ckpt_mtime = (out / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns

    # The identical command again: both ranks resume from checkpoint-4 and have nothing left to do.
    assert run_distributed(config_path("quickstart"), overrides, NPROC) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert _loss_steps(out) == list(range(1, STEPS + 1))  # no step retrained, none logged twice
    # retraining from scratch would have rewritten the step-2 checkpoint
    assert (out / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == first_ckpt_mtime


def test_cli_child_is_plain_train(tmp_path):
    """The launched module is medtune.cli with the train subcommand (importable in this interpreter)."""
    from medtune.launch import launch_command

    cmd = launch_command(tmp_path / "c.yaml", [], 2)
    assert cmd[0].endswith("torchrun") or cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]


ACCELERATE_CONFIGS = ["ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp"]


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_shipped_accelerate_configs_load(name):
    """Each shipped file parses with accelerate's own loader. Loading only: no GPU/DeepSpeed here to run them."""
    from importlib import resources

    from accelerate.commands.config.config_args import load_config_from_file

    path = resources.files("medtune") / "configs" / "accelerate" / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# medtune train CONFIG --nproc 2 --accelerate-config src/medtune/configs/accelerate/{name}.yaml")
    cfg = load_config_from_file(str(path))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert str(cfg.distributed_type).endswith(expected)
    if name.startswith("deepspeed"):
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == int(name.split("zero")[1][0])
        offload = "cpu" if name.endswith("offload") else "none"
        assert ds["offload_optimizer_device"] == offload and ds["offload_param_device"] == offload
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
