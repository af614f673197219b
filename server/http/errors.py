"""One error envelope for every failure, whatever raised it: our own errors, validation errors,
Starlette's 404/405, and anything unexpected (logged with its traceback, never shown to clients)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import VoxswapError, envelope
from server.logs import request_id_var

log = logging.getLogger("voxswap.app")


def install_error_handlers(app: FastAPI) -> None:
    async def voxswap_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, VoxswapError)
        body = envelope(exc.message, type_=exc.type, code=exc.code, param=exc.param,
                        request_id=request_id_var.get())
        report = getattr(exc, "report", None)
        if report:
            body["error"]["report"] = report  # type: ignore[index]
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else {}
        if exc.status_code == 409 and not exc.retry_after:
            headers["x-should-retry"] = "false"  # the openai client retries 409s unless told this one won't pass
        if exc.status_code >= 500 and exc.status_code not in (503, 504, 507):  # expected refusals: no trace
            log.error("request failed", exc_info=exc)
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param or 'request'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(envelope(message, type_="invalid_request_error", code="invalid_request",
                                     param=param, request_id=request_id_var.get()), status_code=400)

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(envelope("internal server error", type_="server_error",
                                     code="internal_error", request_id=request_id_var.get()),
                            status_code=500)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(envelope(str(exc.detail), type_="invalid_request_error", code=code,
                                     request_id=request_id_var.get()),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(VoxswapError, voxswap_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
