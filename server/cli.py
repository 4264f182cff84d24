"""`sparsebert`: serve | build | bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.bundle import load_bundle
from engine.errors import BundleError
from engine.runtime.selection import choose_runtime, probe_machine
from server.settings import DEFAULT_BUNDLE, Settings

USAGE = """usage: sparsebert {serve,build,bench,hash-key} [options]

  serve      run the HTTP server (sparsebert serve --help lists every flag and env var)
  build      build the default model bundle from packaged weights and data
  bench      benchmark batching (server, naive, raw engine) and the cache pool
  hash-key   print the `name:sha256` entry of an API key read from stdin, for --api-keys
"""


def serve(argv: list[str]) -> int:
    from pydantic_settings import CliApp

    settings = CliApp.run(Settings, cli_args=argv)
    if not (settings.bundle / "manifest.json").exists() and settings.build_missing_bundle:
        if settings.bundle.resolve() != DEFAULT_BUNDLE.resolve():
            print(f"error: no bundle at {settings.bundle}", file=sys.stderr)
            return 2
        print(f"no bundle at {settings.bundle}: building it from the packaged model (~40 min on 2 cores)")
        if build(["--out", str(settings.bundle)]) != 0:
            return 1
    try:
        bundle = load_bundle(settings.bundle, allow_failed_gates=settings.allow_failed_gates)
        # A runtime asked for by name must load: say so before binding.
        choose_runtime(settings.runtime, bundle.manifest, probe_machine(bundle.manifest))
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
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="cap every training and evaluation set (quick builds, tests of the pipeline)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-failed-gates", action="store_true", help="write the bundle anyway")
    parser.add_argument(
        "--gpu-graph",
        action="store_true",
        help="also write and gate the GPU encoders: a static QDQ INT8 graph and FP16 torch "
        "weights (~8 min more; +83 MB)",
    )
    parser.add_argument("--teacher-epochs", type=int, default=None, help="override the teacher's epochs")
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
            gpu_graph=args.gpu_graph,
            teacher_epochs=args.teacher_epochs,
        )
    )
    return 0


def bench(argv: list[str]) -> int:
    from loadtest.bench import main as bench_main

    return bench_main(argv)


def hash_key(argv: list[str]) -> int:
    from server.access import hash_key as digest

    parser = argparse.ArgumentParser(prog="sparsebert hash-key", description="Hash an API key (from stdin).")
    parser.add_argument("name", help="the key's name (it labels the caller in rate limits and logs)")
    parser.add_argument("--admin", action="store_true", help="the key may use the admin routes")
    args = parser.parse_args(argv)
    key = sys.stdin.readline().strip()
    if not key:
        print("error: no key on stdin", file=sys.stderr)
        return 2
    print(f"{args.name}:{digest(key)}{':admin' if args.admin else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = {"serve": serve, "build": build, "bench": bench, "hash-key": hash_key}
    if not args or args[0] not in commands:
        print(USAGE, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    return commands[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
