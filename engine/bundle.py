"""The model bundle: a directory with `manifest.json`, read at start-up and written by the build.

The manifest names every file with its sha256; `report.json` holds the accuracy figures and
gates measured at build time. `load_bundle` refuses a bundle whose hashes or gates do not hold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"

TaskKind = Literal["classification", "token-classification", "summarization"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: TaskKind
    labels: tuple[str, ...]
    head: str
    description: str = ""
    aggregator: str | None = None  # classification: trained window aggregation (else windows are averaged)
    window: int | None = None  # tokens per window when chunking (None: the service's default)


@dataclass(frozen=True)
class EncoderSpec:
    file: str
    precision: str
    quantization: str = ""


@dataclass(frozen=True)
class AttentionSpec:
    """The encoder's attention pattern (models/sparse_attention.py): "dense", or "local+global"
    with blocks of `window` tokens and [CLS] + `global_tokens` salient tokens, for batches longer
    than `dense_up_to` tokens (None: 2 x window, where the pattern stops being dense)."""

    kind: str = "dense"
    window: int | None = None
    global_tokens: int = 0
    dense_up_to: int | None = None

    @property
    def sparse(self) -> bool:
        return self.kind != "dense" and self.window is not None

    @property
    def dense_limit(self) -> int | None:
        """The longest batch the encoder reads densely (None: every batch, a dense encoder)."""
        if not self.sparse or self.window is None:
            return None
        return self.dense_up_to if self.dense_up_to is not None else 2 * self.window


@dataclass(frozen=True)
class Manifest:
    name: str
    tokenizer: str
    max_length: int
    hidden_size: int
    encoders: dict[str, EncoderSpec]
    tasks: dict[str, TaskSpec]
    files: dict[str, str]
    attention: AttentionSpec = AttentionSpec()
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def version(self) -> str:
        """A content hash: two bundles share it only if every file is the same."""
        joined = "".join(f"{path}:{digest}\n" for path, digest in sorted(self.files.items()))
        return hashlib.sha256(joined.encode()).hexdigest()[:12]

    def default_task(self, kind: TaskKind) -> str | None:
        return next((name for name, task in self.tasks.items() if task.kind == kind), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "tokenizer": self.tokenizer,
            "max_length": self.max_length,
            "hidden_size": self.hidden_size,
            "attention": vars(self.attention),
            "encoders": {key: vars(spec) for key, spec in self.encoders.items()},
            "tasks": {
                name: {
                    "kind": task.kind,
                    "labels": list(task.labels),
                    "head": task.head,
                    "description": task.description,
                    "aggregator": task.aggregator,
                    "window": task.window,
                }
                for name, task in self.tasks.items()
            },
            "source": self.source,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Manifest:
        if raw.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"manifest format_version {raw.get('format_version')!r} is not {FORMAT_VERSION}"
            )
        try:
            return cls(
                name=raw["name"],
                tokenizer=raw["tokenizer"],
                max_length=int(raw["max_length"]),
                hidden_size=int(raw["hidden_size"]),
                attention=AttentionSpec(**raw.get("attention", {})),
                encoders={key: EncoderSpec(**spec) for key, spec in raw["encoders"].items()},
                tasks={
                    name: TaskSpec(
                        name=name,
                        kind=spec["kind"],
                        labels=tuple(spec["labels"]),
                        head=spec["head"],
                        description=spec.get("description", ""),
                        aggregator=spec.get("aggregator"),
                        window=spec.get("window"),
                    )
                    for name, spec in raw["tasks"].items()
                },
                files=dict(raw["files"]),
                source=raw.get("source", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed manifest: {exc!r}") from exc


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    report: dict[str, Any]

    def path(self, relative: str) -> Path:
        return self.root / relative


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def failed_gates(report: dict[str, Any]) -> list[str]:
    return [gate["name"] for gate in report.get("gates", []) if not gate.get("passed", False)]


def load_bundle(root: Path, *, allow_failed_gates: bool = False) -> Bundle:
    """Read and verify a bundle: every listed file exists with its hash, and every gate passed."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"no bundle at {root}: {MANIFEST} is missing")
    try:
        manifest = Manifest.from_json(json.loads(manifest_path.read_text()))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    for relative, expected in sorted(manifest.files.items()):
        file = root / relative
        if not file.is_file():
            raise BundleError(f"bundle file {file} is missing")
        if sha256_file(file) != expected:
            raise BundleError(f"bundle file {file} does not match its sha256 in {MANIFEST}")
    for needed in [manifest.tokenizer, REPORT]:
        if needed not in manifest.files:
            raise BundleError(f"{MANIFEST} does not list {needed}")
    for task in manifest.tasks.values():
        for needed_file in [task.head, task.aggregator]:
            if needed_file is not None and needed_file not in manifest.files:
                raise BundleError(f"{MANIFEST} does not list {needed_file} of task {task.name}")
    report = json.loads((root / REPORT).read_text())
    failed = failed_gates(report)
    if failed and not allow_failed_gates:
        raise BundleError(f"bundle {root} failed its quality gates: {', '.join(failed)}")
    return Bundle(root=root, manifest=manifest, report=report)


def write_manifest(root: Path, manifest_without_files: Manifest) -> Manifest:
    """Hash every file under `root` (but the manifest) into the manifest and write it."""
    files = {
        str(path.relative_to(root)): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = Manifest(**{**vars(manifest_without_files), "files": files})
    (root / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest
