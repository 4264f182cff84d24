"""Predicts how long a padded batch takes from its shape, fitted online to measured batch times.

A padded encoder's batch of n inputs padded to length L costs about
    a + b * n*L + c * n*L^2
(per-call overhead, the linear layers, attention). The coefficients are fitted by least squares
on the most recent measurements, seeded by a warm-up sweep, so the batcher's choices follow the
machine it runs on rather than constants tuned elsewhere.
"""

from __future__ import annotations

from collections import deque

import numpy as np


def _features(batch_size: int, max_len: int) -> np.ndarray:
    padded = float(batch_size * max_len)
    return np.array([1.0, padded, padded * max_len / 512.0])


class LatencyModel:
    def __init__(self, *, window: int = 512, refit_every: int = 16) -> None:
        self._observations: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0
        # A cautious prior (about 100 us per padded token) until measurements arrive.
        self._coef = np.array([1e-3, 1e-4, 0.0])

    @property
    def fitted(self) -> bool:
        return len(self._observations) >= 3

    def predict(self, batch_size: int, max_len: int) -> float:
        if batch_size <= 0:
            return 0.0
        return max(float(_features(batch_size, max_len) @ self._coef), 1e-5)

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
            coef = np.zeros(3)
            sub, *_ = np.linalg.lstsq(x[:, keep] * weights[:, None], y * weights, rcond=None)
            coef[keep] = np.maximum(sub, 0.0)
        self._coef = coef
