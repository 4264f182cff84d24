"""What the served encoder's attention pattern costs: the sparsity ratio of a sequence,
1 - attended (query, key) pairs / n^2 over its n real tokens.

For the bundle's declared pattern (engine/bundle.py AttentionSpec): dense attends to every pair
(ratio 0); local+global attends to a band of `window` keys around each query plus every pair
that involves one of `global_tokens` tokens. Global tokens are chosen per sequence by the model,
so this counts them as if they sat outside the band (exact for the first-token [CLS] only; an
upper bound on attended pairs otherwise, so a lower bound on sparsity). A runtime that measures
its own attention mask can report the measured value instead.
"""

from __future__ import annotations

from engine.bundle import AttentionSpec


def sparsity_ratio(spec: AttentionSpec, length: int) -> float:
    if spec.kind == "dense" or spec.window is None or length <= 0:
        return 0.0
    n = length
    half = max(spec.window // 2, 0)
    band = n + 2 * sum(n - d for d in range(1, min(half, n - 1) + 1))
    globals_ = min(spec.global_tokens, n)
    attended = min(n * n, band + 2 * globals_ * n - globals_ * globals_)
    return 1.0 - attended / (n * n)
