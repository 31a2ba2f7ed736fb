"""Load-test `python -m runtime.serve` on loopback: throughput, overload and soak, all bounded.

Starts its own server (127.0.0.1, a free port) unless --url names one already running on
loopback, then runs the chosen scenarios and prints one table each:

  throughput  --concurrency clients send --requests requests in total: req/s, img/s, p50/p95/p99
  overload    --burst clients fire at once at a small queue: some 429 (with Retry-After), none
              5xx, and afterwards /healthz, /readyz and a normal request still succeed
  soak        --concurrency clients for --soak-seconds (at most --soak-requests): server RSS
              sampled every second, first / last / max and the drift over the second half

    .venv/bin/python scripts/load_test.py --bundle bundles/tiny --scenario all

Every loop is bounded by a count and by --max-seconds overall; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # successful requests, seconds
    statuses: Counter[str] = field(default_factory=Counter)
    images: int = 0
    retry_after_missing: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: str, seconds: float, images: int = 0) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status == "200":
                self.latencies.append(seconds)
                self.images += images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(bundle: Path, extra: list[str], port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "runtime.serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *extra]  # fmt: skip
    print(f"server: {shlex.join(cmd)}")
    return subprocess.Popen(cmd, cwd=ROOT)


def wait_ready(client: httpx.Client, seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready within {seconds:.0f} s")


def rss_mb(client: httpx.Client, pid: int | None) -> float:
    """Server RSS: from /proc when we started it, else from its process_resident_memory_bytes."""
    if pid is not None:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes"):
            return float(line.split()[-1]) / 2**20
    return float("nan")


def one_request(client: httpx.Client, body: dict[str, object], tally: Tally) -> int:
    start = time.perf_counter()
    try:
        response = client.post("/v1/generate", json=body)
        status = str(response.status_code)
        images = len(response.json().get("images", [])) if response.status_code == 200 else 0
        if response.status_code == 429 and "retry-after" not in response.headers:
            tally.retry_after_missing += 1
    except httpx.HTTPError as exc:
        status, images = type(exc).__name__, 0
    tally.add(status, time.perf_counter() - start, images)
    return 0


def run_clients(
    url: str, headers: dict[str, str], clients: int, total: int, body: dict[str, object], until: float
) -> tuple[Tally, float]:
    """`clients` threads share `total` requests (stopping at `until`); returns the tally and wall time."""
    tally, counter, lock = Tally(), iter(range(total)), threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            while time.monotonic() < until:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                one_request(client, {**body, "prompt": f"{body['prompt']} #{n}", "seed": n}, tally)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return tally, time.perf_counter() - start


def report(name: str, tally: Tally, wall: float) -> None:
    lat = np.array(tally.latencies) * 1000
    ok = tally.statuses.get("200", 0)
    errors = {k: v for k, v in sorted(tally.statuses.items()) if k != "200"}
    print(f"\n== {name}")
    print(f"{'requests':<32}{sum(tally.statuses.values())}")
    print(f"{'ok (200)':<32}{ok}")
    print(f"{'errors':<32}{errors or 0}")
    print(f"{'wall s':<32}{wall:.1f}")
    print(f"{'throughput req/s':<32}{ok / wall:.2f}")
    print(f"{'throughput img/s':<32}{tally.images / wall:.2f}")
    if len(lat):
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        print(f"{'latency ms p50/p95/p99':<32}{p50:.0f} / {p95:.0f} / {p99:.0f}")


def throughput(args: argparse.Namespace, url: str, headers: dict[str, str], body: dict[str, object]) -> bool:
    until = time.monotonic() + args.max_seconds
    tally, wall = run_clients(url, headers, args.concurrency, args.requests, body, until)
    report(f"throughput: {args.concurrency} clients x {args.requests} requests", tally, wall)
    return set(tally.statuses) == {"200"}


def overload(args: argparse.Namespace, url: str, headers: dict[str, str], body: dict[str, object]) -> bool:
    until = time.monotonic() + args.max_seconds
    tally, wall = run_clients(url, headers, args.burst, args.burst, body, until)
    report(f"overload: burst of {args.burst} at once", tally, wall)
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        health = client.get("/healthz").status_code
        ready = client.get("/readyz").status_code
        after = client.post("/v1/generate", json=body).status_code
    server_errors = sum(v for k, v in tally.statuses.items() if not k.isdigit() or k.startswith("5"))
    print(f"{'429 with Retry-After':<32}{tally.statuses.get('429', 0) - tally.retry_after_missing}")
    print(f"{'5xx / transport':<32}{server_errors}")
    print(f"{'after: healthz/readyz/generate':<32} {health} / {ready} / {after}")
    return tally.statuses.get("429", 0) > 0 and server_errors == 0 and (health, ready, after) == (200,) * 3


def soak(
    args: argparse.Namespace, url: str, headers: dict[str, str], body: dict[str, object], pid: int | None
) -> bool:
    until = time.monotonic() + min(args.soak_seconds, args.max_seconds)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            start = time.monotonic()
            while not stop.is_set() and time.monotonic() < until + 5:
                samples.append((time.monotonic() - start, rss_mb(client, pid)))
                stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tally, wall = run_clients(url, headers, args.concurrency, args.soak_requests, body, until)
    stop.set()
    sampler.join(15)
    report(f"soak: {args.concurrency} clients for {wall:.0f} s", tally, wall)
    t, rss = np.array(samples).T
    half = t >= t[-1] / 2
    slope = np.polyfit(t[half], rss[half], 1)[0] * 60 if half.sum() >= 2 else float("nan")
    print(f"{'RSS MB first/last/max':<32}{rss[0]:.0f} / {rss[-1]:.0f} / {rss.max():.0f}")
    print(f"{'RSS drift, 2nd half':<32}{slope:+.1f} MB/min over {half.sum()} samples")
    return set(tally.statuses) == {"200"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "bundles/tiny")
    p.add_argument("--url", default=None, help="an already running server on loopback (default: start one)")
    p.add_argument("--server-args", default="--max-queue 8", help="extra `runtime.serve` flags")
    p.add_argument("--token", default=os.environ.get("SDRT_TOKEN"))
    p.add_argument("--scenario", choices=["throughput", "overload", "soak", "all"], default="all")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--soak-seconds", type=float, default=60)
    p.add_argument("--soak-requests", type=int, default=2000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the bundle's)")
    p.add_argument("--max-seconds", type=float, default=300, help="cap per scenario")
    args = p.parse_args()

    server, pid = None, None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--url must be a loopback address")
        url = args.url
    else:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args.bundle, shlex.split(args.server_args), port)
        pid = server.pid
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    body: dict[str, object] = {"prompt": "load test", "steps": args.steps}
    if args.size:
        body["size"] = args.size
    ok = True
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            wait_ready(client, 120)
            print(f"cpu cores: {os.cpu_count()}, steps {args.steps}, server RSS {rss_mb(client, pid):.0f} MB")
        scenarios = ["throughput", "overload", "soak"] if args.scenario == "all" else [args.scenario]
        for name in scenarios:
            if name == "throughput":
                ok &= throughput(args, url, headers, body)
            elif name == "overload":
                ok &= overload(args, url, headers, body)
            else:
                ok &= soak(args, url, headers, body, pid)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
            # uvicorn drains, shuts the app down, then re-raises SIGTERM: -15 is a clean exit here
            print(f"\nserver exit code after SIGTERM: {server.returncode}")
    print("\nresult:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
