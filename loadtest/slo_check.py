"""Pass/fail of a headless Locust run against the SLO, read from Locust's own CSV output.

One p99 bound for a 20-token sentence and a 1,500-token document says nothing about either, so
the latency SLO is per class of request (Locust's entry names): interactive routes (classify, NER)
and document work (summaries, and a streamed summary's first event). Errors and throughput are
checked over everything.

python -m loadtest.slo_check bench-results/locust/run --max-error-rate 0.01 --min-rps 70 \
    --p99 /v1/classify=500 --p99 /v1/ner=500 --p99 /v1/summarize=2500
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

# Entry name -> p99 bound in ms. A ~500-token article's summary costs ~4 windows of encoder time
# before its first sentence can be chosen; a gRPC stream reads three articles (~1,500 tokens).
DEFAULT_P99_MS = {
    "/v1/classify": 500.0,
    "/v1/ner": 500.0,
    "/v1/summarize": 2500.0,
    "Summarize first event": 1000.0,
    "Summarize stream": 5000.0,
}


def _bound(text: str) -> tuple[str, float]:
    name, _, milliseconds = text.rpartition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME=MS, got {text!r}")
    return name, float(milliseconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prefix", type=Path, help="the --csv prefix given to locust")
    parser.add_argument(
        "--p99",
        type=_bound,
        action="append",
        help="NAME=MS: p99 bound of one Locust entry (repeatable; default: DEFAULT_P99_MS)",
    )
    parser.add_argument("--max-error-rate", type=float, default=0.01)
    parser.add_argument("--min-rps", type=float, default=70.0)
    args = parser.parse_args(argv)
    bounds = dict(args.p99) if args.p99 else DEFAULT_P99_MS
    with Path(f"{args.prefix}_stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    print("| name | requests | failures | req/s | p50 ms | p99 ms | p99 bound ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        bound = bounds.get(row["Name"])
        print(
            f"| {row['Name']} | {row['Request Count']} | {row['Failure Count']} "
            f"| {float(row['Requests/s']):.1f} | {row['50%']} | {row['99%']} | {bound or '-'} |"
        )
    total = next(row for row in rows if row["Name"] == "Aggregated")
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    checks = {
        f"error rate {failures / max(requests, 1):.4f} <= {args.max_error_rate:g}": (
            failures / max(requests, 1) <= args.max_error_rate
        ),
        f"throughput {float(total['Requests/s']):.1f} req/s >= {args.min_rps:g}": (
            float(total["Requests/s"]) >= args.min_rps
        ),
    }
    by_name = {row["Name"]: row for row in rows}
    for name, bound in bounds.items():
        entry = by_name.get(name)
        if entry is None or int(entry["Request Count"]) == 0:
            checks[f"{name}: no requests (the mix must exercise every class)"] = False
        else:
            checks[f"{name}: p99 {entry['99%']} ms <= {bound:g} ms"] = float(entry["99%"]) <= bound
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return 0 if all(checks.values()) and requests > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
