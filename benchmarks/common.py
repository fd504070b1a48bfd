"""What every benchmark shares: writing ``<out>/<name>.json`` (every number) and ``<out>/<name>.md`` (the table)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_results(out: str, name: str, results: dict[str, Any], markdown: str) -> None:
    """Write the results and their table, and print the table."""
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/{name}.json", "w") as f:
        json.dump(results, f, indent=1)
    with open(f"{out}/{name}.md", "w") as f:
        f.write(markdown)
    print(markdown)
