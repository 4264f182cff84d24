"""Locust users for sparsebert-serve: `make loadtest` runs them headless against a local server.

Traffic: classification and NER (6:3) over the mixed-length benchmark texts (60% sentences, 30%
short paragraphs, 10% long ones), with a repeat ratio (LOCUST_REPEAT_SHARE, default 0.3) of
popular texts, every other request a text never sent before, so the cache pool sees what
production sees. FastHttpUser (geventhttpclient):
~4x less CPU per request than HttpUser, which matters when Locust shares 2 cores with the server.
Summaries (1 in 10 HTTP requests) of held-out BBC articles (~380 words, read whole or in
windows). A gRPC user (1 in 8 users) streams summaries of longer documents (three articles, ~1.5k
tokens) and records the time to the first event and the whole stream, as two Locust entries.
"""

from __future__ import annotations

import os
import random
import time

# grpc's own threads must cooperate with gevent's: set up before any channel exists.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import grpc  # noqa: E402
from locust import FastHttpUser, User, constant_throughput, task  # noqa: E402

from loadtest.workload import load_workload  # noqa: E402
from models.data import bbc  # noqa: E402
from server.rpc import sparsebert_pb2 as pb  # noqa: E402
from server.rpc import sparsebert_pb2_grpc as pb_grpc  # noqa: E402

TEXTS = load_workload()
ARTICLES = [article.text for article in bbc.load_splits()["test"]]
GRPC_TARGET = os.environ.get("SPARSEBERT_GRPC_TARGET", "127.0.0.1:50051")
POPULAR = TEXTS[:20]
REPEAT_SHARE = float(os.environ.get("LOCUST_REPEAT_SHARE", "0.3"))
# Each HTTP user paces itself to this rate (less when its requests take longer): the offered
# load is set, not "as fast as the server answers", so the SLO is checked at a stated load.
API_REQUESTS_PER_USER_S = float(os.environ.get("LOCUST_USER_RPS", "5.0"))
STREAMS_PER_USER_S = float(os.environ.get("LOCUST_STREAMS_PER_USER_S", "1.0"))


def pick(rng: random.Random) -> str:
    """A popular text (a repeat the cache can serve), or a text never sent before."""
    if rng.random() < REPEAT_SHARE:
        return rng.choice(POPULAR)
    return f"{rng.choice(TEXTS)} [{rng.getrandbits(48):x}]"


class ApiUser(FastHttpUser):
    weight = 7
    wait_time = constant_throughput(API_REQUESTS_PER_USER_S)

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

    @task(1)
    def summarize(self) -> None:
        body = {"inputs": self.rng.choice(ARTICLES), "sentences": 3}
        self.client.post("/v1/summarize", json=body, name="/v1/summarize")


class GrpcStreamUser(User):
    """Server-streaming Summarize over gRPC; Locust has no gRPC client, so this one reports its
    own entries: "Summarize first event" and "Summarize stream" (the whole stream)."""

    weight = 1
    wait_time = constant_throughput(STREAMS_PER_USER_S)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))
        self.channel = grpc.insecure_channel(GRPC_TARGET)
        self.stub = pb_grpc.InferenceStub(self.channel)  # type: ignore[no-untyped-call]

    def on_stop(self) -> None:
        self.channel.close()

    def _report(self, name: str, seconds: float, error: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=seconds * 1000, response_length=0,
            exception=error, context={},
        )  # fmt: skip

    @task
    def summarize_stream(self) -> None:
        document = "\n\n".join(self.rng.sample(ARTICLES, 3))
        started = time.perf_counter()
        first: float | None = None
        try:
            for _event in self.stub.Summarize(pb.SummarizeRequest(input=document, sentences=3), timeout=30):
                if first is None:
                    first = time.perf_counter() - started
                    self._report("Summarize first event", first)
            self._report("Summarize stream", time.perf_counter() - started)
        except grpc.RpcError as error:
            self._report("Summarize stream", time.perf_counter() - started, error)
