"""An OpenAI-compatible HTTP server over any medtune backend.

Endpoints (the subset of the OpenAI API that a text-only model can honour):

- ``GET /v1/models`` and ``GET /v1/models/{id}``: the one served model.
- ``POST /v1/chat/completions``: messages rendered as the served run was trained
  (:func:`medtune.inference.chat.reply_prompt`: a conversation run's own format; otherwise the
  model's chat template or a 用户/助手 transcript), optionally streamed as server-sent events. A
  pt run (raw text, no turns) answers 400 here and continues text on ``/v1/completions``.
- ``POST /v1/completions``: a raw prompt continued, optionally streamed.
- ``GET /health``: liveness plus the current load (no API key needed, for probes).

Decoding is greedy unless the request sets ``temperature`` above 0: medtune's convention, so
that asking the same exam question twice gives the same answer. Parameters that change the shape
of a response the server cannot produce (tools, logprobs, echo, suffix, best_of > 1, non-text
response formats) are refused with 400; hints it cannot act on (seed, penalties, logit_bias,
user, metadata) are accepted and ignored, as many clients send them by default.

Generation never runs on the event loop: backend calls go to worker threads, at most
``max_concurrency`` at a time, and at most ``max_queue`` requests are admitted (running plus
waiting). Non-streamed requests that wait for the model are generated together, up to
``max_batch_size`` with the same decoding settings in one batched call
(:mod:`medtune.inference.batching`); streamed ones run one by one. Anything beyond the queue is
answered 429 at once instead of piling up, so a client can back off and retry. Every error is returned in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

Without an API key, a web page the user visits could still reach a local server: by DNS
rebinding (its own name made to resolve to 127.0.0.1) or by a cross-site form post. Two checks
close that: the ``Host`` header must name this server (:class:`HostPolicy`, else 421), and POST
bodies must be sent as ``application/json`` (else 415), a type a page cannot send to another
origin without a CORS preflight, which this server never grants.

Prompts are limited to the model's context length unless told otherwise, and a request whose
prompt plus ``max_tokens`` would not fit the context is refused with 400
``context_length_exceeded`` before it reaches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from medtune.inference.base import GenerationParams
from medtune.inference.batching import ContinuousBatching, RequestBatcher
from medtune.inference.chat import reply_prompt, reply_stops

logger = logging.getLogger(__name__)

OWNER = "medtune"
DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 4  # n; each choice costs a full generation
MAX_STOP_STRINGS = 4  # OpenAI's own limit
MAX_BODY_BYTES = 8 * 1024 * 1024  # far above any prompt max_prompt_tokens allows; stops memory abuse
DEFAULT_PROMPT_TOKENS = 4096  # the prompt limit when neither the caller nor the backend gives one

# Roles a chat template understands; OpenAI's newer "developer" role is the system prompt renamed.
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---- errors -------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape; raised anywhere inside a request.

    Args:
        status: HTTP status code.
        message: Human-readable explanation, safe to show to the client.
        type: OpenAI error type (``invalid_request_error``, ``server_error``, ...).
        param: The request field at fault, when there is one.
        code: Machine-readable code (``model_not_found``, ``context_length_exceeded``, ...).
        headers: Extra response headers (e.g. ``Retry-After`` on 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - the field's name in OpenAI's schema
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse into their exception objects."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as a JSON response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


# ---- where a request comes from: Host and Content-Type ---------------------------------------------

# Characters of a DNS name or IPv4 address; anything else in a Host header is malformed.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address, or None when it is a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _parse_host(value: str) -> tuple[str, str] | None:
    """``(host, port)`` from a Host header value, the host lowercased and unbracketed.

    Accepts ``name``, ``name:port``, ``1.2.3.4[:port]`` and ``[v6][:port]`` (RFC 9110 §7.2). A
    trailing dot is dropped (``localhost.`` is ``localhost`` to DNS). Returns None when the value
    is not of that form: a bare IPv6 address, a user-info part, spaces, an empty name.
    """
    value = value.strip().lower()
    if value.startswith("["):
        host, bracket, port = value[1:].partition("]")
        if not bracket or not isinstance(_ip(host), ipaddress.IPv6Address):
            return None
        if port and not port.startswith(":"):
            return None
        port = port[1:]
    else:
        host, _, port = value.partition(":")
        host = host.removesuffix(".")
        if not host or not set(host) <= _NAME_CHARS or ":" in port:
            return None
    if port and not port.isdigit():
        return None
    return host, port


def _is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


class HostPolicy:
    """Which ``Host`` header values the server answers: the defence against DNS rebinding.

    A page on ``evil.example`` can make its own name resolve to 127.0.0.1 and then read the
    responses of a server there as same-origin ones; its requests still say ``Host:
    evil.example``, and that is what is refused. The rules, port ignored (a rebinding attack
    targets the right port anyway, and proxies rewrite it):

    - ``localhost`` and loopback addresses (``127.0.0.1``, ``[::1]``) are always accepted: a
      browser never lets a page's DNS decide where they point.
    - Bound to anything but loopback (``0.0.0.0``, ``::``, a LAN address), any IP-address Host is
      accepted too, since an address cannot be rebound; a name the server was bound to by name is
      accepted as well. Other names must be listed in ``allowed_hosts``.
    - ``"*"`` in ``allowed_hosts`` accepts every Host: no protection, for servers behind a proxy
      that checks Host itself.
    - A request without a Host header (HTTP/1.0) is accepted: browsers always send one, so such
      a request cannot come from a page.

    Until :meth:`bind` is called (:func:`serve` and :func:`background_server` call it), the
    server is assumed bound to loopback, the strictest rules.

    Args:
        allowed_hosts: Extra names (or addresses) to accept, case-insensitive, without port.

    Raises:
        ValueError: An entry is not a host name, an IP address or ``*``.
    """

    def __init__(self, allowed_hosts: Iterable[str] | None = None):
        self.any_host = False
        names: list[str] = []
        for entry in allowed_hosts or ():
            if not isinstance(entry, str):
                raise ValueError(f"allowed host entries must be strings, got {entry!r}")
            if entry.strip() == "*":
                self.any_host = True
                continue
            # A bare IPv6 address is a natural way to write one here; bracket it to parse.
            parsed = _parse_host(f"[{entry.strip()}]" if _ip(entry.strip()) else entry)
            if parsed is None or parsed[1]:
                raise ValueError(f"allowed host {entry!r} must be a host name or IP address without port "
                                 "(e.g. example.lan, 192.168.1.5), or '*' for any")
            names.append(parsed[0])
        self.names = frozenset(names)
        self.bind_host: str | None = None

    def bind(self, host: str) -> None:
        """Record the address the server listens on (as given to uvicorn); the rules depend on it."""
        host = host.strip().lower().strip("[]").removesuffix(".")
        self.bind_host = host or "0.0.0.0"  # "" binds every interface, as 0.0.0.0 does

    @property
    def loopback_only(self) -> bool:
        """True when the server is (assumed) reachable through loopback only."""
        return self.bind_host is None or _is_loopback(self.bind_host)

    def allows(self, host: str) -> bool:
        """Whether a normalised Host (from :func:`_parse_host`) is accepted."""
        if self.any_host or host in self.names or _is_loopback(host):
            return True
        if self.loopback_only:
            return False
        return host == self.bind_host or _ip(host) is not None

    def check(self, values: list[str]) -> APIError | None:
        """The error for a request with these Host header values, None when it may proceed."""
        if not values or (len(values) == 1 and not values[0].strip()):
            return None  # HTTP/1.0 (or an empty Host): not something a browser sends
        if len(values) > 1:
            return APIError(400, "the request has more than one Host header", code="invalid_host_header")
        parsed = _parse_host(values[0])
        if parsed is None:
            return APIError(400, f"the Host header {values[0][:200]!r} is malformed", code="invalid_host_header")
        host = parsed[0]
        if self.allows(host):
            return None
        shown = f"[{host}]" if ":" in host else host
        return APIError(
            421,
            f"Host '{shown}' is not allowed on this server (protection against DNS rebinding); accepted: "
            f"{self.describe()}. To serve this name, start the server with --allowed-host {shown} "
            "(create_app(allowed_hosts=[...]) in Python).",
            code="host_not_allowed",
        )

    def describe(self) -> str:
        """The accepted Host values in words, for errors and the startup line."""
        if self.any_host:
            return "any Host ('*': no DNS-rebinding protection)"
        accepted = ["localhost", "127.0.0.1", "[::1]"]
        if self.bind_host is not None and not self.loopback_only:
            accepted[1:] = ["any IP address"]
            if _ip(self.bind_host) is None:
                accepted.append(self.bind_host)  # bound by name
        accepted += sorted(f"[{n}]" if ":" in n else n for n in self.names)
        return ", ".join(accepted)


class _HostGuard:
    """ASGI middleware answering requests whose Host the policy refuses, before any routing.

    It sits outside the routes so that nothing, not even a 404 or ``/health``, is answered to a
    rebound page.
    """

    def __init__(self, app: ASGIApp, policy: HostPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
            error = self.policy.check(values)
            if error is not None:
                logger.warning("refused a request for Host %s (%s)", ", ".join(map(repr, values)), error.code)
                if scope["type"] == "websocket":
                    # Closing before accepting answers the handshake with 403.
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _require_json(request: Request) -> None:
    """415 unless a request with a body declares it ``application/json``.

    Parameters (``; charset=utf-8``) are allowed. Refusing the other types matters for security:
    a page can post ``text/plain``, form or multipart bodies to any origin without a CORS
    preflight, but ``application/json`` triggers one, which this server never answers.
    """
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    declared = request.headers.get("content-type")
    media_type = (declared or "").partition(";")[0].strip().lower()
    if media_type == "application/json":
        return
    got = f"got {declared.strip()[:100]!r}" if declared and declared.strip() else "the request has none"
    raise APIError(415, f"Content-Type must be application/json; {got}", code="unsupported_media_type")


# ---- request validation -----------------------------------------------------------------------------

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object"}


def _typed(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``body[key]`` checked against ``kind``; ``default`` when absent or null.

    ``bool`` is a subclass of ``int`` in Python, so booleans are refused where a number is
    expected (``"max_tokens": true`` is a client bug, not 1).
    """
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise _bad(f"'{key}' must be {' or '.join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)}, "
                   f"got {type(value).__name__}", key, code="invalid_type")
    return value


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite number within ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``)."""
    value = float(_typed(body, key, (int, float), default))
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(f"'{key}' must be in {interval}, got {value!r}", key)
    return value


def _integer(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """An integer within ``[lo, hi]``; whole floats such as ``2.0`` are accepted (JavaScript clients)."""
    value = _typed(body, key, (int, float), default)
    if isinstance(value, float):
        if not value.is_integer():
            raise _bad(f"'{key}' must be an integer, got {value!r}", key, code="invalid_type")
        value = int(value)
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    """``stop`` as a tuple: a string or a list of up to four non-empty strings."""
    value = _typed(body, "stop", (str, list), ())
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    for s in stops:
        if not isinstance(s, str) or not s:
            # An empty stop string would end every generation before it starts.
            raise _bad("'stop' entries must be non-empty strings", "stop", code="invalid_type")
    return tuple(stops)


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """400 for parameters whose effect the response would silently lack."""
    if body.get("tools") or body.get("functions"):
        raise _bad("tool and function calling are not supported by this server", "tools", "unsupported_parameter")
    if chat and body.get("logprobs"):
        raise _bad("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    if not chat and body.get("logprobs") is not None:
        raise _bad("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    if not chat and body.get("echo"):
        raise _bad("echo is not supported by this server", "echo", "unsupported_parameter")
    if not chat and body.get("suffix"):
        raise _bad("suffix (insertion) is not supported by this server", "suffix", "unsupported_parameter")
    if not chat and body.get("best_of") not in (None, 1):
        raise _bad("best_of is not supported by this server", "best_of", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type", "text") == "text"):
        raise _bad("only the text response format is supported", "response_format", "unsupported_parameter")


@dataclass(frozen=True)
class _Request:
    """A validated completion request, chat or plain."""

    chat: bool
    messages: list[dict[str, str]] | None  # chat requests
    prompt: str | None  # completion requests
    params: GenerationParams
    max_tokens_param: str | None  # the field that set max_new_tokens; None: the server's default
    n: int
    stream: bool
    include_usage: bool


def _content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"{where}[{i}] must be a text part; this model reads text only", f"{where}[{i}]",
                           code="invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where} must be a string or a list of text parts", where, code="invalid_type")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """``messages`` reduced to ``{"role", "content"}`` dicts that ``chat_prompt`` accepts."""
    if "messages" not in body or body["messages"] is None:
        raise _bad("'messages' is required", "messages", code="missing_required_parameter")
    raw = _typed(body, "messages", list)
    if not raw:
        raise _bad("'messages' must contain at least one message", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object", where, code="invalid_type")
        role = m.get("role")
        if role not in _ROLE_ALIASES:
            raise _bad(f"{where}.role must be one of system, developer, user, assistant; got {role!r}",
                       f"{where}.role")
        out.append({"role": _ROLE_ALIASES[role], "content": _content_text(m.get("content"), f"{where}.content")})
    return out


def _prompt(body: dict[str, Any]) -> str:
    """``prompt``: a string, or a list holding exactly one string."""
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("'prompt' is required", "prompt", code="missing_required_parameter")
    value = _typed(body, "prompt", (str, list))
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise _bad("'prompt' must be a string or a list of exactly one string (batches and token ids "
                       "are not supported)", "prompt")
        value = value[0]
    return value


def _parse(body: Any, chat: bool, model_name: str, max_tokens_limit: int) -> _Request:
    """Validate a request body; raises :class:`APIError` (400/404) on the first problem found."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, code="invalid_type")
    # Fields are checked in the order a user would fix them: what to run, then with what input.
    model = _typed(body, "model", str)
    if model is None:
        raise _bad("'model' is required", "model", code="missing_required_parameter")
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    messages = _messages(body) if chat else None
    prompt = None if chat else _prompt(body)
    _refuse_unsupported(body, chat)

    default_max = min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, default_max, 1, max_tokens_limit)
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    include_usage = _typed(options, "include_usage", bool, False)
    if stream and n > 1:
        raise _bad("streaming supports n=1 only", "n")
    params = GenerationParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=_stop(body))
    given = key if body.get(key) is not None else None
    return _Request(chat, messages, prompt, params, given, n, stream, include_usage)


# ---- admission and concurrency ----------------------------------------------------------------------


class _Ticket:
    """One admitted request's place in the queue; released exactly once."""

    def __init__(self, gate: _Gate):
        self._gate = gate
        self._held = True

    def release(self) -> None:
        """Give the place back (idempotent, so every exit path may call it)."""
        if self._held:
            self._held = False
            self._gate.admitted -= 1


class _Gate:
    """Admission control: a bounded queue in front of a concurrency limit.

    Both counters live on the event loop thread only, so check-and-increment needs no lock (no
    ``await`` sits between them).
    """

    def __init__(self, max_queue: int, max_concurrency: int):
        self.max_queue = max_queue
        self.max_concurrency = max_concurrency
        self.admitted = 0  # running + waiting
        self.running = 0
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        # An asyncio semaphore belongs to one event loop; an app served again later (a new
        # uvicorn run, a test) gets a fresh one instead of "bound to a different event loop".
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self._slots, self._loop = asyncio.Semaphore(self.max_concurrency), loop
        return self._slots

    def admit(self) -> _Ticket:
        """A ticket, or 429 when the queue is full."""
        if self.admitted >= self.max_queue:
            raise APIError(429, f"The server is busy ({self.admitted} requests admitted, limit {self.max_queue}); "
                           "retry shortly", type="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": "1"})
        self.admitted += 1
        return _Ticket(self)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Callable[[int], None]]:
        """Hold one of the ``max_concurrency`` generation slots.

        Yields a callable that sets how many requests the slot's generation serves (1 until
        told otherwise; a batch serves several), so ``running`` counts requests, not calls.
        """
        async with self._semaphore():
            held = 1
            self.running += held

            def serving(requests: int) -> None:
                nonlocal held
                self.running += requests - held
                held = requests

            try:
                yield serving
            finally:
                self.running -= held


# ---- running the backend ----------------------------------------------------------------------------


@dataclass
class _Prepared:
    """The rendered prompt, what it costs, and the decoding settings that fit it."""

    text: str
    add_special_tokens: bool
    prompt_tokens: int
    params: GenerationParams  # the request's, with a defaulted max_tokens cut to the context left


def _prepare(backend: Any, req: _Request, max_prompt_tokens: int, context_length: int | None,
             template: Any = None) -> _Prepared:
    """Render and measure the prompt (in a worker thread: templates and tokenizers cost CPU).

    Raises:
        APIError: 400 ``context_length_exceeded`` when the prompt is over ``max_prompt_tokens``,
            or the prompt plus an explicit ``max_tokens`` is over ``context_length``.
    """
    if req.chat:
        try:
            text, add_special = reply_prompt(req.messages or [], template, getattr(backend, "tokenizer", None))
        except Exception as exc:
            # Chat templates reject conversations they cannot render (e.g. roles that do not
            # alternate); that is the request's fault, so it is a 400 with the template's reason.
            raise _bad(f"the messages cannot be rendered with this model's {_format_name(template)}: {exc}",
                       "messages") from exc
    else:
        text, add_special = req.prompt or "", True
    params = req.params
    if req.chat and getattr(template, "kind", None) == "conversation":
        # the run was trained to end each reply with its template's end marker (if any): cut there
        params = replace(params, stop=(*params.stop, *reply_stops(template, add_special)))
    prompt_tokens = backend.count_tokens(text, add_special_tokens=add_special)
    # OpenAI names the input field as the param of context_length_exceeded, even when max_tokens
    # is what tipped it over; clients key on the code.
    where = "messages" if req.chat else "prompt"
    if prompt_tokens > max_prompt_tokens:
        why = " (the model's context length)" if max_prompt_tokens == context_length else ""
        raise _bad(f"the prompt is {prompt_tokens} tokens; this server accepts at most {max_prompt_tokens}{why}",
                   where, code="context_length_exceeded")
    if context_length is not None and prompt_tokens + params.max_new_tokens > context_length:
        room = context_length - prompt_tokens
        if room < 1:
            raise _bad(f"the prompt is {prompt_tokens} tokens, which fills this model's context length of "
                       f"{context_length} and leaves no room for a reply", where, code="context_length_exceeded")
        if req.max_tokens_param is not None:
            raise _bad(f"this model's context length is {context_length} tokens, but the prompt is {prompt_tokens} "
                       f"tokens and {req.max_tokens_param} asks for {params.max_new_tokens} more "
                       f"({prompt_tokens + params.max_new_tokens} in all); shorten the prompt or lower "
                       f"{req.max_tokens_param} to at most {room}", where, code="context_length_exceeded")
        # No max_tokens given: like OpenAI, generate up to what the context leaves instead of failing
        # on a default the client never chose.
        params = replace(params, max_new_tokens=room)
    return _Prepared(text, add_special, prompt_tokens, params)


def _format_name(template: Any) -> str:
    """How chat messages become a prompt for this server, in words (for error messages)."""
    if getattr(template, "kind", None) == "conversation":
        return f"conversation format '{template.name}' (the one it was trained with)"
    return "chat template"


def _refuse_chat_for_raw_text(template: Any) -> None:
    """400 for a chat request to a pt run: raw-text training has no turns to render messages with."""
    if getattr(template, "kind", None) == "text":
        raise APIError(400, "this model was trained on raw text (stage pt) and has no chat format to render messages "
                            "with; POST the text to continue to /v1/completions", param="messages",
                       code="chat_not_supported")


def _batchable(prep: _Prepared, req: _Request) -> bool:
    """Whether one generated row answers the request.

    Greedy choices are identical, so n of them are one row; n sampled choices are n different
    rows, generated one by one (see below).
    """
    return req.n == 1 or prep.params.temperature == 0


def _generate_rows(backend: Any, prompts: list[str], key: tuple[GenerationParams, bool]) -> list[tuple[str, int]]:
    """``(text, completion_tokens)`` per prompt, all in one backend call (runs in a worker thread)."""
    params, add_special_tokens = key
    texts = backend.generate(prompts, params, add_special_tokens=add_special_tokens)
    return [(t, _completion_tokens(backend, t, params.max_new_tokens)) for t in texts]


def _generate_each(backend: Any, prep: _Prepared, req: _Request) -> list[tuple[str, int]]:
    """``n`` sampled choices for one request (runs in a worker thread).

    Generated one prompt at a time rather than as a batch of n copies: a batch makes the
    transformers backend switch its shared tokenizer's padding on, which races with the token
    counting other requests do concurrently (measured: batched calls then fail with "Unable to
    create tensor").
    """
    key = (prep.params, prep.add_special_tokens)
    return [_generate_rows(backend, [prep.text], key)[0] for _ in range(req.n)]


def _completion_tokens(backend: Any, text: str, max_tokens: int) -> int:
    """Tokens in a generated text, counted by re-tokenising it.

    Re-tokenising can overcount: a piece of a multi-byte character decodes to U+FFFD, which
    encodes back to several tokens. The backend never generates more than ``max_tokens``, so
    the count is capped there.
    """
    return min(backend.count_tokens(text, add_special_tokens=False), max_tokens)


def _backend_failure(exc: BaseException) -> APIError:
    """Log a backend exception server-side; the client gets a generic 500 without internals."""
    logger.error("backend failed to generate", exc_info=exc)
    return APIError(500, "The model backend failed while generating; see the server log.", type="server_error",
                    code="backend_error")


class _ThreadedStream:
    """Iterates ``backend.stream`` in a worker thread and hands pieces to the event loop.

    The thread posts ``("piece", text)``, then ``("end", completion_tokens)`` or
    ``("error", exception)`` to an asyncio queue. :meth:`close` asks the thread to stop at the
    next piece and waits until it has, so the caller's generation slot is not released while the
    backend is still working for a client that has gone.
    """

    def __init__(self, backend: Any, prep: _Prepared, params: GenerationParams):
        self._backend = backend
        self._prep = prep
        self._params = params
        self._cancel = threading.Event()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._done = asyncio.Event()
        self._thread: threading.Thread | None = None
        self.completion_tokens = 0

    def start(self) -> None:
        """Start the producer thread (call on the event loop)."""
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._produce, args=(loop,), name="medtune-stream", daemon=True)
        self._thread.start()

    def _produce(self, loop: asyncio.AbstractEventLoop) -> None:
        def post(item: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to read
                loop.call_soon_threadsafe(self._queue.put_nowait, item)

        try:
            pieces = self._backend.stream(self._prep.text, self._params,
                                          add_special_tokens=self._prep.add_special_tokens)
            produced: list[str] = []
            try:
                for piece in pieces:
                    if self._cancel.is_set():
                        break
                    if piece:
                        produced.append(piece)
                        post(("piece", piece))
            finally:
                # Closing the generator lets the backend clean up now rather than at garbage collection.
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
            if not self._cancel.is_set():
                post(("end", _completion_tokens(self._backend, "".join(produced), self._params.max_new_tokens)))
        except BaseException as exc:  # handed to the event loop, which decides what the client sees
            post(("error", exc))
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._done.set)

    async def next_piece(self) -> str | None:
        """The next piece, or None at the end; re-raises the backend's exception."""
        kind, value = await self._queue.get()
        if kind == "piece":
            return value
        if kind == "end":
            self.completion_tokens = value
            return None
        raise value

    async def close(self) -> None:
        """Stop the producer and wait for its thread to finish, even while being cancelled."""
        if self._thread is None:
            return
        self._cancel.set()
        with anyio.CancelScope(shield=True):
            await self._done.wait()


class _TicketedStreamingResponse(StreamingResponse):
    """A streaming response that gives its request's queue place back when it ends, however it ends.

    When the client disconnects, Starlette cancels the send loop and may leave the body generator
    suspended at a ``yield``; closing the generator here (rather than at garbage collection) runs
    its cleanup, which stops generation and frees the slot straight away.
    """

    def __init__(self, content: AsyncIterator[str], ticket: _Ticket):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._ticket = ticket
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
            finally:
                self._ticket.release()


def _sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event carrying ``payload`` (JSON, or a literal such as ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def _finish_reason(completion_tokens: int, max_tokens: int) -> str:
    """``length`` when the token budget was used up, else ``stop``."""
    return "length" if completion_tokens >= max_tokens else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- the app ----------------------------------------------------------------------------------------


def create_app(
    backend: Any,
    model_name: str,
    tokenizer: Any = None,
    api_key: str | None = None,
    max_queue: int = 8,
    max_concurrency: int = 1,
    max_batch_size: int = 8,
    continuous_batching: bool | None = None,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 2048,
    allowed_hosts: Iterable[str] | None = None,
    template: Any = None,
) -> FastAPI:
    """Build the OpenAI-compatible app around ``backend``.

    Args:
        backend: Any :class:`medtune.inference.base.Backend` (``HFBackend``, ``VLLMBackend``,
            ``FakeBackend``).
        model_name: The id clients must send as ``model`` and that ``/v1/models`` lists.
        tokenizer: The tokenizer whose chat template renders chat requests; defaults to
            ``backend.tokenizer`` when the backend has one, else a plain 用户/助手 transcript.
        api_key: When set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        max_queue: Most requests admitted at once (running plus waiting); more get 429.
        max_concurrency: Most generations running at once (a batch is one generation).
        max_batch_size: Most non-streamed requests generated together in one batched call
            (:mod:`medtune.inference.batching`); 1 generates each on its own.
        continuous_batching: Answer greedy requests with transformers' continuous batching
            (:class:`~medtune.inference.batching.ContinuousBatching`: a request joins the running
            batch at the next step, up to ``max_batch_size`` at once). None: when the backend
            supports it; True: required (ValueError when it cannot); False: never.
        max_prompt_tokens: Longest prompt accepted, in the backend's tokens (400 beyond). None:
            the backend's ``context_length``, or :data:`DEFAULT_PROMPT_TOKENS` when it has none.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for.
        allowed_hosts: Host names accepted besides the defaults, ``"*"`` for any; see
            :class:`HostPolicy`. The defaults follow the address given to :func:`serve` or
            :func:`background_server`; under another ASGI server they are the loopback ones.
        template: The served run's template (``medtune.inference.loading.Loaded.template``): a
            conversation format renders chat requests as the run was trained; raw text (a pt
            run) refuses chat requests; an exam template or None renders them with the chat
            template (or a 用户/助手 transcript).

    Returns:
        The FastAPI application; run it with :func:`serve` (or any ASGI server). Its ``state``
        carries ``max_prompt_tokens`` (the limit in force), ``context_length`` (the backend's,
        or None) and ``host_policy``.

    Raises:
        ValueError: A limit is not a positive integer, ``backend.context_length`` is neither
            None nor a positive integer, an allowed host is not a host name, or continuous
            batching was required for a backend that cannot use it.
    """
    context_length = getattr(backend, "context_length", None)
    if context_length is not None and (isinstance(context_length, bool) or not isinstance(context_length, int)
                                       or context_length < 1):
        raise ValueError(f"backend.context_length must be a positive integer or None, got {context_length!r}")
    if max_prompt_tokens is None:
        max_prompt_tokens = context_length or DEFAULT_PROMPT_TOKENS
        if context_length is None:
            logger.warning("the backend does not report its context length; prompts are limited to %d tokens "
                           "(set --max-prompt-tokens to change this)", DEFAULT_PROMPT_TOKENS)
    for name, value in (("--max-queue", max_queue), ("--max-concurrency", max_concurrency),
                        ("--max-batch-size", max_batch_size),
                        ("--max-prompt-tokens", max_prompt_tokens), ("max_tokens_limit", max_tokens_limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if context_length is not None and max_prompt_tokens > context_length:
        # Allowed (the per-request check still refuses what cannot fit), but likely a mistake.
        logger.warning("max_prompt_tokens=%d is more than the model's context length (%d)", max_prompt_tokens,
                       context_length)
    host_policy = HostPolicy(allowed_hosts)
    if api_key is not None and not api_key:
        raise ValueError("api_key must be non-empty (pass None to serve without one)")
    continuous: ContinuousBatching | None = None
    why_not = ("turned off" if continuous_batching is False else "max_batch_size is 1" if max_batch_size == 1
               else ContinuousBatching.unsupported_reason(backend))
    if why_not is None:
        # KV cache for max_batch_size requests of up to 4,096 tokens each, and room for at least one
        # request as long as the context: sized from the limits rather than from free memory
        per_request = min(context_length or DEFAULT_PROMPT_TOKENS, max_prompt_tokens + max_tokens_limit)
        cache_tokens = max(max_batch_size * min(per_request, 4096), per_request)
        continuous = ContinuousBatching(backend, max_batch_size, cache_tokens)
    elif continuous_batching:
        raise ValueError(f"continuous batching cannot serve this model: {why_not}")
    if tokenizer is not None and getattr(backend, "tokenizer", None) is not tokenizer:
        backend = _WithTokenizer(backend, tokenizer)

    gate = _Gate(max_queue, max_concurrency)
    batcher: RequestBatcher[tuple[str, int]] = RequestBatcher(
        lambda prompts, key: _generate_rows(backend, prompts, key), max_batch_size, gate.slot)
    created = int(time.time())
    expected_key = api_key.encode() if api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if continuous is not None:
                await anyio.to_thread.run_sync(continuous.close)

    # No interactive docs: they would be a second, unauthenticated surface to keep in step.
    app = FastAPI(title="medtune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.medtune = gate
    app.state.model_name = model_name
    app.state.api_key_required = api_key is not None
    app.state.max_prompt_tokens = max_prompt_tokens
    app.state.context_length = context_length
    app.state.host_policy = host_policy
    app.state.batching = ("continuous" if continuous is not None else
                          f"batched (continuous batching: {why_not})" if max_batch_size > 1 else "one at a time")
    # Outermost of the app's own layers, so a refused Host gets no routing, auth or handler at all.
    app.add_middleware(_HostGuard, policy=host_policy)

    # ---- error handlers: every failure leaves in OpenAI's shape ----

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; OpenAI clients expect 400 for a malformed request.
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _bad(f"invalid request: {first.get('msg', 'validation failed')}", param,
                    code="invalid_type").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"Unknown route: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"Method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return APIError(exc.status_code, message, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "Internal server error; see the server log.", type="server_error",
                        code="internal_error").response()

    # ---- authentication ----

    async def check_api_key(request: Request) -> None:
        if expected_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # Constant-time on bytes: compare_digest refuses non-ASCII str, and a header can carry any.
        given = token.strip().encode("utf-8", "surrogateescape")
        if not (hmac.compare_digest(given, expected_key) and scheme.lower() == "bearer"):
            raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # Authentication first: an unauthenticated client learns nothing about what else is wrong.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key), Depends(_require_json)])

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": OWNER}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    async def read_json(request: Request) -> Any:
        """The body as JSON, reading at most MAX_BODY_BYTES of it."""
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the request", code="client_disconnect") from None
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise _bad(f"the request body is not valid JSON: {exc}", None, code="invalid_json") from None

    async def complete(request: Request, chat: bool) -> Any:
        req = _parse(await read_json(request), chat, model_name, max_tokens_limit)
        if chat:
            _refuse_chat_for_raw_text(template)
        ticket = gate.admit()
        try:
            try:
                prep = await anyio.to_thread.run_sync(_prepare, backend, req, max_prompt_tokens, context_length,
                                                      template)
            except APIError:
                raise
            except Exception as exc:  # the tokenizer itself failed
                raise _backend_failure(exc) from None
            if req.stream:
                response = _TicketedStreamingResponse(_stream_events(req, prep), ticket)
                ticket = None  # the response owns the place in the queue from here on
                return response
            try:
                if continuous is not None and continuous.accepts(prep.params):
                    gate.running += 1  # the batch decoding it is transformers', not a slot of ours
                    try:
                        text = await continuous.generate(prep.text, prep.params, prep.add_special_tokens)
                        tokens = await anyio.to_thread.run_sync(_completion_tokens, backend, text,
                                                                prep.params.max_new_tokens)
                    finally:
                        gate.running -= 1
                    choices = [(text, tokens)] * req.n  # greedy: every choice is the same
                elif _batchable(prep, req):
                    # generated with whatever other requests with the same settings are waiting
                    choices = [await batcher.submit(prep.text, (prep.params, prep.add_special_tokens))] * req.n
                else:
                    async with gate.slot():
                        # run_sync waits for the thread even if the request is cancelled, so the
                        # slot is held exactly as long as the backend is busy.
                        choices = await anyio.to_thread.run_sync(_generate_each, backend, prep, req)
            except APIError:
                raise
            except Exception as exc:
                raise _backend_failure(exc) from None
        finally:
            if ticket is not None:
                ticket.release()
        return _response_body(req, prep, choices)

    def _response_body(req: _Request, prep: _Prepared, choices: list[tuple[str, int]]) -> dict[str, Any]:
        completion_tokens = sum(c for _, c in choices)
        body: dict[str, Any] = {
            "id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [],
            "usage": _usage(prep.prompt_tokens, completion_tokens),
        }
        for i, (text, tokens) in enumerate(choices):
            finish = _finish_reason(tokens, prep.params.max_new_tokens)
            if req.chat:
                body["choices"].append({"index": i, "message": {"role": "assistant", "content": text},
                                        "logprobs": None, "finish_reason": finish})
            else:
                body["choices"].append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
        return body

    async def _stream_events(req: _Request, prep: _Prepared) -> AsyncIterator[str]:
        """The SSE body: role chunk, content chunks, finish chunk, optional usage, ``[DONE]``."""
        cid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        stamp = int(time.time())
        obj = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(piece: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if req.chat:
                delta: dict[str, str] = {"role": "assistant"} if role else {}
                if piece is not None:
                    delta["content"] = piece
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return {"id": cid, "object": obj, "created": stamp, "model": model_name, "choices": [choice]}

        if req.chat:
            # Sent before waiting for a slot, so a queued client sees at once that it was accepted.
            yield _sse(chunk(role=True))
        async with gate.slot():
            producer = _ThreadedStream(backend, prep, prep.params)
            producer.start()
            try:
                while (piece := await producer.next_piece()) is not None:
                    yield _sse(chunk(piece))
            except Exception as exc:
                # Headers are long gone: report in-stream, in the shape OpenAI's client raises on.
                yield _sse(_backend_failure(exc).body())
                return
            finally:
                await producer.close()
        finish = _finish_reason(producer.completion_tokens, prep.params.max_new_tokens)
        yield _sse(chunk(finish=finish))
        if req.include_usage:
            yield _sse({"id": cid, "object": obj, "created": stamp, "model": model_name, "choices": [],
                        "usage": _usage(prep.prompt_tokens, producer.completion_tokens)})
        yield _sse("[DONE]")

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @v1.post("/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "running": gate.running,
                "waiting": gate.admitted - gate.running, "max_queue": gate.max_queue}

    return app


class _WithTokenizer:
    """A backend seen with another tokenizer's chat template (``create_app(tokenizer=...)``)."""

    def __init__(self, backend: Any, tokenizer: Any):
        self._backend = backend
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


# ---- running it -------------------------------------------------------------------------------------


def _bind_policy(app: FastAPI, host: str) -> None:
    """Tell the app's Host check (when it has one) which address it is about to be served on."""
    policy = getattr(app.state, "host_policy", None)
    if policy is not None:
        policy.bind(host)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted.

    Args:
        app: An app from :func:`create_app`.
        host: Interface to bind; the loopback default keeps the model private to this machine.
        port: TCP port.
        log_level: uvicorn's log level.
    """
    import uvicorn

    _bind_policy(app, host)
    if not _is_loopback(host) and not getattr(app.state, "api_key_required", False):
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    # A bounded graceful shutdown: open streams would otherwise keep Ctrl+C waiting indefinitely.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      startup_timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` in a daemon thread for the ``with`` block; yields its base URL.

    The socket is bound here, before uvicorn starts, so ``port=0`` picks a free port without the
    race of probing for one and binding it later. Used by the tests and the load benchmark.

    Args:
        app: The ASGI app.
        host: Interface to bind (loopback by default).
        port: Port, 0 for any free one.
        startup_timeout: Seconds to wait for uvicorn to start.

    Yields:
        ``http://host:port``.

    Raises:
        RuntimeError: uvicorn did not start in time.
    """
    import uvicorn

    _bind_policy(app, host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP explicitly: asyncio enables TCP_NODELAY only on sockets that say so,
    # and without it each keep-alive response stalls ~40 ms (Nagle against delayed ACKs).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="medtune-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
