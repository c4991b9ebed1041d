"""Serving concurrent clients: ``medtune serve`` beside ``transformers serve --continuous-batching``.

Builds one model in a temporary folder (default: a random-init Qwen2, hidden 256, 4 layers, with
the real Qwen2.5 vocabulary of 151,680 rows, where the LM head is most of a decoding step), then
starts each server on it in turn, as its own process with ``OMP_NUM_THREADS`` threads, and sends
the same chat requests (one per CMExam sample question, greedy, ``max_tokens`` 32):

- ``medtune serve --max-batch-size 1``: one request at a time (the reference answers);
- ``medtune serve``: the defaults (continuous batching for greedy requests);
- ``transformers serve --continuous-batching``: transformers' own server, the baseline.

For each: requests/s and p50/p95 latency with 1 client and with ``--clients`` client threads,
and the server's peak RSS. Then the throughput ratio against transformers at ``--clients``, and
how many answers are identical to the one-at-a-time reference (the same request, answered alone).
Servers run one after the other, so they never share the CPU.

    .venv/bin/python benchmarks/serve_load.py [--clients 8] [--requests 32] [--max-tokens 32]
        [--threads 1] [--vocab qwen2.5|ours] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # successful requests only
    completion_tokens: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    not_sent: int = 0
    texts: dict[int, str] = field(default_factory=dict)  # request index -> answer

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every value reported was observed)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def run_phase(name: str, url: str, bodies: list[dict], clients: int, deadline_s: float,
              request_timeout: float, headers: dict[str, str] | None = None) -> Phase:
    """Send every body once, from ``clients`` threads pulling off a shared list."""
    phase = Phase(name)
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    deadline = time.monotonic() + deadline_s

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=request_timeout, trust_env=False, headers=headers) as client:
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
                        body = r.json()
                        phase.latencies.append(elapsed)
                        phase.completion_tokens += body["usage"]["completion_tokens"]
                        phase.texts[i] = body["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=worker, name=f"client-{k}", daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        # Workers stop taking requests at the deadline; allow one request's timeout on top.
        t.join(timeout=max(0.0, deadline - time.monotonic()) + request_timeout + 5)
    phase.wall_s = time.perf_counter() - t0
    return phase


def describe(phase: Phase, clients: int) -> str:
    errors = sum(v for k, v in phase.statuses.items() if k != 200)
    return (f"{clients} client{'s' if clients > 1 else ' '}: {phase.rps:5.2f} req/s, "
            f"{phase.completion_tokens / phase.wall_s if phase.wall_s else 0:6.1f} completion tok/s, "
            f"p50 {percentile(phase.latencies, 50) * 1000:5.0f} ms, p95 {percentile(phase.latencies, 95) * 1000:5.0f} ms"
            f"  ({len(phase.latencies)} ok, {errors} errors, {phase.not_sent} not sent)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gib(pid: int) -> float:
    """The process's peak resident set (Linux ``VmHWM``), in GiB; NaN where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


@dataclass
class Server:
    label: str
    command: list[str]
    model: str  # what requests send as "model"
    phases: dict[int, Phase] = field(default_factory=dict)
    rss_gib: float = float("nan")
    startup_s: float = float("nan")


def measure(server: Server, bodies: list[dict], port: int, clients: int, threads: int, timeout: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    log = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(server.command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"{server.label} exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 300:
                raise SystemExit(f"{server.label} did not start in 300 s")
            time.sleep(0.3)
        server.startup_s = time.perf_counter() - t0
        mine = [{**b, "model": server.model} for b in bodies]
        # Warm-up outside the measurements: first-call allocations, a concurrent batch (caches).
        run_phase("warm-up", url, mine[:2], 1, timeout, timeout)
        run_phase("warm-up", url, mine[: clients], clients, timeout, timeout)
        server.phases[1] = run_phase("1 client", url, mine, 1, timeout, timeout)
        server.phases[clients] = run_phase(f"{clients} clients", url, mine, clients, timeout, timeout)
        server.rss_gib = peak_rss_gib(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads in the load phase")
    ap.add_argument("--requests", type=int, default=32, help="requests per phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    ap.add_argument("--vocab", choices=["qwen2.5", "ours"], default="qwen2.5")
    ap.add_argument("--skip-transformers", action="store_true", help="measure medtune only")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per phase")
    args = ap.parse_args()
    if args.clients < 1 or args.requests < 1:
        ap.error("--clients and --requests must be positive")

    sys.path.insert(0, str(ROOT / "src"))
    from medtune.data.cmexam import read_cmexam
    from medtune.models import build_tiny_model, tokenizer_corpus
    from medtune.quickstart import sample_path

    work = Path(tempfile.mkdtemp(prefix="medtune-serve-bench-"))
    try:
        records = read_cmexam(sample_path(), on_invalid="skip").records
        if args.vocab == "ours":
            model_dir = build_tiny_model(work / "tiny", tokenizer_corpus(records))
        else:
            model_dir = build_tiny_model(work / "qwen2", tokenizer_corpus(records), arch="qwen2", tokenizer="qwen2.5",
                                         hidden_size=256, num_layers=4, num_heads=4)

        def question(r) -> str:
            options = "\n".join(f"{k} {v}" for k, v in r.options.items())
            return f"{r.question}\n{options}"

        bodies = [{"messages": [{"role": "user", "content": question(records[i % len(records)])}],
                   "max_tokens": args.max_tokens, "temperature": 0} for i in range(args.requests)]
        medtune = [sys.executable, "-m", "medtune.cli", "serve", "--model", str(model_dir), "--model-name", "m",
                   "--max-queue", str(2 * args.clients)]
        servers = []
        for label, extra in (("medtune serve --max-batch-size 1 (one at a time)", ["--max-batch-size", "1"]),
                             ("medtune serve (defaults)", [])):
            port = free_port()
            servers.append((Server(label, [*medtune, *extra, "--port", str(port)], "m"), port))
        if not args.skip_transformers:
            port = free_port()
            cli = str(Path(sys.executable).with_name("transformers"))
            servers.append((Server("transformers serve --continuous-batching",
                                   [cli, "serve", str(model_dir), "--continuous-batching", "--device", "cpu",
                                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                   str(model_dir)), port))

        load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        print(f"{args.vocab} vocabulary model; {args.requests} chat requests (CMExam sample questions), "
              f"max_tokens {args.max_tokens}, greedy; OMP_NUM_THREADS={args.threads}; {os.cpu_count()} CPUs, "
              f"load average {load}\n")
        for server, port in servers:
            measure(server, bodies, port, args.clients, args.threads, args.timeout)
            print(f"{server.label}  (started in {server.startup_s:.1f} s, peak RSS {server.rss_gib:.2f} GiB)")
            for clients, phase in server.phases.items():
                print(f"  {describe(phase, clients)}")
            print()

        reference = servers[0][0].phases[1].texts
        for server, _ in servers:
            for clients, phase in server.phases.items():
                same = sum(phase.texts.get(i) == text for i, text in reference.items())
                print(f"identical to one-at-a-time answers: {server.label}, {clients} client(s): "
                      f"{same}/{len(reference)}")
        if not args.skip_transformers:
            baseline = servers[-1][0].phases[args.clients].rps
            print()
            for server, _ in servers[:-1]:
                ratio = server.phases[args.clients].rps / baseline if baseline else float("nan")
                print(f"{server.label} at {args.clients} clients: {ratio:.2f}x transformers serve --continuous-batching")
        load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        print(f"\nload average at the end: {load}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
