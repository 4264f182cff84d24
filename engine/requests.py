"""Typed requests and results: what transports hand the service and get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from engine.documents import Side, Strategy
from engine.queue import Priority
from engine.tasks.classify import LabelScore
from engine.tasks.ner import Aggregation, Entity
from engine.tasks.summarize import Selection

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class LongInput:
    """How inputs longer than one window are read. Unset fields take the task's defaults: a text
    that fits the model is read whole; a longer one is split into windows of the task's trained
    size (or 256 tokens, overlapping by 32)."""

    strategy: Strategy = "chunk"
    side: Side = "right"  # truncate: the end that is cut
    window: int | None = None  # tokens per window, [CLS] and [SEP] included
    stride: int | None = None  # text tokens between window starts (chunk)


@dataclass(frozen=True, slots=True)
class ClassifyRequest:
    texts: list[str]
    task: str | None = None  # None: the bundle's default classification task
    top_k: int = 1
    raw_scores: bool = False
    truncate: bool = True  # False: an input over the model's maximum is refused
    timeout_s: float | None = None
    cache: bool = True  # False: computed afresh, and not stored
    priority: Priority = "normal"
    long_input: LongInput | None = None  # None: truncate at the model's maximum (or refuse, per `truncate`)
    return_windows: bool = False  # chunk: each window's scores too


@dataclass(frozen=True, slots=True)
class NerRequest:
    texts: list[str]
    task: str | None = None
    aggregation: Aggregation = "simple"
    timeout_s: float | None = None
    cache: bool = True
    priority: Priority = "normal"
    long_input: LongInput = field(default_factory=LongInput)


@dataclass(frozen=True, slots=True)
class SummarizeRequest:
    text: str
    task: str | None = None
    selection: Selection = field(default_factory=Selection)
    window: int | None = None
    stride: int | None = None
    timeout_s: float | None = None
    cache: bool = True
    priority: Priority = "normal"


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    texts: list[str]
    normalize: bool = True
    truncate: bool = True
    timeout_s: float | None = None
    cache: bool = True
    priority: Priority = "normal"


@dataclass(frozen=True, slots=True)
class Timings:
    """Where a request's time went, in seconds (the longest of its inputs for queue/inference)."""

    total_s: float
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Served(Generic[R]):
    results: list[R]
    timings: Timings
    cache_hits: int = 0  # inputs whose result or encoder states came from the cache


@dataclass(frozen=True, slots=True)
class Usage:
    tokens: int  # of the text (and special tokens) read by the encoder
    truncated_tokens: int
    windows: int = 1


@dataclass(frozen=True, slots=True)
class WindowScores:
    start: int  # character span of the window in the text
    end: int
    weight: float  # its share in the aggregate
    labels: list[LabelScore]


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    labels: list[LabelScore]
    usage: Usage
    windows: list[WindowScores] | None = None


@dataclass(frozen=True, slots=True)
class NerResult:
    entities: list[Entity]
    usage: Usage


@dataclass(frozen=True, slots=True)
class EmbedResult:
    embedding: np.ndarray
    usage: Usage


@dataclass(frozen=True, slots=True)
class SummarySentence:
    index: int  # among the document's sentences
    text: str
    start: int
    end: int
    score: float


@dataclass(frozen=True, slots=True)
class SummarizeResult:
    sentences: list[SummarySentence]
    total_sentences: int
    usage: Usage


@dataclass(frozen=True, slots=True)
class SummarizeProgress:
    windows_done: int
    windows_total: int


@dataclass(frozen=True, slots=True)
class SummarizeDone:
    result: SummarizeResult
    timings: Timings
    cache_hits: int


SummarizeEvent = SummarizeProgress | SummarySentence | SummarizeDone
