"""Refuse request bodies over a size limit before they are buffered (a 1 GB prompt never lands)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.serving.errors import BodyTooLarge, error_response


class BodyLimitMiddleware:
    """413 from the Content-Length header when present, else once the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await error_response(scope["path"], 413, BodyTooLarge(self.max_bytes).detail)(
                scope, receive, send
            )
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(scope["path"], 413, exc.detail)(scope, receive, send)
