"""Interleaved timing for scripts/bench_e2e.py (`--interleave`): the engines' workers live at the
same time and take turns, one timed image each per round, the order rotating every round.

Why: engines run one after another drift apart on a shared VM. Two sequential runs of the same
engines on one day differed by 12 %, more than the few per cent some of issue #16's comparisons turn
on. Taking turns puts any slow drift on every engine alike. Each worker still loads and makes its
first image alone (started one after another), so time to first image stays its own; memory is the
sum of every engine's, since all stay loaded.

The protocol (bench_peers.timed_runs with interleaved=True): after its first image a worker prints
READY and waits for "go" on stdin; after each timed image it prints DONE and waits again; the last
"go" lets it finish (quality images, the JSON line) while the others wait.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any


class Worker:
    """One engine's worker process; its stdout is read by a thread, so a token is never missed."""

    def __init__(self, cmd: list[str], timeout: float):
        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # end of output

    def _failure(self, timed_out: bool) -> str:
        self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        last = self.stderr.read().strip().splitlines()
        self.stderr.close()
        if timed_out:
            return f"no result within --timeout {self.timeout:g} s: killed"
        return last[-1] if last else f"exited with {self.proc.returncode}"

    def expect(self, token: str) -> str | None:
        """Read up to the line `token`; None, or the error if the worker died or timed out first."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return self._failure(timed_out=True)
            if line is None:
                return self._failure(timed_out=False)
            if line == token:
                return None

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def turn(self) -> str | None:
        """One timed image; None, or the error."""
        self.go()
        return self.expect("DONE")

    def finish(self) -> dict[str, Any]:
        """Let the worker finish; its result (the last line it prints), or {"error": ...}."""
        self.go()
        deadline = time.monotonic() + self.timeout
        last = ""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return {"error": self._failure(timed_out=True)}
            if line is None:
                break
            last = line or last
        if self.proc.wait() != 0:
            return {"error": self._failure(timed_out=False)}
        self.stderr.close()
        return dict(json.loads(last))


def run_interleaved(
    commands: dict[str, list[str]], repeats: int, timeout: float
) -> dict[str, dict[str, Any]]:
    """Each engine's result (or {"error": ...}), timed in turns; `commands` in the report's order."""
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, Worker] = {}
    for engine, cmd in commands.items():  # one at a time: loads and first images uncontended
        print(f"starting {engine} ...", file=sys.stderr, flush=True)
        worker = Worker(cmd, timeout)
        error = worker.expect("READY")
        if error is None:
            live[engine] = worker
        else:
            results[engine] = {"error": error}
    for round_ in range(repeats):
        names = list(live)
        shift = round_ % len(names) if names else 0
        for engine in names[shift:] + names[:shift]:
            error = live[engine].turn()
            if error is not None:
                results[engine] = {"error": error}
                del live[engine]
    for engine, worker in live.items():
        print(f"finishing {engine} ...", file=sys.stderr, flush=True)
        results[engine] = worker.finish()
    return {engine: results[engine] for engine in commands}
