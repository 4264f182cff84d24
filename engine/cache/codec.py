"""The cache's wire format: a fixed header, then a payload of a known shape. Nothing read from
a cache is ever unpickled or evaluated; a value that does not decode is a miss.

    magic b"SBC" | format version (1 byte) | kind (1 byte) | payload

States travel as bfloat16 rows (the top 16 bits of each float32, rounded to nearest even): half
the bytes of float32, and 3-5x cheaper to convert than float16, whose numpy cast is a scalar
software loop here (a 72-token text: 27 vs 87 us to encode, ~8 vs 45 us to decode, on the event
loop). What that costs in accuracy is measured in tests/test_cache_codec.py. Results travel as
orjson, checked field by field.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from engine.requests import ClassifyResult, NerResult, Usage
from engine.tasks.classify import LabelScore
from engine.tasks.ner import Entity

MAGIC = b"SBC"
FORMAT_VERSION = 1
KIND_STATES = 1
KIND_CLASSIFY = 2
KIND_NER = 3
_HEADER = struct.Struct("<3sBB")
_SHAPE = struct.Struct("<II")
# The most rows a cached state may have: the model's positions (a guard against a forged size).
MAX_ROWS = 8192
MAX_COLUMNS = 8192


class DecodeError(ValueError):
    """A cached value that is not one this version wrote: treated as a miss."""


def _header(kind: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, kind)


def _payload(value: bytes, kind: int) -> memoryview:
    if len(value) < _HEADER.size:
        raise DecodeError("value shorter than the header")
    magic, version, found = _HEADER.unpack_from(value)
    if magic != MAGIC or version != FORMAT_VERSION or found != kind:
        raise DecodeError(f"header {magic!r} v{version} kind {found}, expected kind {kind}")
    return memoryview(value)[_HEADER.size :]


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


def encode_states(states: np.ndarray) -> bytes:
    rows, columns = states.shape
    return _header(KIND_STATES) + _SHAPE.pack(rows, columns) + to_bfloat16(states).tobytes()


def decode_states(value: bytes) -> np.ndarray:
    payload = _payload(value, KIND_STATES)
    if len(payload) < _SHAPE.size:
        raise DecodeError("states without a shape")
    rows, columns = _SHAPE.unpack_from(payload)
    if not (0 < rows <= MAX_ROWS and 0 < columns <= MAX_COLUMNS):
        raise DecodeError(f"states of shape {rows}x{columns}")
    body = payload[_SHAPE.size :]
    if len(body) != rows * columns * 2:
        raise DecodeError(f"{len(body)} bytes for {rows}x{columns} bfloat16 states")
    states = from_bfloat16(np.frombuffer(body, dtype="<u2").reshape(rows, columns))
    if not np.isfinite(states).all():
        raise DecodeError("states hold non-finite values")
    return states


def _json(value: bytes, kind: int) -> Any:
    try:
        return orjson.loads(_payload(value, kind))
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"payload is not JSON: {exc}") from None


def _usage(raw: Any) -> Usage:
    match raw:
        case [int() as tokens, int() as truncated] if tokens > 0 and truncated >= 0:
            return Usage(tokens, truncated)
        case [int() as tokens, int() as truncated, int() as windows] if (
            tokens > 0 and truncated >= 0 < windows
        ):
            return Usage(tokens, truncated, windows)
    raise DecodeError("bad usage")


def _usage_fields(usage: Usage) -> list[int]:
    return [usage.tokens, usage.truncated_tokens, usage.windows]


def _number(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise DecodeError("a score is not a number")
    return float(raw)


def encode_classify(result: ClassifyResult) -> bytes:
    labels = [[item.label, item.score] for item in result.labels]
    usage = _usage_fields(result.usage)
    return _header(KIND_CLASSIFY) + orjson.dumps({"labels": labels, "usage": usage})


def decode_classify(value: bytes) -> ClassifyResult:
    match _json(value, KIND_CLASSIFY):
        case {"labels": list() as labels, "usage": usage}:
            scores = []
            for item in labels:
                match item:
                    case [str() as label, score]:
                        scores.append(LabelScore(label, _number(score)))
                    case _:
                        raise DecodeError("bad label")
            return ClassifyResult(scores, _usage(usage))
    raise DecodeError("not a classification result")


def encode_ner(result: NerResult) -> bytes:
    entities = [[e.label, e.score, e.word, e.start, e.end, e.index] for e in result.entities]
    usage = _usage_fields(result.usage)
    return _header(KIND_NER) + orjson.dumps({"entities": entities, "usage": usage})


def decode_ner(text: str, value: bytes) -> NerResult:
    """`text` is the input the result belongs to: every entity must slice it to its word."""
    match _json(value, KIND_NER):
        case {"entities": list() as raw_entities, "usage": usage}:
            entities = []
            for item in raw_entities:
                match item:
                    case [str() as label, score, str() as word, int() as start, int() as end, index] if (
                        0 <= start < end <= len(text) and text[start:end] == word
                    ) and (index is None or isinstance(index, int)):
                        entities.append(Entity(label, _number(score), word, start, end, index))
                    case _:
                        raise DecodeError("bad entity")
            return NerResult(entities, _usage(usage))
    raise DecodeError("not an NER result")
