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

from loadtest.server_process import free_port, start_server, stop_server


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
                sent_after_signal = signalled.is_set()
                try:
                    response = http.post(f"{url}/v1/classify", json={"inputs": text})
                except httpx.ConnectError:
                    return  # the listener is closed: not accepted, and the client would retry elsewhere
                except httpx.ReadError as error:
                    if sent_after_signal and "reset" in str(error).lower():
                        # A new connection the kernel queued as the listener closed: reset
                        # unread, so refused like a closed port (a load balancer would have
                        # stopped sending on the 503 readiness first).
                        return
                    outcomes.append(f"lost: {error!r}")
                    return
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


FAULTY_SERVER = """
import sys
import numpy as np
from engine.runtime import onnx

encode = onnx.OnnxEncoderRuntime.encode


def faulty(self, input_ids, attention_mask, verify=False):  # the real runtime, failing on one word
    if (input_ids == {zebra}).any():
        raise RuntimeError("injected runtime fault")
    return encode(self, input_ids, attention_mask, verify)


onnx.OnnxEncoderRuntime.encode = faulty
from server.cli import main
sys.exit(main(["serve", "--bundle", sys.argv[1], "--port", sys.argv[2], "--log-level", "warning",
              "--no-grpc"]))
"""
ZEBRA = 29145  # the token id of "zebra" in the MiniLM vocabulary


def test_a_runtime_that_keeps_failing_makes_the_server_unready_and_exit_3(bundle_dir: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", FAULTY_SERVER.replace("{zebra}", str(ZEBRA)), str(bundle_dir), str(port)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.post(f"{url}/v1/classify", json={"inputs": "a calm horse"}).status_code == 200
        statuses = []
        for i in range(3):
            statuses.append(httpx.post(f"{url}/v1/classify", json={"inputs": f"zebra {i}"}).status_code)
        assert statuses == [500, 500, 500]  # the runtime's own failures: internal errors
        assert process.wait(timeout=60) == 3
        assert "3 batches in a row failed" in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()


def test_slow_and_vanishing_clients_leave_nothing_behind(bundle_dir: Path) -> None:
    import socket

    port = free_port()
    server = start_server(bundle_dir, port, ())
    url = f"http://127.0.0.1:{port}"
    try:
        body = b'{"inputs": "' + b"a slow client sends its body a byte at a time " * 20 + b'"}'
        head = (
            "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sockets = []
        for i in range(20):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head.encode() + body[: 10 + i])  # a partial body, then silence
            sockets.append(sock)
        busy = [httpx.post(f"{url}/v1/classify", json={"inputs": f"meanwhile {i}"}) for i in range(5)]
        assert all(r.status_code == 200 for r in busy)  # slow clients hold no worker or queue slot
        for sock in sockets:
            sock.close()
        time.sleep(1.0)
        metrics = httpx.get(f"{url}/metrics").text
        assert "sparsebert_requests_in_flight 1.0" in metrics  # only this scrape itself
        assert "sparsebert_queue_depth 0.0" in metrics
    finally:
        stop_server(server)
