"""Document work queues a level below interactive inputs (a stream's first window excepted), so
short requests do not wait behind documents read in windows. Real bundle, in process; the
batcher's submissions are recorded on their way in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engine.queue import demoted
from models.data import bbc
from server.app import create_app
from server.settings import Settings


def test_demoted_goes_one_level_down_and_stops_at_low() -> None:
    assert [demoted(p) for p in ("high", "normal", "low")] == ["normal", "low", "low"]


@pytest.fixture(scope="module")
def recorded(bundle_dir: Path) -> Iterator[tuple[TestClient, list[str]]]:
    priorities: list[str] = []
    with TestClient(create_app(Settings(bundle=bundle_dir, cache=False, grpc=False))) as client:
        deadline = time.monotonic() + 120
        while client.get("/health/ready").status_code != 200:  # warm-up runs after start-up
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        batcher = client.app.state.service.batcher  # type: ignore[attr-defined]
        submit = batcher.submit

        def recording(ids: Any, deadline: float, priority: str = "normal", admitted: bool = False) -> Any:
            priorities.append(priority)
            return submit(ids, deadline, priority, admitted)

        batcher.submit = recording
        yield client, priorities


def document(tokens_at_least: int) -> str:
    text = ""
    for article in bbc.load_splits()["test"]:
        text += article.text + "\n\n"
        if len(text.split()) > tokens_at_least:
            return text
    raise AssertionError("not enough held-out text")


@pytest.mark.parametrize("priority", ["high", "normal"])
def test_a_summary_queues_its_first_window_as_asked_and_the_rest_one_level_down(
    recorded: tuple[TestClient, list[str]], priority: str
) -> None:
    client, priorities = recorded
    priorities.clear()
    body = {"inputs": document(1500), "sentences": 2}
    response = client.post("/v1/summarize", json=body, headers={"X-Priority": priority})
    assert response.status_code == 200
    assert len(priorities) > 2
    assert priorities[0] == priority
    assert set(priorities[1:]) == {demoted(priority)}  # type: ignore[arg-type]


def test_a_long_document_read_in_windows_is_document_work_and_a_sentence_is_not(
    recorded: tuple[TestClient, list[str]],
) -> None:
    client, priorities = recorded
    priorities.clear()
    assert client.post("/v1/ner", json={"inputs": "Angela Merkel visited Paris."}).status_code == 200
    assert priorities == ["normal"]
    priorities.clear()
    assert client.post("/v1/ner", json={"inputs": document(1500)}).status_code == 200
    assert len(priorities) > 1 and set(priorities) == {"low"}
