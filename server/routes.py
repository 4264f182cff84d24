"""HTTP routes: wire schema <-> engine request, nothing more."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Header, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from engine.bundle import TaskKind
from engine.errors import NotReady, ServingError
from engine.queue import Priority
from engine.requests import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    LongInput,
    NerRequest,
    Served,
    SummarizeDone,
    SummarizeEvent,
    SummarizeProgress,
    SummarizeRequest,
    SummarizeResult,
    SummarySentence,
    Timings,
)
from engine.requests import Usage as EngineUsage
from engine.service import Service
from engine.tasks.ner import Entity
from engine.tasks.summarize import Selection
from server import schemas
from server.errors import error_response
from server.lean_route import LeanRoute

router = APIRouter(route_class=LeanRoute)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text}
    for code, text in {
        413: "Too many inputs, an input too long, or a body too large",
        422: "Invalid request: empty input, wrong types, invalid JSON, unknown model",
        429: "Overloaded: the queue is full (see Retry-After)",
        503: "Not ready: warming up or shutting down",
        504: "The request's deadline passed",
    }.items()
}


TIMING_HEADERS = ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time")


def _json(payload: Any, served: Served[Any] | None = None, request: Request | None = None) -> Response:
    """JSON body; for a served request text-embeddings-inference's x-*-time headers (milliseconds)
    and x-cache-hits (how many of its inputs came from the cache). With `request`, the model tokens
    used are recorded for the caller's token rate limit (server/access.py)."""
    headers = None
    if served is not None and request is not None:
        request.state.tokens_used = sum(r.usage.tokens for r in served.results)
    if served is not None:
        t = served.timings
        seconds = (t.total_s, t.tokenize_s, t.queue_s, t.inference_s)
        headers = {name: f"{s * 1000:.3f}" for name, s in zip(TIMING_HEADERS, seconds, strict=True)}
        headers["x-cache-hits"] = str(served.cache_hits)
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
        headers=headers,
    )


def _service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the model is loading")
    if (reason := service.unready_reason()) is not None:
        raise NotReady(reason)
    return service


def _task_of(request: Request, model: str | None, kind: TaskKind) -> tuple[Service, str]:
    """The service and the task that serves `model`; the task also labels the request's metrics."""
    service = _service(request)
    task = service.task_name(model, kind)
    request.state.task = task
    return service, task


def _texts(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else inputs


def _usage(usage: EngineUsage) -> dict[str, int]:
    return {"tokens": usage.tokens, "truncated_tokens": usage.truncated_tokens, "windows": usage.windows}


def _long_input(value: str | schemas.LongInputBody) -> LongInput:
    if isinstance(value, str):
        return LongInput("chunk" if value == "chunk" else "truncate")
    return LongInput(value.strategy, value.side, value.window, value.stride)


def _classification(result: ClassifyResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "labels": [{"label": ls.label, "score": ls.score} for ls in result.labels],
        "usage": _usage(result.usage),
    }
    if result.windows is not None:
        out["windows"] = [
            {"start": w.start, "end": w.end, "weight": w.weight,
             "labels": [{"label": ls.label, "score": ls.score} for ls in w.labels]}
            for w in result.windows
        ]  # fmt: skip
    return out


def _entity(entity: Entity, per_token: bool) -> dict[str, Any]:
    out: dict[str, Any] = (
        {"entity": entity.label, "index": entity.index} if per_token else {"entity_group": entity.label}
    )
    out.update(score=entity.score, word=entity.word, start=entity.start, end=entity.end)
    return out


TimeoutHeader = Header(
    None, alias="X-Request-Timeout", gt=0, allow_inf_nan=False, description="Deadline in seconds."
)
PriorityHeader = Header(
    "normal",
    alias="X-Priority",
    description="high | normal | low. Low is served after normal traffic up to 0.5 s older (then "
    "in turn: never starved) and refused first when the queue fills; high the other way round. "
    "A document read in windows queues one level lower (a summary's first window excepted).",
)
CacheControlHeader = Header(
    None, alias="Cache-Control", description="`no-cache` or `no-store`: compute afresh, store nothing."
)


def _use_cache(body_flag: bool, cache_control: str | None) -> bool:
    directives = {part.strip().lower() for part in (cache_control or "").split(",")}
    return body_flag and not directives & {"no-cache", "no-store"}


@router.post("/v1/classify", response_model=schemas.ClassifyResponse, responses=ERRORS, tags=["tasks"])
async def classify(
    body: schemas.ClassifyBody,
    request: Request,
    x_request_timeout: float | None = TimeoutHeader,
    cache_control: str | None = CacheControlHeader,
    x_priority: Priority = PriorityHeader,
) -> Response:
    service, task = _task_of(request, body.model, "classification")
    # The plain "truncate" is the one-pass path (and its result cache); anything else reads windows.
    long_input = None if body.long_input == "truncate" else _long_input(body.long_input)
    served = await service.classify(
        ClassifyRequest(
            _texts(body.inputs),
            task,
            body.top_k,
            body.raw_scores,
            timeout_s=x_request_timeout,
            cache=_use_cache(body.cache, cache_control),
            priority=x_priority,
            long_input=long_input,
            return_windows=body.return_windows,
        )
    )
    return _json({"model": task, "results": [_classification(r) for r in served.results]}, served, request)


@router.post("/v1/ner", response_model=schemas.NerResponse, responses=ERRORS, tags=["tasks"])
async def ner(
    body: schemas.NerBody,
    request: Request,
    x_request_timeout: float | None = TimeoutHeader,
    cache_control: str | None = CacheControlHeader,
    x_priority: Priority = PriorityHeader,
) -> Response:
    service, task = _task_of(request, body.model, "token-classification")
    served = await service.ner(
        NerRequest(
            _texts(body.inputs),
            task,
            body.aggregation_strategy,
            timeout_s=x_request_timeout,
            cache=_use_cache(body.cache, cache_control),
            priority=x_priority,
            long_input=_long_input(body.long_input),
        )
    )
    per_token = body.aggregation_strategy == "none"
    return _json(
        {
            "model": task,
            "results": [
                {"entities": [_entity(e, per_token) for e in r.entities], "usage": _usage(r.usage)}
                for r in served.results
            ],
        },
        served,
        request,
    )


def _sentence(sentence: SummarySentence) -> dict[str, Any]:
    return {"index": sentence.index, "text": sentence.text, "start": sentence.start, "end": sentence.end,
            "score": sentence.score}  # fmt: skip


def _summary(task: str, result: SummarizeResult) -> dict[str, Any]:
    return {
        "model": task,
        "sentences": [_sentence(s) for s in result.sentences],
        "total_sentences": result.total_sentences,
        "usage": _usage(result.usage),
    }


def _timings_ms(timings: Timings) -> dict[str, float]:
    seconds = (timings.total_s, timings.tokenize_s, timings.queue_s, timings.inference_s)
    return {
        name[2:].replace("-", "_"): round(s * 1000, 3)
        for name, s in zip(TIMING_HEADERS, seconds, strict=True)
    }


def summary_event(task: str, event: SummarizeEvent) -> tuple[str, dict[str, Any]]:
    """The name and payload of a summarization event, the same on every transport."""
    if isinstance(event, SummarizeProgress):
        return "progress", {"windows_done": event.windows_done, "windows_total": event.windows_total}
    if isinstance(event, SummarySentence):
        return "sentence", _sentence(event)
    return "done", {**_summary(task, event.result), "timings": _timings_ms(event.timings)}


async def _sse(
    task: str, first: SummarizeEvent, events: AsyncGenerator[SummarizeEvent, None], request: Request
) -> AsyncIterator[ServerSentEvent]:
    """The events as SSE; an error after the stream began is an `error` event (the status line
    has gone). A client that hangs up cancels this generator, and with it the queued windows."""
    try:
        event: SummarizeEvent | None = first
        while event is not None:
            name, payload = summary_event(task, event)
            if isinstance(event, SummarizeDone):
                request.state.tokens_used = event.result.usage.tokens
            yield ServerSentEvent(orjson.dumps(payload).decode(), event=name)
            event = await anext(events, None)
    except ServingError as error:
        body = {"error": {"type": error.kind.value, "message": error.message}}
        yield ServerSentEvent(orjson.dumps(body).decode(), event="error")
    finally:
        await events.aclose()


@router.post(
    "/v1/summarize",
    response_model=schemas.SummarizeResponse,
    responses={
        **ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when asked"},
    },
    tags=["tasks"],
)
async def summarize(
    body: schemas.SummarizeBody,
    request: Request,
    x_request_timeout: float | None = TimeoutHeader,
    cache_control: str | None = CacheControlHeader,
    x_priority: Priority = PriorityHeader,
    accept: str | None = Header(None),
) -> Response:
    """Extractive summary: every sentence scored in its document's context, the best selected.
    With `Accept: text/event-stream` (or "stream": true), Server-Sent Events: `progress` as
    windows finish, `sentence` for each selected sentence, then `done` with the whole result."""
    service, task = _task_of(request, body.model, "summarization")
    summarize_request = SummarizeRequest(
        body.inputs,
        task,
        Selection(body.sentences, body.ratio, body.max_chars, body.diversity, body.keep_order),
        body.window,
        body.stride,
        timeout_s=x_request_timeout,
        cache=_use_cache(body.cache, cache_control),
        priority=x_priority,
    )
    if not (body.stream or "text/event-stream" in (accept or "")):
        served = await service.summarize(summarize_request)
        return _json(_summary(task, served.results[0]), served, request)
    events = service.summarize_events(summarize_request)
    first = await anext(events)  # an error before the first event is an ordinary HTTP error
    return EventSourceResponse(_sse(task, first, events, request), ping=15)


@router.post("/predict", responses=ERRORS, tags=["text-embeddings-inference"])
async def predict(
    body: schemas.PredictBody,
    request: Request,
    x_request_timeout: float | None = TimeoutHeader,
    cache_control: str | None = CacheControlHeader,
    x_priority: Priority = PriorityHeader,
) -> Response:
    """text-embeddings-inference's /predict: every label with its score, best first."""
    service, task = _task_of(request, None, "classification")
    texts = _texts(body.inputs)
    served = await service.classify(
        ClassifyRequest(
            texts,
            task,
            top_k=len(service.classifiers[task].labels),
            raw_scores=body.raw_scores,
            truncate=body.truncate,
            timeout_s=x_request_timeout,
            cache=_use_cache(True, cache_control),
            priority=x_priority,
        )
    )
    scored = [[{"score": ls.score, "label": ls.label} for ls in r.labels] for r in served.results]
    return _json(scored[0] if isinstance(body.inputs, str) else scored, served, request)


@router.post("/embed", responses=ERRORS, tags=["text-embeddings-inference"])
async def embed(
    body: schemas.EmbedBody,
    request: Request,
    x_request_timeout: float | None = TimeoutHeader,
    cache_control: str | None = CacheControlHeader,
    x_priority: Priority = PriorityHeader,
) -> Response:
    """text-embeddings-inference's /embed: mean-pooled sentence embeddings, one list per input."""
    request.state.task = "embed"
    served = await _service(request).embed(
        EmbedRequest(
            _texts(body.inputs),
            body.normalize,
            body.truncate,
            x_request_timeout,
            cache=_use_cache(True, cache_control),
            priority=x_priority,
        )
    )
    return _json([r.embedding for r in served.results], served, request)


@router.get("/v1/models", response_model=schemas.ModelList, tags=["meta"])
async def models(request: Request) -> Response:
    manifest = _service(request).bundle.manifest
    precision = ",".join(spec.precision for spec in manifest.encoders.values())
    return _json(
        {
            "data": [
                {
                    "id": name,
                    "task": task.kind,
                    "labels": list(task.labels),
                    "description": task.description,
                    "bundle": manifest.name,
                    "version": manifest.version,
                    "max_length": manifest.max_length,
                    "precision": precision,
                }
                for name, task in manifest.tasks.items()
            ]
        }
    )


@router.get("/health/live", tags=["meta"])
async def live() -> Response:
    return _json({"status": "alive"})


@router.get("/health/ready", tags=["meta"], responses={503: ERRORS[503]})
async def ready(request: Request) -> Response:
    """200 once warmed up; 503 while loading, after SIGTERM (draining) or when a runtime failed."""
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        reason: str | None = "the model is loading"
    elif request.app.state.draining:
        reason = "shutting down: finishing accepted requests"
    else:
        reason = service.unready_reason()
    if reason is not None:
        return error_response(NotReady.kind, reason)
    return _json({"status": "ready"})


admin_router = APIRouter(prefix="/admin", tags=["admin"])


@admin_router.post("/cache/flush")
async def flush_cache(request: Request) -> Response:
    """Empty this replica's in-process cache and every key of the namespace in Redis (every
    bundle version). Other replicas' in-process tiers keep their entries until they expire."""
    deleted = await _service(request).flush_cache()
    return _json({"flushed": True, "redis_keys_deleted": deleted})
