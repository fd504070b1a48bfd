"""The data directory's lock: one run writes a data directory at a time, on a local disk and on S3.

- Local folder: an OS file lock (``<data>/locks/daily.lock``, released by the OS when the holder dies) with the holder
  named in ``daily.holder.json``.
- ``s3://``: a *lease* object ``<data>/locks/daily.lease.json`` created with a conditional PUT (``If-None-Match: *``:
  exactly one of several racing runs creates it), naming its holder and when it expires. The holder renews it every
  third of the lease; a holder that died frees it when it expires, and the next run deletes the expired lease with a
  conditional DELETE (``If-Match`` on the ETag it read, so it can only remove the lease it judged expired) and takes
  it. S3-compatible stores that honour conditional writes (AWS S3 since 2024, MinIO, moto) work.

Other object stores (``gs://``, ``abfs://``) have the same conditional writes but no implementation here yet: the lock
refuses them with a clear error rather than run unlocked.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from features import storage
from jobs.common import Exit, Locked, log

LEASE_S = 3600.0  # a dead holder's lease frees the data directory after this long
POLL_S = 2.0  # how often a waiting run looks at the lease again


def holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


@contextmanager
def data_dir_lock(data_dir: str, timeout: float = 0.0, lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold the lock of ``data_dir`` (a local folder or an ``s3://`` URI) for the ``with`` block. Raises Locked, naming
    the holder, after ``timeout`` seconds (0: at once)."""
    if storage.is_local(data_dir):
        with _file_lock(storage.resolve(data_dir)[1], timeout):
            yield
    elif data_dir.startswith("s3://"):
        with S3Lease(storage.join(data_dir, "locks", "daily.lease.json"), lease_s).held(timeout):
            yield
    else:
        raise ValueError(
            f"{data_dir}: no lock for {data_dir.split('://')[0]}:// storage yet (local folders and s3:// have one); "
            "a data directory is never written unlocked"
        )


@contextmanager
def cli_lock(data_dir: str, timeout: float = 0.0) -> Iterator[None]:
    """``data_dir_lock`` for a job's command line: a held lock is a message on stderr and exit code 75."""
    try:
        with data_dir_lock(data_dir, timeout):
            yield
    except Locked as e:
        print(f"{e}", file=sys.stderr)
        raise SystemExit(int(Exit.LOCKED)) from None


@contextmanager
def _file_lock(data_dir: str, timeout: float) -> Iterator[None]:
    os.makedirs(f"{data_dir}/locks", exist_ok=True)
    lock = FileLock(f"{data_dir}/locks/daily.lock", timeout=timeout)
    who = Path(f"{data_dir}/locks/daily.holder.json")
    try:
        lock.acquire()
    except Timeout:
        name = who.read_text() if who.exists() else "unknown"
        raise Locked(f"{data_dir} is locked by another run ({name}); waited {timeout:g} s") from None
    try:
        who.write_text(json.dumps(holder()))
        yield
    finally:
        who.unlink(missing_ok=True)
        lock.release()


class S3Lease:
    """A lease object on S3 (see the module docstring). ``held(timeout)`` takes it, renews it and gives it back."""

    def __init__(self, uri: str, lease_s: float = LEASE_S):
        import boto3  # noqa: PLC0415 - only S3 data directories need the AWS SDK

        self.uri, self.lease_s = uri, lease_s
        self.bucket, self.key = uri.removeprefix("s3://").split("/", 1)
        self.s3 = boto3.client("s3")  # credentials and endpoint: the SDK's environment and config
        self.etag: str | None = None
        self.lost = threading.Event()

    def _body(self) -> bytes:
        return json.dumps(holder() | {"expires": time.time() + self.lease_s, "lease_s": self.lease_s}).encode()

    def try_take(self) -> dict | None:
        """Take the lease if it is free or expired; else return the holder's lease (its JSON)."""
        from botocore.exceptions import ClientError  # noqa: PLC0415

        for _ in range(2):  # the second round after deleting an expired lease
            try:
                r = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*")
                self.etag = r["ETag"]
                return None
            except ClientError as e:
                if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    raise
            try:
                obj = self.s3.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if _code(e) in ("NoSuchKey", "404"):
                    continue  # released between our PUT and GET: try again
                raise
            other = json.loads(obj["Body"].read())
            if other.get("expires", 0) > time.time():
                return other
            log.warning("lock: the lease of %s expired (held by %s): taking it over", self.uri, other)
            try:
                self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=obj["ETag"])
            except ClientError as e:
                if _code(e) not in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    raise
        return other

    def _renew(self, stop: threading.Event) -> None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        while not stop.wait(self.lease_s / 3):
            try:
                r = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfMatch=self.etag)
                self.etag = r["ETag"]
            except ClientError as e:
                log.error("lock: could not renew the lease %s (%s): another run may take it", self.uri, e)
                self.lost.set()
                return

    @contextmanager
    def held(self, timeout: float = 0.0) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        while (other := self.try_take()) is not None:
            if time.monotonic() >= deadline:
                until = dt.datetime.fromtimestamp(other.get("expires", 0), dt.timezone.utc).isoformat(
                    timespec="seconds"
                )
                who = {k: other.get(k) for k in ("pid", "host", "since")}
                raise Locked(f"{self.uri} is held by another run ({who}, lease until {until}); waited {timeout:g} s")
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(stop,), daemon=True, name="lease-renewal")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            self.release()

    def release(self) -> None:
        from botocore.exceptions import ClientError  # noqa: PLC0415

        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as e:
            log.error("lock: could not release the lease %s (%s): it expires by itself", self.uri, e)


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
