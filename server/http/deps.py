"""Typed accessors for what lives on ``app.state``, as ``Annotated`` dependency aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.errors import Forbidden, Unauthorized
from server.service.context import AppContext


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


def require_admin(request: Request) -> str:
    """Bearer token compared in constant time; with no token configured the admin API is closed."""
    ctx = get_ctx(request)
    expected = ctx.settings.admin_token_value()
    if not expected:
        raise Forbidden("the admin API is disabled: set VOXSWAP_ADMIN_TOKEN (or --admin-token) to enable it")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send 'Authorization: Bearer <admin token>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("the admin token is wrong")
    return "admin"


AdminDep = Annotated[str, Depends(require_admin)]


@dataclass(frozen=True)
class Client:
    """Who sent a request, as the ASGI guard established it from the headers alone.

    ``key_id`` names the client API key that authenticated the request (a stable, non-secret id,
    never the key); None when no keys are configured, in which case every client is the same
    client. ``admin`` is true for the admin token, which sees every client's jobs.
    """

    key_id: str | None = None
    label: str | None = None
    admin: bool = False


ANONYMOUS = Client()


def get_client(request: Request) -> Client:
    client = request.scope.get("state", {}).get("client")
    return client if isinstance(client, Client) else ANONYMOUS


ClientDep = Annotated[Client, Depends(get_client)]
