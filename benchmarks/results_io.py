"""Writing a benchmark's results: the report as JSON (machine-readable) and its markdown, side by side."""

from __future__ import annotations

import json
import os


def write_results(base: str, report: dict, text: str) -> None:
    """Writes base.json and base.md (creating their folder) and says so."""
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(f"wrote {base}.json and {base}.md")
