"""The running server exports exactly the metrics docs/metrics.md documents."""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT

NAME = re.compile(r"^`(sparsebert_\w+)`$")


def documented() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the table rows of docs/metrics.md (GPU-only rows aside: this
    machine has no GPU, and on a CPU they must be absent)."""
    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = NAME.match(cells[0]) if len(cells) >= 3 else None
        if match and not cells[-1].startswith("GPU only"):
            rows[match.group(1)] = (
                cells[1],
                {label.strip() for label in cells[2].split(",") if label.strip()},
            )
    return rows


def test_exported_metrics_match_the_documented_contract(client: httpx.Client) -> None:
    client.post("/v1/classify", json={"inputs": "warm"})
    client.post("/v1/classify", json={"inputs": "late " * 300}, headers={"X-Request-Timeout": "0.0001"})
    exported = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        labels = {key for sample in family.samples for key in sample.labels if key != "le"}
        exported[family.name] = (family.type, labels)  # an Info metric reads as a gauge
    contract = documented()
    assert contract, "docs/metrics.md lists no metric"
    assert set(exported) == set(contract), "exported and documented metrics differ"
    for name, (kind, labels) in exported.items():
        assert kind == contract[name][0], name
        if labels or not contract[name][1]:  # a labelled family with no sample yet shows no labels
            assert labels == contract[name][1], name
