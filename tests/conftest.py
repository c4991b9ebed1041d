"""Shared fixtures: the real CMExam sample and a tiny model built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub; fail fast if code tries


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
