"""A real Prometheus on loopback scrapes the running server; a value comes back through its API."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import yaml

from loadtest.server_process import free_port
from tests.test_deploy import DEPLOY, tool


def test_prometheus_scrapes_the_server_and_loads_the_rules(client: httpx.Client, tmp_path: Path) -> None:
    client.post("/v1/classify", json={"inputs": "A wonderful film."})
    target = str(client.base_url).removeprefix("http://").rstrip("/")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "rules" / "sparsebert.yml")],
        "scrape_configs": [{"job_name": "sparsebert", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline and not result:
            time.sleep(1)
            try:
                body = httpx.get(f"{api}/query", params={"query": "sparsebert_build_info"}).json()
            except httpx.TransportError:
                continue
            result = body["data"]["result"]
        assert result, "Prometheus never scraped sparsebert_build_info"
        metric = result[0]["metric"]
        assert isinstance(metric, dict) and metric["bundle"] == "minilm-multitask"
        assert result[0]["value"][1] == "1"  # type: ignore[index]
        count = httpx.get(
            f"{api}/query",
            params={"query": 'sum(sparsebert_request_duration_seconds_count{route="/v1/classify"})'},
        ).json()["data"]["result"]
        assert float(count[0]["value"][1]) >= 1
        rules = httpx.get(f"{api}/rules").json()["data"]["groups"]
        names = {rule["name"] for group in rules for rule in group["rules"]}
        assert "SparsebertAttentionSparsityLow" in names
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
