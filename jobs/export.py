"""Export a registered model's request-level scoring graph, for serving outside Python (hyformer/export.py).

    python -m jobs.export --data-dir /abs/data --model models:/hyformer@champion --out /abs/scoring

Writes ``scoring_graph.pt2`` (``torch.export``: one request's sequences and its M candidates in, M logits out, KV
reuse inside, M dynamic), ``scoring_graph.json`` (every input: shape, dtype, id space, meaning) and
``features.json`` (the feature config the model was trained on: how the inputs are built). A model with a sequence
relevant to the candidate (one sequence per candidate) is refused: the graph takes one per request. The inputs are what
``features.online.featurize`` gives for one request (``split_request``); the program equals the eager model on them
(tests/test_serve.py, tests/test_export.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from features import storage
from features.build import FeatureConfig
from hyformer.export import candidate_keys, export_scorer, request_keys, save_scorer
from hyformer.model import RankingModel
from jobs.common import log, setup_logging


def split_request(model: RankingModel, batch: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """One request's featurized rows (``features.online.featurize``) -> the exported graph's (request, candidates):
    the sequences of its first row (every row of a request has the same), and every row's candidate inputs."""
    if len(np.unique(batch["request_id"])) != 1:
        raise ValueError("split_request takes the rows of one request")
    for k in request_keys(model.config):
        if not (batch[k] == batch[k][:1]).all():
            raise ValueError(f"{k} differs between the candidates of the request: the graph takes one per request")
    request = {k: torch.from_numpy(np.ascontiguousarray(batch[k][:1])).long() for k in request_keys(model.config)}
    candidates = {
        k: torch.from_numpy(np.ascontiguousarray(batch[k])).to(torch.float32 if k.startswith("dense_") else torch.long)
        for k in candidate_keys(model.config)
    }
    return request, candidates


def export_registered(data_dir: str, uri: str, out: str, max_candidates: int = 4096) -> dict:
    """Export the registered version ``uri`` into the local folder ``out``; returns what was written."""
    from jobs.register import load_registered  # noqa: PLC0415 - MLflow at the edge

    with tempfile.TemporaryDirectory(prefix="hyformer-model-") as tmp:
        reg = load_registered(data_dir, uri, tmp)
    if reg.features:
        per_candidate = [
            n for n, s in FeatureConfig(**reg.features).sequence_specs().items() if s.relevance == "candidate"
        ]
        if per_candidate:
            raise ValueError(
                f"{uri}: sequences {per_candidate} are relevant to the candidate (one per candidate): the graph "
                "takes one set of sequences per request; serve this model with jobs.serve or its pyfunc"
            )
    graph, contract = save_scorer(export_scorer(reg.model, max_candidates), reg.model.config, out)
    (Path(out) / "features.json").write_text(json.dumps(reg.features, indent=1))
    res = {"model": f"{reg.name}/{reg.version}", "graph": str(graph), "contract": str(contract)}
    log.info("export: %s -> %s", res["model"], out)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export a registered model's request-level scoring graph (torch.export).")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model", default="models:/hyformer@champion", help="models:/<name>@<alias> or /<version>")
    p.add_argument("--out", required=True, help="local output folder")
    p.add_argument("--max-candidates", type=int, default=4096, help="largest M the graph accepts")
    a = p.parse_args(argv)
    setup_logging()
    print(json.dumps(export_registered(storage.absolute(a.data_dir), a.model, a.out, a.max_candidates)))


if __name__ == "__main__":
    main()
