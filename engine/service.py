"""The engine's face to transports: validate -> tokenize -> admit -> batch -> task heads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic

import numpy as np

from engine.attention import sparsity_ratio
from engine.batcher import Batcher, EncodedInput
from engine.bundle import Bundle, TaskKind
from engine.cache import codec
from engine.cache.keys import CacheKeys
from engine.cache.pool import CachePool
from engine.coalesce import InFlight
from engine.errors import DeadlineExceeded, NotReady, Overloaded, PayloadTooLarge, ValidationError
from engine.metrics import EngineMetrics
from engine.queue import Priority
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

WAIT_HEADROOM = 2.0


@dataclass(frozen=True)
class ServiceLimits:
    max_inputs: int = 64
    max_input_chars: int = 100_000
    default_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class _Encoded:
    tokens: TokenizedText
    states: np.ndarray  # [tokens, hidden]
    pooled: np.ndarray  # [hidden], their mean
    logits: dict[str, np.ndarray]  # per classification task, when computed with the batch

    @property
    def usage(self) -> Usage:
        return Usage(tokens=self.tokens.length, truncated_tokens=self.tokens.dropped_tokens)


@dataclass(frozen=True, slots=True)
class _EncodedRequest:
    items: list[_Encoded]
    tokenize_s: float
    queue_s: float  # the longest of the inputs computed for this request (0 if none was)
    inference_s: float
    cache_hits: int  # inputs whose states came from the cache

    def timings(self, started: float) -> Timings:
        total = time.monotonic() - started
        return Timings(total, self.tokenize_s, self.queue_s, self.inference_s)


@dataclass(frozen=True, slots=True)
class _Options:
    timeout_s: float | None
    truncate: bool = True  # False: an input over the model's maximum is refused
    cache: bool = True  # False: neither read nor write the cache (in-flight work is still shared)
    priority: Priority = "normal"


@dataclass(frozen=True, slots=True)
class _ResultCodec(Generic[R]):
    """How one task's results are cached: the key scope (task and every parameter that changes
    the output) and the codec."""

    scope: str
    encode: Callable[[R], bytes]
    decode: Callable[[str, bytes], R]  # (the input text, the cached value)


def _checked_states(value: bytes, length: int) -> np.ndarray:
    states = codec.decode_states(value)
    if states.shape[0] != length:
        raise codec.DecodeError(f"cached states have {states.shape[0]} rows for {length} tokens")
    return states


class Service:
    def __init__(
        self,
        bundle: Bundle,
        tokenizer: TextTokenizer,
        batcher: Batcher,
        metrics: EngineMetrics,
        limits: ServiceLimits,
        tokenizer_threads: int = 1,
        *,
        cache: CachePool | None = None,
        coalesce: bool = True,
    ) -> None:
        """`cache`: the result and state cache (None: off). `coalesce`: identical inputs in flight
        at the same time are encoded once."""
        self.bundle = bundle
        self.cache = cache
        self._inflight: InFlight[EncodedInput] | None = InFlight() if coalesce else None
        self._state_keys = cache.keys if cache is not None else CacheKeys("local", bundle.manifest.version)
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits
        self.ready = False
        self._tokenize_pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tokenize")
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="cache-encode")
        self.classifiers: dict[str, Classifier] = {}
        self.token_classifiers: dict[str, TokenClassifier] = {}
        for name, spec in bundle.manifest.tasks.items():
            head = MlpHead.load(bundle.path(spec.head))
            if spec.kind == "classification":
                self.classifiers[name] = Classifier(head, spec.labels)
            else:
                self.token_classifiers[name] = TokenClassifier(head, spec.labels)
        batcher.set_pooled_heads(self._classification_logits)

    def _classification_logits(self, pooled: np.ndarray) -> dict[str, np.ndarray]:
        return {name: classifier.head.logits(pooled) for name, classifier in self.classifiers.items()}

    async def start(self) -> None:
        """Warm every runtime over the batch shapes, off the loop; then become ready."""
        if self.cache is not None:
            self.cache.start()
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.warm_up)
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.batcher.close()
        if self.cache is not None:
            await self.cache.close()
        self._tokenize_pool.shutdown(wait=True)
        self._encode_pool.shutdown(wait=True)

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
        task = self.task_name(request.task, "classification")
        classifier = self.classifiers[task]
        if request.top_k < 1:
            raise ValidationError("top_k must be at least 1")
        top_k = min(request.top_k, len(classifier.labels))  # as the HF pipeline: at most every label

        def head(_text: str, item: _Encoded) -> ClassifyResult:
            labels = classifier.top_k(
                item.pooled, top_k, raw=request.raw_scores, logits=item.logits.get(task)
            )
            return ClassifyResult(labels, item.usage)

        scope = f"{task}:k{top_k}:raw{request.raw_scores:d}:trunc{request.truncate:d}"
        return await self._serve(
            request.texts,
            _ResultCodec(scope, codec.encode_classify, lambda _text, value: codec.decode_classify(value)),
            head,
            _Options(request.timeout_s, request.truncate, request.cache, request.priority),
        )

    async def ner(self, request: NerRequest) -> Served[NerResult]:
        task = self.task_name(request.task, "token-classification")
        classifier = self.token_classifiers[task]
        if request.aggregation not in AGGREGATIONS:
            raise ValidationError(f"aggregation_strategy must be one of {', '.join(AGGREGATIONS)}")

        def head(text: str, item: _Encoded) -> NerResult:
            entities = classifier.entities(text, item.tokens, item.states, request.aggregation)
            return NerResult(entities, item.usage)

        return await self._serve(
            request.texts,
            _ResultCodec(f"{task}:{request.aggregation}", codec.encode_ner, codec.decode_ner),
            head,
            _Options(request.timeout_s, cache=request.cache, priority=request.priority),
        )

    async def embed(self, request: EmbedRequest) -> Served[EmbedResult]:
        self._validate(request.texts)
        started = time.monotonic()
        options = _Options(request.timeout_s, request.truncate, request.cache, request.priority)
        encoded = await self._encode(request.texts, options, started)
        results = []
        for item in encoded.items:
            vector = item.pooled
            if request.normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            results.append(EmbedResult(vector.astype(np.float32), item.usage))
        return Served(results, encoded.timings(started), encoded.cache_hits)

    async def flush_cache(self) -> int:
        """Empty the in-process cache and this namespace's Redis keys; the Redis keys deleted."""
        return 0 if self.cache is None else await self.cache.flush()

    async def _serve(
        self,
        texts: list[str],
        results_codec: _ResultCodec[R],
        head: Callable[[str, _Encoded], R],
        options: _Options,
    ) -> Served[R]:
        """Cached results where there are, the encoder and `head` for the rest."""
        self._validate(texts)
        started = time.monotonic()
        pool = self.cache if options.cache else None
        results: list[R | None] = [None] * len(texts)
        keys: list[str] = []
        if pool is not None:
            keys = [pool.keys.result(results_codec.scope, text) for text in texts]
            results = await pool.get_many(
                keys, "result", lambda index, value: results_codec.decode(texts[index], value)
            )
        missing = [index for index, result in enumerate(results) if result is None]
        if not missing:
            return Served(
                [r for r in results if r is not None], Timings(time.monotonic() - started), len(texts)
            )
        encoded = await self._encode([texts[i] for i in missing], options, started)
        for index, item in zip(missing, encoded.items, strict=True):
            results[index] = head(texts[index], item)
        if pool is not None:
            pool.put_many(
                [(keys[i], results_codec.encode(result)) for i in missing if (result := results[i])],
                "result",
            )
        hits = len(texts) - len(missing) + encoded.cache_hits
        return Served([r for r in results if r is not None], encoded.timings(started), hits)

    def unready_reason(self) -> str | None:
        """Why this service cannot take new work now, or None."""
        if self.batcher.fatal is not None:
            return f"the encoder runtime failed: {self.batcher.fatal}"
        if not self.ready:
            return "the server is warming up"
        return None

    def _validate(self, texts: Sequence[str]) -> None:
        if (reason := self.unready_reason()) is not None:
            raise NotReady(reason)
        if not texts:
            raise ValidationError("inputs must hold at least one text")
        if len(texts) > self.limits.max_inputs:
            raise PayloadTooLarge(
                f"{len(texts)} inputs in one request; the limit is {self.limits.max_inputs}"
            )
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValidationError(f"input {index} is empty")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:  # JSON may carry lone surrogates ("\ud800")
                    raise ValidationError(
                        f"input {index} is not valid Unicode: a lone surrogate at character {error.start}"
                    ) from None
            if len(text) > self.limits.max_input_chars:
                raise PayloadTooLarge(
                    f"input {index} has {len(text)} characters; the limit is {self.limits.max_input_chars}"
                )

    async def _encode(self, texts: list[str], options: _Options, started: float) -> _EncodedRequest:
        """Encoder states of `texts`: cached ones, ones in flight for another request, new ones."""
        timeout = self.limits.default_timeout_s if options.timeout_s is None else options.timeout_s
        deadline = started + timeout
        loop = asyncio.get_running_loop()
        tokenize_started = time.monotonic()
        tokens = await loop.run_in_executor(self._tokenize_pool, self.tokenizer.encode_batch, texts)
        tokenize_s = time.monotonic() - tokenize_started
        self.metrics.tokenize_seconds.observe(tokenize_s)
        for item in tokens:
            self.metrics.input_tokens.observe(item.length)
        if not options.truncate:
            for index, item in enumerate(tokens):
                if item.dropped_tokens:
                    raise PayloadTooLarge(
                        f"input {index} has {item.length + item.dropped_tokens} tokens; the limit "
                        f"is {self.tokenizer.max_length} (set truncate to true to cut it)"
                    )
        pool = self.cache if options.cache else None
        keys = [self._state_keys.states(item.ids) for item in tokens]
        states: list[np.ndarray | None] = [None] * len(tokens)
        if pool is not None:
            states = await pool.get_many(
                keys, "states", lambda index, value: _checked_states(value, tokens[index].length)
            )
        missing = [index for index, found in enumerate(states) if found is None]
        cache_hits = len(tokens) - len(missing)
        waiting = self._compute(missing, tokens, keys, deadline, pool, options.priority)
        if waiting:
            try:
                outputs = await asyncio.wait_for(
                    asyncio.gather(*waiting.values()), timeout=max(deadline - time.monotonic(), 0.0)
                )
            except TimeoutError:
                self.metrics.rejections.labels("deadline").inc()
                raise DeadlineExceeded(f"no result within the request's {timeout:g} s deadline") from None
            finally:
                for future in waiting.values():
                    future.cancel()  # a no-op for finished ones; frees queue slots for the rest
            computed = dict(zip(waiting, outputs, strict=True))
            sparsity = self.metrics.attention_sparsity.labels(self.bundle.manifest.name)
            for index in computed:
                sparsity.observe(sparsity_ratio(self.bundle.manifest.attention, tokens[index].length))
        else:
            computed = {}
        items = []
        for index, (tok, found) in enumerate(zip(tokens, states, strict=True)):
            if index in computed:
                output = computed[index]
                items.append(_Encoded(tok, output.states, output.pooled, output.logits))
            else:
                assert found is not None  # every input was found in the cache or computed
                items.append(_Encoded(tok, found, mean_pool(found), {}))
        return _EncodedRequest(
            items=items,
            tokenize_s=tokenize_s,
            queue_s=max((out.queue_s for out in computed.values()), default=0.0),
            inference_s=max((out.inference_s for out in computed.values()), default=0.0),
            cache_hits=cache_hits,
        )

    def _compute(
        self,
        indices: list[int],
        tokens: list[TokenizedText],
        keys: list[str],
        deadline: float,
        pool: CachePool | None,
        priority: Priority = "normal",
    ) -> dict[int, asyncio.Future[EncodedInput]]:
        """Futures of the states of `tokens[indices]`: joined to identical work in flight where
        there is some, else submitted (all of the new inputs admitted, or none)."""
        waiting: dict[int, asyncio.Future[EncodedInput]] = {}
        if not indices:
            return waiting
        inflight = self._inflight
        new: dict[str, int] = {}
        repeats: list[int] = []  # repeats inside this request: they join the first once it is submitted
        try:
            for index in indices:
                joined = inflight.join(keys[index], deadline) if inflight is not None else None
                if joined is not None:
                    waiting[index] = joined
                    self.metrics.coalesced.inc()
                elif inflight is None:
                    new[str(index)] = index
                elif keys[index] in new:
                    repeats.append(index)
                else:
                    new[keys[index]] = index
            if new:
                self._admit([tokens[i] for i in new.values()], deadline, priority)
            for key, index in new.items():
                work = self.batcher.submit(tokens[index].ids, deadline, priority)
                if pool is not None:
                    work.add_done_callback(self._store_states(pool, keys[index]))
                waiting[index] = work if inflight is None else inflight.start(key, work, self._extender(work))
            for index in repeats:
                assert inflight is not None
                waiting[index] = inflight.join(keys[index], deadline) or waiting[new[keys[index]]]
                self.metrics.coalesced.inc()
        except BaseException:
            for future in waiting.values():
                future.cancel()  # a refused request leaves nothing behind in the queue or in flight
            raise
        return waiting

    def _extender(self, work: asyncio.Future[EncodedInput]) -> Callable[[float], None]:
        return lambda deadline: self.batcher.extend_deadline(work, deadline)

    def _store_states(self, pool: CachePool, key: str) -> Callable[[asyncio.Future[EncodedInput]], None]:
        """Cache the states once computed. The bfloat16 conversion runs on a worker thread: on the
        event loop it was the largest single cost of a cached server under load (12% of the loop)."""

        def stored(encoding: asyncio.Future[bytes]) -> None:
            if not encoding.cancelled() and encoding.exception() is None:
                pool.put_many([(key, encoding.result())], "states")

        def store(work: asyncio.Future[EncodedInput]) -> None:
            if not work.cancelled() and work.exception() is None:
                loop = asyncio.get_running_loop()
                encoding = loop.run_in_executor(self._encode_pool, codec.encode_states, work.result().states)
                encoding.add_done_callback(stored)

        return store

    def _admit(self, tokens: list[TokenizedText], deadline: float, priority: Priority = "normal") -> None:
        """All of a request's inputs are admitted, or none: nothing is left half-queued."""
        if not self.batcher.queue.has_room(len(tokens), sum(item.length for item in tokens), priority):
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
        # The estimate is a mean; waits vary around it. Admitting only what the mean says would
        # finish in half the time left keeps the admitted tail inside the deadline (measured at 3x
        # capacity: a third of those admitted on the mean alone timed out; see test_overload.py).
        if now + WAIT_HEADROOM * wait + own_cost > deadline:
            self.metrics.rejections.labels("deadline_queue").inc()
            raise Overloaded(
                f"the queue ahead would take about {wait * 1000:.0f} ms, past the deadline",
                retry_after_s=wait,
            )
