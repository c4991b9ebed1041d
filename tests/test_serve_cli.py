"""`medtune serve` as a user starts it, and stream cancellation in the transformers backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_with_api_key(tiny_model_dir):
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    port = _free_port()
    env = {**os.environ, "MEDTUNE_API_KEY": "s3cret", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medtune.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--model-name", "tiny"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not start")
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401  # key required
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 8
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_closing_a_stream_stops_generation(tiny_model_dir):
    from medtune.inference.base import GenerationParams
    from medtune.inference.hf import HFBackend
    from medtune.models import load_for_inference

    model, tok = load_for_inference(str(tiny_model_dir), dtype="float32")
    backend = HFBackend(model, tok)
    params = GenerationParams(max_new_tokens=1000)
    start = time.perf_counter()
    full = "".join(backend.stream("问题：", GenerationParams(max_new_tokens=40)))
    per_token = (time.perf_counter() - start) / 40
    gen = backend.stream("问题：", params)
    first = next(gen)
    start = time.perf_counter()
    gen.close()  # joins the worker thread: returns only once generation has stopped
    assert first and full.startswith(first)
    assert time.perf_counter() - start < 100 * per_token + 1.0  # far less than the 1000 tokens asked for
