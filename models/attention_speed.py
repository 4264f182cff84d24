"""Encoder speed of sparse attention against dense, as served: the packaged checkpoint exported
per pattern, per-channel dynamic INT8, ONNX Runtime on one intra-op thread (as each of the
server's runtimes), at 128, 256 and 512 tokens. Run by `sparsebert bench --suite attention`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.runtime.onnx import OnnxEncoderRuntime
from models.bert import AttentionPattern, load_hf_bert
from models.data.packages import minilm_checkpoint
from models.export import export_onnx, quantize_int8

LENGTHS = (128, 256, 384, 512)
PATTERNS = (
    AttentionPattern(),
    AttentionPattern(window=32, global_tokens=8),
    AttentionPattern(window=16, global_tokens=8),
    AttentionPattern(window=16, global_tokens=8, dense_up_to=384),
)


@dataclass(frozen=True)
class SpeedRow:
    pattern: AttentionPattern
    length: int
    batch: int
    ms: float  # median per batch
    sparsity: float  # the graph's own ratio (0 for dense)


def describe(pattern: AttentionPattern) -> str:
    if pattern.window is None:
        return "dense"
    return f"window {pattern.window} + {pattern.global_tokens} global, dense up to {pattern.dense_limit}"


def _time(runtime: OnnxEncoderRuntime, length: int, batch: int, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(length)
    ids = rng.integers(1000, 20000, size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones_like(ids)
    output = runtime.encode(ids, mask)  # warm
    sparsity = float(np.mean(output.sparsity)) if output.sparsity is not None else 0.0
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runtime.encode(ids, mask)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, sparsity


def measure(
    patterns: tuple[AttentionPattern, ...] = PATTERNS,
    lengths: tuple[int, ...] = LENGTHS,
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 15,
    checkpoint: Path | None = None,
) -> list[SpeedRow]:
    checkpoint = checkpoint or minilm_checkpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions: dict[AttentionPattern, OnnxEncoderRuntime] = {}
        for pattern in patterns:
            fp32 = Path(tmp) / "fp32.onnx"
            int8 = Path(tmp) / f"{len(sessions)}.int8.onnx"
            export_onnx(load_hf_bert(checkpoint, pattern), fp32)
            quantize_int8(fp32, int8)
            sessions[pattern] = OnnxEncoderRuntime(int8)  # one intra-op thread, as served
        # Interleaved by shape, so drift of the machine touches every pattern alike.
        for length in lengths:
            for batch in batches:
                for pattern, session in sessions.items():
                    ms, sparsity = _time(session, length, batch, max(3, repeats // batch))
                    rows.append(SpeedRow(pattern, length, batch, ms, sparsity))
    return rows


def table(rows: list[SpeedRow]) -> str:
    dense = {(r.length, r.batch): r.ms for r in rows if r.pattern.window is None}
    lines = [
        "| pattern | tokens | batch | ms per batch | vs dense | sparsity |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = dense[(r.length, r.batch)] / r.ms
        cells = [describe(r.pattern), r.length, r.batch, f"{r.ms:.1f}", f"{ratio:.2f}x", f"{r.sparsity:.3f}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    print("encoder speed, INT8 ONNX Runtime, 1 intra-op thread (vs dense: >1 is faster)")
    print(table(measure()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
