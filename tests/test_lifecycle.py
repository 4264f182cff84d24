"""The process's life on the real bundle: SIGTERM under load loses no accepted request, and a
corrupted bundle is refused before the port opens."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtest.server_process import free_port, start_server


def test_sigterm_under_load_finishes_every_accepted_request_and_exits_0(bundle_dir: Path) -> None:
    port = free_port()
    process = start_server(bundle_dir, port, ("--max-queue-items", "512"))
    url = f"http://127.0.0.1:{port}"
    outcomes: list[str] = []
    after_signal: list[str] = []
    signalled = threading.Event()

    def client(index: int) -> None:
        # A new connection per request: a refused connection is a request never accepted, any
        # other failure would be an accepted request lost.
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=60) as http:
            i = 0
            while True:
                text = f"{index}.{i} " + "a long review that keeps the encoder busy for a while " * 12
                try:
                    response = http.post(f"{url}/v1/classify", json={"inputs": text})
                except httpx.ConnectError:
                    return  # the listener is closed: not accepted, and the client would retry elsewhere
                except httpx.HTTPError as error:
                    outcomes.append(f"lost: {error!r}")
                    return
                outcomes.append(str(response.status_code))
                if signalled.is_set():
                    after_signal.append(str(response.status_code))
                i += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    time.sleep(3.0)
    process.send_signal(signal.SIGTERM)
    signalled.set()
    try:
        ready = httpx.get(f"{url}/health/ready", timeout=2).status_code
    except httpx.TransportError:
        ready = 0  # refused: as unready as it gets
    assert ready in (0, 503)
    for thread in threads:
        thread.join(timeout=60)
    assert process.wait(timeout=60) == 0
    assert outcomes and set(outcomes) == {"200"}, [o for o in outcomes if o != "200"][:5]
    assert after_signal, "no request was in flight when SIGTERM came: the test proved nothing"


def test_a_corrupted_bundle_is_refused_naming_the_file(bundle_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "bundle"
    shutil.copytree(bundle_dir, broken)
    head = next((broken / "heads").glob("*.npz"))
    head.write_bytes(head.read_bytes()[:-10] + b"0123456789")
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--bundle", str(broken), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"heads/{head.name}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
