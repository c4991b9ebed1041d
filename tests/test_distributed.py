"""Multi-process training on CPU (gloo), what the launch refuses, and the shipped accelerate configs.

- A real two-process DDP run (torchrun): both processes finish; they formed ONE job of world size 2
  (16 examples, batch 2 per process → global batch 4 → 4 optimizer steps; two independent runs would
  each take 8); only rank 0 wrote the run directory; a rerun of the identical command resumes from
  the last checkpoint. (A finished run rerun, not a crash mid-run.)
- Two processes × batch 2 train the same weights as one process × batch 4, LoRA (torchrun) and full
  tuning (accelerate with the shipped ddp.yaml), within 1e-6 (see that test for the tolerance).
- FSDP cannot run on CPU with accelerate 1.15: the shipped fsdp.yaml launched anyway trains as
  plain DDP (accelerate sets up MULTI_CPU), which the children refuse; DeepSpeed is not installed
  here and accelerate's launcher says so. ``medtune train --nproc`` refuses both before launching.
- ``train.ddp_timeout`` reaches the process group's timeout; resuming may change it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medtune.config import load_config
from medtune.launch import LaunchError, check_launch
from medtune.train import common

N_EXAMPLES, BATCH, NPROC = 16, 2, 2
DEEPSPEED_INSTALLED = importlib.util.find_spec("deepspeed") is not None
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


def _shipped(name: str) -> Path:
    return Path(str(resources.files("medtune") / "configs" / "accelerate" / f"{name}.yaml"))


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_shipped_accelerate_configs_load(name):
    """Each shipped file parses with accelerate's own loader. DeepSpeed: loading only (not installed here)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = _shipped(name)
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
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # precision comes from the run config (train.bf16/fp16) alone, never silently from this file
    assert cfg.mixed_precision == "no"


def test_fsdp_config_builds_the_fsdp2_plugin_each_process_would(monkeypatch):
    """What a child builds: accelerate's launcher turns the file into FSDP_* variables, the plugin reads them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(["--config_file", str(_shipped("fsdp")), "--num_processes", "2", "x"])
    env = prepare_multi_gpu_env(_validate_launch_command(parsed)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and plugin.cpu_ram_efficient_loading is False


# ---- refused before any process starts ---------------------------------------------------------------


def _cfg(*overrides: str):
    return load_config(None, ["model.name_or_path=m", "data.train=t.jsonl", *overrides])


@pytest.mark.parametrize(("config", "method", "nproc", "gpus", "refusal"), [
    ("fsdp", "lora", 2, 0, "fsdp.yaml (FSDP) needs CUDA GPUs and none is visible"),
    ("deepspeed_zero2", "lora", 2, 0, "deepspeed_zero2.yaml (DEEPSPEED) needs CUDA GPUs"),
    ("fsdp", "qlora", 2, 2, "adapter.method=qlora: --accelerate-config fsdp.yaml (FSDP) shards the model"),
    ("deepspeed_zero3", "qlora", 2, 2, "adapter.method=qlora: --accelerate-config deepspeed_zero3.yaml"),
    (None, "lora", 4, 2, "--nproc 4: 4 processes on this machine but 2 GPU(s) visible"),
    ("ddp", "lora", 3, 2, "--nproc 3: 3 processes on this machine but 2 GPU(s) visible"),
])
def test_launch_refused_before_starting(config, method, nproc, gpus, refusal):
    with pytest.raises(LaunchError) as caught:
        check_launch(_cfg(f"adapter.method={method}"), nproc, config and _shipped(config), gpus=gpus)
    assert refusal in str(caught.value)


@pytest.mark.parametrize(("config", "method", "nproc", "gpus"), [
    (None, "lora", 2, 0),  # DDP over gloo on CPU
    ("ddp", "full", 2, 0),
    (None, "qlora", 2, 2),  # QLoRA under DDP: one 4-bit copy on each GPU
    ("fsdp", "lora", 2, 2),
    ("fsdp", "full", 2, 8),
])
def test_launch_accepted(config, method, nproc, gpus):
    check_launch(_cfg(f"adapter.method={method}"), nproc, config and _shipped(config), gpus=gpus)


@pytest.mark.skipif(DEEPSPEED_INSTALLED, reason="shows what happens without DeepSpeed")
def test_deepspeed_refused_when_not_installed():
    with pytest.raises(LaunchError, match="deepspeed_zero2.yaml .DEEPSPEED. needs DeepSpeed, which is not installed"):
        check_launch(_cfg(), 2, _shipped("deepspeed_zero2"), gpus=2)


def test_nproc_must_divide_over_the_machines(tmp_path):
    two_machines = tmp_path / "two.yaml"
    two_machines.write_text(_shipped("ddp").read_text().replace("num_machines: 1", "num_machines: 2"))
    with pytest.raises(LaunchError, match="--nproc 3: .* has num_machines=2, .* use a multiple of 2"):
        check_launch(_cfg(), 3, two_machines, gpus=8)
    check_launch(_cfg(), 16, two_machines, gpus=8)  # 2 machines x 8 GPUs
    with pytest.raises(LaunchError, match="--nproc 32: 16 processes on this machine but 8 GPU"):
        check_launch(_cfg(), 32, two_machines, gpus=8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cli_refuses_fsdp_without_gpu_before_launching(tmp_path, capsys):
    from medtune.cli import main
    from medtune.quickstart import config_path

    out = tmp_path / "run"
    rc = main(["train", str(config_path("quickstart")), f"train.output_dir={out}", "--nproc", "2",
               "--accelerate-config", str(_shipped("fsdp"))])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "medtune train: error: --accelerate-config fsdp.yaml (FSDP) needs CUDA GPUs" in err
    assert "launching:" not in err and not out.exists()


# ---- FSDP and DeepSpeed on this CPU machine: what accelerate 1.15 does ---------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the CPU behaviour")
def test_fsdp_launched_on_cpu_is_refused_by_every_process(tmp_path, tiny_model_dir, records_file, capfd):
    """The shipped fsdp.yaml launched past medtune's own check: accelerate sets up MULTI_CPU (plain DDP).

    accelerate 1.15 keeps FSDP only for GPU-type devices (AcceleratorState turns FSDP on from the
    MULTI_GPU/NPU/XPU... branch; a gloo CPU group is MULTI_CPU), so without the check this would
    train unsharded DDP and report success. Both processes refuse at the start of training.
    """
    from medtune.launch import run_distributed
    from medtune.quickstart import config_path

    out = tmp_path / "run"
    rc = run_distributed(config_path("quickstart"), _overrides(tiny_model_dir, records_file(8), out), 2,
                         _shipped("fsdp"))
    err = capfd.readouterr().err
    assert rc != 0
    refusal = ("medtune train: error: the launcher asked for FSDP (an accelerate config with distributed_type: "
               "FSDP), but accelerate set up MULTI_CPU")
    assert err.count(refusal) == 2, err[-3000:]
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # refused before the first checkpoint: the half-made run directory is removed


@pytest.mark.skipif(DEEPSPEED_INSTALLED, reason="shows what happens without DeepSpeed")
def test_deepspeed_launcher_exact_error_here(tmp_path):
    """DeepSpeed is not installed here: accelerate's launcher stops before starting any process."""
    import subprocess

    from medtune.launch import launch_command, launch_env

    cmd = launch_command(tmp_path / "c.yaml", [], 2, _shipped("deepspeed_zero2"))
    done = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "ImportError: DeepSpeed is not installed => run `pip3 install deepspeed`" in done.stderr


# ---- two processes train what one process trains ----------------------------------------------------


def _weights(run: Path, method: str) -> dict[str, torch.Tensor]:
    if method == "full":
        return load_file(run / "model" / "model.safetensors")
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _losses(run: Path) -> list[float]:
    state = json.loads((run / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "learning_rate", "accelerate_config"), [
    ("lora", 0.5, None),  # torchrun
    ("full", 0.05, "ddp"),  # accelerate launch with the shipped ddp.yaml
])
def test_two_processes_train_what_one_process_trains(tmp_path, tiny_model_dir, records_file, method,
                                                     learning_rate, accelerate_config):
    """2 processes x batch 2 save the weights of 1 process x batch 4, within 1e-6.

    A fair comparison needs the same global batches in the same order. With
    ``train.group_by_length=false`` the Trainer samples with accelerate's seedable random sampler
    (seeded by train.seed); under two processes accelerate deals its batches of 2 out in turn
    (rank 0 the 1st, rank 1 the 2nd, ...), so each optimiser step sees the same 4 examples as the
    one-process batch of 4. (group_by_length groups per process batch size, so it orders
    differently for batch 2 and batch 4 in general.) The loss is averaged over the label tokens of
    the whole global batch in both (transformers counts them across processes), so the gradients
    are equal in exact arithmetic; max_length 512 keeps every example whole.

    Tolerance: plain SGD, so an update is lr x gradient and a gradient difference shows up in the
    weights undistorted. Adam would amplify rounding (it divides each update by the gradient's own
    running size, so a near-zero gradient element moves a full step either way: 3e-5 was seen at
    lr 5e-3) and would hide a wrongly scaled gradient entirely. What is left is fp32 rounding:
    gloo adds two half-batch gradients where one process sums inside one matmul, and each rank
    pads to its own longest example (other matmul shapes): about 1e-7 seen, against weights of
    size up to 1, so 1e-6 (~10 ulp). The weights moved by more than 1e-3, so a per-process
    average instead of a per-token one, a lost or doubled batch, or another order would all fail.
    """
    from medtune.cli import main
    from medtune.launch import run_distributed
    from medtune.quickstart import config_path

    data = records_file(16)
    settings = [f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "train.epochs=1",
                "train.group_by_length=false", "train.optim=sgd", f"train.learning_rate={learning_rate}",
                f"adapter.method={method}", "train.logging_steps=1", "train.save_steps=100",
                "train.report_to=none", "data.max_length=512"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(config_path("quickstart")), *settings, f"train.output_dir={one}",
                 "train.batch_size=4"]) == 0
    assert run_distributed(config_path("quickstart"), [*settings, f"train.output_dir={two}", "train.batch_size=2"],
                           2, accelerate_config and _shipped(accelerate_config)) == 0

    assert json.loads((two / "trainer_state.json").read_text())["global_step"] == 4  # one job, global batch 4
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a, b = _weights(one, method), _weights(two, method)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    if method == "full":
        start = load_file(Path(tiny_model_dir) / "model.safetensors")
        moved = max((a[k] - start[k]).abs().max().item() for k in a)
    else:  # LoRA's B matrices start at zero
        moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 1e-3, moved


# ---- process-group timeout, resuming, and what every process does ------------------------------------


def test_ddp_timeout_reaches_the_process_group_settings(tmp_path):
    from datetime import timedelta

    from transformers import TrainingArguments

    assert _cfg().train.ddp_timeout == 1800
    args = TrainingArguments(**common.training_arguments(_cfg("train.ddp_timeout=600"), tmp_path, has_val=False))
    assert args.ddp_timeout == 600
    assert args.ddp_timeout_delta == timedelta(seconds=600)  # what init_process_group is given
    with pytest.raises(ValueError, match="train.ddp_timeout: must be > 0, got 0"):
        _cfg("train.ddp_timeout=0")


def test_resume_may_change_ddp_timeout(tmp_path):
    """A run that timed out resumes with a longer timeout; a run saved before the key existed resumes too."""
    cfg = _cfg(f"train.output_dir={tmp_path}")
    cfg.save(tmp_path / "config.yaml")
    common.check_run_dir(_cfg(f"train.output_dir={tmp_path}", "train.ddp_timeout=7200"))
    old = cfg.to_dict()
    del old["train"]["ddp_timeout"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    common.check_run_dir(cfg)
    with pytest.raises(common.RunDirError, match="train.learning_rate"):
        common.check_run_dir(_cfg(f"train.output_dir={tmp_path}", "train.learning_rate=1e-3"))


def test_processes_starting_from_different_steps_are_refused(monkeypatch):
    """One machine resumed checkpoint-4 and another found none (train.output_dir not shared)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def gather(found, mine):
        found[:] = [mine, 0]

    monkeypatch.setattr(dist, "all_gather_object", gather)
    check = common.ParallelRunCheck()
    with pytest.raises(common.RunDirError, match=r"different steps \(rank 0: 4, rank 1: 0\).*shared filesystem"):
        check.on_train_begin(SimpleNamespace(output_dir="runs/x"), SimpleNamespace(global_step=4), None)
    check.on_train_begin(SimpleNamespace(output_dir="runs/x"), SimpleNamespace(global_step=0), None)


def test_every_process_saves_and_rank_zero_writes(tmp_path):
    """save_model runs everywhere (FSDP/ZeRO-3 gather in it); the tokenizer and state are rank 0's."""
    calls = []

    class Trainer:
        def __init__(self, rank):
            self.rank = rank

        def save_model(self, out):
            calls.append((self.rank, "model"))

        def is_world_process_zero(self):
            return self.rank == 0

        def save_state(self):
            calls.append((self.rank, "state"))

    tokenizer = SimpleNamespace(save_pretrained=lambda out: calls.append(("tokenizer", out)))
    for rank in (1, 0):
        common.save_trained(Trainer(rank), tokenizer, tmp_path, adapter=True)
    assert calls == [(1, "model"), (0, "model"), ("tokenizer", str(tmp_path / "adapter")), (0, "state")]


def test_each_process_loads_onto_its_own_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    common.use_local_gpu()
    monkeypatch.delenv("LOCAL_RANK")
    common.use_local_gpu()  # one process without a launcher: left alone
    assert chosen == [1]
