"""The OpenAI-compatible server, exercised over real HTTP on loopback.

Every server runs in a background thread bound to 127.0.0.1 on a free port; every client call
has a timeout and every wait loop a deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from medtune.inference.base import FakeBackend, GenerationParams
from medtune.inference.server import background_server, create_app

MODEL = "medtune-test"
REPLIES = {"发热": "答案：A\n理由：感染性发热最常见。", "咳嗽": "答案：C"}
CHAT = [{"role": "user", "content": "患者发热三天，最可能的诊断是？"}]
CHAT_PROMPT = "用户：患者发热三天，最可能的诊断是？\n助手："  # FakeBackend has no chat template
TIMEOUT = 10.0


@contextlib.contextmanager
def serving(backend, **kwargs) -> Iterator[tuple[str, object]]:
    """``(base_url, app)`` for a server over ``backend`` running for the block."""
    app = create_app(backend, MODEL, **kwargs)
    with background_server(app) as url:
        yield url, app


@contextlib.contextmanager
def http(url: str, **kwargs) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False, **kwargs) as client:
        yield client


def oai(url: str, key: str = "unused") -> openai.OpenAI:
    # No retries: a 429 or 500 must surface in the test, not be retried away.
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way."""
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


class SlowBackend(FakeBackend):
    """FakeBackend that takes ``delay`` seconds per generate call and records peak concurrency."""

    def __init__(self, delay: float = 0.3, piece_delay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay
        self.piece_delay = piece_delay
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.pieces_streamed = 0
        self.stream_closed = threading.Event()

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def generate(self, prompts, params, add_special_tokens=True):
        self._enter()
        try:
            time.sleep(self.delay)
            return super().generate(prompts, params, add_special_tokens)
        finally:
            self._leave()

    def stream(self, prompt, params, add_special_tokens=True):
        self._enter()
        try:
            for piece in super().stream(prompt, params, add_special_tokens):
                time.sleep(self.piece_delay)
                self.pieces_streamed += 1
                yield piece
        finally:
            self._leave()
            self.stream_closed.set()


class BrokenBackend(FakeBackend):
    def generate(self, prompts, params, add_special_tokens=True):
        raise RuntimeError("CUDA out of memory (secret internals)")

    def stream(self, prompt, params, add_special_tokens=True):
        yield "答"
        raise RuntimeError("CUDA out of memory (secret internals)")


# ---- round trips -----------------------------------------------------------------------------------


def test_models_endpoint():
    with serving(FakeBackend()) as (url, _), http(url) as c:
        body = c.get("/v1/models").json()
        assert body["object"] == "list"
        (card,) = body["data"]
        assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "medtune"
        assert isinstance(card["created"], int)
        assert c.get(f"/v1/models/{MODEL}").json() == card
        assert_error(c.get("/v1/models/gpt-4"), 404, "model_not_found")
        assert [m.id for m in oai(url).models.list()] == [MODEL]


def test_openai_client_round_trip():
    with serving(FakeBackend(REPLIES)) as (url, _):
        client = oai(url)
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=64)
        assert chat.object == "chat.completion" and chat.model == MODEL and chat.id.startswith("chatcmpl-")
        (choice,) = chat.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == REPLIES["发热"]
        assert choice.finish_reason == "stop"
        # FakeBackend counts one token per character.
        assert chat.usage.prompt_tokens == len(CHAT_PROMPT)
        assert chat.usage.completion_tokens == len(REPLIES["发热"])
        assert chat.usage.total_tokens == len(CHAT_PROMPT) + len(REPLIES["发热"])

        comp = client.completions.create(model=MODEL, prompt="咳嗽伴咳痰", max_tokens=64)
        assert comp.object == "text_completion" and comp.model == MODEL
        assert comp.choices[0].text == "答案：C"
        assert comp.choices[0].finish_reason == "stop"
        assert (comp.usage.prompt_tokens, comp.usage.completion_tokens) == (5, 4)


def test_chat_messages_forms_and_prompt_list():
    backend = FakeBackend(REPLIES)
    with serving(backend) as (url, _), http(url) as c:
        messages = [
            {"role": "developer", "content": "你是医生"},
            {"role": "user", "content": [{"type": "text", "text": "患者"}, {"type": "text", "text": "发热"}]},
        ]
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert r.status_code == 200
        assert backend.calls[-1] == ["你是医生\n用户：患者发热\n助手："]
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["发热"]})
        assert r.json()["choices"][0]["text"] == REPLIES["发热"]


def test_length_finish_reason_and_usage():
    with serving(FakeBackend(REPLIES)) as (url, _), http(url) as c:
        body = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 3}).json()
        assert body["choices"][0]["message"]["content"] == "答案："
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(CHAT_PROMPT), "completion_tokens": 3,
                                 "total_tokens": len(CHAT_PROMPT) + 3}


def test_stop_strings_honoured():
    with serving(FakeBackend(REPLIES)) as (url, _):
        client = oai(url)
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, stop="\n")
        assert chat.choices[0].message.content == "答案：A"
        assert chat.choices[0].finish_reason == "stop"
        assert chat.usage.completion_tokens == 4
        comp = client.completions.create(model=MODEL, prompt="发热", stop=["理由", "A"])
        assert comp.choices[0].text == "答案："
        streamed = client.chat.completions.create(model=MODEL, messages=CHAT, stop=["\n"], stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == "答案：A"


def test_n_choices():
    with serving(FakeBackend(REPLIES)) as (url, _):
        client = oai(url)
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, n=2)
        assert [c.index for c in chat.choices] == [0, 1]
        assert [c.message.content for c in chat.choices] == [REPLIES["发热"]] * 2
        assert chat.usage.completion_tokens == 2 * len(REPLIES["发热"])
        assert chat.usage.prompt_tokens == len(CHAT_PROMPT)  # the prompt is counted once
        sampled = client.completions.create(model=MODEL, prompt="咳嗽", n=3, temperature=0.8)
        assert [c.text for c in sampled.choices] == ["答案：C"] * 3


# ---- streaming -------------------------------------------------------------------------------------


def test_streaming_reassembles_fake():
    with serving(FakeBackend(REPLIES)) as (url, _), http(url) as c:
        full = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT}).json()
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"] for ch in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        assert text == full["choices"][0]["message"]["content"] == REPLIES["发热"]

        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "发热", "stream": True, "max_tokens": 4})
        chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
        assert all(ch["object"] == "text_completion" for ch in chunks)
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == "答案：A"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    with serving(FakeBackend(REPLIES)) as (url, _):
        stream = oai(url).chat.completions.create(
            model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == REPLIES["发热"]
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(CHAT_PROMPT), len(REPLIES["发热"]))


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    from medtune.inference.hf import HFBackend
    from medtune.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir))
    return HFBackend(model, tokenizer)


def test_streaming_matches_greedy_tiny_model(hf_backend):
    with serving(hf_backend) as (url, _):
        client = oai(url)
        for kind in ("chat", "completion"):
            if kind == "chat":
                full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
                text, usage = full.choices[0].message.content, full.usage
                parts = client.chat.completions.create(
                    model=MODEL, messages=CHAT, max_tokens=20, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = list(parts)
                streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            else:
                full = client.completions.create(model=MODEL, prompt="患者发热三天", max_tokens=20, temperature=0)
                text, usage = full.choices[0].text, full.usage
                chunks = list(client.completions.create(
                    model=MODEL, prompt="患者发热三天", max_tokens=20, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                ))
                streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            assert text, "the tiny model should produce some text in 20 tokens"
            assert streamed == text
            assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens
            assert chunks[-1].usage.completion_tokens == usage.completion_tokens
            assert 0 < usage.completion_tokens <= 20


# ---- bad input -------------------------------------------------------------------------------------

GOOD = {"model": MODEL, "messages": CHAT}

BAD_REQUESTS = [
    # (path, body (dict → JSON, str → raw), status, code, param)
    ("/v1/chat/completions", "{not json", 400, "invalid_json", None),
    ("/v1/chat/completions", b"\xff\xfe", 400, "invalid_json", None),
    ("/v1/chat/completions", "[1, 2]", 400, "invalid_type", None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "missing_required_parameter", "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "invalid_type", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, None, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, None,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_type", "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "invalid_type", None),
    ("/v1/chat/completions", {"model": 7, "messages": CHAT}, 400, "invalid_type", "model"),
    ("/v1/chat/completions", {**GOOD, "model": "gpt-4o"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 0}, 400, None, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 100000}, 400, None, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": "10"}, 400, "invalid_type", "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 2.5}, 400, "invalid_type", "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "temperature": 5}, 400, None, "temperature"),
    ("/v1/chat/completions", {**GOOD, "temperature": -0.1}, 400, None, "temperature"),
    ("/v1/chat/completions", json.dumps(GOOD)[:-1] + ', "temperature": NaN}', 400, None, "temperature"),
    ("/v1/chat/completions", {**GOOD, "top_p": 0}, 400, None, "top_p"),
    ("/v1/chat/completions", {**GOOD, "n": 9}, 400, None, "n"),
    ("/v1/chat/completions", {**GOOD, "n": 2, "stream": True}, 400, None, "n"),
    ("/v1/chat/completions", {**GOOD, "stream": "yes"}, 400, "invalid_type", "stream"),
    ("/v1/chat/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    ("/v1/chat/completions", {**GOOD, "stop": [""]}, 400, None, "stop"),
    ("/v1/chat/completions", {**GOOD, "stop": 3}, 400, "invalid_type", "stop"),
    ("/v1/chat/completions", {**GOOD, "tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    ("/v1/completions", {"model": MODEL}, 400, "missing_required_parameter", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, None, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}, 400, None, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "unsupported_parameter", "echo"),
]


def test_bad_requests_get_openai_errors():
    backend = FakeBackend(REPLIES)
    with serving(backend, max_tokens_limit=512) as (url, _), http(url) as c:
        for path, body, status, code, param in BAD_REQUESTS:
            content = body.encode() if isinstance(body, str) else body if isinstance(body, bytes) else None
            r = c.post(path, content=content, json=None if content is not None else body,
                       headers={"content-type": "application/json"})
            assert_error(r, status, code, param)
        assert_error(c.get("/v1/nope"), 404, "not_found")
        assert_error(c.post("/v2/chat/completions", json=GOOD), 404, "not_found")
        assert_error(c.get("/v1/chat/completions"), 405, "method_not_allowed")
        assert backend.calls == []  # nothing reached the backend
        # and the server is still fine
        assert c.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_prompt_too_long():
    with serving(FakeBackend(REPLIES), max_prompt_tokens=50) as (url, _), http(url) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "发" * 51})
        assert_error(r, 400, "context_length_exceeded", "prompt")
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "热" * 60}]})
        assert_error(r, 400, "context_length_exceeded", "messages")
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "发" * 50}).status_code == 200
        with pytest.raises(openai.BadRequestError) as info:
            oai(url).completions.create(model=MODEL, prompt="x" * 100)
        assert info.value.code == "context_length_exceeded"


def test_backend_failure_is_500_without_internals():
    with serving(BrokenBackend()) as (url, _), http(url) as c:
        err = assert_error(c.post("/v1/chat/completions", json=GOOD), 500, "backend_error")
        assert err["type"] == "server_error" and "secret" not in err["message"]
        r = c.post("/v1/chat/completions", json={**GOOD, "stream": True})
        events = sse_events(r.text)
        assert "[DONE]" not in events and "secret" not in r.text
        assert json.loads(events[-1])["error"]["code"] == "backend_error"
        with pytest.raises(openai.APIError):
            list(oai(url).chat.completions.create(model=MODEL, messages=CHAT, stream=True))
        assert c.get("/health").json()["running"] == 0


def test_create_app_rejects_bad_limits():
    for kwargs in ({"max_queue": 0}, {"max_concurrency": -1}, {"max_prompt_tokens": 1.5}, {"api_key": ""}):
        with pytest.raises(ValueError):
            create_app(FakeBackend(), MODEL, **kwargs)


# ---- authentication --------------------------------------------------------------------------------


def test_api_key_enforced():
    key = "s3cret-key"
    with serving(FakeBackend(REPLIES), api_key=key) as (url, _), http(url) as c:
        assert_error(c.post("/v1/chat/completions", json=GOOD), 401, "invalid_api_key")
        assert_error(c.get("/v1/models"), 401, "invalid_api_key")
        for header in ("Bearer wrong", f"Basic {key}", key, f"Bearer {key}x", f"Bearer  {key} extra"):
            assert_error(c.post("/v1/chat/completions", json=GOOD, headers={"Authorization": header}),
                         401, "invalid_api_key")
        # a non-ASCII header must be a 401, not a crash in the comparison
        r = c.post("/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer ключ".encode()})
        assert_error(r, 401, "invalid_api_key")
        ok = c.post("/v1/chat/completions", json=GOOD, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key

        with pytest.raises(openai.AuthenticationError):
            oai(url, key="wrong").chat.completions.create(model=MODEL, messages=CHAT)
        chat = oai(url, key=key).chat.completions.create(model=MODEL, messages=CHAT)
        assert chat.choices[0].message.content == REPLIES["发热"]


# ---- Host header (DNS rebinding) -------------------------------------------------------------------


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    """``(status, body)`` for a hand-written request (for what httpx will not send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_dns_rebinding_host_is_refused():
    backend = FakeBackend(REPLIES)
    with serving(backend) as (url, _), http(url) as c:
        port = port_of(url)
        for host in ("evil.example", f"evil.example:{port}", "EVIL.example.", "192.168.1.5", f"[2001:db8::1]:{port}"):
            for response in (c.get("/v1/models", headers={"Host": host}),
                             c.post("/v1/chat/completions", json=GOOD, headers={"Host": host}),
                             c.get("/health", headers={"Host": host}),
                             c.get("/no-such-route", headers={"Host": host})):
                err = assert_error(response, 421, "host_not_allowed")
                # the message names the host (without port) and the way to allow it
                shown = host.lower().rsplit(":", 1)[0].rstrip(".") if not host.startswith("[") else "[2001:db8::1]"
                assert f"'{shown}'" in err["message"] and f"--allowed-host {shown}" in err["message"]
        assert backend.calls == []  # nothing reached the model
        for host in ("[::1", "a b", "::1", "user@localhost", f"localhost:{port}x"):
            assert_error(c.get("/health", headers={"Host": host}), 400, "invalid_host_header")


def test_loopback_hosts_accepted():
    with serving(FakeBackend(REPLIES)) as (url, _), http(url) as c:
        port = port_of(url)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", "LocalHost.",
                     "127.0.0.2", "[::1]"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
            r = c.post("/v1/chat/completions", json=GOOD, headers={"Host": host})
            assert r.json()["choices"][0]["message"]["content"] == REPLIES["发热"]
        # HTTP/1.0 clients send no Host; browsers always do, so such a request is not a rebinding.
        status, body = raw_http(port, b"GET /health HTTP/1.0\r\n\r\n")
        assert status == 200 and json.loads(body)["status"] == "ok"
        # the official client, through both loopback spellings
        for base in (url, url.replace("127.0.0.1", "localhost")):
            chat = oai(base).chat.completions.create(model=MODEL, messages=CHAT)
            assert chat.choices[0].message.content == REPLIES["发热"]


def test_allowed_hosts_admit_names():
    with serving(FakeBackend(REPLIES), allowed_hosts=["medtune.lan", "GPU-Box"]) as (url, _), http(url) as c:
        port = port_of(url)
        for host in (f"medtune.lan:{port}", "gpu-box", "localhost"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
        err = assert_error(c.get("/v1/models", headers={"Host": "other.lan"}), 421, "host_not_allowed")
        assert "medtune.lan" in err["message"]  # the accepted names are listed
        # bound to loopback, an IP address a client can only have reached through a proxy is refused
        assert_error(c.get("/v1/models", headers={"Host": "10.0.0.7"}), 421, "host_not_allowed")
        with pytest.raises(openai.APIStatusError) as info:
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT,
                          default_headers={"Host": "other.lan"}).models.list()
        assert info.value.status_code == 421

    with serving(FakeBackend(REPLIES), allowed_hosts=["*"]) as (url, _), http(url) as c:
        assert c.get("/v1/models", headers={"Host": "evil.example"}).status_code == 200


def test_wildcard_bind_accepts_ip_addresses_not_names():
    app = create_app(FakeBackend(REPLIES), MODEL, allowed_hosts=["gpu-box.lan"])
    with background_server(app, host="0.0.0.0") as url:
        port = port_of(url)
        with http(f"http://127.0.0.1:{port}") as c:
            for host in (f"192.0.2.7:{port}", "10.1.2.3", f"[2001:db8::1]:{port}", "localhost", "gpu-box.lan"):
                assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
            err = assert_error(c.get("/v1/models", headers={"Host": f"evil.example:{port}"}), 421,
                               "host_not_allowed")
            assert "--allowed-host evil.example" in err["message"] and "any IP address" in err["message"]
            assert oai(f"http://127.0.0.1:{port}").models.list().data[0].id == MODEL


@pytest.mark.parametrize(("bind", "allowed", "refused"), [
    ("127.0.0.1", ["localhost", "127.0.0.1", "127.9.9.9", "::1"], ["10.0.0.1", "evil.example", "::2"]),
    ("localhost", ["localhost", "127.0.0.1", "::1"], ["192.168.1.5", "localhost.evil.example"]),
    ("::1", ["localhost", "127.0.0.1", "::1"], ["2001:db8::1", "evil.example"]),
    ("0.0.0.0", ["10.0.0.1", "2001:db8::1", "localhost"], ["evil.example", "box.lan"]),
    ("::", ["10.0.0.1", "2001:db8::1", "localhost"], ["evil.example"]),
    ("", ["10.0.0.1"], ["evil.example"]),
    ("192.168.1.5", ["192.168.1.5", "10.0.0.1"], ["evil.example"]),
    ("Box.LAN", ["box.lan", "10.0.0.1"], ["evil.example"]),  # bound by name: that name is the server's
])
def test_host_policy_rules(bind, allowed, refused):
    from medtune.inference.server import HostPolicy

    policy = HostPolicy()
    policy.bind(bind)
    for host in allowed:
        assert policy.allows(host), (bind, host)
    for host in refused:
        assert not policy.allows(host), (bind, host)
    # a second Host header is ambiguous (h11 refuses it already; other HTTP parsers may not)
    assert policy.check(["localhost", "evil.example"]).status == 400


# ---- Content-Type (cross-site form posts) ----------------------------------------------------------


def test_post_requires_json_content_type():
    backend = FakeBackend(REPLIES)
    body = json.dumps({"model": MODEL, "prompt": "发热"}).encode()
    with serving(backend) as (url, _), http(url) as c:
        refused = [
            c.post("/v1/completions", data={"model": MODEL, "prompt": "发热"}),  # an HTML form
            c.post("/v1/completions", content=body, headers={"Content-Type": "text/plain"}),  # enctype=text/plain
            c.post("/v1/completions", files={"prompt": ("p.txt", b"x")}),  # multipart/form-data
            c.post("/v1/completions", content=body),  # no Content-Type at all
            c.post("/v1/chat/completions", content=json.dumps(GOOD).encode(),
                   headers={"Content-Type": "text/json"}),
            c.post("/v1/chat/completions", content=json.dumps(GOOD).encode(),
                   headers={"Content-Type": "application/jsonp"}),
        ]
        for r in refused:
            err = assert_error(r, 415, "unsupported_media_type")
            assert "application/json" in err["message"]
        assert "'text/plain'" in refused[1].json()["error"]["message"]
        assert backend.calls == []
        for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/json ;charset=UTF-8"):
            r = c.post("/v1/completions", content=body, headers={"Content-Type": content_type})
            assert r.json()["choices"][0]["text"] == REPLIES["发热"], content_type
        assert c.get("/v1/models").status_code == 200  # GETs carry no body and need no Content-Type
        # and a page cannot get a JSON post through a CORS preflight: none is granted
        preflight = c.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 405
        assert not any(h.startswith("access-control-") for h in preflight.headers)

    with serving(FakeBackend(REPLIES), api_key="k") as (url, _), http(url) as c:
        # without the key the client learns only that the key is wrong
        assert_error(c.post("/v1/completions", content=body, headers={"Content-Type": "text/plain"}), 401,
                     "invalid_api_key")


# ---- context length --------------------------------------------------------------------------------


def test_prompt_limit_follows_context_length():
    backend = FakeBackend(default="长" * 100, context_length=64)  # one token per character
    with serving(backend) as (url, app), http(url) as c:
        assert (app.state.max_prompt_tokens, app.state.context_length) == (64, 64)

        def complete(prompt: str, **extra) -> httpx.Response:
            return c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **extra})

        err = assert_error(complete("x" * 70), 400, "context_length_exceeded", "prompt")
        assert "70 tokens" in err["message"] and "64" in err["message"]
        assert complete("x" * 50, max_tokens=10).json()["usage"] == {
            "prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}
        assert complete("x" * 54, max_tokens=10).status_code == 200  # exactly the context
        err = assert_error(complete("x" * 50, max_tokens=20), 400, "context_length_exceeded", "prompt")
        assert "64" in err["message"] and "70 in all" in err["message"] and "at most 14" in err["message"]
        err = assert_error(complete("x" * 50, max_tokens=20, stream=True), 400, "context_length_exceeded")
        chat = [{"role": "user", "content": "x" * 40}]  # 46 tokens once rendered as 用户：…\n助手：
        err = assert_error(c.post("/v1/chat/completions", json={"model": MODEL, "messages": chat,
                                                                "max_completion_tokens": 30}),
                           400, "context_length_exceeded", "messages")
        assert "max_completion_tokens" in err["message"]
        assert len(backend.calls) == 2  # the two accepted requests; every refusal came before the model

        # No max_tokens: the default (256) is cut to what the context leaves instead of failing.
        body = complete("x" * 50).json()
        assert body["choices"][0]["text"] == "长" * 14 and body["choices"][0]["finish_reason"] == "length"
        streamed = c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 60, "stream": True})
        chunks = [json.loads(e) for e in sse_events(streamed.text)[:-1]]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == "长" * 4
        assert_error(complete("x" * 64), 400, "context_length_exceeded", "prompt")  # no room for a reply

        with pytest.raises(openai.BadRequestError) as info:
            oai(url).completions.create(model=MODEL, prompt="x" * 50, max_tokens=20)
        assert info.value.code == "context_length_exceeded"


def test_prompt_limit_without_context_length(caplog):
    with caplog.at_level("WARNING", logger="medtune.inference.server"):
        app = create_app(FakeBackend(), MODEL)
    assert (app.state.max_prompt_tokens, app.state.context_length) == (4096, None)
    assert "does not report its context length" in caplog.text and "4096" in caplog.text
    # an explicit limit wins over the context length; the context still bounds prompt + max_tokens
    with serving(FakeBackend(context_length=64), max_prompt_tokens=32) as (url, app), http(url) as c:
        assert app.state.max_prompt_tokens == 32
        assert_error(c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 40}), 400,
                     "context_length_exceeded", "prompt")
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 32}).status_code == 200


def test_create_app_rejects_bad_hosts_and_context_length():
    for kwargs in ({"allowed_hosts": ["example.lan:8000"]}, {"allowed_hosts": ["http://example.lan"]},
                   {"allowed_hosts": [""]}, {"allowed_hosts": ["a b"]}):
        with pytest.raises(ValueError, match="allowed host"):
            create_app(FakeBackend(), MODEL, **kwargs)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="context_length"):
            create_app(FakeBackend(context_length=bad), MODEL)


# ---- load ------------------------------------------------------------------------------------------


def test_burst_is_bounded_and_admitted_requests_complete():
    backend = SlowBackend(delay=0.3, replies=REPLIES)
    # batches of 1: the two admitted requests run one after the other (batching: test_server_batching.py)
    with serving(backend, max_concurrency=1, max_queue=2, max_batch_size=1) as (url, app):

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
                return await asyncio.gather(*(
                    client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
                    for _ in range(6)
                ))

        t0 = time.monotonic()
        responses = asyncio.run(burst())
        elapsed = time.monotonic() - t0
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 429, 429, 429, 429], statuses
        for r in responses:
            if r.status_code == 429:
                err = assert_error(r, 429, "queue_full")
                assert err["type"] == "rate_limit_exceeded"
                assert r.headers["retry-after"] == "1"
            else:
                assert r.json()["choices"][0]["message"]["content"] == REPLIES["发热"]
        assert backend.peak == 1  # max_concurrency held
        assert elapsed >= 0.55  # the two admitted ones ran one after the other
        assert [len(call) for call in backend.calls] == [1, 1]
        gate = app.state.medtune
        assert (gate.admitted, gate.running) == (0, 0)

        with pytest.raises(openai.RateLimitError):
            def fire():
                with contextlib.suppress(Exception):
                    oai(url).chat.completions.create(model=MODEL, messages=CHAT)
            threads = [threading.Thread(target=fire) for _ in range(2)]
            for t in threads:
                t.start()
            wait_until(lambda: gate.admitted == 2)
            try:
                oai(url).chat.completions.create(model=MODEL, messages=CHAT)
            finally:
                for t in threads:
                    t.join(timeout=TIMEOUT)


def test_event_loop_stays_responsive_during_generation():
    backend = SlowBackend(delay=1.0, replies=REPLIES)
    with serving(backend) as (url, app), http(url) as c:
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(r=c.post("/v1/chat/completions", json=GOOD)), daemon=True
        )
        worker.start()
        wait_until(lambda: backend.in_flight == 1)
        for _ in range(3):
            t0 = time.monotonic()
            assert c.get("/v1/models").status_code == 200
            assert time.monotonic() - t0 < 0.2
        worker.join(timeout=TIMEOUT)
        assert result["r"].status_code == 200


def test_stream_holds_slot_and_disconnect_releases_it():
    reply = "一二三四五六七八九十" * 4
    backend = SlowBackend(delay=0.0, piece_delay=0.05, default=reply)
    with serving(backend, max_concurrency=1, max_queue=1) as (url, app), http(url) as c:
        gate = app.state.medtune
        with c.stream("POST", "/v1/chat/completions", json={**GOOD, "stream": True}) as r:
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                if '"content"' in line:
                    seen += 1
                if seen == 2:
                    break
            # mid-stream: the slot and the queue place are held
            assert (gate.admitted, gate.running) == (1, 1)
            assert_error(c.post("/v1/chat/completions", json=GOOD), 429, "queue_full")
        # leaving the block closes the connection mid-stream
        assert backend.stream_closed.wait(timeout=3)
        wait_until(lambda: gate.admitted == 0 and gate.running == 0, timeout=3)
        assert backend.pieces_streamed < len(reply)  # generation stopped early
        ok = c.post("/v1/chat/completions", json={**GOOD, "max_tokens": 3})
        assert ok.json()["choices"][0]["message"]["content"] == reply[:3]


def test_queued_stream_waits_for_its_slot():
    backend = SlowBackend(delay=0.3, replies=REPLIES)
    with serving(backend, max_concurrency=1, max_queue=3) as (url, app):

        async def mixed() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
                return await asyncio.gather(
                    client.post("/v1/chat/completions", json=GOOD),
                    client.post("/v1/chat/completions", json={**GOOD, "stream": True}),
                    client.post("/v1/completions", json={"model": MODEL, "prompt": "咳嗽", "stream": True}),
                )

        plain, chat_stream, comp_stream = asyncio.run(mixed())
        assert plain.json()["choices"][0]["message"]["content"] == REPLIES["发热"]
        chunks = [json.loads(e) for e in sse_events(chat_stream.text)[:-1]]
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == REPLIES["发热"]
        chunks = [json.loads(e) for e in sse_events(comp_stream.text)[:-1]]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == "答案：C"
        assert backend.peak == 1
        assert (app.state.medtune.admitted, app.state.medtune.running) == (0, 0)


def test_generation_params_reach_backend():
    seen: list[GenerationParams] = []

    class Recording(FakeBackend):
        def generate(self, prompts, params, add_special_tokens=True):
            seen.append(params)
            return super().generate(prompts, params, add_special_tokens)

    with serving(Recording(REPLIES)) as (url, _), http(url) as c:
        c.post("/v1/chat/completions", json={**GOOD, "max_completion_tokens": 7, "temperature": 0.5,
                                            "top_p": 0.9, "stop": "\n"})
        c.post("/v1/chat/completions", json=GOOD)
    assert seen[0] == GenerationParams(max_new_tokens=7, temperature=0.5, top_p=0.9, stop=("\n",))
    assert seen[1] == GenerationParams(max_new_tokens=256, temperature=0.0, top_p=1.0, stop=())


def test_chat_template_from_tokenizer(tiny_tokenizer):
    backend = FakeBackend(REPLIES)
    with serving(backend, tokenizer=tiny_tokenizer) as (url, _), http(url) as c:
        body = c.post("/v1/chat/completions", json=GOOD).json()
    expected = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert backend.calls == [[expected]]
    assert body["usage"]["prompt_tokens"] == len(expected)


def test_framework_validation_errors_are_400():
    # Routes with typed parameters fail validation inside FastAPI; that must still be a 400 in
    # OpenAI's shape, not FastAPI's 422.
    app = create_app(FakeBackend(), MODEL)

    @app.get("/typed")
    async def typed(x: int) -> dict:
        return {"x": x}

    with background_server(app) as url, http(url) as c:
        assert c.get("/typed", params={"x": 3}).json() == {"x": 3}
        assert_error(c.get("/typed", params={"x": "abc"}), 400, "invalid_type", "x")
