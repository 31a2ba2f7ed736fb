"""One place that turns failures into HTTP errors with a clear, single-line message.

/v1 and the health endpoints answer {"detail": message} (FastAPI's convention); /v2 answers
{"error": message}, which KServe v2 specifies and tritonclient reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from runtime.errors import SetupError

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never delivered
RETRY_AFTER_S = 5  # what a 503 (shutting down, engine closed) tells the caller to wait


def error_payload(path: str, message: str) -> dict[str, str]:
    # A message may quote the caller's text: a lone surrogate in it must not break the JSON encoder.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": message} if path.startswith("/v2") else {"detail": message}


def error_response(
    path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_payload(path, message), status_code=status, headers=headers)


def body_too_large(limit: int) -> str:
    return f"request body must be at most {limit} bytes"


def unparsable_body(cause: BaseException | None) -> str | None:
    """The message for a JSON body the parser gave up on (FastAPI's opaque 400), when the cause says why."""
    if isinstance(cause, RecursionError):
        return "malformed JSON body: nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return f"malformed JSON body: not UTF-8 (byte {cause.start})"
    return None


def server_fault(exc: BaseException) -> HTTPException:
    """500 for a failure that is not the caller's. The body names its kind, never its text: that
    is for the operator (logged), and may be a backend's multi-line dump of internal state."""
    if isinstance(exc, SetupError):
        what = f"the server's model setup is broken ({type(exc).__name__})"
    else:
        what = f"generation failed inside the server ({type(exc).__name__})"
    return HTTPException(500, f"{what}; the request itself was valid; the server log has the details")


def describe_validation(errors: Sequence[Any]) -> tuple[int, str]:
    """pydantic's error list -> (status, message): 400 unparsable JSON, 415 not sent as JSON, else 422.

    Inputs are echoed shortened, so a megabyte of wrong-typed data is not sent back."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx", {})
            return 400, f"malformed JSON body: {ctx.get('error', error.get('msg'))}"
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if not loc and isinstance(error.get("input"), bytes):
            return 415, "the body must be JSON sent with Content-Type: application/json"
        field = ".".join(loc) or "body"
        got = ""
        if "input" in error and error.get("type") != "missing":
            shown = repr(error["input"])
            got = f" (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
        parts.append(f"{field}: {error.get('msg')}{got}")
    return 422, "; ".join(parts) or "invalid request"
