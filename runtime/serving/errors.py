"""One place that turns failures into HTTP errors with a clear, single-line message.

/v1 and the health endpoints answer {"detail": message} (FastAPI's convention); /v2 answers
{"error": message}, which KServe v2 specifies and tritonclient reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never delivered


def error_payload(path: str, message: str) -> dict[str, str]:
    return {"error": message} if path.startswith("/v2") else {"detail": message}


def error_response(
    path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_payload(path, message), status_code=status, headers=headers)


class BodyTooLarge(HTTPException):
    """An HTTPException so FastAPI's body reader lets it through instead of wrapping it in a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body must be at most {limit} bytes")


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
