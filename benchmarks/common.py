"""What the benchmarks share: cached synthetic logs, and ``<out>/<name>.json`` (every number) + ``<out>/<name>.md``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

from features.synth import SynthConfig, generate


def write_results(out: str, name: str, results: dict[str, Any], markdown: str) -> None:
    """Write the results and their table, and print the table."""
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/{name}.json", "w") as f:
        json.dump(results, f, indent=1)
    with open(f"{out}/{name}.md", "w") as f:
        f.write(markdown)
    print(markdown)


def synthesize_cached(cfg: SynthConfig, data: str, end: dt.date) -> bool:
    """Synthetic logs of ``cfg`` ending at ``end`` in ``data``, kept between runs (``data/synth.json`` records the
    config; another config regenerates). Returns whether it generated."""
    marker = f"{data}/synth.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as it reads back from JSON (tuples become lists)
    if os.path.exists(marker) and json.loads(Path(marker).read_text()) == wanted:
        return False
    shutil.rmtree(data, ignore_errors=True)
    generate(cfg, data, end)
    Path(marker).write_text(json.dumps(wanted))
    return True
