"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the status an
OpenAI client maps to its exception classes, for every way a request can fail, so a client
never sees FastAPI's own shapes or a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("moespac.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 503: "server_error"}


class ApiError(Exception):
    """A request this server refuses, with its status and one-line message."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(error_body(e.status, e.message, e.code, e.param), status_code=e.status, headers=headers)


def _validation_message(e: RequestValidationError, content_type: str) -> tuple[str, str | None]:
    """One line naming the first bad field (pydantic's own message), and that field."""
    first = e.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", None
    if not loc and "json" not in content_type:  # curl -d sends a form unless told otherwise
        return f"send the body as JSON with Content-Type: application/json (got {content_type or 'none'})", None
    field = ".".join(loc) or None
    return (f"{field}: {first['msg']}" if field else first["msg"]), field


def install(app: FastAPI) -> None:
    """Route every failure through error_body."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, field = _validation_message(e, request.headers.get("content-type", ""))
        return error_response(ApiError(400, message, "invalid_value", field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("internal error")  # the traceback goes to the server's log, never to a client
        return error_response(ApiError(500, f"internal error: {type(e).__name__}"))
