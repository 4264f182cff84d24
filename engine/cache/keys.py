"""Cache keys. Every key carries the deployment's namespace and the bundle's content version, so
deployments can share one Redis and a bundle never reads another bundle's entries.

    {namespace}:r:{bundle version}:{scope}:{hash of the input text}   results
    {namespace}:s:{bundle version}:{hash of the token ids}           encoder states

Results are keyed by the exact text (NER offsets and words index it); states by token ids, so
two texts the tokenizer maps to the same ids (case, spacing) share one encoding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheKeys:
    namespace: str
    bundle_version: str

    def result(self, scope: str, text: str) -> str:
        """`scope`: the task and every parameter that changes its output."""
        digest = _digest(text.encode("utf-8", "surrogatepass"))
        return f"{self.namespace}:r:{self.bundle_version}:{scope}:{digest}"

    def states(self, ids: np.ndarray) -> str:
        digest = _digest(np.ascontiguousarray(ids, dtype="<i8").tobytes())
        return f"{self.namespace}:s:{self.bundle_version}:{digest}"

    @property
    def pattern(self) -> str:
        """Every key of this namespace, every bundle version (for a flush)."""
        return f"{self.namespace}:*"
