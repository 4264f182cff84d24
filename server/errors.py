"""The HTTP mapping of the engine's error taxonomy, in one table, and the JSON error body."""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from engine.errors import ErrorKind, ServingError

log = logging.getLogger(__name__)

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.VALIDATION: 422,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.NOT_READY: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.CANCELLED: 499,
    ErrorKind.INTERNAL: 500,
}
_KIND_OF_STATUS = {404: ErrorKind.NOT_FOUND, 405: ErrorKind.VALIDATION, 413: ErrorKind.PAYLOAD_TOO_LARGE}


def error_response(kind: ErrorKind, message: str, retry_after_s: float | None = None) -> Response:
    status = HTTP_STATUS[kind]
    headers = {}
    if retry_after_s is not None or status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s or 1.0)))
    body = orjson.dumps({"error": {"type": kind.value, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


# The branches of `inputs` (a text, or a list of texts) as pydantic names them in a location.
_UNION_BRANCHES = ("constrained-str", "list[constrained-str]", "str", "list[str]")


def _describe(error: dict[str, Any]) -> str:
    location = [str(part) for part in error.get("loc", ()) if part != "body" and part not in _UNION_BRANCHES]
    kind = error.get("type")
    if location[:1] == ["inputs"]:
        if kind in ("string_too_short", "string_pattern_mismatch"):
            return f"input {location[1]} is empty" if len(location) > 1 else "the input is empty"
        if kind == "too_short":
            return "inputs must hold at least one text"
    return f"{'.'.join(location) or 'body'}: {error.get('msg', 'invalid')}"


def _relevant(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a union field, the other branch's "should be a valid list/string" says nothing when
    this branch has a real complaint: drop it."""
    fields = {tuple(e.get("loc", ())[:2]) for e in errors if not str(e.get("type")).endswith("_type")}
    return [
        e
        for e in errors
        if not (str(e.get("type")).endswith("_type") and tuple(e.get("loc", ())[:2]) in fields)
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving(_: Request, exc: ServingError) -> Response:
        return error_response(exc.kind, exc.message, exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = _relevant(list(exc.errors())) or list(exc.errors())
        message = "; ".join(dict.fromkeys(_describe(e) for e in errors[:5])) or "invalid request"
        return error_response(ErrorKind.VALIDATION, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # the framework could not read the body (e.g. not UTF-8)
            return error_response(ErrorKind.VALIDATION, f"the body is not valid JSON text: {exc.detail}")
        kind = _KIND_OF_STATUS.get(exc.status_code, ErrorKind.VALIDATION)
        response = error_response(kind, str(exc.detail))
        response.status_code = exc.status_code
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ErrorKind.INTERNAL, "internal error; the server log has the details")
