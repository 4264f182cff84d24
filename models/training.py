"""Fine-tuning and distillation of an encoder with a task head: one reusable training loop.

`fine_tune` trains one shared encoder with a head per task on hard labels (a batch holds one
task's examples; the tasks' batches are interleaved); given a `teacher`, it distils instead: the
student (e.g. the sparse-attention encoder) learns the teacher's soft targets at a temperature
plus the hard labels:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

It shows a progress bar, checkpoints after every epoch (model, optimizer, scheduler, RNG, the
epoch) and resumes from the last checkpoint when run again with the same directory.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from models.bert import BertEncoder

IGNORE = -100  # label of positions that carry no loss (padding, special tokens, later sub-words)


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int64 [length], special tokens included
    labels: np.ndarray  # int64: [length] for token tasks, [1] for sequence tasks
    task: str = "task"


@dataclass(frozen=True)
class HeadSpec:
    num_labels: int
    token_level: bool  # a label per token, else one per sequence (on the mean of its real tokens)


class TaskModel(nn.Module):
    """A shared encoder with a linear head per task."""

    def __init__(self, encoder: BertEncoder, heads: dict[str, HeadSpec], dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.specs = heads
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(encoder.config.hidden_size, spec.num_labels) for name, spec in heads.items()}
        )

    @classmethod
    def single(
        cls, encoder: BertEncoder, num_labels: int, token_level: bool, dropout: float = 0.1
    ) -> TaskModel:
        """One task, named "task" (the default of Example.task)."""
        return cls(encoder, {"task": HeadSpec(num_labels, token_level)}, dropout)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str = "task"
    ) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask)
        if not self.specs[task].token_level:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            hidden = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits: torch.Tensor = self.heads[task](self.dropout(hidden))
        return logits


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of the steps with a linear warm-up, then linear decay
    batch_tokens: int = 2048  # padded tokens per batch (length-sorted buckets waste little)
    max_batch: int = 64
    seed: int = 0
    temperature: float = 2.0  # distillation only
    alpha: float = 0.5  # distillation only: the soft-target share of the loss


class Teacher(Protocol):
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str) -> torch.Tensor: ...


def batches(examples: Sequence[Example], config: TrainConfig, rng: random.Random) -> list[list[int]]:
    """Indices of one task each, grouped by similar length under the token budget, shuffled."""
    order = sorted(range(len(examples)), key=lambda i: (examples[i].task, len(examples[i].ids), rng.random()))
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = len(examples[index].ids)
        if current and (
            (len(current) + 1) * longest > config.batch_tokens
            or len(current) >= config.max_batch
            or examples[current[0]].task != examples[index].task
        ):
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    rng.shuffle(groups)
    return groups


def collate(
    examples: Sequence[Example], token_level: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.int64)
    mask = torch.zeros(len(examples), longest, dtype=torch.int64)
    labels = torch.full((len(examples), longest) if token_level else (len(examples),), IGNORE)
    for row, example in enumerate(examples):
        n = len(example.ids)
        ids[row, :n] = torch.from_numpy(example.ids)
        mask[row, :n] = 1
        if token_level:
            labels[row, :n] = torch.from_numpy(example.labels)
        else:
            labels[row] = int(example.labels[0])
    return ids, mask, labels


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Soft-target KL at `temperature` (scaled by T^2 so its gradients keep their size) plus the
    hard-label cross-entropy, over the positions whose label is not IGNORE."""
    keep = labels != IGNORE
    student, teacher, labels = student[keep], teacher[keep], labels[keep]
    hard = functional.cross_entropy(student, labels)
    if alpha == 0.0:
        return hard
    soft = functional.kl_div(
        functional.log_softmax(student / temperature, dim=-1),
        functional.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def _schedule(
    optimizer: torch.optim.Optimizer, total: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        return step / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fine_tune(
    model: TaskModel,
    examples: Sequence[Example],
    config: TrainConfig,
    checkpoints: Path | None = None,
    on_epoch: Callable[[int, TaskModel], None] | None = None,
    teacher: Teacher | None = None,
) -> TaskModel:
    """Train `model` on `examples`; with a `teacher`, distil it (see the module docstring)."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    head_params = list(model.heads.parameters())
    head_ids = {id(p) for p in head_params}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) not in head_ids], "lr": config.lr},
            {"params": head_params, "lr": config.head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = len(batches(examples, config, random.Random(0)))
    scheduler = _schedule(optimizer, steps_per_epoch * config.epochs, config.warmup)
    first_epoch = _resume(checkpoints, model, optimizer, scheduler, rng)
    alpha = config.alpha if teacher is not None else 0.0
    for epoch in range(first_epoch, config.epochs):
        model.train()
        groups = batches(examples, config, rng)
        progress = tqdm(groups, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False)
        for group in progress:
            task = examples[group[0]].task
            ids, mask, labels = collate([examples[i] for i in group], model.specs[task].token_level)
            logits = model(ids, mask, task)
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(ids, mask, task)
            else:
                soft = logits.detach()
            loss = distillation_loss(logits, soft, labels, config.temperature, alpha)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            progress.set_postfix(loss=f"{loss.item():.4f}")
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch, model)
        if checkpoints is not None:
            _save(checkpoints, epoch + 1, model, optimizer, scheduler, rng)
    return model.eval()


def _save(
    directory: Path,
    epochs_done: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    rng: random.Random,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "epochs_done": epochs_done,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
    }
    partial = directory / "last.pt.partial"
    torch.save(state, partial)
    partial.replace(directory / "last.pt")  # a run cut off mid-write keeps the previous checkpoint


def _resume(
    directory: Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    rng: random.Random,
) -> int:
    """The epoch to start from: 0, or the one after the last checkpoint's."""
    if directory is None or not (directory / "last.pt").exists():
        return 0
    state = torch.load(directory / "last.pt", weights_only=False)  # our own file, written above
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epochs_done"])


def predict(model: TaskModel, examples: Sequence[Example], batch_tokens: int = 8192) -> Iterator[np.ndarray]:
    """Logits per example, in order: [length, labels] for token tasks, [labels] otherwise."""
    config = TrainConfig(batch_tokens=batch_tokens, max_batch=256)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    results: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for group in batches([examples[i] for i in order], config, random.Random(0)):
            chosen = [order[i] for i in group]
            task = examples[chosen[0]].task
            token_level = model.specs[task].token_level
            ids, mask, _ = collate([examples[i] for i in chosen], token_level)
            logits = model(ids, mask, task).numpy()
            for row, index in enumerate(chosen):
                results[index] = logits[row, : len(examples[index].ids)] if token_level else logits[row]
    for index in range(len(examples)):
        yield results[index]


def estimate_minutes(
    model: TaskModel, examples: Sequence[Example], config: TrainConfig, sample: int = 4
) -> float:
    """Minutes for the whole run, from timing a few real training steps (printed before training)."""
    groups = batches(examples, config, random.Random(config.seed))
    probe = copy.deepcopy(model)  # the timed steps must not touch the model's weights
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
    started = time.perf_counter()
    tokens = 0
    for group in groups[:sample]:
        task = examples[group[0]].task
        ids, mask, labels = collate([examples[i] for i in group], probe.specs[task].token_level)
        tokens += ids.numel()
        logits = probe(ids, mask, task)
        loss = distillation_loss(logits, logits.detach(), labels, 1.0, 0.0)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
    seconds_per_token = (time.perf_counter() - started) / max(tokens, 1)
    total_tokens = sum(len(g) * max(len(examples[i].ids) for i in g) for g in groups)
    return math.ceil(seconds_per_token * total_tokens * config.epochs / 60 * 10) / 10
