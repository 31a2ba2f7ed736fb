"""One loaded pipeline shared by worker threads behind a bounded queue: the embeddable server core.

Callers `submit` options and get a `Job` (a Future plus a cancel flag). Workers call
`Pipeline.generate` concurrently: ONNX Runtime sessions are thread-safe, so nothing serialises
whole requests, and by default ORT's intra-op threads are split between the workers
(cores // workers) so concurrent requests do not oversubscribe the CPU. Admission is bounded
(`QueueFull` carries a retry hint), every job may carry a deadline that the pipeline's cancel
hook enforces between denoising steps, and `close()` finishes what was admitted before it
releases the sessions. Same-shape requests are merged into one call when `max_batch` > 1
(see `batching.py` for when that is exact).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from runtime.backends.config import THREADED, BackendConfig
from runtime.bundle import Bundle
from runtime.errors import RequestError, SetupError
from runtime.lora import LoraSettings
from runtime.options import MAX_IMAGES, GenerateOptions, ResolvedOptions, validate
from runtime.pipeline import Cancelled, Pipeline, Result
from runtime.serving.batching import batch_key, merge, split
from runtime.serving.checks import SettingError, int_in, number_in

log = logging.getLogger(__name__)

MAX_WORKERS = 64  # concurrent generate() calls per engine
MAX_QUEUE = 100_000
MAX_WAIT_MS = 10_000.0


class QueueFull(RuntimeError):
    """The queue holds `max_queue` jobs already; try again after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"server busy: {depth} requests are queued; retry after {retry_after} s")
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine is shutting down (or failed to start) and accepts no more work."""


class DeadlineExceeded(Cancelled):
    """The job's deadline passed before it finished (queued too long, or generating too long)."""


@dataclass(frozen=True)
class EngineConfig:
    workers: int = 1  # concurrent generate() calls
    max_queue: int = 16  # jobs waiting for a busy worker; more are refused with QueueFull (0: no waiting)
    max_batch: int = 1  # requests merged into one generate() call; 1 = no batching
    max_wait_s: float = 0.005  # how long a worker waits for more same-shape requests to merge
    warmup: bool = True  # run each model once in start(), so the first request does not pay loading

    def validate(self) -> EngineConfig:
        """This config, or RequestError naming the setting (as the CLIs spell it) and its range."""
        int_in("workers", self.workers, 1, MAX_WORKERS)
        int_in("max_queue", self.max_queue, 0, MAX_QUEUE)
        int_in("max_batch", self.max_batch, 1, MAX_IMAGES)
        if isinstance(self.max_wait_s, bool) or not isinstance(self.max_wait_s, (int, float)):
            raise SettingError("max_wait_ms", f"must be a number; got {self.max_wait_s!r:.40}")
        number_in("max_wait_ms", self.max_wait_s * 1000, 0, MAX_WAIT_MS)
        if not isinstance(self.warmup, bool):
            raise SettingError("warmup", f"must be true or false; got {self.warmup!r:.40}")
        return self


class Job:
    """One submitted generation: `future` resolves to its Result, or to Cancelled/DeadlineExceeded."""

    def __init__(self, options: ResolvedOptions, deadline: float | None, key: Hashable | None):
        self.options = options
        self.deadline = deadline  # time.monotonic() value, or None
        self.key = key
        self.future: Future[Result] = Future()
        self.batch_size = 0  # requests in the generate() call that ran it
        self._cancelled = threading.Event()
        self._engine: Engine | None = None

    def cancel(self) -> None:
        """Stop it: dropped if still queued, else stopped after the current denoising step."""
        self._cancelled.set()
        if self._engine is not None:
            self._engine._dequeue(self)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        return self._cancelled.is_set() or self.expired()

    def result(self, timeout: float | None = None) -> Result:
        return self.future.result(timeout)

    def _stopped_error(self) -> Cancelled:
        if self._cancelled.is_set():
            return Cancelled("cancelled by the caller")
        return DeadlineExceeded("deadline exceeded before the generation finished")

    def _fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def one_line(text: str, limit: int = 2000) -> str:
    """A message on one log line: its lines joined by " | ", cut at `limit` characters."""
    joined = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def default_threads(workers: int) -> int | None:
    """Intra-op threads per session: all cores for one worker (ORT's default), else an equal share."""
    return None if workers <= 1 else max(1, (os.cpu_count() or 1) // workers)


class Engine:
    """Thread-safe generation service around one Pipeline. Use as a context manager or call close()."""

    def __init__(self, pipeline: Pipeline, config: EngineConfig | None = None):
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        self.config.validate()
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._active: set[Job] = set()
        self._busy = 0  # workers running a generate() call
        self._workers: list[threading.Thread] = []
        self._started = False
        self._start_done = threading.Event()
        self._ready = False
        self._closing = False
        self._closed = False
        self.error: str | None = None  # why start() failed
        self._avg_job_s = 1.0  # running mean of a generate() call, for Retry-After hints

    @classmethod
    def open(
        cls,
        bundle: Bundle | str | Path,
        backend: BackendConfig | None = None,
        config: EngineConfig | None = None,
        verify: str = "stamp",
        lora: LoraSettings | None = None,
    ) -> Engine:
        """Load the bundle (checked as `verify` says: runtime.bundle.VERIFY_MODES); a CPU backend
        without `threads` gets default_threads(workers); `lora`: the pipeline's LoRA cache."""
        config = config or EngineConfig()
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
        backend = (backend or BackendConfig()).validate()
        if backend.backend in THREADED and backend.threads is None:
            backend = replace(backend, threads=default_threads(config.workers))
        return cls(Pipeline(bundle, backend, lora=lora or LoraSettings()), config)

    @property
    def bundle(self) -> Bundle:
        return self.pipeline.bundle

    @property
    def ready(self) -> bool:
        return self._ready and not self._closing

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Jobs a worker is generating right now."""
        return len(self._active)

    def start(self) -> None:
        """Warm up (each model once, so sessions exist before the first request), then start workers."""
        with self._cond:
            if self._started:
                raise RuntimeError("Engine.start() was already called")
            self._started = True
        try:
            if self.config.warmup:
                self._warm_up()
        except Exception as exc:
            self.error = f"warm-up failed: {exc}"
            if isinstance(exc, SetupError):  # a broken bundle or backend: its message names the file
                log.error("engine %s", one_line(self.error))
            else:
                log.exception("engine warm-up failed")
            self._fail_queued(EngineClosed(self.error))
            self._start_done.set()
            raise
        with self._cond:
            if not self._closing:
                for i in range(self.config.workers):
                    thread = threading.Thread(target=self._work, name=f"sdrt-worker-{i}", daemon=True)
                    thread.start()
                    self._workers.append(thread)
                self._ready = True
        self._start_done.set()
        log.info("engine ready: %d worker(s), max queue %d, max batch %d", self.config.workers,
                 self.config.max_queue, self.config.max_batch)  # fmt: skip

    def _warm_up(self) -> None:
        start = time.perf_counter()
        modes = ["standard"] + (["deproject"] if self.bundle.has_deprojector else [])
        for mode in modes:
            self.pipeline.generate(
                GenerateOptions(prompts=("warm-up",), steps=1, scheduler="ddim", mode=mode)
            )
        log.info("warm-up (%s) took %.2f s", ", ".join(modes), time.perf_counter() - start)

    def submit(self, options: GenerateOptions | ResolvedOptions, timeout: float | None = None) -> Job:
        """Validate (unless already resolved) and queue; raises RequestError, QueueFull or EngineClosed."""
        o = validate(options, self.bundle)
        key = batch_key(o, self.bundle) if self.config.max_batch > 1 else None
        job = Job(o, None if timeout is None else time.monotonic() + timeout, key)
        with self._cond:
            if self._closing or self.error:
                raise EngineClosed(self.error or "the server is shutting down")
            idle = self.config.workers - self._busy  # they take a job at once: it never waits
            if len(self._queue) >= self.config.max_queue + max(0, idle):
                raise QueueFull(len(self._queue), self._retry_after())
            job._engine = self
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def generate(self, options: GenerateOptions | ResolvedOptions, timeout: float | None = None) -> Result:
        """Blocking convenience: submit and wait (the wait is bounded by `timeout` too)."""
        job = self.submit(options, timeout)
        try:
            return job.result(None if timeout is None else timeout + 1.0)
        except FutureTimeout:
            job.cancel()
            raise DeadlineExceeded(f"no result within {timeout} s") from None

    def _retry_after(self) -> int:
        per_slot = self._avg_job_s / (self.config.workers * self.config.max_batch)
        return int(min(60, max(1, math.ceil(per_slot * (len(self._queue) + 1)))))

    def _dequeue(self, job: Job) -> None:
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job._fail(job._stopped_error())

    def _take(self) -> list[Job]:
        """Next job plus any same-shape jobs to merge with it; [] when closing with an empty queue."""
        with self._cond:
            while True:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return []
                first = self._queue.popleft()
                if not first.future.set_running_or_notify_cancel():
                    continue
                if first.should_stop():
                    first._fail(first._stopped_error())
                    continue
                batch = [first]
                if first.key is not None:
                    self._fill(batch)
                self._active.update(batch)
                self._busy += 1
                return batch

    def _fill(self, batch: list[Job]) -> None:
        """Move queued jobs with the first job's key into `batch`, waiting up to max_wait_s for more."""
        first = batch[0]
        limit = min(self.config.max_batch, MAX_IMAGES // first.options.num_images)
        until = time.monotonic() + self.config.max_wait_s
        while len(batch) < limit:
            for job in list(self._queue):
                if len(batch) >= limit:
                    break
                if job.key != first.key or job.should_stop():
                    continue  # a stopped job is failed by whichever worker pops it
                self._queue.remove(job)
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
            remaining = until - time.monotonic()
            if len(batch) >= limit or remaining <= 0 or self._closing:
                return
            self._cond.wait(remaining)

    def _work(self) -> None:
        while batch := self._take():
            start = time.monotonic()
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._active.difference_update(batch)
                    self._busy -= 1
                    self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.monotonic() - start)
                    self._cond.notify_all()

    def _run(self, batch: list[Job]) -> None:
        for job in batch:
            job.batch_size = len(batch)
        try:
            if len(batch) == 1:
                job = batch[0]
                results = [self.pipeline.generate(job.options, cancel=job.should_stop)]
            else:
                options = [job.options for job in batch]
                merged = self.pipeline.generate(
                    merge(options, self.bundle), cancel=lambda: all(j.should_stop() for j in batch)
                )
                results = split(merged, options)
        except Cancelled:
            for job in batch:
                job._fail(job._stopped_error())
        except Exception as exc:
            if isinstance(exc, (SetupError, RequestError)):  # typed: the message says it all
                log.error("generation failed for %d request(s): %s", len(batch), one_line(str(exc)))
            else:
                log.exception("generation failed for %d request(s)", len(batch))
            for job in batch:
                job._fail(exc)
        else:
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)

    def _fail_queued(self, exc: BaseException) -> None:
        with self._cond:
            while self._queue:
                self._queue.popleft()._fail(exc)

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new work, finish queued and running jobs (cancelling what outlasts `timeout`), unload."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._cond.notify_all()
        until = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if until is None else max(0.0, until - time.monotonic())

        if self._started:
            self._start_done.wait(left())
        for thread in self._workers:
            thread.join(left())
        if any(thread.is_alive() for thread in self._workers):
            log.warning("close: jobs outlasted the %s s grace period; cancelling them", timeout)
            with self._cond:
                for job in list(self._queue) + list(self._active):
                    job._cancelled.set()
            for thread in self._workers:
                thread.join(10.0)
        self._fail_queued(EngineClosed("the server shut down before this request ran"))
        self.pipeline.close()
        log.info("engine closed")

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
