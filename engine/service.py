"""The engine's face to transports: validate -> tokenize -> admit -> batch -> task heads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engine.batcher import Batcher
from engine.bundle import Bundle, TaskKind
from engine.errors import DeadlineExceeded, NotReady, Overloaded, PayloadTooLarge, ValidationError
from engine.metrics import EngineMetrics
from engine.requests import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    NerRequest,
    NerResult,
    R,
    Served,
    Timings,
    Usage,
)
from engine.tasks.classify import Classifier
from engine.tasks.heads import MlpHead, mean_pool
from engine.tasks.ner import AGGREGATIONS, TokenClassifier
from engine.tokenization import TextTokenizer, TokenizedText


@dataclass(frozen=True)
class ServiceLimits:
    max_inputs: int = 64
    max_input_chars: int = 100_000
    default_timeout_s: float = 30.0
    max_top_k: int = 100


@dataclass(frozen=True, slots=True)
class _Encoded:
    tokens: TokenizedText
    states: np.ndarray

    @property
    def usage(self) -> Usage:
        return Usage(tokens=self.tokens.length, truncated_tokens=self.tokens.dropped_tokens)


@dataclass(frozen=True, slots=True)
class _EncodedRequest:
    items: list[_Encoded]
    started: float
    tokenize_s: float
    queue_s: float
    inference_s: float

    def served(self, results: list[R]) -> Served[R]:
        total = time.monotonic() - self.started
        return Served(results, Timings(total, self.tokenize_s, self.queue_s, self.inference_s))


class Service:
    def __init__(
        self,
        bundle: Bundle,
        tokenizer: TextTokenizer,
        batcher: Batcher,
        metrics: EngineMetrics,
        limits: ServiceLimits,
        tokenizer_threads: int = 1,
    ) -> None:
        self.bundle = bundle
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits
        self.ready = False
        self._tokenize_pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tokenize")
        self.classifiers: dict[str, Classifier] = {}
        self.token_classifiers: dict[str, TokenClassifier] = {}
        for name, spec in bundle.manifest.tasks.items():
            head = MlpHead.load(bundle.path(spec.head))
            if spec.kind == "classification":
                self.classifiers[name] = Classifier(head, spec.labels)
            else:
                self.token_classifiers[name] = TokenClassifier(head, spec.labels)

    async def start(self) -> None:
        """Warm every runtime over the batch shapes, off the loop; then become ready."""
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.warm_up)
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.batcher.close()
        self._tokenize_pool.shutdown(wait=True)

    def task_name(self, requested: str | None, kind: TaskKind) -> str:
        tasks = self.bundle.manifest.tasks
        if requested is None:
            default = self.bundle.manifest.default_task(kind)
            if default is None:
                raise ValidationError(f"the bundle serves no {kind} task")
            return default
        if requested not in tasks:
            known = ", ".join(sorted(tasks))
            raise ValidationError(f"unknown model {requested!r}; this server has: {known}")
        if tasks[requested].kind != kind:
            raise ValidationError(f"model {requested!r} is a {tasks[requested].kind} model, not {kind}")
        return requested

    async def classify(self, request: ClassifyRequest) -> Served[ClassifyResult]:
        classifier = self.classifiers[self.task_name(request.task, "classification")]
        if not 1 <= request.top_k <= min(self.limits.max_top_k, len(classifier.labels)):
            raise ValidationError(f"top_k must be between 1 and {len(classifier.labels)}")
        encoded = await self._encode(request.texts, request.timeout_s, request.truncate)
        return encoded.served(
            [
                ClassifyResult(
                    classifier.top_k(item.states, request.top_k, raw=request.raw_scores), item.usage
                )
                for item in encoded.items
            ]
        )

    async def ner(self, request: NerRequest) -> Served[NerResult]:
        classifier = self.token_classifiers[self.task_name(request.task, "token-classification")]
        if request.aggregation not in AGGREGATIONS:
            raise ValidationError(f"aggregation_strategy must be one of {', '.join(AGGREGATIONS)}")
        encoded = await self._encode(request.texts, request.timeout_s)
        return encoded.served(
            [
                NerResult(
                    classifier.entities(text, item.tokens, item.states, request.aggregation), item.usage
                )
                for text, item in zip(request.texts, encoded.items, strict=True)
            ]
        )

    async def embed(self, request: EmbedRequest) -> Served[EmbedResult]:
        encoded = await self._encode(request.texts, request.timeout_s, request.truncate)
        results = []
        for item in encoded.items:
            vector = mean_pool(item.states)
            if request.normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            results.append(EmbedResult(vector.astype(np.float32), item.usage))
        return encoded.served(results)

    def _validate(self, texts: Sequence[str]) -> None:
        if not self.ready:
            raise NotReady("the server is warming up")
        if not texts:
            raise ValidationError("inputs must hold at least one text")
        if len(texts) > self.limits.max_inputs:
            raise PayloadTooLarge(
                f"{len(texts)} inputs in one request; the limit is {self.limits.max_inputs}"
            )
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValidationError(f"input {index} is empty")
            if len(text) > self.limits.max_input_chars:
                raise PayloadTooLarge(
                    f"input {index} has {len(text)} characters; the limit is {self.limits.max_input_chars}"
                )

    async def _encode(
        self, texts: list[str], timeout_s: float | None, truncate: bool = True
    ) -> _EncodedRequest:
        self._validate(texts)
        started = time.monotonic()
        timeout = self.limits.default_timeout_s if timeout_s is None else timeout_s
        deadline = started + timeout
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(self._tokenize_pool, self.tokenizer.encode_batch, texts)
        tokenize_s = time.monotonic() - started
        self.metrics.tokenize_seconds.observe(tokenize_s)
        if not truncate:
            for index, item in enumerate(tokens):
                if item.dropped_tokens:
                    raise PayloadTooLarge(
                        f"input {index} has {item.length + item.dropped_tokens} tokens; the limit "
                        f"is {self.tokenizer.max_length} (set truncate to true to cut it)"
                    )
        self._admit(tokens, deadline)
        futures = [self.batcher.submit(item.ids, deadline) for item in tokens]
        for item in tokens:
            self.metrics.input_tokens.observe(item.length)
        try:
            outputs = await asyncio.wait_for(
                asyncio.gather(*futures), timeout=max(deadline - time.monotonic(), 0.0)
            )
        except TimeoutError:
            self.metrics.rejections.labels("deadline").inc()
            raise DeadlineExceeded(f"no result within the request's {timeout:g} s deadline") from None
        finally:
            for future in futures:
                future.cancel()  # a no-op for finished ones; frees queue slots for the rest
        return _EncodedRequest(
            items=[_Encoded(tok, out.states) for tok, out in zip(tokens, outputs, strict=True)],
            started=started,
            tokenize_s=tokenize_s,
            queue_s=max(out.queue_s for out in outputs),
            inference_s=max(out.inference_s for out in outputs),
        )

    def _admit(self, tokens: list[TokenizedText], deadline: float) -> None:
        """All of a request's inputs are admitted, or none: nothing is left half-queued."""
        if not self.batcher.queue.has_room(len(tokens), sum(item.length for item in tokens)):
            self.metrics.rejections.labels("queue_full").inc()
            raise Overloaded("the server is at capacity", retry_after_s=self.batcher.estimated_wait_s())
        own_cost = sum(self.batcher.latency.predict(1, item.length) for item in tokens)
        own_cost /= min(self.batcher.runtimes, len(tokens))
        now = time.monotonic()
        if now + own_cost > deadline:
            self.metrics.rejections.labels("deadline").inc()
            raise DeadlineExceeded(
                f"the deadline cannot be met: these inputs need about {own_cost * 1000:.0f} ms"
            )
        wait = self.batcher.estimated_wait_s()
        if now + wait + own_cost > deadline:
            self.metrics.rejections.labels("deadline_queue").inc()
            raise Overloaded(
                f"the queue ahead would take about {wait * 1000:.0f} ms, past the deadline",
                retry_after_s=wait,
            )
