"""Predicts how long a padded batch takes from its shape, fitted online to measured batch times.

A padded encoder's batch of n inputs padded to length L costs about
    a + b * n*L + c * n*L^2 + d * (n*L)^2
(per-call overhead, the linear layers, attention, and the cache misses of big activations: on
the 2-core CPU here a token costs ~95 us in a batch of 512 padded tokens, ~150 us in one of
8192, so the best batch is a modest one, and the fitted curve says which).
The coefficients are fitted by least squares
on the most recent measurements, seeded by a warm-up sweep, so the batcher's choices follow the
machine it runs on rather than constants tuned elsewhere.
"""

from __future__ import annotations

from collections import deque

import numpy as np


def _features(batch_size: int, max_len: int) -> np.ndarray:
    padded = float(batch_size * max_len)
    return np.array([1.0, padded, padded * max_len / 512.0, padded * padded / 8192.0])


class LatencyModel:
    def __init__(self, *, window: int = 512, refit_every: int = 16) -> None:
        self._observations: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0
        # A cautious prior (about 100 us per padded token) until measurements arrive.
        self._set(np.array([1e-3, 1e-4, 0.0, 0.0]))

    def _set(self, coef: np.ndarray) -> None:
        self._scalars = tuple(float(x) for x in coef)

    @property
    def fitted(self) -> bool:
        return len(self._observations) >= 3

    def predict(self, batch_size: int, max_len: int) -> float:
        # Plain float arithmetic: batch formation calls this thousands of times a second.
        if batch_size <= 0:
            return 0.0
        a, b, c, d = self._scalars
        padded = batch_size * max_len
        return max(a + padded * (b + c * max_len / 512.0 + d * padded / 8192.0), 1e-5)

    def costs(self, max_len: int, max_size: int) -> list[float]:
        """predict(size, max_len) for every size from 1 to max_size, in one call."""
        a, b, c, d = self._scalars
        per_token = b + c * max_len / 512.0
        growth = d * max_len / 8192.0  # d * padded / 8192, per input in the batch
        return [
            max(a + size * max_len * (per_token + growth * size), 1e-5) for size in range(1, max_size + 1)
        ]

    def seconds_per_token(self, typical_len: int = 64) -> float:
        """Marginal cost of one padded token at a typical length, for queue-drain estimates."""
        return self.predict(8, typical_len) / (8 * typical_len)

    def observe(self, batch_size: int, max_len: int, seconds: float) -> float:
        """Record a measured batch; returns the relative error of the prediction made for it."""
        predicted = self.predict(batch_size, max_len)
        self._observations.append((_features(batch_size, max_len), seconds))
        self._since_fit += 1
        if self._since_fit >= self._refit_every or not self.fitted:
            self.refit()
        return (predicted - seconds) / seconds if seconds > 0 else 0.0

    def refit(self) -> None:
        self._since_fit = 0
        if len(self._observations) < 3:
            return
        x = np.stack([features for features, _ in self._observations])
        y = np.array([seconds for _, seconds in self._observations])
        # Relative error matters, not absolute: weight each row by 1/y.
        weights = 1.0 / np.maximum(y, 1e-6)
        coef, *_ = np.linalg.lstsq(x * weights[:, None], y * weights, rcond=None)
        # Costs are never negative; a clipped coefficient is refitted without its column.
        if np.any(coef < 0):
            keep = coef >= 0
            coef = np.zeros(len(coef))
            sub, *_ = np.linalg.lstsq(x[:, keep] * weights[:, None], y * weights, rcond=None)
            coef[keep] = np.maximum(sub, 0.0)
        self._set(coef)
