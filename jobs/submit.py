"""Submit the daily workflow to a Ray cluster, stream its logs and exit with the workflow's own exit code.

    python jobs/submit.py -- --data-dir /abs/shared/data
    python jobs/submit.py --address http://head:8265 -- --data-dir /abs/shared/data --date 2026-11-22

Everything after ``--`` is passed to ``python workflows/daily_train.py``. The job runs in a copy of ``--working-dir``
(the project root by default), so ``--data-dir`` must be an absolute path on storage every node can read, or an
object-storage URI (``s3://bucket/prefix``; then ``MLFLOW_TRACKING_URI`` names a tracking server);
``MLFLOW_TRACKING_URI`` is forwarded to the job when it is set. A blocking ``ray job submit`` exits 0 or 1 only; this
wrapper exits with the driver's own exit code, so that a scheduler can tell the outcomes apart:

    0   a healthy day: promoted or kept, or nothing to do (the date is already done)
    1   a stage failed; also a job that ended STOPPED or FAILED without a driver exit code (its runtime env could
        not be set up, it was stopped), a driver killed by a signal, or a cluster that could not be reached
    2   usage error (of this wrapper or of the workflow)
    3   the champion is kept (only with the workflow's --exit-3-when-kept)
    75  another run holds the data directory's lock (EX_TEMPFAIL: try again later)

Ray 2.60 clusters (`ray start`, `ray.init`) use token authentication by default: export RAY_AUTH_MODE=token, and
the client reads the token from RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token
(``ray get-auth-token`` on the head prints it). SIGINT/SIGTERM stop the submitted job before exiting (128 + signal),
so that a scheduler's timeout does not leave a run holding the data lock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from jobs.common import Exit, has_secret, redact

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = "workflows/daily_train.py"  # relative to the working dir
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)
UPLOAD_EXCLUDES = [".git", ".venv", "/data"]  # gitignore-style, relative to the working dir; .gitignore applies too
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# The workflow's exit codes (jobs.common.Exit), returned unchanged, and what the wrapper says of each.
MEANING = {
    Exit.PROMOTED: "a healthy day (promoted or kept), or nothing to do",
    Exit.FAILED: "failed",
    Exit.USAGE: "usage error",
    Exit.NOT_PROMOTED: "trained but not promoted (champion kept; --exit-3-when-kept)",
    Exit.LOCKED: "another run holds the data directory's lock",
}


class JobClient(Protocol):
    """The part of ray.job_submission.JobSubmissionClient this wrapper uses (tests pass a fake)."""

    def submit_job(
        self, *, entrypoint: str, submission_id: str | None = None, runtime_env: dict | None = None
    ) -> str: ...
    def tail_job_logs(self, job_id: str) -> Any: ...  # async iterator of log chunks
    def get_job_status(self, job_id: str) -> Any: ...
    def get_job_info(self, job_id: str) -> Any: ...  # .status, .driver_exit_code, .message
    def stop_job(self, job_id: str) -> bool: ...


class UsageError(ValueError):
    pass


class Interrupted(BaseException):
    """SIGINT/SIGTERM while waiting (a BaseException so that no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(msg: str) -> None:
    print(f"submit: {msg}", file=sys.stderr, flush=True)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag v`` or ``--flag=v``); the last one wins, as in argparse."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def check_workflow_args(args: Sequence[str], environ: Mapping[str, str]) -> None:
    """Paths that would land in the job's temporary copy of the working dir (and vanish with it) are usage errors."""
    data_dir = flag_value(args, "--data-dir")
    if data_dir is not None and "://" not in data_dir and not os.path.isabs(data_dir):
        raise UsageError(
            f"--data-dir {data_dir!r} must be absolute (or an s3://, gs://, abfs:// URI): the job runs in a "
            "temporary copy of the working dir"
        )
    if data_dir is None:
        say("warning: no --data-dir: the workflow's default (./data, or HYFORMER_DATA_DIR on the cluster) is used")
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    if uri and not uri.startswith(
        ("http://", "https://", "sqlite:////", "file:///", "postgresql", "mysql", "databricks")
    ):
        raise UsageError(
            f"MLFLOW_TRACKING_URI={redact(uri)!r} must be absolute (http(s)://, sqlite:////abs/db, file:///abs) for "
            "a submitted job"
        )
    if uri and has_secret(uri):
        raise UsageError(
            f"MLFLOW_TRACKING_URI={redact(uri)!r} carries a secret, and a submitted job's environment is stored with "
            "the job and shown by the Ray dashboard: give the cluster its credentials itself (e.g. the RayJob's env "
            "from a Kubernetes Secret; MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for a tracking server) "
            "and submit with a URI without them"
        )


def default_submission_id(workflow_args: Sequence[str], now: float) -> str:
    """``daily-<day>-<unix time>``: the day is --date, else the last day of a --from/--to backfill, else 'latest'."""
    day = flag_value(workflow_args, "--date") or flag_value(workflow_args, "--to") or "latest"
    return f"daily-{day}-{int(now)}"


def workflow_entrypoint(workflow_args: Sequence[str]) -> str:
    return shlex.join(["python", WORKFLOW, *workflow_args])


def runtime_env(working_dir: str | Path, environ: Mapping[str, str]) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES}
    env_vars = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def status_name(status: Any) -> str:
    return str(getattr(status, "value", status))  # JobStatus is a str Enum; fakes may pass plain strings


def job_exit_code(info: Any) -> int:
    """The exit code a scheduler should see for a finished job (see the module docstring)."""
    status = status_name(info.status)
    if status not in TERMINAL:
        raise ValueError(f"job is not finished: {status}")
    code = info.driver_exit_code
    if code is None:  # the driver never ran or never finished: runtime env failure, stopped, lost node
        return Exit.PROMOTED if status == "SUCCEEDED" else Exit.FAILED
    return int(code) if 0 <= int(code) <= 255 else Exit.FAILED  # negative: the driver was killed by a signal


def follow_logs(client: JobClient, job_id: str, out: TextIO) -> None:
    """Print the job's logs as they come until it finishes; a dropped stream only ends the printing."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - the job's outcome comes from get_job_info, not from the stream
        say(f"log stream ended early ({type(e).__name__}: {e}); waiting for the job without logs")


def wait_for_job(client: JobClient, job_id: str, poll_s: float = 5.0) -> Any:
    while status_name(client.get_job_status(job_id)) not in TERMINAL:
        time.sleep(poll_s)
    return client.get_job_info(job_id)


def make_client(address: str) -> JobClient:
    from ray.job_submission import JobSubmissionClient  # imported here: --help stays fast

    return JobSubmissionClient(address)


def submit(
    address: str,
    workflow_args: Sequence[str],
    working_dir: str | Path = PROJECT_ROOT,
    submission_id: str | None = None,
    client: JobClient | None = None,
    environ: Mapping[str, str] = os.environ,
    poll_s: float = 5.0,
    out: TextIO = sys.stdout,
) -> int:
    """Submit ``python workflows/daily_train.py <workflow_args>``, wait for it and return the exit code to exit with."""
    try:
        check_workflow_args(workflow_args, environ)
        if not (Path(working_dir) / WORKFLOW).is_file():
            raise UsageError(f"{Path(working_dir) / WORKFLOW} not found: --working-dir must be the project root")
    except UsageError as e:
        say(str(e))
        return Exit.USAGE
    submission_id = submission_id or default_submission_id(workflow_args, time.time())
    entrypoint = workflow_entrypoint(workflow_args)
    try:
        client = client or make_client(address)
        job_id = client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env(working_dir, environ)
        )
    except Exception as e:  # noqa: BLE001 - unreachable cluster, auth, duplicate id: all "could not run"
        say(f"could not submit to {address}: {type(e).__name__}: {e}")  # Ray's auth errors say which token is missing
        return Exit.FAILED
    say(f"submitted {job_id} to {address}: {entrypoint}")
    try:
        follow_logs(client, job_id, out)
        info = wait_for_job(client, job_id, poll_s)
    except Interrupted as e:
        say(f"{e}: stopping job {job_id}")
        client.stop_job(job_id)
        return 128 + e.signum
    code = job_exit_code(info)
    say(
        f"job {job_id} {status_name(info.status)}, driver exit code {info.driver_exit_code} -> exit {code} "
        f"({MEANING.get(code, 'workflow exit code')})"
    )
    if code != Exit.PROMOTED and info.driver_exit_code is None and getattr(info, "message", None):
        say(f"ray: {info.message}")
    return code


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """This wrapper's options, and the workflow's arguments (everything after the first ``--``)."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(
        prog="jobs/submit.py",
        usage=(
            "%(prog)s [--address URL] [--working-dir DIR] [--submission-id ID] [--poll SECONDS] "
            "-- [daily_train.py args]"
        ),
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help=f"Ray dashboard/Jobs API address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--working-dir",
        default=str(PROJECT_ROOT),
        help="directory uploaded as the job's working dir (default: the project root)",
    )
    p.add_argument("--submission-id", default=None, help="job id (default: daily-<--date or 'latest'>-<unix time>)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between status checks once the log stream ends")
    return p.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    a, workflow_args = parse_args(sys.argv[1:] if argv is None else argv)

    def interrupted(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        return submit(a.address, workflow_args, working_dir=a.working_dir, submission_id=a.submission_id, poll_s=a.poll)
    except Interrupted as e:  # before the job existed (while connecting or submitting): nothing to stop
        say(f"{e} before the job was submitted")
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
