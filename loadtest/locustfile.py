"""Locust users for sparsebert-serve: `make loadtest` runs them headless against a local server.

Traffic: classification and NER (6:3) over the mixed-length benchmark texts (60% sentences, 30%
short paragraphs, 10% long ones), with a repeat ratio (LOCUST_REPEAT_SHARE, default 0.3) of
popular texts, every other request a text never sent before, so the cache pool sees what
production sees. FastHttpUser (geventhttpclient):
~4x less CPU per request than HttpUser, which matters when Locust shares 2 cores with the server.
Summarization and the gRPC streaming user come with the streaming API (issue 5).
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, task

from loadtest.workload import load_workload

TEXTS = load_workload()
POPULAR = TEXTS[:20]
REPEAT_SHARE = float(os.environ.get("LOCUST_REPEAT_SHARE", "0.3"))


def pick(rng: random.Random) -> str:
    """A popular text (a repeat the cache can serve), or a text never sent before."""
    if rng.random() < REPEAT_SHARE:
        return rng.choice(POPULAR)
    return f"{rng.choice(TEXTS)} [{rng.getrandbits(48):x}]"


class ApiUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))

    @task(6)
    def classify(self) -> None:
        self.client.post("/v1/classify", json={"inputs": pick(self.rng)}, name="/v1/classify")

    @task(3)
    def ner(self) -> None:
        self.client.post(
            "/v1/ner", json={"inputs": pick(self.rng), "aggregation_strategy": "simple"}, name="/v1/ner"
        )
