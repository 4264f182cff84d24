"""Verification sampling end to end on the real bundle: sampled batches of the sparse branch
report the kept share of dense attention mass as a metric; short inputs (the dense branch) and
an unsampled server report none."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.data import bbc
from server.app import create_app
from server.settings import Settings

KEPT = "sparsebert_attention_kept_mass_ratio"


def serving(bundle_dir: Path, rate: float) -> Iterator[TestClient]:
    settings = Settings(bundle=bundle_dir, cache=False, grpc=False, attention_verify_rate=rate)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        yield client


def kept_mass(client: TestClient) -> tuple[float, float]:
    """(sum, count) of the kept-mass histogram, all models."""
    text = client.get("/metrics").text
    total = sum(float(v) for v in re.findall(rf"^{KEPT}_sum{{[^}}]*}} (\S+)$", text, re.MULTILINE))
    count = sum(float(v) for v in re.findall(rf"^{KEPT}_count{{[^}}]*}} (\S+)$", text, re.MULTILINE))
    return total, count


def article_of(tokens_at_least: int) -> str:
    """A held-out article long enough for the sparse branch (over 384 tokens, read whole)."""
    for article in bbc.load_splits()["test"]:
        if tokens_at_least * 1.1 < len(article.text.split()) < 350:
            return article.text
    raise AssertionError("no held-out article of that length")


@pytest.fixture(scope="module")
def always(bundle_dir: Path) -> Iterator[TestClient]:
    yield from serving(bundle_dir, 1.0)


def test_every_sampled_sparse_batch_reports_its_kept_mass(always: TestClient) -> None:
    assert always.post("/v1/classify", json={"inputs": "A short sentence."}).status_code == 200
    assert kept_mass(always) == (0.0, 0.0)  # the dense branch keeps everything: nothing to verify
    text = article_of(300)
    response = always.post("/v1/classify", json={"inputs": text, "model": "topic"})
    assert response.status_code == 200
    assert response.json()["results"][0]["labels"][0]["label"] in bbc.LABELS
    total, count = kept_mass(always)
    assert count == 1
    assert 0.2 < total < 0.8  # the bundle's baseline is 0.46 (report.md)


def test_without_sampling_nothing_is_verified(bundle_dir: Path) -> None:
    for client in serving(bundle_dir, 0.0):
        assert client.post("/v1/classify", json={"inputs": article_of(300)}).status_code == 200
        assert kept_mass(client) == (0.0, 0.0)
        assert "sparsebert_attention_sparsity_ratio_count" in client.get("/metrics").text
