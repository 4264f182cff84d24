"""Build steps of the document tasks: topic (BBC News, windows + trained aggregator) and
extractive summarization (ACLSum sentence scorer). Features come from the served INT8 encoder
through the same windowing the server uses (`engine.documents`), so what is trained is what runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from rouge_score import rouge_scorer
from torch import nn

from engine.documents import LongInputPolicy, WindowedDocument, document_states, owner_windows, split
from engine.runtime.onnx import OnnxEncoderRuntime
from engine.sentences import token_sentences
from engine.tasks.classify import WindowAggregator
from engine.tasks.heads import MlpHead
from engine.tasks.summarize import Selection, SentenceScore, select, sentence_features
from engine.tokenization import TextTokenizer
from models.data.aclsum import Paper
from models.features import encode_all
from models.heads import to_numpy_head

DOCS_PER_PASS = 64  # documents encoded together: bounds the memory their token states take


def windowed(
    runtime: OnnxEncoderRuntime, tokenizer: TextTokenizer, texts: list[str], policy: LongInputPolicy
) -> Iterator[tuple[WindowedDocument, list[np.ndarray]]]:
    """Each text split as the server splits it, and the states of its windows."""
    for first in range(0, len(texts), DOCS_PER_PASS):
        documents = [
            split(doc, policy, tokenizer.cls_id, tokenizer.sep_id)
            for doc in tokenizer.encode_documents(texts[first : first + DOCS_PER_PASS])
        ]
        flat = [window.tokens for doc in documents for window in doc.windows]
        states = encode_all(runtime, flat)
        position = 0
        for doc in documents:
            yield doc, states[position : position + len(doc.windows)]
            position += len(doc.windows)


def window_means(
    runtime: OnnxEncoderRuntime, tokenizer: TextTokenizer, texts: list[str], policy: LongInputPolicy
) -> list[np.ndarray]:
    """[windows, hidden] mean-pooled states per text."""
    return [
        np.stack([s.mean(axis=0) for s in states])
        for _, states in windowed(runtime, tokenizer, texts, policy)
    ]


class _WindowClassifier(nn.Module):
    def __init__(self, hidden: int, labels: int, width: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, 1)
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, labels),
        )

    def forward(self, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.query(windows).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return self.mlp((weights.unsqueeze(-1) * windows).sum(dim=1))


def _padded(docs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    most = max(d.shape[0] for d in docs)
    x = np.zeros((len(docs), most, docs[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(docs), most), dtype=bool)
    for i, d in enumerate(docs):
        x[i, : d.shape[0]] = d
        mask[i, : d.shape[0]] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


@dataclass(frozen=True)
class WindowClassifier:
    aggregator: WindowAggregator
    head: MlpHead

    def predict(self, windows: list[np.ndarray]) -> np.ndarray:
        return np.array(
            [int(self.head.logits(self.aggregator.pool(w)[None, :])[0].argmax()) for w in windows]
        )

    def accuracy(self, windows: list[np.ndarray], labels: np.ndarray) -> float:
        return float((self.predict(windows) == labels).mean())


def train_window_classifier(
    train: list[np.ndarray],
    labels: np.ndarray,
    num_labels: int,
    dev: list[np.ndarray],
    dev_labels: np.ndarray,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[WindowClassifier, float]:
    """Attention pooling over windows + an MLP, trained together. Every article is also shown
    as its first window alone, so the same weights serve truncated inputs. Keeps the epoch with
    the best dev accuracy (windowed)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    docs = train + [d[:1] for d in train]
    y = torch.from_numpy(np.concatenate([labels, labels]).astype(np.int64))
    model = _WindowClassifier(train[0].shape[1], num_labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    best: tuple[WindowClassifier | None, float] = (None, float("-inf"))
    for _ in range(epochs):
        model.train()
        for batch in torch.split(torch.randperm(len(docs), generator=generator), batch_size):
            x, mask = _padded([docs[int(i)] for i in batch])
            optimizer.zero_grad()
            loss_fn(model(x, mask), y[batch]).backward()
            optimizer.step()
        model.eval()
        classifier = WindowClassifier(
            WindowAggregator(
                model.query.weight.detach()[0].numpy().astype(np.float32), float(model.query.bias.detach()[0])
            ),
            to_numpy_head(model.mlp),
        )
        score = classifier.accuracy(dev, dev_labels)
        if score > best[1]:
            best = (classifier, score)
    assert best[0] is not None
    return best[0], best[1]


def paper_features(
    runtime: OnnxEncoderRuntime, tokenizer: TextTokenizer, papers: list[Paper], policy: LongInputPolicy
) -> list[np.ndarray]:
    """Sentence features of each paper, its sentences scored in context as the server does."""
    out = []
    texts = [paper.text for paper in papers]
    for paper, (doc, states) in zip(papers, windowed(runtime, tokenizer, texts, policy), strict=True):
        token_states = document_states(doc.windows, states, owner_windows(doc.windows, doc.document.length))
        owners = token_sentences(doc.document.offsets, list(paper.spans))
        out.append(sentence_features(token_states, owners, len(paper.spans)))
    return out


def summaries(papers: list[Paper], scores: list[np.ndarray], selection: Selection) -> list[str]:
    out = []
    for paper, paper_scores in zip(papers, scores, strict=True):
        scored = [
            SentenceScore(i, start, end, float(score))
            for i, ((start, end), score) in enumerate(zip(paper.spans, paper_scores, strict=True))
        ]
        out.append(" ".join(paper.text[s.start : s.end] for s in select(paper.text, scored, selection)))
    return out


def rouge(candidates: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (Google's rouge-score, stemmed)."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for candidate, reference in zip(candidates, references, strict=True):
        for name, score in scorer.score(reference, candidate).items():
            totals[name] += score.fmeasure
    return {name: round(total / len(candidates), 4) for name, total in totals.items()}


def baseline_scores(papers: list[Paper], kind: str, seed: int = 0) -> list[np.ndarray]:
    """lead-k: earlier sentences score higher; random-k: seeded random scores."""
    rng = np.random.default_rng(seed)
    if kind == "lead":
        return [-np.arange(len(p.spans), dtype=np.float32) for p in papers]
    return [rng.random(len(p.spans)).astype(np.float32) for p in papers]
