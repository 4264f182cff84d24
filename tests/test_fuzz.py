"""Schemathesis against the server's own OpenAPI schema: no 5xx, and every response matches the
schema (status codes, content types, headers, bodies). CI runs a bounded number of examples per
route; `make fuzz` runs many more (SPARSEBERT_FUZZ_EXAMPLES).

X-Request-Timeout is pinned to 30 s: a deadline too short to meet is a documented 504, which
schemathesis counts as a server error (test_http_api.py covers it). The checks that want every
schema-valid body accepted, or every unknown header refused, are not run: a request for a model
the server does not serve is schema-valid and rightly a 422, and HTTP servers ignore unknown headers.
"""

from __future__ import annotations

import os
import subprocess

import httpx

from tests.test_deploy import tool

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,unsupported_method"
)


def test_the_api_survives_schema_driven_fuzzing(client: httpx.Client) -> None:
    examples = os.environ.get("SPARSEBERT_FUZZ_EXAMPLES", "30")
    result = subprocess.run(
        [tool("schemathesis"), "run", f"{str(client.base_url).rstrip('/')}/openapi.json", "--checks", CHECKS,
         "--max-examples", examples, "--workers", "1", "--phases", "examples,coverage,fuzzing",
         "-H", "X-Request-Timeout: 30", "--seed", "7", "--no-color"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
