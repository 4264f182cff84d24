"""`sparsebert`: serve | build | bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.bundle import load_bundle
from engine.errors import BundleError
from server.settings import DEFAULT_BUNDLE, Settings

USAGE = """usage: sparsebert {serve,build,bench} [options]

  serve   run the HTTP server (sparsebert serve --help lists every flag and env var)
  build   build the default model bundle from packaged weights and data
  bench   benchmark the server against a naive baseline and the raw engine
"""


def serve(argv: list[str]) -> int:
    from pydantic_settings import CliApp

    settings = CliApp.run(Settings, cli_args=argv)
    if not (settings.bundle / "manifest.json").exists() and settings.build_missing_bundle:
        if settings.bundle.resolve() != DEFAULT_BUNDLE.resolve():
            print(f"error: no bundle at {settings.bundle}", file=sys.stderr)
            return 2
        print(f"no bundle at {settings.bundle}: building it from the packaged model (a few minutes)")
        if build(["--out", str(settings.bundle)]) != 0:
            return 1
    try:
        bundle = load_bundle(settings.bundle, allow_failed_gates=settings.allow_failed_gates)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from server.lifecycle import run

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(settings, bundle)


def build(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sparsebert build", description="Build a model bundle.")
    parser.add_argument("--out", type=Path, default=DEFAULT_BUNDLE, help="bundle directory to write")
    parser.add_argument("--cache", type=Path, default=Path(".cache"), help="work and data cache")
    parser.add_argument("--limit", type=int, default=None, help="cap each training set (quick builds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-failed-gates", action="store_true", help="write the bundle anyway")
    args = parser.parse_args(argv)
    try:
        from models.build import BuildOptions
        from models.build import build as run_build
    except ImportError as exc:
        print(f"error: building needs the [build] extra (pip install -e '.[build]'): {exc}", file=sys.stderr)
        return 2
    run_build(
        BuildOptions(
            out=args.out,
            cache=args.cache,
            limit=args.limit,
            seed=args.seed,
            allow_failed_gates=args.allow_failed_gates,
        )
    )
    return 0


def bench(argv: list[str]) -> int:
    from loadtest.bench import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = {"serve": serve, "build": build, "bench": bench}
    if not args or args[0] not in commands:
        print(USAGE, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    return commands[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
