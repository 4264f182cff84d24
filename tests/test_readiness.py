"""Before warm-up ends the server answers 503 (with Retry-After), not 500."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings


def test_requests_before_ready_get_503(bundle_dir: Path) -> None:
    app = create_app(Settings(bundle=bundle_dir))
    client = TestClient(app)  # no `with`: the lifespan (load + warm-up) has not run
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    response = client.post("/v1/classify", json={"inputs": "hello"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "not_ready"
