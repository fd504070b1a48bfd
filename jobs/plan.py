"""What a run would do, without doing it: ``--dry-run`` (or ``--validate-only``) of workflows/daily_train.py.

Checks the experiment (already validated when it was read), the storage (the data directory and its logs), each
date's window (not after today) and the logs' schemas (every partition ingest would read: its Parquet footers and
required columns), then prints the plan: the partitions to ingest (new or changed since their last ingest), the
feature days to build, and the model's size (dense and embedding parameters, training FLOPs of one step on one
worker's batch: hyformer.profile, on the meta device). Reads footers, manifests and pointers; writes nothing: no
lock, no MLflow store, no Ray cluster.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
from typing import Any

from features import storage
from features.build import plan_vocab
from features.schema import DAY_FORMAT, DIM_TABLES, TABLES, logs_root, utc_today, window
from hyformer.config import ConfigError, HyFormerConfig
from hyformer.profile import profile
from jobs.build_features import read_dims, read_meta, stale_days, store_root
from jobs.common import redact
from jobs.experiment import Experiment, ExperimentError
from jobs.ingest import check_footers, plan_partition, up_to_date
from jobs.train import model_config


def model_of(exp: Experiment, vocab: dict[str, int] | None = None) -> HyFormerConfig:
    """The model config of ``exp`` on its feature spec, with the vocabularies ``vocab`` (a store's or planned ones;
    None: 2 buckets per id space, which leaves the dense widths and FLOPs as they will be)."""
    cfg = exp.features
    vocab = vocab or dict.fromkeys(sorted(cfg.id_spaces()), 2)
    window = types.SimpleNamespace(cfg=dataclasses.replace(cfg, vocab=vocab))
    return model_config(window, exp.train.model, exp.train.arch, exp.train.hide_sequences)


def check_model(exp: Experiment, name: str) -> None:
    """Raise ExperimentError (naming the file's model section) when the features cannot feed the model (e.g. a
    d_model that the tokens cannot split into), before any data is read."""
    try:
        model_of(exp)
    except ConfigError as e:
        raise ExperimentError(f"{name}: model: {e}") from None


def plan_run(exp: Experiment, dates: list[dt.date], logs_expected: bool = True) -> dict[str, Any]:
    """The plan of a run of ``exp`` for ``dates`` (module doc). Raises the ingest's own errors (ContractError,
    MissingPartitionError, EmptyPartitionError: naming the file or partition) and ValueError for a window after
    today. ``logs_expected``: False when the run would first generate synthetic logs (the demo's data directory)."""
    cfg, tc = exp.features, exp.train
    data_dir = storage.absolute(exp.data.dir)
    if dates[-1] > utc_today():
        raise ValueError(f"the window ends on {dates[-1]}, after today ({utc_today()} UTC)")
    days = sorted({d for end in dates for d in window(end, exp.data.days)})
    out: dict[str, Any] = {
        "data_dir": redact(data_dir),
        "dates": [d.strftime(DAY_FORMAT) for d in dates],
        "window": f"{days[0]}..{days[-1]} ({len(days)} days)",
        "tables": list(cfg.tables()),
    }
    vocab = None
    if not storage.exists(logs_root(data_dir)):
        if logs_expected:
            raise FileNotFoundError(f"no logs in {logs_root(data_dir)}")
        out["logs"] = "none yet: the run generates the demo's synthetic logs first"
    else:
        wanted = cfg.tables()
        parts = [plan_partition(data_dir, t, None) for t in DIM_TABLES if t in wanted]
        parts += [plan_partition(data_dir, t, d) for t in TABLES if TABLES[t].daily and t in wanted for d in days]
        tables = cfg.contract()
        for p in parts:
            check_footers(p, tables[p.table])  # readable files, required columns, rows: the ingest's own check
        todo = [p for p in parts if not up_to_date(data_dir, p, tables[p.table])]
        out["ingest"] = {
            "partitions": len(parts),
            "to_validate": len(todo),
            "days_to_validate": sorted({p.day for p in todo if p.day}),
        }
        root = store_root(data_dir, cfg)
        store = storage.read_json_or_none(f"{root}/store.json")
        if store:
            vocab = store["vocab"]
        else:  # planned as the store will plan them, from the raw snapshots (before ingest)
            vocab = plan_vocab(
                read_dims(data_dir, cfg, files=lambda t: storage.list_files(f"{logs_root(data_dir)}/{t}")), cfg
            )
        names = [d.strftime(DAY_FORMAT) for d in window(dates[-1], exp.data.days)]
        changed = min((p.day for p in todo if p.day), default=None)  # ingest re-versions it: built again from it on
        stale = set(stale_days(root, data_dir, names, cfg, False)[0]) if store else set(names)
        build = sorted(stale | {d for d in names if changed is not None and d >= changed})
        out["features"] = {
            "store": redact(root),
            "new_store": store is None,
            "days_built": sum(read_meta(root, d) is not None for d in names) if store else 0,
            "days_to_build": build,
        }
    mc = model_of(exp, vocab)
    prof = profile(mc, batch=tc.batch_size)
    out["model"] = {
        "arch": tc.arch,
        "sequences": dict(mc.schema.sequences),
        "tokens": list(mc.schema.ns_groups),
        "dense_params": prof.dense_params,
        "embedding_params": prof.sparse_params if vocab else None,  # unknown until the vocabularies are
        "train_gflops_per_step": prof.train_flops / 1e9,
        "batch_per_worker": tc.batch_size,
        "workers": tc.workers,
    }
    return out


def describe(plan: dict[str, Any]) -> str:
    """The plan as lines for people."""
    lines = [
        f"plan for {', '.join(plan['dates'])}: window {plan['window']}, data {plan['data_dir']}",
        f"  tables read: {', '.join(plan['tables'])}",
    ]
    if "logs" in plan:
        lines.append(f"  logs: {plan['logs']}")
    if "ingest" in plan:
        i = plan["ingest"]
        days = i["days_to_validate"]
        span = f" (days {days[0]}..{days[-1]})" if days else ""
        lines.append(f"  ingest: {i['to_validate']} of {i['partitions']} partitions to validate{span}")
    if "features" in plan:
        f = plan["features"]
        days = f["days_to_build"]
        span = f": {days[0]}..{days[-1]}" if days else ""
        new = " (a new store)" if f["new_store"] else f" ({f['days_built']} built)"
        lines.append(f"  features: {len(days)} day(s) to build{span} in {f['store']}{new}")
    m = plan["model"]
    emb = f"{m['embedding_params'] / 1e6:.3g}M embedding" if m["embedding_params"] is not None else "embeddings: ?"
    lines.append(
        f"  model: {m['arch']}, {len(m['sequences'])} sequences {m['sequences']}, {len(m['tokens'])} tokens; "
        f"{m['dense_params'] / 1e6:.3g}M dense params, {emb}; {m['train_gflops_per_step']:.3g} GFLOPs per training "
        f"step (batch {m['batch_per_worker']} per worker, {m['workers']} worker(s))"
    )
    return "\n".join(lines)
