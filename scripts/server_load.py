#!/usr/bin/env python3
"""Bounded loopback load test of `dgemma serve`: N concurrent streaming clients, checked and timed.

    python scripts/server_load.py --model demo --clients 1,2,4,8 --requests 3 --max-tokens 128 [--mode exact,fast]

Starts `dgemma serve` on a free loopback port (or uses --url), then for each client count runs
that many threads, each sending `--requests` streaming chat requests one after another. Every
stream is parsed and checked (valid JSON chunks, one id, one finish_reason, a usage chunk, the
closing [DONE]); the server's resident memory is sampled between levels. Prints a Markdown table
(aggregate completion tokens/s, mean time to first content, memory) and exits non-zero if any
response was malformed or missing. `--mode exact,fast` runs each client count once per mode, in
turn, on the same server (one run, side by side), and prints the server's decoder passes by the
number of requests in them (`/health`'s batch_sizes). Only loopback addresses are accepted; every loop is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse


def sse_request(url: str, payload: dict, timeout: float) -> dict:
    """One streaming request; returns its checked outcome (raises AssertionError if malformed)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"})
    res = conn.getresponse()
    assert res.status == 200, f"HTTP {res.status}: {res.read()[:200]!r}"
    first = None
    ids, finishes, usage, text, done = set(), [], None, [], False
    for raw in res:
        line = raw.decode().strip()
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        ids.add(chunk["id"])
        if chunk.get("usage"):
            assert chunk["choices"] == []
            usage = chunk["usage"]
            continue
        choice = chunk["choices"][0]
        piece = choice["delta"].get("content") or ""
        if piece and first is None:
            first = time.perf_counter() - t0
        text.append(piece)
        if choice["finish_reason"]:
            finishes.append(choice["finish_reason"])
    conn.close()
    assert done and len(ids) == 1 and len(finishes) == 1 and usage is not None, (done, ids, finishes, usage)
    return {"tokens": usage["completion_tokens"], "ttft": first, "text": "".join(text),
            "wall": time.perf_counter() - t0, "finish": finishes[0]}


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return float("nan")


def run_level(url: str, clients: int, requests: int, base: dict, timeout: float) -> dict:
    results, errors = [], []
    lock = threading.Lock()

    def client(k: int):
        for r in range(requests):
            payload = dict(base, seed=1000 * clients + 10 * k + r,
                           messages=[{"role": "user", "content": f"client {k} request {r}: tell me a story"}])
            try:
                out = sse_request(url, payload, timeout)
                with lock:
                    results.append(out)
            except Exception as e:  # recorded and reported: a load test must not stop at the first
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout * requests + 30)
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"clients": clients, "responses": len(results), "expected": clients * requests, "errors": errors,
            "tokens": tokens, "wall": wall, "tps": tokens / wall if wall else 0.0,
            "ttft": statistics.mean(ttfts) if ttfts else float("nan"),
            "latency": statistics.mean(r["wall"] for r in results) if results else float("nan")}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--url", help="an already running server on loopback (default: start one)")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="max_denoising_steps (default: the model's)")
    ap.add_argument("--mode", default=None, help="the requests' path: exact, fast, or both as exact,fast "
                    "(default: the server's)")
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]
    modes = args.mode.split(",") if args.mode else [None]
    if any(m not in ("exact", "fast", None) for m in modes):
        ap.error("--mode takes exact, fast or exact,fast")

    proc = None
    url = args.url
    if url:
        host = urllib.parse.urlparse(url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            ap.error("--url must be a loopback address")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "mlx_diffusiongemma.cli.app", "serve", "--model", args.model,
                                 "--port", str(port), "--log-level", "WARNING",
                                 "--max-concurrency", str(args.max_concurrency), "--max-queue", "64"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(proc.stderr.read() if proc.poll() is not None else "server did not start", file=sys.stderr)
                return 1
            time.sleep(0.3)
    base = {"model": "default_model", "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": args.max_tokens}
    if args.steps:
        base["max_denoising_steps"] = args.steps
    rows, failed, batches = [], False, {}
    try:
        # Warm-up (compilation, first allocations), not measured.
        sse_request(url, dict(base, seed=0, messages=[{"role": "user", "content": "warm up"}]), args.timeout)
        rss0 = rss_mb(proc.pid) if proc else float("nan")
        for n in levels:
            for mode in modes:
                level = run_level(url, n, args.requests, base if mode is None else dict(base, mode=mode), args.timeout)
                level["rss"] = rss_mb(proc.pid) if proc else float("nan")
                level["mode"] = mode or "server default"
                rows.append(level)
                failed |= bool(level["errors"]) or level["responses"] != level["expected"]
                for e in level["errors"][:3]:
                    print(f"error ({n} clients, {level['mode']}): {e}", file=sys.stderr)
        c = http.client.HTTPConnection(urllib.parse.urlparse(url).hostname, urllib.parse.urlparse(url).port, timeout=10)
        c.request("GET", "/health")
        batches = json.loads(c.getresponse().read()).get("batch_sizes", {})
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"model {args.model} · {args.requests} streaming requests per client · max_tokens {args.max_tokens}"
          f" · steps {args.steps or 'default'} · server RSS after warm-up {rss0:.0f} MB · {os.cpu_count()} CPUs")
    print()
    print("| clients | mode | responses ok | completion tokens | wall s | aggregate tok/s | mean first text s | mean latency s | server RSS MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['mode']} | {r['responses']}/{r['expected']} | {r['tokens']} | {r['wall']:.1f} "
              f"| {r['tps']:.1f} | {r['ttft']:.2f} | {r['latency']:.2f} | {r['rss']:.0f} |")
    print()
    print("decoder passes by requests in them (the whole run, warm-up included): "
          + ", ".join(f"{n}: {k}" for n, k in batches.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
