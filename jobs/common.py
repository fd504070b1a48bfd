"""Small helpers shared by the jobs: Ray start-up, data-directory layout, logging."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import urllib.parse
from enum import IntEnum
from pathlib import Path

import ray

log = logging.getLogger("hyformer")
MAX_QUARANTINE_SHARE = 0.01  # ingest's default limit on a partition's quarantined rows / rows read

DEFAULT_DATA_DIR = os.environ.get("HYFORMER_DATA_DIR", str(Path.cwd() / "data"))
PRIVATE_UMASK = 0o007  # what the pipeline creates (quarantined raw rows, the MLflow store): owner and group only
SECRET_PARAM = re.compile(r"(?i)pass|pwd|secret|token|sig|key|credential|auth")  # query parameters to mask


def private_files() -> None:
    """New files and folders of this process: no access for others (umask 007). Run when this module is imported,
    which every process running a job's code does (the CLIs, the workflows, and the Ray workers that run jobs'
    tasks, whatever umask their node gave them)."""
    os.umask(PRIVATE_UMASK)


private_files()


def redact(uri: str) -> str:
    """``uri`` fit to print or log: a password (or a lone token) in its user info and the values of query parameters
    named like secrets (password, token, signature, key, ...) become ``***``."""
    try:
        parts = urllib.parse.urlsplit(uri)
        password = parts.password
    except ValueError:
        return "<a URI that does not parse>"
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{parts.username}:***@{host}" if password is not None else f"***@{host}"
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(SECRET_PARAM.search(k) for k, _ in params):
        query = "&".join(f"{k}=***" if SECRET_PARAM.search(k) else f"{k}={v}" for k, v in params)
    out = uri.replace(f"//{parts.netloc}", f"//{netloc}", 1) if netloc != parts.netloc else uri
    return out.replace(f"?{parts.query}", f"?{query}", 1) if query != parts.query else out


def has_secret(uri: str) -> bool:
    """Whether ``uri`` holds what ``redact`` masks (user info, secret-named query parameters)."""
    return redact(uri) != uri


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (a submitted job), else start a local one.

    Locally we declare at least 4 logical CPUs: on a 2-core machine Ray Data read tasks and Ray Train workers otherwise
    wait on each other's whole CPUs (see ../shared/PLATFORM_NOTES.md). Resources cannot be passed when joining.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # The dashboard (State API) on a known free port, named in RAY_API_SERVER_ADDRESS for every process of the
        # cluster: Ray Train V2's placement-group cleaner finds its cluster through it, and with several local Ray
        # instances on one host it otherwise fails ("Found multiple active Ray instances") and a finished or stopped
        # run (e.g. a Tune trial stopped by ASHA) keeps its workers' CPUs for good.
        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(
            num_cpus=num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=True,
            dashboard_port=port,
            log_to_driver=True,
        )
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data without progress bars (progress is logged per stage; bars garble `ray job logs`) and warnings only; in
    every process that runs Ray Data (the driver, a Tune trial's own process)."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Exit(IntEnum):
    """The daily workflow's exit codes; jobs/submit.py passes them through from a Ray job. The docstring after each
    is what the submit wrapper prints."""

    PROMOTED = 0  # a healthy day: promoted or kept (or already done); the outcome is logged and in status/<date>.json
    FAILED = 1  # a stage failed (named on stderr)
    USAGE = 2  # bad arguments (argparse)
    NOT_PROMOTED = 3  # only with --exit-3-when-kept: trained and registered, the champion is kept (reason logged)
    LOCKED = 75  # EX_TEMPFAIL: another run holds the data directory's lock


class Locked(RuntimeError):
    """Another run holds the data directory's lock; the message names it (pid, host, since when)."""


class ReconcileError(RuntimeError):
    """Row counts that do not add up (read != written + dropped, read != clean + quarantined): a bug, never let it
    pass silently."""


class StageFailed(RuntimeError):
    """A workflow stage failed; the message names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage = stage


def stage(name: str, fn, *args, **kwargs):
    """Run one stage of a workflow, logging its wall time; any failure becomes StageFailed naming the stage."""
    t0 = time.perf_counter()
    log.info("=== stage %s: start", name)
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the stage's name
        log.exception("=== stage %s: FAILED", name)
        raise StageFailed(name, e) from e
    log.info("=== stage %s: done in %.1f s", name, time.perf_counter() - t0)
    return out


def clean_root(data_dir: str) -> str:
    from features.schema import SCHEMA_VERSION

    return f"{data_dir}/clean/v{SCHEMA_VERSION}"


def quarantine_root(data_dir: str) -> str:
    from features.schema import SCHEMA_VERSION

    return f"{data_dir}/quarantine/v{SCHEMA_VERSION}"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (Ray workers, CI and job logs have no display)."""
    import matplotlib  # noqa: PLC0415 - only the stages that plot pay for the import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt
