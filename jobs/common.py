"""Small helpers shared by the jobs: Ray start-up, data-directory layout, logging."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import ray

log = logging.getLogger("hyformer")

DEFAULT_DATA_DIR = os.environ.get("HYFORMER_DATA_DIR", str(Path.cwd() / "data"))


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
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_port=port, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # progress is logged per stage; bars garble `ray job logs`
    logging.getLogger("ray.data").setLevel(logging.WARNING)


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


def absolute(path: str) -> str:
    """Absolute path: a submitted job runs in a temporary copy of the working directory."""
    return str(Path(path).expanduser().resolve())


def clean_root(data_dir: str) -> str:
    from features.schema import SCHEMA_VERSION

    return f"{data_dir}/clean/v{SCHEMA_VERSION}"


def quarantine_root(data_dir: str) -> str:
    from features.schema import SCHEMA_VERSION

    return f"{data_dir}/quarantine/v{SCHEMA_VERSION}"


def replace_dir(new: str | None, final: str, trash: str | None = None) -> None:
    """Put folder ``new`` at ``final`` (``None``: remove ``final``): rename the old one away, the new one in, delete old.

    Readers see the old folder or the new one, never a half-written one (between the two renames, none). The old one
    goes into ``trash`` (default: a sibling ``<final>.old-<id>``) before it is deleted.
    """
    old = None
    if os.path.lexists(final):
        if trash is None:
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        else:
            os.makedirs(trash, exist_ok=True)
            old = f"{trash}/{uuid.uuid4().hex}"
        os.rename(final, old)
    if new is not None:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
