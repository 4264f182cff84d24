"""The operational kit, validated offline: alert rules under `promtool test rules`, the scrape
config, Grafana dashboards (structure, PromQL that parses, metrics that exist), the compose file
against the compose spec, and the Kubernetes manifests against Kubernetes' schemas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_metrics_contract import NAME

DEPLOY = ROOT / "deploy"
PROMQL_FUNCTIONS_AND_WORDS = {
    "sum", "by", "rate", "histogram_quantile", "max", "avg", "min", "le", "without", "on",
    "avg_over_time", "irate", "increase", "count", "offset", "bool", "and", "or", "unless",
}  # fmt: skip


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is missing: `make system-deps` installs it (Debian package prometheus)")
    return path


def contract_names() -> set[str]:
    names = set()
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = NAME.match(cells[0]) if cells else None
        if match:
            names.add(match.group(1))
    return names


def metrics_in(expr: str) -> set[str]:
    """The metric names an expression reads (suffixes of histograms and counters stripped)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    without_ranges = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_ranges)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges))
    names = set()
    for word in words - PROMQL_FUNCTIONS_AND_WORDS:
        names.add(re.sub(r"_(bucket|sum|count|total)$", "", word))
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    exprs = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                exprs.append((f"{path.name}: {panel['title']}", target["expr"]))
    return exprs


def test_alert_rules_pass_their_unit_tests() -> None:
    tests = DEPLOY / "prometheus" / "tests" / "sparsebert_test.yml"
    result = subprocess.run(
        [tool("promtool"), "test", "rules", str(tests)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_and_reads_documented_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "sparsebert.yml").read_text())
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    tested = (DEPLOY / "prometheus" / "tests" / "sparsebert_test.yml").read_text()
    assert "SparsebertAttentionSparsityLow" in alerts
    known = contract_names() | {"up"}
    for alert, expr in alerts.items():
        assert f"alertname: {alert}" in tested, f"{alert} has no promtool test"
        assert metrics_in(expr) <= known, f"{alert} reads {metrics_in(expr) - known}"


def test_scrape_config_is_valid(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        (DEPLOY / "prometheus" / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/rules/*.yml", str(DEPLOY / "prometheus" / "rules" / "*.yml"))
    )
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_are_well_formed_and_their_queries_parse(tmp_path: Path) -> None:
    paths = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert paths
    for path in paths:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "prometheus", panel["title"]
    exprs = dashboard_exprs()
    # promtool parses PromQL when it checks rules: one recording rule per panel query.
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query:{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(exprs)
    ]}]}  # fmt: skip
    rules_file = tmp_path / "dashboard_queries.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_read_only_documented_metrics_and_cover_the_issue() -> None:
    known = contract_names()
    used: set[str] = set()
    for where, expr in dashboard_exprs():
        assert metrics_in(expr) <= known, f"{where} reads {metrics_in(expr) - known}"
        used |= metrics_in(expr)
    needed = {
        "sparsebert_request_duration_seconds",
        "sparsebert_queue_depth",
        "sparsebert_batch_size",
        "sparsebert_batch_padding_ratio",
        "sparsebert_cache_lookups",
        "sparsebert_attention_sparsity_ratio",
        "sparsebert_gpu_memory_fragmentation_ratio",
    }
    assert needed <= used, needed - used


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "sparsebert.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert any(m.startswith("./grafana/dashboards:" + path) for m in mounts)
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["uid"] == "prometheus"


def test_compose_file_matches_the_compose_spec_and_its_files_exist() -> None:
    compose_file = DEPLOY / "compose.yaml"
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose_file)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load(compose_file.read_text())
    assert {"sparsebert", "redis", "prometheus", "grafana"} <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    build = compose["services"]["sparsebert"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


def test_kubernetes_manifests_validate_strictly() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    files = [DEPLOY / "kubernetes" / name for name in kustomization["resources"]]
    assert all(f.is_file() for f in files)
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.33.0", *map(str, files)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    documents = [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]
    kinds = {doc["kind"] for doc in documents}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    server = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "sparsebert")
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert "preStop" in container["lifecycle"]
    hpa = next(d for d in documents if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in contract_names()
