"""A private copy of the files msda builds from, for tests that run setup.py or
its PEP 517 hooks: those write egg-info (and build folders) into the tree they
run in, and scripts/test.sh runs test files side by side in several worker
processes, so two such tests must not share the checkout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What MANIFEST.in draws from; the sdist's own rules still decide what it ships.
TOP_FILES = ("setup.py", "pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in")
TREES = ("src", "csrc")


def copy_source_tree(dest: os.PathLike) -> Path:
    """Copies the build's inputs into ``dest`` (created) and returns it. Built
    libraries, caches and egg-info stay behind; the build-time _build_info.py
    is copied, so the sdist's exclusion of it is still tested."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOP_FILES:
        shutil.copy2(REPO / name, dest / name)
    for tree in TREES:
        shutil.copytree(REPO / tree, dest / tree,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    return dest
