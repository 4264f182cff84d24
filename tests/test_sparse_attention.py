"""The sparse-attention encoder (models/sparse_attention.py): exact at full window, equal to a
brute-force masked reference below it, and the same in ONNX Runtime as in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.bert import AttentionPattern
from models.export import export_onnx
from models.sparse_attention import (
    dense_attention,
    global_keys,
    kept_dense_mass,
    local_global_attention,
    salient_tokens,
)
from tests.tiny_bert import random_batch, random_tiny_bert


def test_a_window_as_long_as_the_input_is_dense_attention_exactly() -> None:
    ids, mask = random_batch([37, 20, 5])
    dense = random_tiny_bert(AttentionPattern())
    sparse = random_tiny_bert(AttentionPattern(window=40, global_tokens=3))
    dense_hidden, dense_sparsity = dense.encode(ids, mask)
    sparse_hidden, sparse_sparsity = sparse.encode(ids, mask)
    real = mask.bool()
    assert torch.allclose(dense_hidden[real], sparse_hidden[real], atol=1e-5)
    assert torch.allclose(sparse_sparsity, torch.zeros(3), atol=1e-6)
    assert torch.allclose(dense_sparsity, torch.zeros(3), atol=1e-6)


def test_the_blocked_form_alone_is_dense_at_full_window_too() -> None:
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 3, 13, 8) for _ in range(3))
    key_mask = torch.ones(2, 13)
    key_mask[1, 9:] = 0.0
    context, pairs = local_global_attention(q, k, v, key_mask, 13, 4)
    expected, expected_pairs = dense_attention(q, k.transpose(-1, -2), v, key_mask)
    real = key_mask.bool()
    assert torch.allclose(context.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=1e-5)
    assert torch.equal(pairs, expected_pairs)


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, window: int, globals_: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention under the pattern's explicit [query, key] mask, built from its definition."""
    batch, _, length, _ = q.shape
    indices, valid = salient_tokens(q, k, key_mask, globals_)
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                allowed[b, i, j] = abs(i // window - j // window) <= 1
            allowed[b, i, 0] = True
            for index, ok in zip(indices[b].tolist(), valid[b].tolist(), strict=True):
                if ok:
                    allowed[b, i, index] = True
    allowed &= key_mask.bool()[:, None, :]
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    context = torch.matmul(torch.softmax(scores, dim=-1), v)
    pairs = (allowed & key_mask.bool()[:, :, None]).sum(dim=(1, 2)).to(torch.float32)
    return context, pairs


@pytest.mark.parametrize(
    ("length", "window", "globals_", "sparse"),
    [(23, 4, 3, True), (16, 4, 0, True), (30, 8, 2, True), (9, 3, 20, False)],  # 20 globals: all keys
)
def test_below_the_input_length_it_is_the_masked_pattern_it_claims(
    length: int, window: int, globals_: int, sparse: bool
) -> None:
    torch.manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 8) for _ in range(3))
    key_mask = torch.ones(2, length)
    key_mask[1, length - 5 :] = 0.0  # the second sequence is padded
    context, pairs = local_global_attention(q, k, v, key_mask, window, globals_)
    expected, expected_pairs = _reference(q, k, v, key_mask, window, globals_)
    real = key_mask.bool()
    assert torch.allclose(context.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=1e-5)
    assert torch.equal(pairs, expected_pairs)
    assert bool((pairs[0] < length**2) == sparse)


def test_globals_are_chosen_per_sequence_from_real_tokens_only() -> None:
    torch.manual_seed(3)
    q, k = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)
    key_mask = torch.ones(2, 10)
    key_mask[1, 4:] = 0.0  # 4 real tokens: [CLS] + 3 candidates for 5 picks
    indices, valid = salient_tokens(q, k, key_mask, 5)
    assert valid[0].tolist() == [1.0] * 5
    assert valid[1].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert sorted(indices[1, :3].tolist()) == [1, 2, 3]
    assert 0 not in indices[0].tolist()


def test_onnx_export_has_dynamic_axes_and_matches_torch(tmp_path: Path) -> None:
    model = random_tiny_bert(AttentionPattern(window=8, global_tokens=2))
    path = tmp_path / "sparse.onnx"
    export_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "sparsity", "kept_attention_mass"]
    for lengths in ([5], [40, 17, 33], [64, 9], [100]):
        ids, mask = random_batch(lengths, seed=len(lengths))
        hidden, sparsity, kept = model.encode_verified(ids, mask, torch.tensor(True))
        for verify in (True, False):
            got_hidden, got_sparsity, got_kept = session.run(
                None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "verify": np.array(verify)}
            )
            real = mask.bool().numpy()
            np.testing.assert_allclose(got_hidden[real], hidden.detach().numpy()[real], atol=1e-4)
            np.testing.assert_allclose(got_sparsity, sparsity.detach().numpy(), atol=1e-5)
            dense_branch = max(lengths) <= model.pattern.dense_limit  # keeps all: 1.0 either way
            expected_kept = kept.detach().numpy() if verify or dense_branch else -np.ones(len(lengths))
            np.testing.assert_allclose(got_kept, expected_kept, atol=1e-5)
    assert 0.3 < float(got_sparsity[0]) < 1.0  # 100 tokens in windows of 8: mostly skipped pairs


def test_below_dense_up_to_a_batch_takes_the_dense_branch_in_onnx(tmp_path: Path) -> None:
    model = random_tiny_bert(AttentionPattern(window=8, global_tokens=2, dense_up_to=50))
    export_onnx(model, tmp_path / "sparse.onnx")
    session = ort.InferenceSession(str(tmp_path / "sparse.onnx"), providers=["CPUExecutionProvider"])
    dense = random_tiny_bert(AttentionPattern())
    for length, sparse in ((50, False), (51, True)):
        ids, mask = random_batch([length])
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "verify": np.array(True)}
        hidden, sparsity, kept = session.run(None, feed)
        assert (float(sparsity[0]) > 0.3) == sparse
        assert (float(kept[0]) < 1.0 - 1e-6) == sparse  # the dense branch keeps all of the mass
        if not sparse:
            np.testing.assert_allclose(hidden, dense(ids, mask).detach().numpy(), atol=1e-4)


@pytest.mark.parametrize(("length", "window", "globals_"), [(23, 4, 3), (30, 8, 0), (9, 3, 2)])
def test_the_kept_mass_is_dense_attention_summed_over_the_pattern(
    length: int, window: int, globals_: int
) -> None:
    torch.manual_seed(length)
    q, k = torch.randn(2, 3, length, 8), torch.randn(2, 3, length, 8)
    key_mask = torch.ones(2, length)
    key_mask[1, length - 5 :] = 0.0
    indices, valid = global_keys(q, k, key_mask, globals_)
    kept = kept_dense_mass(q, k.transpose(-1, -2), key_mask, window, indices, valid)
    scores = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~key_mask.bool()[:, None, None, :], -1e9)
    probs = torch.softmax(scores, dim=-1)
    for b in range(2):
        allowed = torch.zeros(length, length, dtype=torch.bool)
        for i in range(length):
            for j in range(length):
                allowed[i, j] = abs(i // window - j // window) <= 1
        for index, ok in zip(indices[b].tolist(), valid[b].tolist(), strict=True):
            allowed[:, index] |= bool(ok)
        per_query = (probs[b] * allowed).sum(dim=-1).mean(dim=0)  # [n], averaged over heads
        expected = float(per_query[key_mask[b].bool()].sum())
        assert abs(float(kept[b]) - expected) < 1e-4
    if length <= 2 * window:  # one or two blocks: every key is a neighbour, all mass is kept
        assert torch.allclose(kept, key_mask.sum(dim=-1), atol=1e-5)
    else:
        assert float(kept[0]) < length - 1e-3


def test_the_encoder_reports_the_kept_share_only_when_asked() -> None:
    model = random_tiny_bert(AttentionPattern(window=4, global_tokens=2, dense_up_to=0))
    ids, mask = random_batch([23, 9])
    _, _, kept = model.encode_verified(ids, mask, torch.tensor(True))
    assert bool(((kept > 0.0) & (kept < 1.0)).all())
    _, _, unmeasured = model.encode_verified(ids, mask, torch.tensor(False))
    assert unmeasured.tolist() == [-1.0, -1.0]
    _, _, dense = random_tiny_bert(AttentionPattern()).encode_verified(ids, mask, torch.tensor(True))
    assert torch.allclose(dense, torch.ones(2))
