"""The OpenAPI docs page, rendered by a real browser (headless Chromium) with no network."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import httpx

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
]


def test_docs_render_every_route_in_a_browser(client: httpx.Client) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed: `make system-deps` installs it (apt package chromium)"
    with tempfile.TemporaryDirectory() as profile:
        rendered = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", f"{client.base_url}/docs"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    assert "Unable to render this definition" not in rendered
    for path in ["/v1/classify", "/v1/ner", "/predict", "/embed", "/v1/models", "/health/ready"]:
        assert f'data-path="{path}"' in rendered, path
