"""Benchmark: the HTTP API under load. The real server on the bundled model, one GPT
and one API key; streaming clients call ``POST /v1/chat/completions`` back to back for
``--duration`` seconds, first one client alone, then ``--clients`` at once. Prints, for
each run: completed requests, errors (target 0), p50/p95 time to first token and
aggregate completion tokens/s. Must not download anything.

    .venv/bin/python bench/api_load.py [--duration 120] [--clients 8] [--max-tokens 128] [--home DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402

from support.server import start_app_server  # noqa: E402

INSTRUCTIONS = ("You are Garden Helper, a friendly assistant for a community garden. Answer in plain words, "
                "start with the direct answer, then give the steps.")
QUESTIONS = [
    "How do I stop slugs eating my lettuce?",
    "When should I sow tomatoes indoors, and how?",
    "What can I grow on a shady balcony?",
    "How do I start a compost heap?",
    "Why are my courgette leaves white and powdery?",
    "Explain crop rotation for four small beds.",
    "How often should I water carrots in summer?",
    "What is green manure and when do I sow it?",
]


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    completed: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(what[:200])


def one_call(client: httpx.Client, gpt_id: str, key: str, question: str, user: str) -> tuple[float, int]:
    """One streamed completion: (seconds to the first content token, completion tokens)."""
    body = {"model": gpt_id, "stream": True, "stream_options": {"include_usage": True}, "user": user,
            "messages": [{"role": "user", "content": question}]}
    started = time.perf_counter()
    first, tokens, done = None, None, False
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error'].get('message')}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.perf_counter() - started
    if not done or first is None or tokens is None:
        raise RuntimeError("stream ended early")
    return first, tokens


def load(url: str, gpt_id: str, key: str, clients: int, duration: float) -> tuple[Run, float]:
    run = Run()
    deadline = time.perf_counter() + duration

    def client_loop(n: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            i = n
            while time.perf_counter() < deadline:
                try:
                    ttft, tokens = one_call(client, gpt_id, key, QUESTIONS[i % len(QUESTIONS)], f"bench-client-{n}")
                except Exception as exc:  # noqa: BLE001 - counted and shown
                    run.error(f"client {n}: {exc}")
                    time.sleep(0.5)
                else:
                    with run.lock:
                        run.ttft.append(ttft)
                        run.tokens += tokens
                        run.completed += 1
                i += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return run, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per run (default 120)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the load run (default 8)")
    parser.add_argument("--max-tokens", type=int, default=128, help="the GPT's answer length (default 128)")
    parser.add_argument("--home", type=Path, help="PERSONAL_GPT_HOME to use (default: a temporary one)")
    args = parser.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="pgpt-api-load-"))
    home.mkdir(parents=True, exist_ok=True)
    cache = os.environ.get("PERSONAL_GPT_MODEL_CACHE") or str(Path.home() / ".personal-gpt" / "models")
    no_auth = home / "no-sign-in.toml"
    no_auth.write_text("# the benchmark runs without sign-in\n", encoding="utf-8")
    env = {"PERSONAL_GPT_HOME": str(home), "PERSONAL_GPT_MODEL_CACHE": cache, "PERSONAL_GPT_SECRETS": str(no_auth),
           "PERSONAL_GPT_DATABASE_URL": ""}
    os.environ.update(env)

    from personal_gpt.auth import Principal
    from personal_gpt.services import Services

    me = Principal.local()
    svc = Services()
    gpt = svc.create_gpt(me, spec={"name": f"Load test {int(time.time())}", "instructions": INSTRUCTIONS,
                                   "generation": {"temperature": 0.0, "max_new_tokens": args.max_tokens}})
    svc.publish(me, gpt.id)
    # the benchmark's own traffic must not meet the visitor limits meant for the public
    svc.save_embed_settings(me, gpt.id, limits={"per_visitor_minute": 1000, "per_visitor_day": 100_000,
                                                "per_gpt_day": 10_000_000})
    _, key = svc.create_api_key(me, gpt.id, name="bench/api_load.py")
    svc.close()

    print(f"home {home}; model cache {cache}; starting the server ...", flush=True)
    server = start_app_server(home, env=env, log_dir=home, timeout=120)
    try:
        print(f"server at {server.url}; warming up (loads the model) ...", flush=True)
        with httpx.Client(base_url=server.url, timeout=300) as client:
            one_call(client, gpt.id, key, QUESTIONS[0], "bench-warm-up")
        print(f"{os.cpu_count()} CPUs; answers up to {args.max_tokens} tokens, greedy; "
              f"{args.duration:.0f} s per run", flush=True)
        results = []
        for clients in (1, args.clients):
            print(f"running {clients} streaming client(s) for {args.duration:.0f} s ...", flush=True)
            run, wall = load(server.url, gpt.id, key, clients, args.duration)
            results.append((clients, run, wall))
    finally:
        server.stop()

    print()
    print(f"{'clients':>7} {'completed':>9} {'errors':>6} {'p50 TTFT s':>10} {'p95 TTFT s':>10} {'tokens/s':>9}")
    for clients, run, wall in results:
        print(f"{clients:7d} {run.completed:9d} {run.errors:6d} {percentile(run.ttft, 50):10.3f} "
              f"{percentile(run.ttft, 95):10.3f} {run.tokens / wall:9.1f}")
    single, many = results[0][1], results[1][1]
    if single.tokens and many.tokens:
        ratio = (many.tokens / results[1][2]) / (single.tokens / results[0][2])
        print(f"aggregate tokens/s with {args.clients} clients: {ratio:.2f}x one client")
    for _, run, _ in results:
        for sample in run.error_samples:
            print(f"error: {sample}")
    print("(TTFT: request sent -> first content token over SSE; tokens/s: completion tokens of finished "
          "requests / run wall time; a request still running at the end is finished and counted)")
    return 1 if any(run.errors for _, run, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
