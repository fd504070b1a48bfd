"""Daily training workflow: ingest -> features -> train -> evaluate -> champion/challenger -> register, per date.

    python workflows/daily_train.py                                  # fresh machine: synthetic logs, local Ray
    python workflows/daily_train.py --date 2026-11-22 --data-dir /abs/data
    python workflows/daily_train.py --from 2026-11-20 --to 2026-11-22 --data-dir /abs/data     # backfill, in order
    ray job submit --working-dir . -- python workflows/daily_train.py --data-dir /abs/data

For each date D: ingest day D (unchanged days are skipped), build its features (incrementally), publish the online
feature source of D for serving (jobs/online.py), warm-start from the current champion (``--init-from``, default
``champion``), train on the window ending at D with D held out, score the champion on D's samples, and register the
challenger; the registry alias ``champion`` moves to it only if its query-level AUC on D beats the champion's by more
than ``--promotion-margin``. The decision and its reason are logged
and kept on the MLflow run and the model version. A date already done (a finished run for it) is skipped unless
``--force``; a lock on the data directory keeps two runs from working on it at once.

With no logs under ``<data-dir>/logs``, the demo's default data directory (``./data``, or ``HYFORMER_DATA_DIR``) first
gets a small synthetic window ending at the last date (default: yesterday, UTC); any other data directory needs
``--synthetic`` for that, and fails naming the missing logs otherwise (a mistyped ``--data-dir`` must not train and
promote a model of synthetic data). Without ``--date`` and with existing logs, the newest impressions day is used.

Exit codes: 0 a healthy day, the champion promoted or kept (the outcome is in the log, the MLflow run and
``<data-dir>/status/<date>.json``), 1 a stage failed (named), 2 bad arguments, 75 another run holds the data
directory's lock; with ``--exit-3-when-kept`` (the behaviour before issue #18) a kept champion exits 3. A backfill
stops at the first failure and exits with the last date's code.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, also inside a Ray job's working dir

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from features import storage  # noqa: E402
from features.schema import DAY_FORMAT, day_folders, logs_root, parse_day  # noqa: E402
from features.synth import SynthConfig, generate  # noqa: E402
from jobs.build_features import add_feature_arguments, feature_config, logs_to_features  # noqa: E402
from jobs.common import DEFAULT_DATA_DIR, Exit, Locked, StageFailed, init_ray, log, setup_logging, stage  # noqa: E402
from jobs.experiment import (  # noqa: E402
    Experiment,
    ExperimentError,
    add_config_arguments,
    data_defaults,
    experiment_of_argv,
)
from jobs.lease import data_dir_lock  # noqa: E402
from jobs.online import publish_source  # noqa: E402
from jobs.plan import check_model, describe, plan_run  # noqa: E402
from jobs.promote import backfill_guard, decide, evaluate_registered  # noqa: E402
from jobs.register import (
    champion,
    commit_decision,
    daily_record,
    load_registered,
    log_failed_run,
    log_training_run,
    registered_checkpoint,
    resume_decision,
    start_training_run,
    tracking_uri,
    version_date,
)  # noqa: E402
from jobs.retention import clean_leftovers  # noqa: E402
from jobs.train import train, warm_start_state  # noqa: E402
from jobs.train_config import TrainConfig, add_train_arguments, read_best_config, train_config  # noqa: E402

STATUS = "status"  # <data-dir>/status/<date>.json: the outcome of each date, for whatever watches the runs


def outcome_exit(outcome: str, exit_3_when_kept: bool) -> Exit:
    return Exit.NOT_PROMOTED if outcome == "kept" and exit_3_when_kept else Exit.PROMOTED


class NoLogs(FileNotFoundError):
    """No logs in a data directory that is not the demo's, and no --synthetic."""


def newest_log_day(data_dir: str) -> dt.date | None:
    root = f"{logs_root(data_dir)}/impressions"
    days = day_folders(root, storage.list_dirs(root, "day="))  # a stray day=... folder: a ValueError naming it
    return parse_day(days[-1]) if days else None


def training_defaults(exp: Experiment, path: str | None) -> TrainConfig:
    """The training flags' defaults: the experiment's, with a best-config file's settings (workflows/tune.py) on
    top; flags given on the command line still win."""
    try:
        return exp.train if path is None else exp.train.override(read_best_config(path))
    except (OSError, ValueError) as e:
        raise SystemExit(f"daily_train: --train-config: {e}") from e


def experiment_of(a: argparse.Namespace) -> Experiment:
    """The experiment this run is: the file's (or the demo's) with every flag given on the command line applied;
    its YAML is logged with the run and reruns it."""
    exp = a.experiment
    return Experiment(
        data=dataclasses.replace(
            exp.data,
            dir=a.data_dir,
            days=a.days,
            max_quarantine_share=a.max_quarantine_share,
            synthetic=a.synthetic,
            synth_scale=a.synth_scale,
        ),
        features=feature_config(a, exp.features),
        train=train_config(a),
        promotion=dataclasses.replace(exp.promotion, margin=a.promotion_margin, init_from=a.init_from),
        tune=exp.tune,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(p)
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--date", type=parse_day, default=None, help="day to train for (held out for evaluation), YYYY-MM-DD"
    )
    when.add_argument(
        "--from", dest="date_from", type=parse_day, default=None, help="backfill: first date (with --to), run in order"
    )
    p.add_argument("--to", dest="date_to", type=parse_day, default=None, help="backfill: last date (inclusive)")
    p.add_argument("--days", type=int, default=70, help="window length in days, ending at the date (default 70)")
    add_feature_arguments(p)
    p.add_argument(
        "--rebuild-features",
        action="store_true",
        help="rebuild every feature day of the window (default: only stale days)",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="generate the demo's synthetic logs when --data-dir has none (automatic only for the default ./data)",
    )
    p.add_argument(
        "--synth-scale", type=float, default=1.0, help="multiplies the demo's synthetic request/event counts"
    )
    p.add_argument(
        "--exit-3-when-kept",
        action="store_true",
        help="exit 3 when the champion is kept (the old behaviour; default: 0 for promoted and kept alike)",
    )
    p.add_argument(
        "--init-from",
        default="champion",
        help=(
            "warm start: 'champion' (default; the registry alias, cold start without one), 'latest' (newest "
            "version), 'none', models:/<name>/<version>, models:/<name>@<alias>, or a checkpoint directory"
        ),
    )
    p.add_argument(
        "--promotion-margin",
        type=float,
        default=0.0,
        help="promote only if the challenger's query AUC beats the champion's by more than this (default 0)",
    )
    p.add_argument(
        "--force", action="store_true", help="train again for a date that is already done (registers another version)"
    )
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for another run's lock on the data directory (default 0: exit 75 at once)",
    )
    p.add_argument(
        "--train-config",
        default=None,
        help='JSON with defaults for the training flags, {"train": {...}} (e.g. the best config of workflows/tune.py)',
    )
    p.add_argument(
        "--no-register", action="store_true", help="log the MLflow run but do not register (nor promote) the model"
    )
    p.add_argument(
        "--dry-run",
        "--validate-only",
        dest="dry_run",
        action="store_true",
        help="check the config, storage, window and the logs' schemas; print the plan (partitions to ingest, feature "
        "days to build, model params and FLOPs); write nothing",
    )
    pre, _ = p.parse_known_args(argv)
    exp = experiment_of_argv(p, argv, "daily_train") or Experiment()
    p.set_defaults(
        **data_defaults(exp),
        promotion_margin=exp.promotion.margin,
        init_from=exp.promotion.init_from,
        experiment=exp,
    )
    add_train_arguments(p, training_defaults(exp, pre.train_config))
    a = p.parse_args(argv)
    try:
        a.experiment = experiment_of(a)
        check_model(a.experiment, pre.config or "the command line")
    except (ValueError, ExperimentError) as e:
        p.exit(2, f"daily_train: {e}\n")
    if (a.date_from is None) != (a.date_to is None):
        p.error("--from and --to go together")
    if a.date_from is not None and a.date_from > a.date_to:
        p.error(f"--from {a.date_from} is after --to {a.date_to}")
    return a


def dates_of(a: argparse.Namespace, data_dir: str) -> list[dt.date]:
    if a.date_from is not None:
        return [a.date_from + dt.timedelta(days=i) for i in range((a.date_to - a.date_from).days + 1)]
    date = a.date or newest_log_day(data_dir) or (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1))
    return [date]


def synthesize_if_empty(a: argparse.Namespace, data_dir: str, dates: list[dt.date]) -> None:
    """The demo: without logs, a synthetic window covering every date's training window; only for the default data
    directory or with ``--synthetic`` (NoLogs otherwise)."""
    if storage.exists(logs_root(data_dir)):
        return
    if not (a.synthetic or data_dir == storage.absolute(DEFAULT_DATA_DIR)):
        raise NoLogs(
            f"no logs in {logs_root(data_dir)}: point --data-dir at a data directory with logs (jobs.import_logs "
            "writes them), or pass --synthetic to generate the demo's synthetic logs there"
        )
    cfg = SynthConfig.demo(a.days + (dates[-1] - dates[0]).days, a.synth_scale, a.seed)
    stage("synthesize", generate, cfg, data_dir, dates[-1])


def run_day(a: argparse.Namespace, data_dir: str, date: dt.date, models_dir: str) -> dict:
    """One date: train the challenger, compare it with the champion on the date, register, promote or keep.
    ``models_dir``: a local scratch folder for registry downloads (MLflow downloads to local disk)."""
    day = date.strftime(DAY_FORMAT)
    tags = {
        "date": day,
        "arch": a.arch,
        "hide_sequences": str(a.hide_sequences),
        "window_days": str(a.days),
        "workflow": "daily",
    }
    # a decision recorded before a crash is completed (not trained again); a run that died before deciding is abandoned
    stage("resume decision", resume_decision, data_dir, tags, a.arch)
    if not a.force and (done := daily_record(data_dir, tags)) is not None:
        log.info(
            "daily %s: already done (run %s, outcome %s: %s); --force trains again",
            day,
            done["run_id"],
            done["outcome"],
            done.get("decision_reason", ""),
        )
        return {"date": day, "outcome": done["outcome"], "already_done": True, "run_id": done["run_id"]}
    init_ray()
    counts, fs = logs_to_features(
        data_dir,
        date,
        a.days,
        a.experiment.features,
        force=a.rebuild_features,
        step=stage,
        max_quarantine_share=a.max_quarantine_share,
    )
    # serving reads the newest day's events and profiles from the online source, fresh whatever the decision
    source = stage("online features", publish_source, data_dir, fs)
    run_name = f"daily-{day}-{int(time.time())}" + ("-noseq" if a.hide_sequences else "")
    # the champion is downloaded once: the default warm start and the comparison after training use the same version
    champ_version = champion(data_dir, a.arch)
    # a backfill: a champion trained for a later date has learned this day; neither compared on it nor warm-started from
    champ_date = None if champ_version is None else version_date(data_dir, a.arch, champ_version)
    leak = None if champ_version is None else backfill_guard(day, champ_version, champ_date, {}, a.promotion_margin)
    reg = None
    if champ_version is not None and leak is None:
        reg = stage(
            "load champion", load_registered, data_dir, f"models:/{a.arch}/{champ_version}", f"{models_dir}/champion"
        )
    if leak is not None and a.init_from == "champion":
        init_from = None
        log.warning("daily %s: %s; training from scratch (no warm start from it)", day, leak.reason)
    elif a.init_from == "champion" and reg is not None:
        init_from = reg.checkpoint_dir
        log.info(
            "warm start: models:/%s/%s (version %s) downloaded to %s", a.arch, champ_version, champ_version, init_from
        )
    else:
        init_from = stage("warm-start", registered_checkpoint, data_dir, a.init_from, a.arch, f"{models_dir}/init")
    # merged once here and handed to train(); the default warm start from a champion of another shape (e.g. a newly
    # tuned config) is a cold start
    tc, init_state = stage(
        "warm-start", warm_start_state, fs, train_config(a, init_from=init_from), a.init_from == "champion"
    )
    init_from = tc.init_from
    configs = {"train": tc.flat(), "features": fs.cfg.to_dict()}
    # the run is open while it trains: its step metrics (loss, learning rate, samples/s) are live in MLflow
    run_id = stage("start run", start_training_run, data_dir, run_name, tags)
    live = (tracking_uri(data_dir), run_id)
    try:
        res = stage("train", train, fs, tc, f"{data_dir}/train", run_name, init_state=init_state, live=live)
    except StageFailed as e:
        stage("log failure", log_failed_run, data_dir, run_name, e.__cause__, configs, tags, run_id=run_id)
        raise
    champ_metrics = None
    if reg is not None:
        champ_metrics = stage(
            "evaluate champion",
            evaluate_registered,
            reg,
            data_dir,
            fs,
            storage.join(data_dir, "scores", f"{a.arch}-v{champ_version}", day),
        )
    decision = (
        decide(res.metrics, champ_metrics, a.promotion_margin)
        if leak is None
        else backfill_guard(day, champ_version, champ_date, res.metrics, a.promotion_margin)
    )
    log.info("daily %s: %s", day, decision.reason)
    ingest_metrics = {
        f"ingest_{t}_{k}": float(getattr(c, k))
        for t, c in counts.items()
        for k in ("read", "clean", "quarantined", "skipped_days")
    }
    run_id, version = stage(
        "register",
        log_training_run,
        data_dir,
        run_name,
        res.checkpoint_dir,
        res.history,
        configs | {"model": res.model_config.to_dict()},
        extra_metrics=ingest_metrics
        | {"feature_samples": float(fs.samples), "feature_days_built": float(len(fs.built))},
        tags=tags | {"init_from": str(a.init_from if init_from else "none")},
        register_as=None if a.no_register else a.arch,
        experiment_yaml=a.experiment.to_yaml(),
        run_id=run_id,
        online_source=source["root"],
    )
    details = decision.to_dict() | {"date": day, "oracle": res.metrics.get("eval_oracle_query_auc", float("nan"))}
    outcome = stage("decide", commit_decision, data_dir, run_id, a.arch, version, details, champ_version, champ_metrics)
    eval_metrics = {k: v for k, v in res.metrics.items() if k.startswith("eval_")}
    return {
        "date": day,
        "outcome": outcome,
        "reason": decision.reason,
        "run_id": run_id,
        "model_version": version,
        "champion_before": champ_version,
        **eval_metrics,
    }


def run(a: argparse.Namespace) -> tuple[Exit, list[dict]]:
    """Every date in order under the data directory's lock; stops at the first failure."""
    data_dir = storage.absolute(a.data_dir)
    try:
        with data_dir_lock(data_dir, a.lock_timeout):
            stage("clean up", clean_leftovers, data_dir)  # what earlier (or killed) runs left behind
            try:
                dates = dates_of(a, data_dir)
                synthesize_if_empty(a, data_dir, dates)
            except (NoLogs, ValueError) as e:  # no logs; a stray folder among the day partitions
                print(f"daily_train: {e}", file=sys.stderr)
                return Exit.FAILED, []
            summaries, code = [], Exit.PROMOTED
            for date in dates:
                try:
                    with tempfile.TemporaryDirectory(prefix="hyformer-registry-") as scratch:
                        s = run_day(a, data_dir, date, scratch)
                except StageFailed as e:
                    print(f"daily_train: {date}: {e}", file=sys.stderr)
                    return Exit.FAILED, summaries
                print("daily_train: day " + json.dumps(s), flush=True)
                storage.write_json(storage.join(data_dir, STATUS, f"{s['date']}.json"), s)
                summaries.append(s)
                code = outcome_exit(s["outcome"], a.exit_3_when_kept)
            return code, summaries
    except Locked as e:
        print(f"daily_train: {e} (--lock-timeout)", file=sys.stderr)
        return Exit.LOCKED, []


def dry_run(a: argparse.Namespace) -> Exit:
    """--dry-run: the plan of this run (jobs.plan), printed; nothing written."""
    data_dir = storage.absolute(a.data_dir)
    try:
        dates = dates_of(a, data_dir)
        demo = a.synthetic or data_dir == storage.absolute(DEFAULT_DATA_DIR)
        plan = plan_run(a.experiment, dates, logs_expected=not demo)
    except (OSError, ValueError) as e:  # the ingest's contract errors, a missing partition, a future window
        print(f"daily_train: dry run: {type(e).__name__}: {e}", file=sys.stderr)
        return Exit.FAILED
    print(describe(plan))
    print("daily_train: plan " + json.dumps(plan))
    return Exit.PROMOTED


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = parse_args(argv)
    if a.dry_run:
        return int(dry_run(a))
    t0 = time.perf_counter()
    code, summaries = run(a)
    if code in (Exit.PROMOTED, Exit.NOT_PROMOTED):
        last = summaries[-1] if summaries else {}
        print(
            "daily_train: done "
            + json.dumps(
                {
                    "exit": int(code),
                    "days": len(summaries),
                    "last": last,
                    "wall_seconds": round(time.perf_counter() - t0, 1),
                }
            )
        )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
