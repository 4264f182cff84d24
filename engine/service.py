"""The engine's face to transports: validate -> tokenize -> admit -> batch -> task heads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic

import numpy as np
from prometheus_client import Histogram

from engine.attention import attention_branch, sparsity_ratio
from engine.batcher import Batcher, EncodedInput
from engine.bundle import Bundle, TaskKind
from engine.cache import codec
from engine.cache.keys import CacheKeys
from engine.cache.pool import CachePool
from engine.coalesce import InFlight
from engine.documents import (
    DEFAULT_WINDOW,
    SPECIAL_TOKENS,
    LongInputPolicy,
    WindowedDocument,
    document_as_input,
    document_states,
    owner_windows,
    split,
    window_borders,
)
from engine.errors import DeadlineExceeded, NotReady, Overloaded, PayloadTooLarge, ValidationError
from engine.metrics import EngineMetrics
from engine.queue import Priority, demoted
from engine.requests import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    LongInput,
    NerRequest,
    NerResult,
    R,
    Served,
    SummarizeDone,
    SummarizeEvent,
    SummarizeProgress,
    SummarizeRequest,
    SummarizeResult,
    SummarySentence,
    Timings,
    Usage,
    WindowScores,
)
from engine.sentences import sentence_spans, token_sentences
from engine.tasks.classify import Classifier, WindowAggregator
from engine.tasks.heads import MlpHead, mean_pool
from engine.tasks.ner import AGGREGATIONS, TokenClassifier
from engine.tasks.summarize import SentenceScore, SentenceScorer, select, sentence_features
from engine.tokenization import TextTokenizer, TokenizedText

WAIT_HEADROOM = 2.5


@dataclass(frozen=True)
class ServiceLimits:
    max_inputs: int = 64
    max_input_chars: int = 500_000
    default_timeout_s: float = 30.0
    max_document_tokens: int = 65_536
    # A long document's windows are queued a few at a time, as earlier ones finish: the queue
    # stays fair to other requests, and a cancelled document leaves at most this much behind.
    document_tokens_in_flight: int = 16_384


@dataclass(frozen=True, slots=True)
class _ReadDocument:
    """A document's windows and their states."""

    windowed: WindowedDocument
    states: list[np.ndarray]  # [window tokens, hidden] per window
    owner: np.ndarray  # per document token, the window it is read from (documents.owner_windows)

    @classmethod
    def of(cls, windowed: WindowedDocument, states: list[np.ndarray]) -> _ReadDocument:
        return cls(windowed, states, owner_windows(windowed.windows, windowed.document.length))

    @property
    def usage(self) -> Usage:
        windowed = self.windowed
        return Usage(windowed.encoded_tokens, windowed.dropped_tokens, len(windowed.windows))

    def window_means(self) -> np.ndarray:
        return np.stack([states.mean(axis=0) for states in self.states])

    def token_states(self) -> np.ndarray:
        """[document tokens, hidden], each token from the window where it saw most context."""
        return document_states(self.windowed.windows, self.states, self.owner)


@dataclass(slots=True)
class _EventClock:
    """Time to a stream's first event, and between its events."""

    started: float
    first: Histogram
    gap: Histogram
    last: float | None = None

    def tick(self) -> None:
        now = time.monotonic()
        if self.last is None:
            self.first.observe(now - self.started)
        else:
            self.gap.observe(now - self.last)
        self.last = now


@dataclass(slots=True)
class _WindowTally:
    """Cache hits and the longest queue and inference times over a request's windows."""

    started: float
    tokenize_s: float = 0.0
    hits: int = 0
    queue_s: float = 0.0
    inference_s: float = 0.0

    def timings(self) -> Timings:
        return Timings(time.monotonic() - self.started, self.tokenize_s, self.queue_s, self.inference_s)

    def add(self, output: EncodedInput | None) -> None:
        if output is None:
            self.hits += 1
        else:
            self.queue_s = max(self.queue_s, output.queue_s)
            self.inference_s = max(self.inference_s, output.inference_s)


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


def _within_budget(windows: list[TokenizedText], budget: int) -> list[TokenizedText]:
    """The leading windows whose tokens fit `budget` (at least one)."""
    total = 0
    for count, window in enumerate(windows):
        total += window.length
        if total > budget and count > 0:
            return windows[:count]
    return windows


def _char_span(tokens: TokenizedText) -> tuple[int, int]:
    """The characters a window covers (its first and last text tokens)."""
    real = [span for span, word in zip(tokens.offsets, tokens.word_ids, strict=True) if word is not None]
    return (real[0][0], real[-1][1]) if real else (0, 0)


def _long_input_scope(long_input: LongInput) -> str:
    """The part of a result's cache key that says how a long input was read."""
    return f"{long_input.strategy}:{long_input.side}:w{long_input.window}:s{long_input.stride}"


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
        self.classifiers: dict[str, Classifier] = {}
        self.aggregators: dict[str, WindowAggregator] = {}
        self.token_classifiers: dict[str, TokenClassifier] = {}
        self.summarizers: dict[str, SentenceScorer] = {}
        for name, spec in bundle.manifest.tasks.items():
            head = MlpHead.load(bundle.path(spec.head))
            if spec.kind == "classification":
                self.classifiers[name] = Classifier(head, spec.labels)
                if spec.aggregator is not None:
                    self.aggregators[name] = WindowAggregator.load(bundle.path(spec.aggregator))
            elif spec.kind == "summarization":
                self.summarizers[name] = SentenceScorer(head, spec.labels)
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

        if request.long_input is not None:
            return await self._classify_documents(request, task, top_k)
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

        options = _Options(request.timeout_s, cache=request.cache, priority=request.priority)

        async def compute(texts: list[str]) -> Served[NerResult]:
            read, tally = await self._read_texts(texts, request.long_input, task, options)
            results = []
            for text, document in zip(texts, read, strict=True):
                tokens = document_as_input(document.windowed.document)
                borders = window_borders(document.owner)
                entities = classifier.entities(
                    text, tokens, document.token_states(), request.aggregation, borders
                )
                results.append(NerResult(entities, document.usage))
            return Served(results, tally.timings(), tally.hits)

        scope = f"{task}:agg{request.aggregation}:{_long_input_scope(request.long_input)}"
        return await self._cached_results(
            request.texts, _ResultCodec(scope, codec.encode_ner, codec.decode_ner), options, compute
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

    async def _classify_documents(
        self, request: ClassifyRequest, task: str, top_k: int
    ) -> Served[ClassifyResult]:
        """Classification of documents read in windows: the task's aggregator pools the windows'
        states (attention weights where trained, else the mean) before its head."""
        assert request.long_input is not None
        long_input = request.long_input
        options = _Options(request.timeout_s, cache=request.cache, priority=request.priority)

        async def compute(texts: list[str]) -> Served[ClassifyResult]:
            read, tally = await self._read_texts(texts, long_input, task, options)
            results = [self._classify_document(document, request, task, top_k) for document in read]
            return Served(results, tally.timings(), tally.hits)

        if request.return_windows:  # the cached form keeps the labels only
            return await compute(request.texts)
        scope = f"{task}:k{top_k}:raw{request.raw_scores:d}:{_long_input_scope(long_input)}"
        decode = _ResultCodec(scope, codec.encode_classify, lambda _text, value: codec.decode_classify(value))
        return await self._cached_results(request.texts, decode, options, compute)

    def _classify_document(
        self, document: _ReadDocument, request: ClassifyRequest, task: str, top_k: int
    ) -> ClassifyResult:
        classifier = self.classifiers[task]
        aggregator = self.aggregators.get(task, WindowAggregator())
        means = document.window_means()
        weights = aggregator.weights(means)
        labels = classifier.top_k(weights @ means, top_k, raw=request.raw_scores)
        per_window = None
        if request.return_windows:
            per_window = [
                WindowScores(
                    *_char_span(window.tokens),
                    float(weight),
                    classifier.top_k(mean, top_k, raw=request.raw_scores),
                )
                for window, weight, mean in zip(document.windowed.windows, weights, means, strict=True)
            ]
        return ClassifyResult(labels, document.usage, per_window)

    async def summarize(self, request: SummarizeRequest) -> Served[SummarizeResult]:
        result: Served[SummarizeResult] | None = None
        async with contextlib.aclosing(self.summarize_events(request)) as events:
            async for event in events:
                if isinstance(event, SummarizeDone):
                    result = Served([event.result], event.timings, event.cache_hits)
        assert result is not None
        return result

    async def summarize_events(self, request: SummarizeRequest) -> AsyncGenerator[SummarizeEvent, None]:
        clock = _EventClock(
            time.monotonic(),
            self.metrics.stream_first_event.labels(request.task or "summarize"),
            self.metrics.stream_event_gap.labels(request.task or "summarize"),
        )
        # aclosing: a consumer that stops early closes the inner generator now, not at GC time,
        # so its queued windows leave the queue at once.
        async with contextlib.aclosing(self._summarize_events(request)) as events:
            async for event in events:
                clock.tick()
                yield event

    async def _summarize_events(self, request: SummarizeRequest) -> AsyncGenerator[SummarizeEvent, None]:
        """Progress as windows finish, then the selected sentences, then the whole result. A
        consumer that stops listening (a client gone) stops the work: the windows it still had
        queued leave the queue."""
        task = self.task_name(request.task, "summarization")
        scorer = self.summarizers[task]
        selection = request.selection
        if selection.sentences is not None and selection.sentences < 1:
            raise ValidationError("sentences must be at least 1")
        if selection.sentences is None and not 0 < (selection.ratio or 0) <= 1:
            raise ValidationError("ratio must be in (0, 1]")
        self._validate([request.text])
        tally = _WindowTally(time.monotonic())
        # A summary is document work: its windows queue a level below interactive inputs.
        options = _Options(request.timeout_s, cache=request.cache, priority=demoted(request.priority))
        long_input = LongInput("chunk", window=request.window, stride=request.stride)
        task_window = self.bundle.manifest.tasks[task].window
        [document] = await self._split([request.text], long_input, task_window, tally)
        loop = asyncio.get_running_loop()
        # Sentence splitting (~0.6 ms a sentence) runs while the windows are encoded.
        spans_future = loop.run_in_executor(self._tokenize_pool, sentence_spans, request.text)
        windows = document.windows
        states: list[np.ndarray | None] = [None] * len(windows)
        deadline = tally.started + self._timeout(options)
        try:
            async with contextlib.aclosing(
                self._window_states(
                    [w.tokens for w in windows], options, deadline, first_priority=request.priority
                )
            ) as stream:
                async for index, window_states, output in stream:
                    states[index] = window_states
                    tally.add(output)
                    yield SummarizeProgress(sum(x is not None for x in states), len(windows))
            spans = await spans_future
        finally:
            spans_future.cancel()
        read = _ReadDocument.of(document, [x for x in states if x is not None])
        owners = token_sentences(document.document.offsets, spans)
        scores: list[float] = []
        if spans:
            scores = scorer.scores(sentence_features(read.token_states(), owners, len(spans))).tolist()
        scored = [
            SentenceScore(i, start, end, float(score))
            for i, ((start, end), score) in enumerate(zip(spans, scores, strict=True))
        ]
        chosen = [
            SummarySentence(s.index, request.text[s.start : s.end], s.start, s.end, s.score)
            for s in select(request.text, scored, selection)
        ]
        for sentence in chosen:
            yield sentence
        yield SummarizeDone(SummarizeResult(chosen, len(spans), read.usage), tally.timings(), tally.hits)

    def _timeout(self, options: _Options) -> float:
        return self.limits.default_timeout_s if options.timeout_s is None else options.timeout_s

    async def _split(
        self, texts: list[str], long_input: LongInput, task_window: int | None, tally: _WindowTally
    ) -> list[WindowedDocument]:
        loop = asyncio.get_running_loop()
        tokenize_started = time.monotonic()
        documents = await loop.run_in_executor(self._tokenize_pool, self.tokenizer.encode_documents, texts)
        tally.tokenize_s = time.monotonic() - tokenize_started
        self.metrics.tokenize_seconds.observe(tally.tokenize_s)
        out = []
        for index, document in enumerate(documents):
            if document.length > self.limits.max_document_tokens:
                limit = self.limits.max_document_tokens
                raise PayloadTooLarge(f"input {index} has {document.length} tokens; the limit is {limit}")
            policy = self._policy(long_input, task_window, document.length)
            out.append(split(document, policy, self.tokenizer.cls_id, self.tokenizer.sep_id))
            self.metrics.document_windows.observe(len(out[-1].windows))
        return out

    def _policy(self, long_input: LongInput, task_window: int | None, length: int) -> LongInputPolicy:
        """The request's policy with the task's defaults: a text that fits the model is read
        whole; a longer one in windows of the task's trained size, else DEFAULT_WINDOW tokens."""
        most = self.tokenizer.max_length
        window = long_input.window or task_window
        if window is None:
            window = (
                most
                if length + SPECIAL_TOKENS <= most or long_input.strategy == "truncate"
                else DEFAULT_WINDOW
            )
        if window > most:
            raise ValidationError(f"window must be at most the model's {most} tokens")
        try:
            stride = long_input.stride or LongInputPolicy.default_stride(window)
            return LongInputPolicy(long_input.strategy, window, stride, long_input.side)
        except ValueError as error:
            raise ValidationError(str(error)) from None

    async def _read_texts(
        self, texts: list[str], long_input: LongInput, task: str, options: _Options
    ) -> tuple[list[_ReadDocument], _WindowTally]:
        """Every text split by `long_input` (with `task`'s defaults) and all their windows read."""
        self._validate(texts)
        tally = _WindowTally(time.monotonic())
        self._refuse_early(len(texts), tally.started + self._timeout(options), options.priority)
        documents = await self._split(texts, long_input, self.bundle.manifest.tasks[task].window, tally)
        windows = [window.tokens for document in documents for window in document.windows]
        if len(windows) > len(documents):  # documents read in windows queue as document work
            options = dataclasses.replace(options, priority=demoted(options.priority))
        states: list[np.ndarray | None] = [None] * len(windows)
        deadline = tally.started + self._timeout(options)
        async with contextlib.aclosing(self._window_states(windows, options, deadline)) as stream:
            async for index, window_states, output in stream:
                states[index] = window_states
                tally.add(output)
        read = []
        position = 0
        for document in documents:
            count = len(document.windows)
            read.append(
                _ReadDocument.of(document, [x for x in states[position : position + count] if x is not None])
            )
            position += count
        return read, tally

    async def _window_states(
        self,
        windows: list[TokenizedText],
        options: _Options,
        deadline: float,
        first_priority: Priority | None = None,
    ) -> AsyncGenerator[tuple[int, np.ndarray, EncodedInput | None], None]:
        """(index, states, the computation or None for a cache hit) of each window, as each is
        ready. Windows are queued a few at a time; leaving the iteration cancels those queued.
        `first_priority`: the first window's, where it differs (a stream's first event)."""
        pool = self.cache if options.cache else None
        keys, found = await self._cached_states(windows, pool)
        for index, states in enumerate(found):
            if states is not None:
                yield index, states, None
        missing = [index for index, states in enumerate(found) if states is None]
        if not missing:
            return
        budget = self.limits.document_tokens_in_flight
        first = _within_budget([windows[i] for i in missing], budget)
        self._admit([windows[i] for i in missing], deadline, options.priority, first_queued=first)
        in_flight: dict[asyncio.Future[EncodedInput], int] = {}
        queued_tokens = 0
        next_missing = 0
        try:
            while next_missing < len(missing) or in_flight:
                while next_missing < len(missing) and (
                    not in_flight or queued_tokens + windows[missing[next_missing]].length <= budget
                ):
                    index = missing[next_missing]
                    priority = first_priority if next_missing == 0 and first_priority else options.priority
                    futures = self._compute([index], windows, keys, deadline, pool, priority, admitted=True)
                    in_flight[futures[index]] = index
                    queued_tokens += windows[index].length
                    next_missing += 1
                done, _ = await asyncio.wait(
                    in_flight,
                    timeout=max(deadline - time.monotonic(), 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    self.metrics.rejections.labels("deadline").inc()
                    raise DeadlineExceeded(
                        f"no result within the request's {self._timeout(options):g} s deadline"
                    )
                for future in done:
                    index = in_flight.pop(future)
                    queued_tokens -= windows[index].length
                    output = future.result()
                    self._observe_sparsity(output, windows[index].length)
                    yield index, output.states, output
        finally:
            for future in in_flight:
                future.cancel()  # consumer gone, deadline passed or a window failed: the rest leave the queue

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

        async def compute(missing: list[str]) -> Served[R]:
            started = time.monotonic()
            encoded = await self._encode(missing, options, started)
            results = [head(text, item) for text, item in zip(missing, encoded.items, strict=True)]
            return Served(results, encoded.timings(started), encoded.cache_hits)

        return await self._cached_results(texts, results_codec, options, compute)

    async def _cached_results(
        self,
        texts: list[str],
        results_codec: _ResultCodec[R],
        options: _Options,
        compute: Callable[[list[str]], Awaitable[Served[R]]],
    ) -> Served[R]:
        """The result cache in front of `compute`, which runs on the texts it does not hold."""
        self._validate(texts)
        pool = self.cache if options.cache else None
        if pool is None:
            return await compute(texts)
        started = time.monotonic()
        keys = [pool.keys.result(results_codec.scope, text) for text in texts]
        results = await pool.get_many(
            keys, "result", lambda index, value: results_codec.decode(texts[index], value)
        )
        missing = [index for index, result in enumerate(results) if result is None]
        if not missing:
            return Served(
                [r for r in results if r is not None], Timings(time.monotonic() - started), len(texts)
            )
        served = await compute([texts[i] for i in missing])
        for index, result in zip(missing, served.results, strict=True):
            results[index] = result
        pool.put_many(
            [(keys[i], results_codec.encode(served.results[n])) for n, i in enumerate(missing)], "result"
        )
        timings = dataclasses.replace(served.timings, total_s=time.monotonic() - started)
        hits = len(texts) - len(missing) + served.cache_hits
        return Served([r for r in results if r is not None], timings, hits)

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
        self._refuse_early(len(texts), deadline, options.priority)
        loop = asyncio.get_running_loop()
        tokenize_started = time.monotonic()
        # Ids only: what classification and embeddings use of their tokens. Short texts the fast
        # path reads are tokenized here, on the loop (see TextTokenizer.encode_ids_inline).
        tokens = self.tokenizer.encode_ids_inline(texts)
        if tokens is None:
            tokens = await loop.run_in_executor(self._tokenize_pool, self.tokenizer.encode_ids_batch, texts)
        tokenize_s = time.monotonic() - tokenize_started
        self.metrics.tokenize_seconds.observe(tokenize_s)
        if not options.truncate:
            for index, item in enumerate(tokens):
                if item.dropped_tokens:
                    raise PayloadTooLarge(
                        f"input {index} has {item.length + item.dropped_tokens} tokens; the limit "
                        f"is {self.tokenizer.max_length} (set truncate to true to cut it)"
                    )
        pool = self.cache if options.cache else None
        keys, states = await self._cached_states(tokens, pool)
        missing = [index for index, found in enumerate(states) if found is None]
        cache_hits = len(tokens) - len(missing)
        waiting = self._compute(missing, tokens, keys, deadline, pool, options.priority)
        if waiting:
            try:
                # asyncio.timeout, not wait_for: no task per request around the futures.
                async with asyncio.timeout_at(loop.time() + max(deadline - time.monotonic(), 0.0)):
                    outputs = await asyncio.gather(*waiting.values())
            except TimeoutError:
                self.metrics.rejections.labels("deadline").inc()
                raise DeadlineExceeded(f"no result within the request's {timeout:g} s deadline") from None
            finally:
                for future in waiting.values():
                    future.cancel()  # a no-op for finished ones; frees queue slots for the rest
            computed = dict(zip(waiting, outputs, strict=True))
            for index, output in computed.items():
                self._observe_sparsity(output, tokens[index].length)
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

    async def _cached_states(
        self, tokens: list[TokenizedText], pool: CachePool | None
    ) -> tuple[list[str], list[np.ndarray | None]]:
        """The state-cache keys of encoder inputs, and the states the cache holds for them."""
        for item in tokens:
            self.metrics.input_tokens.observe(item.length)
        keys = [self._state_keys.states(item.ids) for item in tokens]
        if pool is None:
            return keys, [None] * len(tokens)
        states = await pool.get_many(
            keys, "states", lambda index, value: _checked_states(value, tokens[index].length)
        )
        return keys, states

    def _compute(
        self,
        indices: list[int],
        tokens: list[TokenizedText],
        keys: list[str],
        deadline: float,
        pool: CachePool | None,
        priority: Priority = "normal",
        admitted: bool = False,
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
            if new and not admitted:
                self._admit([tokens[i] for i in new.values()], deadline, priority)
            for key, index in new.items():
                work = self.batcher.submit(tokens[index].ids, deadline, priority, admitted)
                if pool is not None:
                    work.add_done_callback(self._store_states(pool, keys[index]))
                if inflight is None:
                    waiting[index] = work
                else:  # with a cache, kept joinable until its states are stored (_store_states)
                    waiting[index] = inflight.start(key, work, self._extender(work), retain=pool is not None)
            for index in repeats:
                assert inflight is not None
                waiting[index] = inflight.join(keys[index], deadline) or waiting[new[keys[index]]]
                self.metrics.coalesced.inc()
        except BaseException:
            for future in waiting.values():
                future.cancel()  # a refused request leaves nothing behind in the queue or in flight
            raise
        return waiting

    def _observe_sparsity(self, output: EncodedInput, length: int) -> None:
        """The ratio the encoder measured, else the one its declared pattern implies; and the
        kept dense attention mass where its batch was verified on the sparse branch."""
        spec = self.bundle.manifest.attention
        ratio = output.sparsity if output.sparsity is not None else sparsity_ratio(spec, length)
        branch = attention_branch(spec, length)
        model = self.bundle.manifest.name
        self.metrics.attention_sparsity.labels(model, branch).observe(ratio)
        if output.kept_attention_mass is not None and branch == "sparse":
            self.metrics.attention_kept_mass.labels(model).observe(output.kept_attention_mass)

    def _extender(self, work: asyncio.Future[EncodedInput]) -> Callable[[float], None]:
        return lambda deadline: self.batcher.extend_deadline(work, deadline)

    def _store_states(self, pool: CachePool, key: str) -> Callable[[asyncio.Future[EncodedInput]], None]:
        """Cache the states once computed, from the loop. The bfloat16 conversion takes ~11 us
        for a 60-token input; handing it to a worker thread cost more than that (the thread used
        0.03-0.05 of a core at 240 inputs/s on its wake-ups and the GIL, and the loop one more
        callback per input)."""

        def store(work: asyncio.Future[EncodedInput]) -> None:
            try:
                if not work.cancelled() and work.exception() is None:
                    pool.put_many([(key, codec.encode_states(work.result().states))], "states")
            finally:
                if self._inflight is not None:
                    self._inflight.forget(key)  # the L1 now answers for it

        return store

    def _refuse_early(self, inputs: int, deadline: float, priority: Priority) -> None:
        """Before tokenizing: refuse what `_admit` would refuse whatever the inputs' lengths (a
        full queue, or a queue that alone outlasts the deadline). Under overload this answers
        429 in a millisecond instead of after a turn in the tokenizer's queue (measured at 3x
        capacity: p99 of refusals 140-180 ms without it), and spends no CPU on doomed work."""
        self._refuse_if_full(inputs, 0, priority)
        self._refuse_if_queue_outlasts(deadline, own_cost=0.0)

    def _refuse_if_full(self, inputs: int, tokens: int, priority: Priority) -> None:
        if not self.batcher.queue.has_room(inputs, tokens, priority):
            self.metrics.rejections.labels("queue_full").inc()
            raise Overloaded("the server is at capacity", retry_after_s=self.batcher.estimated_wait_s())

    def _refuse_if_queue_outlasts(self, deadline: float, own_cost: float) -> None:
        wait = self.batcher.estimated_wait_s()
        # The estimate is a mean; waits vary around it. Admitting only what the mean says would
        # finish in 40% of the time left keeps the admitted tail inside the deadline (measured at 3x
        # capacity: a third of those admitted on the mean alone timed out; with 2x headroom 2% did,
        # with 2.5x 0.1-0.3%; see test_overload.py).
        if time.monotonic() + WAIT_HEADROOM * wait + own_cost > deadline:
            self.metrics.rejections.labels("deadline_queue").inc()
            raise Overloaded(
                f"the queue ahead would take about {wait * 1000:.0f} ms, past the deadline",
                retry_after_s=wait,
            )

    def _admit(
        self,
        tokens: list[TokenizedText],
        deadline: float,
        priority: Priority = "normal",
        first_queued: list[TokenizedText] | None = None,
    ) -> None:
        """All of a request's inputs are admitted, or none: nothing is left half-queued.
        `first_queued`: the part queued at once, when the rest follows as it completes."""
        queued = tokens if first_queued is None else first_queued
        self._refuse_if_full(len(queued), sum(item.length for item in queued), priority)
        own_cost = sum(self.batcher.latency.predict(1, item.length) for item in tokens)
        own_cost /= min(self.batcher.runtimes, len(tokens))
        if time.monotonic() + own_cost > deadline:
            self.metrics.rejections.labels("deadline").inc()
            raise DeadlineExceeded(
                f"the deadline cannot be met: these inputs need about {own_cost * 1000:.0f} ms"
            )
        self._refuse_if_queue_outlasts(deadline, own_cost)
