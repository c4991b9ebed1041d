"""`medtune serve` as a user starts it, and stream cancellation in the transformers backend."""

from __future__ import annotations

import os
import signal
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
    env = {**os.environ, "MEDTUNE_API_KEY": "s3cret", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medtune.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--model-name", "tiny", "--allowed-host", "medtune.internal"],
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
        # --allowed-host admits its name; any other name is refused before authentication
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{base}/v1/models", headers={**auth, "Host": f"medtune.internal:{port}"},
                         timeout=5).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers={"Host": "evil.example"}, timeout=5).status_code == 421
        # the default prompt limit is the tiny model's context length (max_position_embeddings)
        too_long = httpx.post(f"{base}/v1/completions", headers=auth, timeout=30,
                              json={"model": "tiny", "prompt": "热" * 2000, "max_tokens": 4})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    finally:
        # Ctrl-C, as a user stops it: Python then waits for every non-daemon thread, continuous
        # batching's generation thread included, so a thread left running would hang here
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=20)
    assert f"serving tiny on http://127.0.0.1:{port}/v1 (API key required)" in output
    assert "prompts up to 1024 tokens (the model's context length)" in output
    assert "concurrent requests: continuous, up to 8 at once" in output
    assert "Host accepted: localhost, 127.0.0.1, [::1], medtune.internal" in output


@pytest.fixture
def fake_serve(monkeypatch):
    """``medtune serve`` with a FakeBackend, its server run on loopback for ``probe(url)`` to query.

    Only the model loading and the blocking ``serve`` call are replaced; the CLI's parsing and
    wiring run as they do for a user, and the server is a real one.
    """
    from types import SimpleNamespace

    import medtune.cli
    import medtune.inference.server as server
    from medtune.inference.base import FakeBackend

    state = {"backend": FakeBackend(), "probe": None, "served_on": None, "loads": 0}

    def fake_load(args, command, kind="exam"):
        state["loads"] += 1
        return SimpleNamespace(backend=state["backend"], name="fake", template=None)

    def fake_serve(app, host="127.0.0.1", port=8000, log_level="info"):
        state["served_on"] = (host, port)
        with server.background_server(app, host=host) as url:
            state["probe"](url.replace("0.0.0.0", "127.0.0.1"))

    monkeypatch.setattr(medtune.cli, "_load", fake_load)
    monkeypatch.setattr(server, "serve", fake_serve)
    return state


def test_serve_cli_wiring_hosts_and_prompt_limit(fake_serve, capsys):
    httpx = pytest.importorskip("httpx")
    from medtune.cli import build_parser, main
    from medtune.inference.base import FakeBackend

    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.max_prompt_tokens is None and args.allowed_hosts is None
    args = build_parser().parse_args(["serve", "--model", "m", "--allowed-host", "a.lan", "--allowed-host", "*"])
    assert args.allowed_hosts == ["a.lan", "*"]

    seen: dict[str, int] = {}

    def probe(url: str) -> None:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as c:
            port = url.rsplit(":", 1)[1]
            seen["named"] = c.get("/v1/models", headers={"Host": f"box.lan:{port}"}).status_code
            seen["other"] = c.get("/v1/models", headers={"Host": "evil.example"}).status_code
            seen["ip"] = c.get("/v1/models", headers={"Host": "10.0.0.7"}).status_code
            seen["long"] = c.post("/v1/completions", json={"model": "fake", "prompt": "x" * 70}).status_code
            seen["fits"] = c.post("/v1/completions",
                                  json={"model": "fake", "prompt": "x" * 50, "max_tokens": 10}).status_code
            seen["form"] = c.post("/v1/completions", data={"model": "fake", "prompt": "x"}).status_code

    fake_serve["backend"], fake_serve["probe"] = FakeBackend(context_length=64), probe
    assert main(["serve", "--model", "m", "--host", "0.0.0.0", "--port", "0", "--allowed-host", "box.lan"]) == 0
    assert fake_serve["served_on"] == ("0.0.0.0", 0)
    assert seen == {"named": 200, "other": 421, "ip": 200, "long": 400, "fits": 200, "form": 415}
    out = capsys.readouterr().out
    assert "prompts up to 64 tokens (the model's context length); " \
           "Host accepted: localhost, any IP address, box.lan" in out

    # a backend that does not know its context length: 4096, and the startup line says why
    fake_serve["backend"], fake_serve["probe"] = FakeBackend(), lambda url: None
    assert main(["serve", "--model", "m", "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert "prompts up to 4096 tokens (the model does not report its context length" in out
    assert "Host accepted: localhost, 127.0.0.1, [::1]" in out

    # an explicit limit is reported as such
    fake_serve["backend"] = FakeBackend(context_length=64)
    assert main(["serve", "--model", "m", "--port", "0", "--max-prompt-tokens", "32"]) == 0
    assert "prompts up to 32 tokens (--max-prompt-tokens; the model's context length is 64)" in capsys.readouterr().out


def test_serve_cli_rejects_bad_allowed_host_before_loading(fake_serve, capsys):
    from medtune.cli import main

    assert main(["serve", "--model", "m", "--allowed-host", "box.lan:8000"]) == 2
    err = capsys.readouterr().err
    assert "medtune serve: error: allowed host 'box.lan:8000' must be a host name or IP address without port" in err
    assert fake_serve["loads"] == 0 and fake_serve["served_on"] is None


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
