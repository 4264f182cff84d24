"""The padding-free encoder (models/bert.Packing): the projections and feed-forward layers run on
a batch's real tokens only, with the same result as the padded form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.bert import AttentionPattern, BertEncoder
from models.export import export_onnx, ffn_down_projections
from tests.tiny_bert import RANDOM_VOCAB, random_batch, random_tiny_bert, tiny_bert_config

TINY = tiny_bert_config(vocab_size=RANDOM_VOCAB)
PATTERNS = [AttentionPattern(), AttentionPattern(window=8, global_tokens=2)]


def _pair(pattern: AttentionPattern) -> tuple[BertEncoder, BertEncoder]:
    """The same random weights, padding dropped and kept."""
    return random_tiny_bert(pattern), random_tiny_bert(pattern, drop_padding=False)


def _batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return random_batch(lengths, seed=len(lengths))


@pytest.mark.parametrize("pattern", PATTERNS, ids=["dense", "sparse"])
def test_dropping_padding_changes_no_real_token_state(pattern: AttentionPattern) -> None:
    packed, padded = _pair(pattern)
    for lengths in ([5], [40, 17, 33], [64, 9, 1]):
        ids, mask = _batch(lengths)
        with torch.no_grad():
            got = packed.encode_verified(ids, mask, torch.tensor(True))
            expected = padded.encode_verified(ids, mask, torch.tensor(True))
        real = mask.bool()
        torch.testing.assert_close(got[0][real], expected[0][real], atol=1e-5, rtol=1e-5)
        for got_per_sequence, expected_per_sequence in zip(got[1:], expected[1:], strict=True):
            torch.testing.assert_close(got_per_sequence, expected_per_sequence, atol=1e-5, rtol=1e-5)


def test_the_exported_graph_runs_its_feed_forward_on_real_tokens_only(tmp_path: Path) -> None:
    model = _pair(AttentionPattern(window=8, global_tokens=2))[0]
    path = tmp_path / "encoder.onnx"
    export_onnx(model, path)
    graph = onnx.load(str(path))
    ffn = next(node for node in graph.graph.node if node.name == ffn_down_projections(path)[0])
    graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(ffn.output[0]))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ids, mask = _batch([40, 3, 17])
    outputs = session.run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "verify": np.array(False)}
    )
    assert outputs[-1].shape == (60, TINY.hidden_size)  # 40 + 3 + 17 rows, not 3 x 40
    states = outputs[0]
    with torch.no_grad():
        expected = model(ids, mask).numpy()
    real = mask.bool().numpy()
    np.testing.assert_allclose(states[real], expected[real], atol=1e-4)
