"""The runtime protocol. A runtime is called from one worker thread at a time, never the event loop."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


class RuntimeOutput(NamedTuple):
    states: np.ndarray  # float32 [batch, seq, hidden]
    # [batch]: each sequence's attention sparsity ratio, where the graph reports it (sparse encoders)
    sparsity: np.ndarray | None = None
    # [batch]: the kept share of dense attention mass, where asked to verify and measured (-1: not)
    kept_attention_mass: np.ndarray | None = None


class EncoderRuntime(Protocol):
    name: str

    def encode(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, verify: bool = False
    ) -> RuntimeOutput:
        """int64 [batch, seq] ids and mask -> states (and sparsity where the graph measures it).
        `verify`: also measure the kept share of dense attention mass, where the graph can."""
        ...


def pad_batch(sequences: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad int64 id arrays with 0 to max_len; returns (input_ids, attention_mask)."""
    input_ids = np.zeros((len(sequences), max_len), dtype=np.int64)
    attention_mask = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, ids in enumerate(sequences):
        input_ids[row, : ids.shape[0]] = ids
        attention_mask[row, : ids.shape[0]] = 1
    return input_ids, attention_mask
