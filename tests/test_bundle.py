"""The bundle's guarantees: hashes checked, failed gates refused, each with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.bundle import REPORT, load_bundle, sha256_file
from engine.errors import BundleError


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    return copy


def test_the_default_bundle_loads_and_passed_its_gates(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert set(bundle.manifest.tasks) == {"sentiment", "ner", "topic", "summarize"}
    assert bundle.manifest.tasks["topic"].aggregator == "heads/topic.aggregator.npz"
    assert bundle.report["passed"] is True
    assert len(bundle.manifest.version) == 12


def test_a_corrupted_file_is_refused_by_name(bundle_copy: Path) -> None:
    with (bundle_copy / "heads" / "sentiment.npz").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=r"heads/sentiment\.npz does not match its sha256"):
        load_bundle(bundle_copy)


def test_a_missing_file_is_refused_by_name(bundle_copy: Path) -> None:
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        load_bundle(bundle_copy)


def test_a_failed_gate_is_refused_unless_allowed(bundle_copy: Path) -> None:
    report_path = bundle_copy / REPORT
    report = json.loads(report_path.read_text())
    report["gates"][0]["passed"] = False
    report_path.write_text(json.dumps(report))
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][REPORT] = sha256_file(report_path)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="failed its quality gates"):
        load_bundle(bundle_copy)
    assert load_bundle(bundle_copy, allow_failed_gates=True).report["gates"][0]["passed"] is False


def test_no_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(tmp_path)
