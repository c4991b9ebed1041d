"""Load test of the OpenAI-compatible server: concurrent clients vs the same requests one at a time.

Builds the tiny model from the shipped CMExam sample in a temporary folder, serves it on
loopback with ``medtune.inference.server``, and sends a fixed set of chat requests (one per
sample question, greedy, ``max_tokens`` 32):

- baseline: every request sent one at a time by a single client;
- load: the same requests shared among N client threads (httpx), all at once.

For each it prints throughput (requests/s and completion tokens/s), p50/p95 latency and the
count of responses by HTTP status, then the ratio of the two throughputs. Both phases stop
after the fixed number of requests or at ``--timeout`` seconds, whichever comes first.

    .venv/bin/python benchmarks/serve_load.py [--clients 4] [--requests 40] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = "tiny"


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # successful requests only
    completion_tokens: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    not_sent: int = 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every value reported was observed)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def run_phase(name: str, url: str, bodies: list[dict], clients: int, deadline_s: float,
              request_timeout: float) -> Phase:
    """Send every body once, from ``clients`` threads pulling off a shared list."""
    phase = Phase(name)
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    deadline = time.monotonic() + deadline_s

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=request_timeout, trust_env=False) as client:
            while True:
                with lock:
                    i = next(next_index, None)
                    if i is None:
                        return
                    if time.monotonic() > deadline:
                        phase.not_sent += 1
                        continue
                t0 = time.perf_counter()
                try:
                    r = client.post("/v1/chat/completions", json=bodies[i])
                    status: int | str = r.status_code
                except httpx.HTTPError as exc:  # timeouts, resets: counted, not fatal
                    r, status = None, type(exc).__name__
                elapsed = time.perf_counter() - t0
                with lock:
                    phase.statuses[status] += 1
                    if r is not None and r.status_code == 200:
                        phase.latencies.append(elapsed)
                        phase.completion_tokens += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=worker, name=f"client-{k}", daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        # Workers stop taking requests at the deadline; allow one request's timeout on top.
        t.join(timeout=max(0.0, deadline - time.monotonic()) + request_timeout + 5)
    phase.wall_s = time.perf_counter() - t0
    return phase


def report(phase: Phase, clients: int) -> float:
    """Print one phase; returns its requests/s."""
    ok = len(phase.latencies)
    rps = ok / phase.wall_s if phase.wall_s else 0.0
    tps = phase.completion_tokens / phase.wall_s if phase.wall_s else 0.0
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(phase.statuses.items(), key=str)) or "none"
    errors = sum(v for k, v in phase.statuses.items() if k != 200)
    print(f"{phase.name} ({clients} client{'s' if clients > 1 else ''})")
    print(f"  requests ok       {ok} in {phase.wall_s:.2f} s  (errors {errors}, not sent {phase.not_sent})")
    print(f"  throughput        {rps:.2f} req/s, {tps:.1f} completion tokens/s")
    print(f"  latency           p50 {percentile(phase.latencies, 50) * 1000:.0f} ms, "
          f"p95 {percentile(phase.latencies, 95) * 1000:.0f} ms")
    print(f"  responses         {statuses}")
    return rps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads in the load phase")
    ap.add_argument("--requests", type=int, default=40, help="requests per phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=None,
                    help="server generation slots (default: --clients)")
    ap.add_argument("--max-queue", type=int, default=None, help="server queue bound (default: 2 x --clients)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per phase")
    args = ap.parse_args()
    if args.clients < 1 or args.requests < 1:
        ap.error("--clients and --requests must be positive")

    import torch

    from medtune.data.cmexam import read_cmexam
    from medtune.inference.hf import HFBackend
    from medtune.inference.server import background_server, create_app
    from medtune.models import build_tiny_model, load_for_inference, tokenizer_corpus
    from medtune.quickstart import sample_path

    work = Path(tempfile.mkdtemp(prefix="medtune-serve-bench-"))
    try:
        records = read_cmexam(sample_path(), on_invalid="skip").records
        model_dir = build_tiny_model(work / "tiny", tokenizer_corpus(records))
        model, tokenizer = load_for_inference(str(model_dir))
        backend = HFBackend(model, tokenizer)

        def question(r) -> str:
            options = "\n".join(f"{k} {v}" for k, v in r.options.items())
            return f"{r.question}\n{options}"

        bodies = [
            {"model": MODEL, "messages": [{"role": "user", "content": question(r)}],
             "max_tokens": args.max_tokens, "temperature": 0}
            for r in (records[i % len(records)] for i in range(args.requests))
        ]
        slots = args.max_concurrency or args.clients
        queue = args.max_queue or 2 * args.clients
        app = create_app(backend, MODEL, max_concurrency=slots, max_queue=queue)
        # The load average matters on a shared machine: other processes skew both phases.
        load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        print(f"tiny model on {backend.device}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs, load average {load}; server "
              f"max_concurrency {slots}, max_queue {queue}; {args.requests} chat requests, "
              f"max_tokens {args.max_tokens}, greedy\n")
        with background_server(app) as url:
            # Warm-up (first-call allocations, lazy imports) outside both measurements.
            run_phase("warm-up", url, bodies[:2], 1, args.timeout, 120)
            base = run_phase("baseline: one at a time", url, bodies, 1, args.timeout, 120)
            load = run_phase("load: concurrent clients", url, bodies, args.clients, args.timeout, 120)
        base_rps = report(base, 1)
        print()
        load_rps = report(load, args.clients)
        print()
        ratio = load_rps / base_rps if base_rps else float("nan")
        print(f"throughput ratio (load / baseline): {ratio:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
