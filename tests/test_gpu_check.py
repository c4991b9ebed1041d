"""benchmarks/gpu_check.py: its CPU behaviour (print the plan, exit 0) and the arithmetic its GPU run reports.

No GPU here, so the GPU path itself cannot run in this suite; what it would run is pinned by the
printed plan, and the model shape and FLOP counts it uses are checked against a real model built
on the meta device.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_on_cpu_it_prints_the_plan_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "w")], capture_output=True,
                          text=True, timeout=120, check=False)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.startswith("medtune GPU check: the plan\n")
    assert out.rstrip().endswith("no CUDA device here: nothing was run (exit 0)")
    assert not (tmp_path / "w").exists()  # nothing written either
    # the model: Qwen2.5-1.5B's shape, random weights
    for field in ("hidden_size=1536", "num_hidden_layers=28", "num_attention_heads=12", "num_key_value_heads=2",
                  "intermediate_size=8960", "vocab_size=151936"):
        assert field in out
    # every case, in order, with the settings that make it what it says
    blocks = out.split("\n\n")  # the header, one block per case, what is reported, the CPU line
    assert [block.split(":")[0] for block in blocks[1:-2]] == ["baseline", "qlora", "lora-sdpa", "lora-packed",
                                                               "vllm-lora"]
    assert "adapter.method=qlora" in out and "model.attn_implementation=sdpa" in out
    assert out.count("train.bf16=true") == 2 and "'bf16': True" in out
    assert "DataCollatorWithFlattening(separator_id=-100)" in out
    assert f"load_backend(run={tmp_path / 'w' / 'lora-sdpa'}, backend=vllm)" in out
    assert "tokens/s (x baseline), peak GPU memory" in out and "MFU" in out


def test_shape_and_matmul_parameters_match_a_real_qwen2(gpu_check):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**gpu_check.QWEN25_1_5B))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head included
    assert gpu_check.weight_matmul_params(gpu_check.QWEN25_1_5B) == linear
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.54e9, rel=0.01)  # Qwen2.5-1.5B's size


def test_flops_per_token(gpu_check):
    shape = gpu_check.QWEN25_1_5B
    n = gpu_check.weight_matmul_params(shape)
    attention = 2 * 28 * 300 * 1536  # per token at a mean context of 300, forward
    assert gpu_check.flops_per_token(shape, 300, training=True) == 4 * n + 3 * attention
    assert gpu_check.flops_per_token(shape, 300, training=False) == 2 * n + attention


def test_peak_by_gpu_name(gpu_check):
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check.peak_tflops("Some GPU", None) is None
    assert gpu_check.peak_tflops("Some GPU", 100.0) == 100.0


def test_results_table(gpu_check, capsys):
    Result = gpu_check.Result
    gpu_check.print_results([Result("baseline", 1000, 2.0, 3 * 2**30, 1e15),
                             Result("qlora", 1000, 1.0, 2**30, 1e15),
                             Result("vllm-lora", 0, 0.0, 0, 0.0, note="skipped: vllm is not installed")], 1000.0)
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].split() == ["baseline", "500", "1.00", "3.0", "GiB", "50.0%"]
    assert rows[3].split() == ["qlora", "1,000", "2.00", "1.0", "GiB", "100.0%"]
    assert rows[4] == f"{'vllm-lora':<12} skipped: vllm is not installed"
