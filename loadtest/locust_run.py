"""`make loadtest`: a local server on the default bundle, Locust headless against it for a bounded
time, the CPU Locust itself took (it shares the 2 cores), then the SLO check on Locust's CSV."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from loadtest import slo_check
from loadtest.server_process import free_port, start_server, stop_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/minilm-multitask"))
    parser.add_argument("--users", type=int, default=18)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench-results/locust"))
    parser.add_argument("--max-error-rate", type=float, default=0.01)
    parser.add_argument("--min-rps", type=float, default=70.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    port, grpc_port = free_port(), free_port()
    server = start_server(args.bundle, port, ("--grpc-port", str(grpc_port)))
    try:
        started = time.perf_counter()
        locustfile = os.environ.get("LOCUSTFILE", "loadtest/locustfile.py")  # another mix, to compare
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", locustfile, "--headless",
             "-H", f"http://127.0.0.1:{port}", "-u", str(args.users), "-r", str(args.users),
             "-t", f"{args.seconds}s", "--only-summary", "--csv", str(args.out / "run"),
             "--json-file", str(args.out / "run"), "--exit-code-on-error", "0"],
            check=False,
            env={**os.environ, "SPARSEBERT_GRPC_TARGET": f"127.0.0.1:{grpc_port}"},
        )  # fmt: skip
        wall = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # Locust's: the server is not reaped yet
    finally:
        stop_server(server)
    locust_cpu = usage.ru_utime + usage.ru_stime
    print(f"\nLocust: {locust_cpu:.1f} s CPU over {wall:.1f} s = {locust_cpu / wall:.2f} of a core")
    if locust.returncode != 0:
        print(f"locust exited with {locust.returncode}")
        return locust.returncode
    return slo_check.main(
        [str(args.out / "run"), "--max-error-rate", str(args.max_error_rate), "--min-rps", str(args.min_rps)]
    )


if __name__ == "__main__":
    sys.exit(main())
