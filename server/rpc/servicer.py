"""The Inference service: protobuf messages <-> engine requests, nothing more."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from engine.documents import Side, Strategy
from engine.errors import ErrorKind, NotReady, ServingError
from engine.queue import Priority
from engine.requests import (
    ClassifyRequest,
    LongInput,
    NerRequest,
    SummarizeDone,
    SummarizeProgress,
    SummarizeRequest,
    SummarySentence,
    Usage,
)
from engine.service import Service
from engine.tasks.ner import AGGREGATIONS, Aggregation
from engine.tasks.summarize import Selection
from server.access import ApiKey, KeyRing, authenticate
from server.rpc import sparsebert_pb2 as pb
from server.rpc import sparsebert_pb2_grpc as pb_grpc
from server.rpc.errors import GRPC_STATUS

log = logging.getLogger(__name__)
T = TypeVar("T")
PRIORITIES: dict[int, Priority] = {
    pb.PRIORITY_NORMAL: "normal",
    pb.PRIORITY_HIGH: "high",
    pb.PRIORITY_LOW: "low",
}


def _usage(usage: Usage) -> pb.Usage:
    return pb.Usage(tokens=usage.tokens, truncated_tokens=usage.truncated_tokens, windows=usage.windows)


def _long_input(message: pb.LongInput, default: LongInput | None) -> LongInput | None:
    if message.strategy == pb.LongInput.STRATEGY_DEFAULT and not (message.window or message.stride):
        return default
    strategy: Strategy = "truncate" if message.strategy == pb.LongInput.STRATEGY_TRUNCATE else "chunk"
    side: Side = "left" if message.truncate_left else "right"
    return LongInput(strategy, side, message.window or None, message.stride or None)


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline (grpc-timeout), which the engine then honours like X-Request-Timeout."""
    remaining = context.time_remaining()
    return None if remaining is None else max(float(remaining), 1e-3)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, service: Callable[[], Service | None], keys: KeyRing | None) -> None:
        self._service = service
        self._keys = keys

    async def _ready(self, context: grpc.aio.ServicerContext) -> Service:
        if self._keys is not None:
            metadata = dict(context.invocation_metadata() or ())
            key = authenticate(self._keys, str(metadata.get("authorization", "")))
            if not isinstance(key, ApiKey):
                await _abort(context, *key)
        service = self._service()
        if service is None:
            raise NotReady("the model is loading")
        if (reason := service.unready_reason()) is not None:
            raise NotReady(reason)
        return service

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        async def run() -> pb.ClassifyResponse:
            service = await self._ready(context)
            task = service.task_name(request.model or None, "classification")
            served = await service.classify(
                ClassifyRequest(
                    list(request.inputs),
                    task,
                    request.top_k or 1,
                    request.raw_scores,
                    timeout_s=_timeout(context),
                    cache=not request.no_cache,
                    priority=PRIORITIES.get(request.priority, "normal"),
                    long_input=_long_input(request.long_input, None),
                    return_windows=request.return_windows,
                )
            )
            return pb.ClassifyResponse(
                model=task,
                results=[
                    pb.Classification(
                        labels=[pb.LabelScore(label=s.label, score=s.score) for s in result.labels],
                        usage=_usage(result.usage),
                        windows=[
                            pb.WindowScores(
                                start=w.start,
                                end=w.end,
                                weight=w.weight,
                                labels=[pb.LabelScore(label=s.label, score=s.score) for s in w.labels],
                            )
                            for w in result.windows or []
                        ],
                    )
                    for result in served.results
                ],
            )

        return await _mapped(context, run)

    async def Ner(self, request: pb.NerRequest, context: grpc.aio.ServicerContext) -> pb.NerResponse:
        async def run() -> pb.NerResponse:
            service = await self._ready(context)
            task = service.task_name(request.model or None, "token-classification")
            aggregation = request.aggregation_strategy or "simple"
            if aggregation not in AGGREGATIONS:
                await _abort(
                    context,
                    ErrorKind.VALIDATION,
                    f"aggregation_strategy must be one of {', '.join(AGGREGATIONS)}",
                )
            served = await service.ner(
                NerRequest(
                    list(request.inputs),
                    task,
                    _aggregation(aggregation),
                    timeout_s=_timeout(context),
                    cache=not request.no_cache,
                    priority=PRIORITIES.get(request.priority, "normal"),
                    long_input=_long_input(request.long_input, LongInput()) or LongInput(),
                )
            )
            return pb.NerResponse(
                model=task,
                results=[
                    pb.Entities(
                        entities=[
                            pb.Entity(
                                entity_group=e.label, score=e.score, word=e.word, start=e.start, end=e.end
                            )
                            for e in result.entities
                        ],
                        usage=_usage(result.usage),
                    )
                    for result in served.results
                ],
            )

        return await _mapped(context, run)

    async def Summarize(
        self, request: pb.SummarizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SummarizeEvent]:
        """A cancelled call (or one past its deadline) cancels this generator while it awaits the
        engine: the windows it had queued leave the queue, as for an HTTP client that hangs up."""
        try:
            service = await self._ready(context)
            task = service.task_name(request.model or None, "summarization")
            selection = Selection(
                sentences=request.sentences or (None if request.ratio else 3),
                ratio=request.ratio or None,
                max_chars=request.max_chars or None,
                diversity=request.diversity if request.HasField("diversity") else 0.8,
                keep_order=not request.best_first,
            )
            summarize = SummarizeRequest(
                request.input,
                task,
                selection,
                request.window or None,
                request.stride or None,
                timeout_s=_timeout(context),
                cache=not request.no_cache,
                priority=PRIORITIES.get(request.priority, "normal"),
            )
            async with contextlib.aclosing(service.summarize_events(summarize)) as events:
                async for event in events:
                    yield _summary_event(task, event)
        except ServingError as error:
            await _abort(context, error.kind, error.message)


def _aggregation(name: str) -> Aggregation:
    return next(a for a in AGGREGATIONS if a == name)


def _sentence(s: SummarySentence) -> pb.Sentence:
    return pb.Sentence(index=s.index, text=s.text, start=s.start, end=s.end, score=s.score)


def _summary_event(task: str, event: Any) -> pb.SummarizeEvent:
    if isinstance(event, SummarizeProgress):
        return pb.SummarizeEvent(
            progress=pb.Progress(windows_done=event.windows_done, windows_total=event.windows_total)
        )
    if isinstance(event, SummarySentence):
        return pb.SummarizeEvent(sentence=_sentence(event))
    assert isinstance(event, SummarizeDone)
    result, timings = event.result, event.timings
    return pb.SummarizeEvent(
        done=pb.Summary(
            model=task,
            sentences=[_sentence(s) for s in result.sentences],
            total_sentences=result.total_sentences,
            usage=_usage(result.usage),
            total_ms=timings.total_s * 1000,
            queue_ms=timings.queue_s * 1000,
            inference_ms=timings.inference_s * 1000,
        )
    )


async def _abort(context: grpc.aio.ServicerContext, kind: ErrorKind, message: str) -> None:
    await context.abort(GRPC_STATUS[kind], message)


async def _mapped(context: grpc.aio.ServicerContext, run: Callable[[], Awaitable[T]]) -> T:
    try:
        return await run()
    except ServingError as error:
        await _abort(context, error.kind, error.message)
        raise  # abort raises; this line is never reached
