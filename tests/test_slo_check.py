"""The load test's verdict (loadtest/slo_check.py) on Locust CSV output: a p99 per class of request."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import slo_check

HEADER = "Type,Name,Request Count,Failure Count,Requests/s,50%,99%\n"


def _csv(tmp_path: Path, rows: list[tuple[str, int, int, float, int, int]]) -> Path:
    prefix = tmp_path / "run"
    lines = [f"POST,{name},{n},{failed},{rps},{p50},{p99}\n" for name, n, failed, rps, p50, p99 in rows]
    Path(f"{prefix}_stats.csv").write_text(HEADER + "".join(lines))
    return prefix


@pytest.mark.parametrize(
    ("summary_p99", "classify_failures", "verdict"),
    [(2000, 0, 0), (3000, 0, 1), (2000, 20, 1)],  # all good; a slow summary; too many errors
)
def test_each_class_is_held_to_its_own_p99(
    tmp_path: Path, summary_p99: int, classify_failures: int, verdict: int
) -> None:
    prefix = _csv(
        tmp_path,
        [
            ("/v1/classify", 1000, classify_failures, 40.0, 80, 450),
            ("/v1/summarize", 100, 0, 4.0, 900, summary_p99),
            ("Aggregated", 1100, classify_failures, 60.0, 90, summary_p99),  # over 500 ms: not a class
        ],
    )
    bounds = ["--p99", "/v1/classify=500", "--p99", "/v1/summarize=2500"]
    assert slo_check.main([str(prefix), *bounds, "--min-rps", "50"]) == verdict


def test_a_class_the_run_never_exercised_fails(tmp_path: Path) -> None:
    prefix = _csv(
        tmp_path, [("/v1/classify", 1000, 0, 60.0, 80, 300), ("Aggregated", 1000, 0, 60.0, 80, 300)]
    )
    assert slo_check.main([str(prefix), "--p99", "/v1/classify=500", "--p99", "/v1/ner=500"]) == 1
