"""Who may call, and how much: API keys and per-caller rate limits, as one pure ASGI middleware.

Keys are stored as SHA-256 hashes (`name:sha256hex[:admin]`, from settings or a file; `sparsebert
hash-key` prints one); a presented key is hashed and compared with every stored hash in constant
time. No key -> 401; a key that matches none -> 403; a non-admin key on /admin -> 403. Public
paths (health, metrics, docs by default) need no key.

Rate limits are token buckets per caller (the key's name, or the client address when no keys are
configured): one on requests, checked before the request runs, and one on model tokens, charged
after the request from the tokens it used (the route reports them), so a caller may go into debt
by one request and then waits. Hand-written: the maintained limiter libraries (e.g. `limits`)
count requests in windows and have no after-the-fact charge for a cost known only at the end.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cachetools import LRUCache
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.errors import ErrorKind
from server.errors import error_response

MAX_CALLERS = 100_000
DEFAULT_PUBLIC_PATHS = ("/health/live", "/health/ready", "/metrics", "/docs", "/redoc", "/openapi.json")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    admin: bool = False


class KeyRing:
    def __init__(self, entries: list[str]) -> None:
        self.keys: list[ApiKey] = []
        for entry in entries:
            parts = entry.strip().split(":")
            if len(parts) not in (2, 3) or len(parts[1]) != 64 or (len(parts) == 3 and parts[2] != "admin"):
                raise ValueError(
                    f"an API key entry is `name:sha256hex` or `name:sha256hex:admin`, got {entry!r}"
                )
            self.keys.append(ApiKey(parts[0], bytes.fromhex(parts[1]), len(parts) == 3))

    @classmethod
    def load(cls, entries: list[str], path: Path | None) -> KeyRing | None:
        """None when no key is configured (the server is open)."""
        if path is not None:
            lines = path.read_text().splitlines()
            entries = [*entries, *(line for line in lines if line.strip() and not line.startswith("#"))]
        return cls(entries) if entries else None

    def find(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self.keys:  # every comparison runs: the time does not say which key nearly matched
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


def authenticate(keys: KeyRing, authorization: str) -> ApiKey | tuple[ErrorKind, str]:
    """The key an `Authorization: Bearer <key>` value (HTTP header or gRPC metadata) names, or
    the error to answer with."""
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return ErrorKind.UNAUTHENTICATED, "this server needs an API key: Authorization: Bearer <key>"
    key = keys.find(presented.strip())
    if key is None:
        return ErrorKind.FORBIDDEN, "the API key is not recognised"
    return key


@dataclass
class TokenBucket:
    rate: float  # units per second
    burst: float  # the most it holds
    clock: Callable[[], float] = time.monotonic
    level: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = self.burst
        self.updated = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, amount: float) -> float:
        """Take `amount` if the bucket holds it: 0.0; else the seconds until it will."""
        self._refill()
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def charge(self, amount: float) -> None:
        """Take `amount` after the fact; the level may go below zero (a debt)."""
        self._refill()
        self.level -= amount


@dataclass(frozen=True)
class RateLimits:
    requests_per_s: float | None = None
    request_burst: float = 20.0
    tokens_per_s: float | None = None
    token_burst: float = 20_000.0


class AccessMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing | None,
        limits: RateLimits,
        public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS,
    ) -> None:
        self.app = app
        self.keys = keys
        self.limits = limits
        self.public_paths = public_paths
        # Bounded: callers are client addresses when no keys are set, and those are unbounded.
        self._requests: LRUCache[str, TokenBucket] = LRUCache(MAX_CALLERS)
        self._tokens: LRUCache[str, TokenBucket] = LRUCache(MAX_CALLERS)

    def _is_public(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        caller = self._caller(scope)
        if isinstance(caller, tuple):
            kind, message = caller
            headers = {"WWW-Authenticate": "Bearer"} if kind is ErrorKind.UNAUTHENTICATED else {}
            response = error_response(kind, message)
            response.headers.update(headers)
            await response(scope, receive, send)
            return
        if self.limits.requests_per_s is not None:
            bucket = self._requests.setdefault(
                caller, TokenBucket(self.limits.requests_per_s, self.limits.request_burst)
            )
            wait = bucket.take(1)
            if wait > 0:
                await self._limited(scope, receive, send, f"{caller} is over its request rate", wait)
                return
        tokens = None
        if self.limits.tokens_per_s is not None:
            tokens = self._tokens.setdefault(
                caller, TokenBucket(self.limits.tokens_per_s, self.limits.token_burst)
            )
            wait = tokens.take(0.0)  # refills; a bucket in debt makes the caller wait it out
            if tokens.level <= 0:
                wait = -tokens.level / tokens.rate
                await self._limited(scope, receive, send, f"{caller} is over its token rate", wait)
                return
        scope.setdefault("state", {})["caller"] = caller
        try:
            await self.app(scope, receive, send)
        finally:
            used = scope.get("state", {}).get("tokens_used", 0)  # set by the task routes
            if tokens is not None and used:
                tokens.charge(used)

    def _caller(self, scope: Scope) -> str | tuple[ErrorKind, str]:
        """The caller's name, or the error to answer with."""
        if self.keys is None:
            client = scope.get("client")
            return f"client {client[0]}" if client else "client unknown"
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        key = authenticate(self.keys, header)
        if not isinstance(key, ApiKey):
            return key
        if scope["path"].startswith("/admin") and not key.admin:
            return ErrorKind.FORBIDDEN, f"key {key.name!r} may not use the admin routes"
        return f"key {key.name}"

    @staticmethod
    async def _limited(scope: Scope, receive: Receive, send: Send, message: str, wait_s: float) -> None:
        await error_response(ErrorKind.RATE_LIMITED, message, retry_after_s=wait_s)(scope, receive, send)
