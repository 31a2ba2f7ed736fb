"""uvicorn's listener with the two guards it lacks: a cap on open connections and a header deadline.

uvicorn times out nothing before a request's headers are complete (its keep-alive timer stops at
the first byte of the next request), and `limit_concurrency` answers excess requests only once
their headers arrive, so a client that opens sockets and sends nothing, or one header byte at a
time, holds file descriptors forever. `guarded_protocol` wraps uvicorn's HTTP protocol:

- a connection beyond `max_connections` gets a JSON 503 (Retry-After) and is closed at once;
- a request's headers must be complete within `head_timeout_s` of the connection opening (or of
  the first byte after the previous response); else 408 and close.

The body has its own deadline in `middleware.BodyMiddleware`, which works behind any server (Ray's
proxy too); keep-alive idling is uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

from uvicorn import Config
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from runtime.serving.options import ServerOptions


def _raw_response(status: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"detail": message}).encode()
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{retry}connection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


class GuardedProtocol(asyncio.Protocol):
    """One connection: uvicorn's protocol (`inner`) does HTTP; this counts and times the connection."""

    inner_class: ClassVar[Callable[..., asyncio.Protocol]] = AutoHTTPProtocol
    max_connections: ClassVar[int] = 128
    head_timeout_s: ClassVar[float] = 15.0
    connections: ClassVar[set[GuardedProtocol]] = set()  # per configured subclass

    def __init__(self, **kwargs: Any) -> None:
        self.inner = self.inner_class(**kwargs)
        self.transport: asyncio.Transport | None = None
        self.refused = False
        self.timer: asyncio.TimerHandle | None = None
        self.cycle: object = None  # the inner protocol's current request, once its headers are in
        self.bytes_since_armed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has asyncio.Transport's methods but is not a subclass of it
        self.transport = cast(asyncio.Transport, transport)
        if len(self.connections) >= self.max_connections:
            self.refused = True
            message = f"too many open connections (this server allows {self.max_connections}); retry later"
            self.transport.write(_raw_response("503 Service Unavailable", message, retry_after=1))
            self.transport.close()
            return
        self.connections.add(self)
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self.bytes_since_armed += len(data)
        self.inner.data_received(data)
        cycle = getattr(self.inner, "cycle", None)
        if cycle is not None and cycle is not self.cycle:  # a new request's headers are complete
            self.cycle = cycle
            self._disarm()
        elif self.timer is None and (cycle is None or getattr(cycle, "response_complete", False)):
            self._arm()  # the first bytes of the next request's head on a kept-alive connection
            self.bytes_since_armed = len(data)

    def eof_received(self) -> bool | None:
        return None if self.refused else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.refused:
            return
        self.connections.discard(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _arm(self) -> None:
        self._disarm()
        self.bytes_since_armed = 0
        self.timer = asyncio.get_running_loop().call_later(self.head_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.bytes_since_armed:  # a request was started: tell it why it ends
            message = f"request headers not received within {self.head_timeout_s:g} s"
            self.transport.write(_raw_response("408 Request Timeout", message))
        self.transport.close()


def guarded_protocol(max_connections: int, head_timeout_s: float) -> type[asyncio.Protocol]:
    """A GuardedProtocol class with these limits and its own connection count (one per server)."""

    class Guarded(GuardedProtocol):
        connections: ClassVar[set[GuardedProtocol]] = set()

    Guarded.max_connections = max_connections
    Guarded.head_timeout_s = head_timeout_s
    return Guarded


def uvicorn_config(app: Any, options: ServerOptions, **overrides: Any) -> Config:
    """uvicorn's Config for `options`: limits, keep-alive, shutdown grace, log level."""
    settings: dict[str, Any] = {
        "host": options.host,
        "port": options.port,
        "log_level": options.log_level,
        "access_log": options.log_level == "debug",
        "timeout_keep_alive": options.keep_alive_s,
        "timeout_graceful_shutdown": math.ceil(options.shutdown_grace_s),
        "http": guarded_protocol(options.max_connections, options.limits.read_timeout_s),
        **overrides,
    }
    return Config(app, **settings)
