"""A BERT small enough to train and export in seconds, for tests of models/."""

from __future__ import annotations

import torch

from models.bert import AttentionPattern, BertConfig, BertEncoder


def tiny_bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
    )


RANDOM_VOCAB = 200  # the vocabulary of random_tiny_bert and random_batch


def random_tiny_bert(pattern: AttentionPattern, *, drop_padding: bool = True) -> BertEncoder:
    """A tiny encoder with seeded random weights (not the near-uniform default init, under which
    every attention pattern looks alike), in eval mode."""
    torch.manual_seed(0)
    model = BertEncoder(tiny_bert_config(RANDOM_VOCAB), pattern, drop_padding=drop_padding)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return model.eval()


def random_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random ids and their attention mask, right-padded to the longest of `lengths`."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.randint(1, RANDOM_VOCAB, (len(lengths), longest), generator=generator)
    mask = torch.zeros(len(lengths), longest, dtype=torch.int64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids * mask, mask
