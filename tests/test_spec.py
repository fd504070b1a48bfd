"""The feature spec and the experiment file: declared features and sequences reach the model, point in time; a bad
file is one clear error naming its line; the resolved file reruns the same experiment."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch
import yaml

from features.build import FeatureConfig, build_day, empty_state, plan_vocab
from features.materialize import Materializer, Stream, Timelines
from features.spec import DEFAULT_TOKENS, SequenceSpec
from hyformer import build_model, load_model
from jobs.build_features import FeatureSet
from jobs.experiment import Experiment, ExperimentError, load_experiment, parse_experiment
from jobs.train import input_schema
from tests.conftest import committed_files
from tests.test_features import H, hand_inputs
from tests.test_workflow import registry, run_workflow

ROOT = Path(__file__).resolve().parents[1]

# the paper's spec plus a dense feature of the candidate and a fourth sequence: the user's liked feed events of the
# candidate's category
SPEC = {
    "tokens": {**DEFAULT_TOKENS, "item": (*DEFAULT_TOKENS["item"], "item_len")},
    "features": {"item_len": {"table": "items", "column": "duration_s", "kind": "dense", "norm": "log1p"}},
    "sequences": {
        "long": {"table": "search_events", "length": 16, "relevance": "none"},
        "search": {"table": "search_events", "length": 8, "relevance": "query"},
        "feed": {"table": "feed_events", "length": 8, "relevance": "query"},
        "liked": {"table": "feed_events", "length": 4, "relevance": "candidate", "filter": "finish = 1"},
    },
}


def spec_config(**kw) -> FeatureConfig:
    return FeatureConfig(**(SPEC | kw))


def test_the_default_spec_is_the_papers_trio_and_spelling_it_out_changes_no_store():
    default = FeatureConfig(long_len=128)
    assert list(default.sequence_specs()) == ["long", "search", "feed"]
    assert default.seq_tables() == {"long": "search", "search": "search", "feed": "feed"}
    demo = load_experiment(str(ROOT / "configs/demo.yaml"))
    assert demo.features.store_id() == default.store_id()  # configs/demo.yaml is the no-argument default, written out
    assert demo.features.sequence_specs() == default.sequence_specs() and demo.features.token_groups() == DEFAULT_TOKENS
    assert demo.train == Experiment().train and demo.data == Experiment().data
    spec = spec_config()
    assert spec.store_id() != default.store_id()  # a declared feature or sequence is stored: another store
    assert (
        dataclasses.replace(
            spec, sequences=spec.sequences | {"liked": SequenceSpec("feed_events", 9, "candidate", "finish = 1")}
        ).store_id()
        == spec.store_id()
    )  # lengths are read side
    assert spec.streams() == {
        "search": ("search_events", None),
        "feed": ("feed_events", None),
        "liked": ("feed_events", "finish = 1"),
    }


def hand_spec_batch(cfg: FeatureConfig, dedup: bool = False):
    return build_and_materialize(*hand_spec_inputs(cfg), dedup)


def hand_spec_inputs(cfg: FeatureConfig):
    """The hand inputs of tests/test_features.py with finished feed events and item durations added."""
    imps, search, feed, dims, cfg = hand_inputs(cfg)
    # finished feed events of user 7: category 3 at 3h (finished), category 3 at 4h (not), category 4 at 6h (finished)
    feed = pl.concat(
        [
            feed,
            pl.DataFrame(
                {
                    "user_id": [7, 7, 7],
                    "ts": [3 * H, 4 * H, 6 * H],
                    "item_id": [32, 33, 34],
                    "author_id": [1, 1, 1],
                    "category_id": [3, 3, 4],
                    "watch_time_s": [1.0, 1.0, 1.0],
                    "finish": [1, 0, 1],
                    "like": [0, 0, 0],
                }
            ),
        ],
        how="vertical_relaxed",
    ).sort("user_id", "ts")
    dims["items"] = dims["items"].with_columns(
        pl.when(pl.col("item_id") == 33)
        .then(3)
        .when(pl.col("item_id") == 34)
        .then(4)
        .otherwise(pl.col("category_id"))
        .alias("category_id"),
        (pl.col("item_id").cast(pl.Float32) * 10).alias("duration_s"),
    )
    return imps, search, feed, dims, cfg


def build_and_materialize(imps, search, feed, dims, cfg: FeatureConfig, dedup: bool = False):
    """One day of the hand inputs built (vocabularies planned from ``dims``) and materialized: samples, batch, cfg."""
    cfg = dataclasses.replace(cfg, vocab=plan_vocab(dims, cfg))
    out = build_day(
        imps.lazy(),
        {"search": search.lazy(), "feed": feed.lazy()},
        {s: empty_state() for s in cfg.streams()},
        {k: v.lazy() for k, v in dims.items()},
        cfg,
    )
    t = Timelines({s: Stream.build(out[f"events/{s}"], empty_state().collect()) for s in cfg.streams()})
    samples = out["samples"]
    return samples, Materializer(t, cfg, dedup=dedup)({c: samples[c].to_numpy() for c in samples.columns}), cfg


def test_a_declared_dense_feature_and_a_filtered_candidate_sequence_are_built_point_in_time():
    samples, b, cfg = hand_spec_batch(spec_config())
    # candidates: request 1 at 10h shows items 10, 11 (category 3), request 2 at 20h item 12 (category 3)
    assert samples["ns_item_id"].to_list() == [11, 12, 13]
    np.testing.assert_allclose(b["dense_item"][:, 0], np.log1p([100.0, 110.0, 120.0]), rtol=1e-6)
    assert b["ns_item"].shape == (3, 4) and b["dense_item"].shape == (3, 1) and b["dense_item"].dtype == np.float32
    # liked: finish = 1 events of the candidate's category strictly before the impression: only item 32 (3h, cat 3);
    # item 33 is not finished, item 34 is another category, and nothing after 10h counts for request 1
    np.testing.assert_array_equal(b["len_liked"], [1, 1, 1])
    np.testing.assert_array_equal(b["seq_liked"][:, 0, 0], [33, 33, 33])  # item 32 -> bucket 33
    assert (b["seq_liked"][:, 1:] == 0).all()
    # the unfiltered feed sequence still sees every feed event of the query's category
    assert b["len_feed"].tolist() == [2, 2, 2]
    dd = hand_spec_batch(spec_config(), dedup=True)[1]
    assert {"uniq_search", "uniq_feed", "uniq_liked", "inv_liked"} <= set(dd)


def test_both_new_inputs_reach_the_model():
    samples, b, cfg = hand_spec_batch(spec_config())
    fs = FeatureSet("/nowhere", cfg, ("d",), 3)
    schema = input_schema(fs)
    assert schema.dense == {"item": ("item_len",)} and schema.sequences["liked"] == 4
    assert schema.seq_table("liked") == "liked" and schema.target_groups == ("item",)
    from jobs.train import model_config

    torch.manual_seed(0)
    model = build_model(model_config(fs, {"d_model": 36, "n_heads": 2, "emb_dim": 8, "head_hidden": (16,)})).eval()
    assert_inputs_matter(model, {k: torch.from_numpy(v) for k, v in b.items()})


def assert_inputs_matter(model, batch: dict) -> None:
    """The logits change when only the dense feature changes, and when only the fourth sequence's events do."""
    with torch.no_grad():
        base = model(batch)
        dense = dict(batch, dense_item=batch["dense_item"] + 1.0)
        assert not torch.allclose(model(dense), base)
        liked = dict(batch, len_liked=torch.zeros_like(batch["len_liked"]))  # its events masked, nothing else
        assert (batch["len_liked"] > 0).any()
        assert not torch.allclose(model(liked), base)


# --- the experiment file ---------------------------------------------------------------------------------------------

GOOD = """\
data:
  days: 4
features:
  sequences:
    long: {table: search_events, length: 16, relevance: none}
    feed: {table: feed_events, length: 8, relevance: query}
model:
  preset: tiny
  d_model: 32
train:
  epochs: 2
  optim:
    lr: 0.001
"""


@pytest.mark.parametrize(
    "text,line,needle",
    [
        (GOOD.replace("  days: 4", "  dayz: 4"), 2, "data.dayz: unknown key"),
        (GOOD.replace("epochs: 2", "epochs: two"), 11, "train.epochs: Input should be a valid integer"),
        (GOOD.replace("lr: 0.001", "lr: [1]"), 13, "train.optim.lr"),
        (GOOD.replace("relevance: none}", "relevance: none, lenght: 3}"), 5, "features.sequences.long.lenght: unknown"),
        (GOOD.replace("table: feed_events", "table: likes"), 6, "table 'likes' is not an event table"),
        (GOOD + "promotions: {}\n", 14, "promotions: unknown section"),
        (GOOD.replace("preset: tiny", "preset: huge"), 8, "'huge' is not a preset"),
        (GOOD.replace("d_model: 32", "d_modle: 32"), 9, "model.d_modle: unknown key"),
        (GOOD.replace("d_model: 32", "d_model: wide"), 9, "model.d_model"),
        (
            GOOD.replace(
                "features:\n", "features:\n  features:\n    f: {table: items, column: length_s, kind: dense}\n"
            ),
            5,
            "items has no column 'length_s'",
        ),
        (
            GOOD.replace("features:\n", "features:\n  features:\n    f: {table: impressions, column: label}\n"),
            5,
            "impressions.label is an outcome of the impression, never a feature",
        ),
        (
            GOOD.replace("features:\n", "features:\n  tokens: {user: [user_id, age]}\n"),
            4,
            "token 'user': unknown feature 'age'",
        ),
        (GOOD.replace("relevance: query}", "relevance: query, filter: 'stars > 3'}"), 6, "filter uses ['stars']"),
        (
            GOOD.replace("relevance: query}", "relevance: query, filter: 'finish IN (SELECT 1)'}"),
            6,
            "may only be a scalar",
        ),
        (
            GOOD.replace("features:\n", "features:\n  columns:\n    items: {x: {type: decimal}}\n"),
            5,
            "features.columns.items.x.type: column items.x: type='decimal' must be one of",
        ),
        (
            GOOD.replace("features:\n", "features:\n  columns:\n    items: {x: {type: int32, maxx: 3}}\n"),
            5,
            "features.columns.items.x.maxx: unknown key",
        ),
        ("data: [1, 2]\n", 1, "data: must be a mapping"),
        ("data:\n  days: 4\n bad", 3, "not valid YAML"),
    ],
)
def test_a_bad_experiment_file_is_one_error_naming_its_line(tmp_path, text, line, needle):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentError) as e:
        load_experiment(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert needle in msg, msg


def test_the_resolved_file_reads_back_to_the_same_experiment_and_set_overrides_one_key():
    exp = parse_experiment(GOOD, "good.yaml", ["train.optim.lr=0.003", "features.sequences.long.length=32"])
    assert exp.train.optim.lr == 0.003 and exp.train.epochs == 2 and exp.features.seq_len("long") == 32
    assert exp.train.model["d_model"] == 32 and exp.train.model["emb_dim"] == 8  # the tiny preset under the override
    again = parse_experiment(exp.to_yaml(), "resolved.yaml")
    assert again == exp
    spec = parse_experiment(yaml.safe_dump({"features": json.loads(json.dumps(SPEC))}), "spec.yaml")
    assert spec.features == spec_config(long_len=128) and parse_experiment(spec.to_yaml()).features == spec.features
    with pytest.raises(ExperimentError, match="expected KEY=VALUE"):
        parse_experiment(GOOD, "good.yaml", ["train.epochs"])


# --- end to end -----------------------------------------------------------------------------------------------------


def test_the_workflow_trains_on_a_declared_dense_feature_and_fourth_sequence_without_leaks(tmp_path):
    """Done-when of #19: a config file declares both; the workflow runs end to end; both reach the trained model
    and the new sequence holds exactly the earlier liked events of the candidate's category."""
    config = tmp_path / "exp.yaml"
    doc = {"features": json.loads(json.dumps(SPEC)), "model": {"preset": "demo", "d_model": 36}}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    data = tmp_path / "data"
    done = run_workflow(data, "--config", str(config), "--date", "2026-11-22", "--log-every", "2")
    log = done.stderr + done.stdout
    assert done.returncode == 0, log[-4000:]
    # progress people can see (no terminal here: lines), and step metrics in MLflow while the run trained
    assert re.search(r"ingest days: (\d+)/\1 partitions \(100%\), .* in \d+:\d\d:\d\d", log), log[-3000:]
    assert re.search(r"features: (\d+)/\1 shard-days \(100%\)", log)
    runs, versions, champion = registry(data)
    assert versions == {"1": "promoted"} and len(runs) == 1  # the run opened before training is the one finished
    steps = mlflow.tracking.MlflowClient().get_metric_history(runs[0].info.run_id, "step_train_loss")
    assert len(steps) >= 2 and [m.step for m in steps] == sorted({m.step for m in steps})
    logged = mlflow.artifacts.load_text(f"{runs[0].info.artifact_uri}/experiment.yaml")
    exp = parse_experiment(logged, "experiment.yaml")
    assert exp.features.sequence_specs()["liked"].filter == "finish = 1" and exp.data.days == 4
    assert exp.features.seq_len("long") == 16  # the workflow's --long-len flag, applied to the spec and logged

    fs = FeatureSet.load(glob.glob(f"{data}/features/v2/*/window-2026-11-22-4d.json")[0])
    samples = pl.read_parquet(fs.sample_files()).sort("request_id", "ns_item_id")
    batch = Materializer(fs.timelines(), fs.cfg, dedup=False)({c: samples[c].to_numpy() for c in samples.columns})
    # leak test for the new sequence: a brute-force point-in-time join over the clean logs
    clean = lambda t: pl.read_parquet(committed_files(f"{data}/clean/v1/{t}"))  # noqa: E731
    vocab = fs.cfg.vocab
    items = clean("items").select("item_id", pl.col("category_id").alias("cat"))
    ev = clean("feed_events").filter(pl.col("finish") == 1).join(items, on="item_id")
    ev = ev.select("user_id", pl.col("ts").alias("ev_ts"), "item_id", pl.col("cat").alias("ev_cat"))
    imps = (
        clean("impressions")
        .join(items, on="item_id")
        .select("request_id", (pl.col("item_id") % (vocab["item"] - 1) + 1).cast(pl.Int32).alias("ns_item_id"), "cat")
    )
    s = samples.select("request_id", "ns_item_id", "user_id", "ts").join(imps, on=["request_id", "ns_item_id"])
    j = s.join(ev, on="user_id").filter((pl.col("ev_ts") < pl.col("ts")) & (pl.col("ev_cat") == pl.col("cat")))
    want = s.join(
        j.sort("ev_ts", descending=True)
        .group_by("request_id", "ns_item_id")
        .agg((pl.col("item_id") % (vocab["item"] - 1) + 1).alias("items")),
        on=["request_id", "ns_item_id"],
        how="left",
    )
    want = samples.select("request_id", "ns_item_id").join(
        want, on=["request_id", "ns_item_id"], how="left", maintain_order="left"
    )
    checked = 0
    for i, items_ in enumerate(want["items"].to_list()):
        items_ = (items_ or [])[:4]
        n = int(batch["len_liked"][i])
        assert n == len(items_) and sorted(batch["seq_liked"][i, :n, 0].tolist()) == sorted(items_), i
        checked += n
    assert checked > 50  # the tiny logs have such histories
    # the dense feature is the candidate's log1p(duration_s)
    dur = clean("items").select("item_id", "duration_s")
    d = (
        clean("impressions")
        .join(dur, on="item_id")
        .select(
            "request_id", (pl.col("item_id") % (vocab["item"] - 1) + 1).cast(pl.Int32).alias("ns_item_id"), "duration_s"
        )
    )
    d = samples.select("request_id", "ns_item_id").join(
        d, on=["request_id", "ns_item_id"], how="left", maintain_order="left"
    )
    np.testing.assert_allclose(batch["dense_item"][:, 0], np.log1p(d["duration_s"].fill_null(0).to_numpy()), rtol=1e-5)
    # the registered model reads both
    model_dir = glob.glob(f"{data}/train/**/model.pt", recursive=True)
    model = load_model(str(Path(sorted(model_dir)[-1]).parent)).eval()
    rows = np.argsort(-batch["len_liked"], kind="stable")[:64]  # samples with the longest finished histories
    assert_inputs_matter(model, {k: torch.from_numpy(v[rows]) for k, v in batch.items()})
    # the plan of the same run again: nothing left to ingest or build (--dry-run writes nothing)
    dry = run_workflow(data, "--config", str(config), "--date", "2026-11-22", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert (
        re.search(r"ingest: 0 of \d+ partitions to validate", dry.stdout)
        and "features: 0 day(s) to build" in dry.stdout
    )


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs/*.yaml"))), ids=lambda p: Path(p).name)
def test_every_example_config_loads_and_feeds_its_model(path):
    from jobs.plan import check_model

    exp = load_experiment(path)
    check_model(exp, path)  # the spec's tokens and sequences fit the model's widths
    assert parse_experiment(exp.to_yaml()) == exp


@pytest.mark.skipif(
    not os.environ.get("HYFORMER_SLOW"),
    reason="~90 s; the config-file workflow test above covers the entry point by default; set HYFORMER_SLOW=1",
)
def test_movielens_runs_from_its_config_as_a_feed_only_spec(tmp_path):
    """Done-when of #19: MovieLens (here its three files, tiny) imported by the profile as feed-only logs (no query
    column, no queries table, no search events) and trained by the workflow from configs/movielens.yaml."""
    import subprocess
    import sys

    from features.mapping import parse_mapping
    from features.movielens import movielens_mapping
    from jobs.import_logs import import_logs
    from tests.test_import_logs import END, movielens_dir
    from tests.test_workflow import clean_env

    data = tmp_path / "data"
    import_logs(str(data), parse_mapping(movielens_mapping(movielens_dir(tmp_path / "ml-100k"))))
    tables = {t for t in os.listdir(data / "logs" / "v1") if not t.startswith("_")}
    assert tables == {"feed_events", "impressions", "items", "users"}
    cmd = [sys.executable, "workflows/daily_train.py", "--config", "configs/movielens.yaml", "--data-dir", str(data)]
    cmd += ["--date", str(END), "--days", "3", "--min-eval-rows", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, (done.stderr + done.stdout)[-4000:]
    assert json.loads((data / "status" / f"{END}.json").read_text())["outcome"] == "promoted"
    runs, _, _ = registry(data)
    metrics = runs[0].data.metrics
    assert "ingest_feed_events_clean" in metrics and not any("search_events" in k or "queries" in k for k in metrics)
    exp = parse_experiment(mlflow.artifacts.load_text(f"{runs[0].info.artifact_uri}/experiment.yaml"))
    assert (
        list(exp.features.sequence_specs()) == ["history", "genre", "liked"] and "queries" not in exp.features.tables()
    )
    fs = FeatureSet.load(glob.glob(f"{data}/features/v2/*/window-{END}-3d.json")[0])
    samples = pl.read_parquet(fs.sample_files())
    assert (samples["ns_query_id"] == 0).all()  # no query: the padding id, not a placeholder query
    assert set(fs.cfg.streams()) == {"feed", "liked"}


@pytest.mark.parametrize(
    "module,args",
    [
        ("workflows.daily_train", []),
        ("workflows.tune", ["--date", "2026-11-22"]),
        ("jobs.ingest", ["--date", "2026-11-22"]),
        ("jobs.build_features", ["--date", "2026-11-22"]),
        ("jobs.train", ["--features", "unused.json"]),
        ("benchmarks.quality", ["--suite", "tables", "--date", "2026-11-22"]),
    ],
)
def test_every_entry_point_takes_the_experiment_file_and_names_its_bad_line(tmp_path, capsys, module, args):
    import importlib

    path = tmp_path / "exp.yaml"
    path.write_text(GOOD.replace("epochs: 2", "epochs: two"))
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--config", str(path), *args])
    assert e.value.code == 2
    assert f"{path}:11: train.epochs: Input should be a valid integer" in capsys.readouterr().err


def test_an_id_list_feature_is_mean_pooled_into_its_token():
    """kind: ids over an id_list extension column (a video's tags "3|17|4"): bucketised, cut to max_len, padded;
    the model mean-pools the list's embeddings into the token (the logits move with the list, not with its
    padding)."""
    tags = {10: "3|17|4|9", 11: "", 12: "5"}
    cfg = spec_config(
        columns={"items": {"tags": {"type": "id_list"}}},
        features=SPEC["features"]
        | {"item_tags": {"table": "items", "column": "tags", "kind": "ids", "vocab": 50, "max_len": 3}},
        tokens=SPEC["tokens"] | {"item": (*SPEC["tokens"]["item"], "item_tags")},
    )
    imps, search, feed, dims, cfg = hand_inputs(cfg)
    dims["items"] = dims["items"].with_columns(pl.col("item_id").replace_strict(tags, default=None).alias("tags"))
    _, b, cfg = build_and_materialize(imps, search, feed, dims, cfg, dedup=True)
    # items 10, 11, 12: ids + 1 (buckets of 50), the first 3; "" -> the padding id; one list per token: (B, 1, 3)
    np.testing.assert_array_equal(b["bag_item"][:, 0], [[4, 18, 5], [0, 0, 0], [6, 0, 0]])
    fs = FeatureSet("/nowhere", cfg, ("d",), 3)
    assert input_schema(fs).bags == {"item": ("item_tags",)}
    from jobs.train import model_config

    torch.manual_seed(0)
    model = build_model(model_config(fs, {"d_model": 36, "n_heads": 2, "emb_dim": 8, "head_hidden": (16,)})).eval()
    batch = {k: torch.from_numpy(v) for k, v in b.items()}
    with torch.no_grad():
        base = model(batch)
        other = batch["bag_item"].clone()
        other[0, 0, 0] = 7  # another tag of the first candidate: only its logit moves
        moved = model(dict(batch, bag_item=other))
        assert not torch.isclose(moved[0], base[0]) and torch.allclose(moved[1:], base[1:])
        order = batch["bag_item"].clone()
        order[0, 0] = order[0, 0, [2, 1, 0]]  # the same tags in another order: a mean, the same logit
        torch.testing.assert_close(model(dict(batch, bag_item=order)), base)


def test_a_sequence_with_its_own_side_info_gets_its_own_table_and_input_width():
    seqs = SPEC["sequences"] | {
        "recent": {"table": "search_events", "length": 3, "relevance": "none", "fields": ["item", "dt"]}
    }
    cfg = spec_config(sequences=seqs)
    assert cfg.seq_tables()["recent"] == "search_item_dt" and cfg.seq_tables()["long"] == "search"
    samples, naive, cfg = hand_spec_batch(cfg)
    _, dd, _ = hand_spec_batch(cfg, dedup=True)
    assert naive["seq_recent"].shape == (3, 3, 2) and naive["seq_long"].shape[2] == 7
    np.testing.assert_array_equal(naive["seq_recent"][..., 0], naive["seq_long"][:, :3, 0])  # the same events' items
    from features.materialize import reconstruct

    rebuilt = reconstruct(dd, cfg.seq_tables())
    for s in cfg.sequence_specs():
        np.testing.assert_array_equal(rebuilt[f"seq_{s}"], naive[f"seq_{s}"])
    fs = FeatureSet("/nowhere", cfg, ("d",), 3)
    schema = input_schema(fs)
    assert schema.fields_of("recent") == ("item", "dt") and schema.seq_table("recent") == "search_item_dt"
    from jobs.train import model_config

    torch.manual_seed(0)
    mc = model_config(fs, {"d_model": 40, "n_heads": 2, "emb_dim": 8, "head_hidden": (16,)})
    model = build_model(mc).eval()
    with torch.no_grad():
        a = model({k: torch.from_numpy(v) for k, v in dd.items()})
        b = model({k: torch.from_numpy(v) for k, v in naive.items()})
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # dedup tables and full sequences: the same logits
    with pytest.raises(ExperimentError, match="fields=.*must be distinct side-info fields"):
        parse_experiment("features:\n  sequences:\n    x: {table: feed_events, fields: [item, price]}\n", "f.yaml")
