"""A FastAPI route class whose per-request path is short, for the routes that take a JSON body
model, headers and the Request, and return a Response (every task route here).

FastAPI 0.165 spends a good part of a request outside the endpoint: it introspects the endpoint
for error context, solves the (trivial) dependency graph through generic type inspection, parses
the Content-Type with `email.message`, opens two exit stacks and calls telemetry hooks. On this
2-core machine the event loop shares the cores with the encoders, so each of those microseconds
is taken from inference (see README, "Where the loop's time goes"). This class does the same
validation with the same pydantic models and raises the same `RequestValidationError`s, resolved
once per route at start-up. The endpoint's signature still declares the route to OpenAPI, and a
route this class cannot serve exactly (dependencies, query or path parameters, a return that is
not a Response) keeps FastAPI's own handler.

Written by hand because no library does this: FastAPI documents custom `APIRoute` classes as the
way to change how a route handles its requests.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from fastapi import params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticUndefined
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class _HeaderParam:
    name: str
    alias: str  # as declared: error locations name it so
    header: str  # lower case, as ASGI carries it
    adapter: TypeAdapter[Any]
    default: Any  # PydanticUndefined: required


@dataclass(frozen=True)
class _Plan:
    """How to call the endpoint: where each argument comes from."""

    body_name: str | None
    body_model: type[BaseModel] | None
    request_name: str | None
    headers: tuple[_HeaderParam, ...]


def plan_call(endpoint: Callable[..., Any]) -> _Plan | None:
    """The call plan of `endpoint`, or None if it takes anything this class does not handle."""
    hints = get_type_hints(endpoint, include_extras=True)
    returned = hints.get("return")
    if not (inspect.isclass(returned) and issubclass(returned, Response)):
        return None
    body_name = body_model = request_name = None
    headers = []
    for name, parameter in inspect.signature(endpoint).parameters.items():
        annotation, default = hints.get(name), parameter.default
        if annotation is Request:
            request_name = name
        elif isinstance(default, params.Header) and not _is_sequence(annotation):
            alias = default.alias or (name.replace("_", "-") if default.convert_underscores else name)
            adapter: TypeAdapter[Any] = TypeAdapter(Annotated[annotation, default])  # type: ignore[arg-type]
            headers.append(_HeaderParam(name, alias, alias.lower(), adapter, default.default))
        elif (
            default is inspect.Parameter.empty
            and inspect.isclass(annotation)
            and issubclass(annotation, BaseModel)
            and body_model is None
        ):
            body_name, body_model = name, annotation
        else:
            return None
    return _Plan(body_name, body_model, request_name, tuple(headers))


def _is_sequence(annotation: Any) -> bool:
    """A list-like header (FastAPI reads every value of it): left to FastAPI's handler."""
    return any(get_origin(a) in (list, tuple, set, frozenset) for a in (annotation, *get_args(annotation)))


def _is_json(content_type: str | None) -> bool:
    """As FastAPI decides it: application/json or application/*+json, parameters ignored."""
    if not content_type:
        return False
    maintype, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


def _errors_at(location: tuple[str | int, ...], error: PydanticValidationError) -> list[dict[str, Any]]:
    return [{**e, "loc": (*location, *e["loc"])} for e in error.errors(include_url=False)]


async def _body(request: Request, model: type[BaseModel]) -> tuple[BaseModel | None, list[dict[str, Any]]]:
    raw = await request.body()
    if not raw:
        return None, [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
    content: Any = raw  # not JSON: validated as bytes, which the model refuses, as FastAPI does
    if _is_json(request.headers.get("content-type")):
        try:
            content = json.loads(raw)  # stdlib json, as FastAPI: lone surrogates reach the engine's check
        except json.JSONDecodeError as error:
            return None, [
                {"type": "json_invalid", "loc": ("body", error.pos), "msg": "JSON decode error",
                 "input": {}, "ctx": {"error": error.msg}}
            ]  # fmt: skip
        except UnicodeDecodeError:
            raise HTTPException(status_code=400, detail="There was an error parsing the body") from None
    try:
        return model.model_validate(content, from_attributes=True), []  # as FastAPI validates
    except PydanticValidationError as error:
        return None, _errors_at(("body",), error)


def lean_handler(endpoint: Callable[..., Awaitable[Response]], plan: _Plan) -> Handler:
    async def handle(request: Request) -> Response:
        arguments: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        if plan.headers:
            received = request.headers
            for param in plan.headers:
                value = received.get(param.header)
                if value is None:
                    if param.default is PydanticUndefined:
                        errors.append({"type": "missing", "loc": ("header", param.alias),
                                       "msg": "Field required", "input": None})  # fmt: skip
                    else:
                        arguments[param.name] = param.default
                    continue
                try:
                    arguments[param.name] = param.adapter.validate_python(value)
                except PydanticValidationError as error:
                    errors.extend(_errors_at(("header", param.alias), error))
        if plan.body_model is not None and plan.body_name is not None:
            body, body_errors = await _body(request, plan.body_model)
            errors.extend(body_errors)
            arguments[plan.body_name] = body
        if errors:
            raise RequestValidationError(errors)
        if plan.request_name is not None:
            arguments[plan.request_name] = request
        return await endpoint(**arguments)

    return handle


class LeanRoute(APIRoute):
    lean = False  # True where this class's handler serves the route

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        plan = (
            plan_call(endpoint) if inspect.iscoroutinefunction(endpoint) and not self.dependencies else None
        )
        if plan is None:
            return  # FastAPI's own handler, as set up by APIRoute
        handle = lean_handler(endpoint, plan)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            # Exceptions go to the app's ExceptionMiddleware, which maps them once for every route.
            response = await handle(Request(scope, receive, send))
            await response(scope, receive, send)

        self.app = app
        self.lean = True
