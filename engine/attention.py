"""What the served encoder's attention pattern costs: the sparsity ratio of a sequence,
1 - attended (query, key) pairs / n^2 over its n real tokens.

A sparse encoder measures it in its graph (the "sparsity" output), and that value is used. This
is the fallback for encoders that do not, from the bundle's declared pattern (engine/bundle.py
AttentionSpec): dense attends to every pair (ratio 0); local+global attends, per query, to the
keys of its own and its two neighbouring blocks of `window` tokens plus the global tokens
([CLS] + `global_tokens`, counted as if outside those blocks: an upper bound on attended pairs,
so a lower bound on sparsity). Batches no longer than the pattern's dense limit are dense.
"""

from __future__ import annotations

from engine.bundle import AttentionSpec


def sparsity_ratio(spec: AttentionSpec, length: int) -> float:
    if attention_branch(spec, length) == "dense" or spec.window is None:
        return 0.0
    window = spec.window
    n = length
    attended = 0
    for start in range(0, n, window):
        queries = min(window, n - start)
        keys = min(n, start + 2 * window) - max(0, start - window)
        attended += queries * min(n, keys + 1 + spec.global_tokens)
    return 1.0 - attended / (n * n)


def attention_branch(spec: AttentionSpec, length: int) -> str:
    """Which branch of the encoder reads an input of `length` tokens: "sparse" or "dense" (batches
    never mix the two: attention_boundaries)."""
    limit = spec.dense_limit
    return "dense" if limit is None or length <= limit else "sparse"


def attention_boundaries(spec: AttentionSpec) -> tuple[int, ...]:
    """Batch lengths where the encoder's computation changes: up to its dense limit a batch
    takes the dense branch, past it the sparse one. Past 2 x window the two differ, so the
    batcher must not mix inputs from both sides (engine/queue.py BatchLimits)."""
    limit = spec.dense_limit
    if limit is None or spec.window is None:
        return ()
    return (limit,) if limit > 2 * spec.window else ()
