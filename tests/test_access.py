"""API keys, rate limits and CORS: units of the token bucket and key ring, then a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from loadtest.server_process import free_port
from server.access import KeyRing, TokenBucket, hash_key
from server.rpc import sparsebert_pb2 as pb
from server.rpc import sparsebert_pb2_grpc as pb_grpc
from tests.conftest import start_server
from tests.test_http_api import error_of

ALICE, BOB, CAROL = "alice-secret-key", "bob-secret-key", "carol-secret-key"


def test_token_bucket_refills_at_its_rate_and_can_go_into_debt() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [bucket.take(1) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(1) == pytest.approx(0.5)  # one unit at 2 per second
    now[0] = 0.5
    assert bucket.take(1) == 0.0
    bucket.charge(10)  # after the fact: a debt of 10
    now[0] = 2.5
    assert bucket.level == pytest.approx(-10) and bucket.take(1) > 0
    now[0] = 100.0
    assert bucket.take(3) == 0.0  # refilled, but never above the burst
    assert bucket.take(1) > 0


def test_key_ring_finds_keys_by_hash_and_refuses_malformed_entries(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# one per line\nbob:{hash_key(BOB)}\n")
    ring = KeyRing.load([f"alice:{hash_key(ALICE)}:admin"], keys_file)
    assert ring is not None
    alice, bob = ring.find(ALICE), ring.find(BOB)
    assert alice is not None and alice.name == "alice" and alice.admin
    assert bob is not None and bob.name == "bob" and not bob.admin
    assert ring.find("nobody") is None and ring.find(hash_key(ALICE)) is None  # the hash is not the key
    assert KeyRing.load([], None) is None
    for bad in ("alice", f"alice:{hash_key(ALICE)}:root", "alice:abc"):
        with pytest.raises(ValueError, match="name:sha256hex"):
            KeyRing([bad])


GUARDED_GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def guarded(bundle_dir: Path) -> Iterator[httpx.Client]:
    keys = f'["alice:{hash_key(ALICE)}:admin", "bob:{hash_key(BOB)}", "carol:{hash_key(CAROL)}"]'
    yield from start_server(
        bundle_dir, "--api-keys", keys, "--admin-api", "--rate-limit-rps", "2", "--rate-limit-burst", "3",
        "--rate-limit-tokens-per-s", "20", "--rate-limit-token-burst", "200",
        "--cors-origins", '["https://app.example"]', "--grpc-port", str(GUARDED_GRPC_PORT),
    )  # fmt: skip


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_checked_and_scoped(guarded: httpx.Client) -> None:
    missing = guarded.post("/v1/classify", json={"inputs": "fine"})
    assert error_of(missing, 401) == "unauthenticated"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert error_of(
        guarded.post("/v1/classify", json={"inputs": "x"}, headers={"Authorization": "Basic x"}), 401
    )
    assert (
        error_of(guarded.post("/v1/classify", json={"inputs": "x"}, headers=auth("wrong")), 403)
        == "forbidden"
    )
    assert guarded.post("/v1/classify", json={"inputs": "fine"}, headers=auth(ALICE)).status_code == 200
    assert error_of(guarded.post("/admin/cache/flush", headers=auth(BOB)), 403) == "forbidden"
    assert guarded.post("/admin/cache/flush", headers=auth(ALICE)).status_code == 200
    for public in ("/health/live", "/health/ready", "/metrics", "/docs", "/openapi.json"):
        assert guarded.get(public).status_code == 200, public


def test_a_caller_over_its_request_rate_gets_429_with_retry_after(guarded: httpx.Client) -> None:
    statuses = [
        guarded.post("/v1/classify", json={"inputs": f"text {i}"}, headers=auth(BOB)).status_code
        for i in range(6)
    ]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
    limited = guarded.post("/v1/classify", json={"inputs": "again"}, headers=auth(BOB))
    assert error_of(limited, 429) == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    # Another caller is not limited by bob's use.
    assert guarded.post("/v1/classify", json={"inputs": "mine"}, headers=auth(ALICE)).status_code == 200


def test_a_caller_over_its_token_rate_waits_out_its_debt(guarded: httpx.Client) -> None:
    long_text = "a long review of a film " * 100  # ~500 tokens: over the 200-token burst
    first = guarded.post("/v1/classify", json={"inputs": long_text}, headers=auth(CAROL))
    assert first.status_code == 200  # allowed while the bucket held tokens; now in debt
    limited = guarded.post("/v1/classify", json={"inputs": "short"}, headers=auth(CAROL))
    assert error_of(limited, 429) == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 10  # ~300 tokens of debt at 20 per second


def test_cors_is_off_unless_configured(guarded: httpx.Client, client: httpx.Client) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = guarded.options("/v1/classify", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = guarded.options("/v1/classify", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in client.options("/v1/classify", headers=preflight).headers


def test_grpc_calls_need_a_known_key_in_their_metadata(guarded: httpx.Client) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{GUARDED_GRPC_PORT}") as channel:
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.ClassifyRequest(inputs=["A fine film."])
        wrong_key = (("authorization", "Bearer wrong"),)
        for metadata, code in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (wrong_key, grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request, metadata=metadata)
            assert refused.value.code() == code
        answer = stub.Classify(request, metadata=(("authorization", f"Bearer {CAROL}"),))
        assert answer.results[0].labels[0].label == "positive"
