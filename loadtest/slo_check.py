"""Pass/fail of a headless Locust run against the SLO, read from Locust's own CSV output.

python -m loadtest.slo_check bench-results/locust/run --p99-ms 500 --max-error-rate 0.01 --min-rps 50
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prefix", type=Path, help="the --csv prefix given to locust")
    parser.add_argument("--p99-ms", type=float, default=500.0)
    parser.add_argument("--max-error-rate", type=float, default=0.01)
    parser.add_argument("--min-rps", type=float, default=50.0)
    args = parser.parse_args(argv)
    with Path(f"{args.prefix}_stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    print("| name | requests | failures | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['Name']} | {row['Request Count']} | {row['Failure Count']} "
            f"| {float(row['Requests/s']):.1f} | {row['50%']} | {row['99%']} |"
        )
    total = next(row for row in rows if row["Name"] == "Aggregated")
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    checks = {
        f"p99 {total['99%']} ms <= {args.p99_ms:g} ms": float(total["99%"]) <= args.p99_ms,
        f"error rate {failures / max(requests, 1):.4f} <= {args.max_error_rate:g}": (
            failures / max(requests, 1) <= args.max_error_rate
        ),
        f"throughput {float(total['Requests/s']):.1f} req/s >= {args.min_rps:g}": (
            float(total["Requests/s"]) >= args.min_rps
        ),
    }
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return 0 if all(checks.values()) and requests > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
