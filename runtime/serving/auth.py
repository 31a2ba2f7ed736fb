"""Optional bearer token: a FastAPI dependency that is a no-op when the server has no token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_scheme = HTTPBearer(auto_error=False, description="set when the server was started with --token")


def bearer_auth(token: str | None) -> Callable[..., Awaitable[None]]:
    """Dependency checking `Authorization: Bearer <token>` in constant time."""
    expected = token.encode() if token else None

    async def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_scheme)]) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    return check
