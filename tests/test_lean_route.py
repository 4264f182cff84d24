"""LeanRoute answers every request as FastAPI's own route does: same values reach the endpoint,
same validation errors (through the server's error handlers), same OpenAPI description."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from server.errors import install_error_handlers
from server.lean_route import LeanRoute, plan_call


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str | list[str] = Field(min_length=1)
    top_k: int = 1


async def endpoint(
    body: Body,
    request: Request,
    x_request_timeout: float | None = Header(None, alias="X-Request-Timeout", gt=0, allow_inf_nan=False),
    x_priority: Literal["high", "normal", "low"] = Header("normal", alias="X-Priority"),
    accept: str | None = Header(None),
) -> Response:
    seen = {
        "body": body.model_dump(),
        "timeout": x_request_timeout,
        "priority": x_priority,
        "accept": accept,
        "path": request.url.path,
    }
    return Response(json.dumps(seen), media_type="application/json")  # ASCII: lone surrogates too


async def with_query(q: int = Query(1)) -> Response:
    return Response(str(q))


TAG_HEADER = Header(None)


async def with_list_header(x_tag: list[str] | None = TAG_HEADER) -> Response:
    return Response(",".join(x_tag or []))


def _app(route_class: type) -> FastAPI:
    app = FastAPI()
    router = APIRouter(route_class=route_class)
    router.post("/t")(endpoint)
    router.get("/q")(with_query)
    app.router.routes.extend(router.routes)
    install_error_handlers(app)
    return app


CASES: list[tuple[bytes, dict[str, str]]] = [
    (b'{"inputs": "a text", "top_k": 3}', {"content-type": "application/json"}),
    (b'{"inputs": ["a", "b"]}', {"content-type": "application/json; charset=utf-8", "X-Priority": "low"}),
    (b'{"inputs": "x"}', {"content-type": "application/vnd.api+json", "X-Request-Timeout": "2.5"}),
    (b'{"inputs": "x"}', {"content-type": "application/json", "X-Request-Timeout": "0"}),
    (b'{"inputs": "x"}', {"content-type": "application/json", "X-Request-Timeout": "inf"}),
    (b'{"inputs": "x"}', {"content-type": "application/json", "X-Request-Timeout": "soon"}),
    (b'{"inputs": "x"}', {"content-type": "application/json", "X-Priority": "urgent"}),
    (b'{"inputs": "x"}', {"content-type": "application/json", "Accept": "text/event-stream"}),
    (b'{"inputs": ', {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b'{"inputs": "x"}', {}),
    (b'{"inputs": "x"}', {"content-type": "text/plain"}),
    (b'{"inputs": "\xff"}', {"content-type": "application/json"}),
    (b'{"inputs": "\\ud800"}', {"content-type": "application/json"}),
    (b'{"inputs": []}', {"content-type": "application/json"}),
    (b'{"inputs": "x", "extra": 1}', {"content-type": "application/json"}),
    (b'{"inputs": 5, "top_k": "many"}', {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
]


@pytest.mark.parametrize(("body", "headers"), CASES)
def test_answers_as_fastapi_does(body: bytes, headers: dict[str, str]) -> None:
    lean, stock = TestClient(_app(LeanRoute)), TestClient(_app(APIRoute))
    got = lean.post("/t", content=body, headers=headers)
    expected = stock.post("/t", content=body, headers=headers)
    assert (got.status_code, got.json()) == (expected.status_code, expected.json())


def test_documents_the_route_as_fastapi_does() -> None:
    assert _app(LeanRoute).openapi() == _app(APIRoute).openapi()


def test_routes_it_cannot_serve_exactly_keep_fastapis_handler() -> None:
    routes = {route.path: route for route in _app(LeanRoute).routes if isinstance(route, LeanRoute)}
    assert getattr(routes["/t"], "lean", False)
    assert not getattr(routes["/q"], "lean", False)
    assert plan_call(with_query) is None
    assert plan_call(with_list_header) is None
    assert TestClient(_app(LeanRoute)).get("/q?q=4").text == "4"


def test_the_server_routes_are_lean() -> None:
    from server.routes import router

    assert all(getattr(route, "lean", False) for route in router.routes)
