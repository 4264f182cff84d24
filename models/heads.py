"""Training of MLP heads on frozen encoder features (torch, build time only)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from engine.tasks.heads import MlpHead


def to_numpy_head(model: nn.Module) -> MlpHead:
    """The Linear layers of `model` (a Sequential of them with activations, or one Linear), in order."""
    linears = [layer for layer in model.modules() if isinstance(layer, nn.Linear)]
    return MlpHead(
        [
            (layer.weight.detach().T.contiguous().numpy().astype(np.float32),
             layer.bias.detach().numpy().astype(np.float32))
            for layer in linears
        ]
    )  # fmt: skip


def train_mlp_head(
    features: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    dev_score: Callable[[MlpHead], float],
    *,
    hidden: int = 256,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    dropout: float = 0.1,
    seed: int = 0,
) -> tuple[MlpHead, float]:
    """Adam on cross-entropy; keeps the epoch with the best dev score (higher is better)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(features.shape[1], hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_labels),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    loss_fn = nn.CrossEntropyLoss()
    best_head, best_score = to_numpy_head(model), float("-inf")
    for _ in range(epochs):
        model.train()
        for batch in torch.split(torch.randperm(len(x), generator=generator), batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        head = to_numpy_head(model)
        score = dev_score(head)
        if score > best_score:
            best_head, best_score = head, score
    return best_head, best_score
