"""MkDocs hook: replaces ``<!-- bench: NAME -->`` in a page with the table that
docs/_gen/bench_tables.py renders from benchmarks/results/NAME's JSON file."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tables  # noqa: E402

MARKER = re.compile(r"<!-- bench: (\w+) -->")


def on_page_markdown(markdown: str, **_: object) -> str:
    return MARKER.sub(lambda m: bench_tables.render(m.group(1)), markdown)
