"""Typed requests and results: what transports hand the service and get back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from engine.queue import Priority
from engine.tasks.classify import LabelScore
from engine.tasks.ner import Aggregation, Entity

R = TypeVar("R")


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


@dataclass(frozen=True, slots=True)
class NerRequest:
    texts: list[str]
    task: str | None = None
    aggregation: Aggregation = "simple"
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
    tokens: int
    truncated_tokens: int


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    labels: list[LabelScore]
    usage: Usage


@dataclass(frozen=True, slots=True)
class NerResult:
    entities: list[Entity]
    usage: Usage


@dataclass(frozen=True, slots=True)
class EmbedResult:
    embedding: np.ndarray
    usage: Usage
