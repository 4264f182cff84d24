"""The training step (models/training.py) on a tiny encoder and toy tasks: it learns, it resumes
where it stopped, and distillation pulls a sparse student towards its dense teacher."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional

from models.bert import AttentionPattern, BertEncoder
from models.training import (
    IGNORE,
    Example,
    HeadSpec,
    TaskModel,
    TrainConfig,
    distillation_loss,
    fine_tune,
    predict,
)
from tests.tiny_bert import tiny_bert_config

TINY = tiny_bert_config(vocab_size=40)
CONFIG = TrainConfig(epochs=6, lr=3e-3, head_lr=3e-3, batch_tokens=256, warmup=0.1)


def _encoder(pattern: AttentionPattern | None = None, seed: int = 0) -> BertEncoder:
    torch.manual_seed(seed)
    return BertEncoder(TINY, pattern)


def _token_task(count: int, seed: int) -> list[Example]:
    """Label a token 1 where its id is even: learnable from each token alone."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        ids = rng.integers(3, TINY.vocab_size, size=int(rng.integers(4, 20)))
        labels = (ids % 2 == 0).astype(np.int64)
        ids[0], labels[0] = 1, IGNORE  # [CLS]
        examples.append(Example(ids.astype(np.int64), labels))
    return examples


def _accuracy(model: TaskModel, examples: list[Example]) -> float:
    right = total = 0
    for example, logits in zip(examples, predict(model, examples), strict=True):
        keep = example.labels != IGNORE
        right += int((logits.argmax(-1)[keep] == example.labels[keep]).sum())
        total += int(keep.sum())
    return right / total


def test_the_loss_is_cross_entropy_without_a_teacher_and_ignores_unlabelled_positions() -> None:
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 2, IGNORE, 1, IGNORE])
    keep = labels != IGNORE
    expected = functional.cross_entropy(student[keep], labels[keep])
    assert torch.allclose(distillation_loss(student, teacher, labels, 2.0, 0.0), expected)
    soft_only = distillation_loss(student, student, labels, 2.0, 1.0)
    assert soft_only.abs() < 1e-6  # a student equal to its teacher has nothing left to learn
    assert distillation_loss(student, teacher, labels, 2.0, 1.0) > 0.01


def test_fine_tuning_learns_a_token_task_from_chance() -> None:
    train, held_out = _token_task(300, seed=1), _token_task(60, seed=2)
    model = TaskModel.single(_encoder(), 2, token_level=True, dropout=0.0)
    before = _accuracy(model, held_out)
    fine_tune(model, train, CONFIG)
    after = _accuracy(model, held_out)
    assert before < 0.7
    assert after > 0.95


def test_a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    train = _token_task(120, seed=3)
    config = replace(CONFIG, epochs=2)
    whole = fine_tune(TaskModel.single(_encoder(), 2, True, dropout=0.0), train, config)

    class CutOff(Exception):
        pass

    def cut_off_in_the_second_epoch(epoch: int, _model: TaskModel) -> None:
        if epoch == 1:
            raise CutOff

    with pytest.raises(CutOff):
        fine_tune(
            TaskModel.single(_encoder(), 2, True, dropout=0.0),
            train,
            config,
            tmp_path,
            cut_off_in_the_second_epoch,
        )
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epochs_done"] == 1
    resumed = fine_tune(TaskModel.single(_encoder(seed=9), 2, True, dropout=0.0), train, config, tmp_path)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_distillation_pulls_a_sparse_student_towards_its_dense_teacher() -> None:
    rng = np.random.default_rng(4)
    examples = []
    for _ in range(150):
        ids = rng.integers(3, TINY.vocab_size, size=int(rng.integers(30, 60))).astype(np.int64)
        ids[0] = 1
        examples.append(Example(ids, np.array([int(ids[1:].sum()) % 2])))  # labels barely matter here
    teacher = TaskModel.single(_encoder(seed=5), 2, token_level=False, dropout=0.0).eval()
    for parameter in teacher.parameters():
        torch.nn.init.normal_(parameter, std=0.2)

    def student() -> TaskModel:
        return TaskModel.single(
            _encoder(AttentionPattern(window=4, global_tokens=2), seed=6), 2, False, dropout=0.0
        )

    def gap(model: TaskModel) -> float:
        teacher_logits = np.stack(list(predict(teacher, examples)))
        return float(np.abs(teacher_logits - np.stack(list(predict(model, examples)))).mean())

    before = gap(student())
    distilled = fine_tune(student(), examples, replace(CONFIG, alpha=1.0, temperature=1.0), teacher=teacher)
    on_labels = fine_tune(student(), examples, CONFIG)
    assert gap(distilled) < 0.7 * before
    assert gap(distilled) < 0.7 * gap(on_labels)


def test_one_encoder_learns_a_token_task_and_a_sequence_task_together() -> None:
    tokens = _token_task(300, seed=7)
    rng = np.random.default_rng(8)
    sequences = []
    for _ in range(300):
        ids = rng.integers(3, TINY.vocab_size, size=int(rng.integers(4, 20))).astype(np.int64)
        ids[0] = 1
        sequences.append(Example(ids, np.array([int(5 in ids[1:])]), task="has-5"))
    tagged = [Example(e.ids, e.labels, task="even") for e in tokens]
    model = TaskModel(_encoder(), {"even": HeadSpec(2, True), "has-5": HeadSpec(2, False)}, dropout=0.0)
    fine_tune(model, tagged[:250] + sequences[:250], replace(CONFIG, epochs=8))
    assert _accuracy(model, tagged[250:]) > 0.95
    predicted = np.stack(list(predict(model, sequences[250:]))).argmax(-1)
    truth = np.array([int(e.labels[0]) for e in sequences[250:]])
    assert (predicted == truth).mean() > 0.85
