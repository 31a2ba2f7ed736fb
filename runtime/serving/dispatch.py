"""Options -> engine job -> Result for any HTTP front end (/v1 JSON, /v2 KServe).

Does what every protocol needs the same way: reject bad options before they take a queue slot
(`validate` + the server's limits), map a full queue to 429 with Retry-After, and while waiting
watch the client and the deadline: a disconnect or an expired deadline cancels the job through
the pipeline's cancel hook, so the worker is free after the current denoising step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fastapi import HTTPException, Request

from runtime.errors import SetupError
from runtime.options import GenerateOptions, ResolvedOptions, validate
from runtime.pipeline import Cancelled, Result
from runtime.serving.engine import DeadlineExceeded, Engine, EngineClosed, Job, QueueFull
from runtime.serving.errors import CLIENT_CLOSED, RETRY_AFTER_S, server_fault
from runtime.serving.limits import Limits, check_limits, check_prompts

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a waiting request checks for a client disconnect


def prepare(options: GenerateOptions, engine: Engine, limits: Limits) -> ResolvedOptions:
    """Validated options within the server's limits; RequestError naming the parameter otherwise."""
    check_prompts(options, limits)  # before tokenising anything
    o = validate(options, engine.bundle)
    check_limits(o, limits)
    return o


def request_timeout(asked: float | None, limits: Limits) -> float:
    """A request may ask for a shorter deadline than the server's, never a longer one."""
    return limits.timeout_s if asked is None else min(asked, limits.timeout_s)


def _submit(engine: Engine, options: ResolvedOptions, timeout: float) -> Job:
    try:
        return engine.submit(options, timeout)
    except QueueFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    except EngineClosed as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


async def generate(
    request: Request,
    engine: Engine,
    options: ResolvedOptions,
    timeout: float,
    on_done: Callable[[Result, int], None] | None = None,
) -> Result:
    """Run one generation for an HTTP request; every failure is an HTTPException with a clear message.

    `on_done(result, batch_size)` sees each success (metrics)."""
    job = _submit(engine, options, timeout)
    future = asyncio.wrap_future(job.future)
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=POLL_S)
            if future.done():
                break
            if await request.is_disconnected():
                raise HTTPException(CLIENT_CLOSED, "client closed the connection; generation cancelled")
            if job.expired():
                raise HTTPException(504, f"deadline of {timeout:g} s exceeded; generation cancelled")
    except BaseException:  # HTTPException above, or this task cancelled at shutdown
        job.cancel()
        future.cancel()  # detaches from the worker's future: no "exception never retrieved"
        raise
    try:
        result = future.result()
    except DeadlineExceeded:
        raise HTTPException(504, f"deadline of {timeout:g} s exceeded; generation cancelled") from None
    except Cancelled as exc:
        raise HTTPException(CLIENT_CLOSED, str(exc)) from None
    except SetupError as exc:  # the engine logged it; the caller learns only that it is not their fault
        raise server_fault(exc) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    except Exception as exc:  # logged by the engine's worker, with its traceback
        raise server_fault(exc) from None
    if on_done is not None:
        on_done(result, job.batch_size)
    return result
