"""Pure ASGI middleware (not BaseHTTPMiddleware, which hides client disconnects from handlers).

- `BodyMiddleware`: reads each request's whole body before the app runs: at most `max_bytes` (413,
  from Content-Length before a byte is read, or once a streamed body passes it) within `timeout_s`
  (408, and the connection is closed). Only then does the request count as in flight, so a client
  that sends headers and half a body (slowloris) holds no handler, no queue slot and no gauge.
- `ShutdownMiddleware`: a request that outlives the shutdown grace period is cancelled by uvicorn;
  it gets a JSON 503 with Retry-After instead of a plain-text 500, and the log gets one line
  instead of a CancelledError traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.serving.errors import RETRY_AFTER_S, body_too_large, error_response

log = logging.getLogger(__name__)


class BodyMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, in_flight: Gauge | None = None):
        self.app, self.max_bytes, self.timeout_s, self.in_flight = app, max_bytes, timeout_s, in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            # uvicorn discards the unread body and keeps the connection: the client reads the 413
            await error_response(scope["path"], 413, body_too_large(self.max_bytes))(scope, receive, send)
            return
        body = await self._read(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real channel: http.disconnect when the client hangs up

        if self.in_flight is not None:
            self.in_flight.inc()
        try:
            await self.app(scope, replay, send)
        finally:
            if self.in_flight is not None:
                self.in_flight.dec()

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The body, or None once an error was sent (or the client left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.info("%s: body not received within %g s (%d bytes came): 408", scope["path"],
                         self.timeout_s, size)  # fmt: skip
                message_text = f"request body not received within {self.timeout_s:g} s"
                await self._refuse(scope, receive, send, 408, message_text)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, body_too_large(self.max_bytes))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        """Answer mid-body and close: the rest of the body is not worth reading."""
        await error_response(scope["path"], status, message, {"Connection": "close"})(scope, receive, send)


class ShutdownMiddleware:
    def __init__(self, app: ASGIApp, grace_s: float):
        self.app, self.grace_s = app, grace_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        start = time.monotonic()

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError as exc:
            # uvicorn cancels what is still running when the grace period ends. Answering (not
            # re-raising) ends this task normally, so uvicorn has no exception to log.
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python >= 3.11
                task.uncancel()
            reason = str(exc.args[0]) if exc.args else "cancelled"
            log.warning("%s %s cancelled after %.1f s (%s)%s", scope["method"], scope["path"],
                        time.monotonic() - start, reason, "" if started else ": answered 503")  # fmt: skip
            if started:
                return
            message = (
                f"the server is shutting down and stopped this request after its {self.grace_s:g} s grace "
                "period; retry it (generation is deterministic: same seed, same image)"
            )
            headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
            with contextlib.suppress(Exception):  # the connection is gone too: nothing left to tell
                await error_response(scope["path"], 503, message, headers)(scope, receive, send)
