"""Data-plane benchmark (issue #17): ingest + features + one training epoch at 1x, 4x and 16x the demo's traffic, on a
local folder and on an S3 server (moto's, in its own process on 127.0.0.1).

    python -m benchmarks.data_plane                                  # 1x, 4x, 16x; local and s3; 14-day window
    python -m benchmarks.data_plane --scales 1 --backends local      # a quick run

Each (scale, backend) runs in a fresh driver process, as the daily workflow would: synthetic logs (the demo's world,
per-day traffic x scale) are generated into the data directory (timed apart), then ``jobs.ingest``,
``jobs.build_features`` and one epoch of ``jobs.train`` (2 CPU workers, checkpoints to the data directory) are timed.
Per stage:

- wall seconds;
- bytes written: the growth of the data directory (every file, listed through ``features.storage``);
- for S3, the bytes that crossed the network to and from the server (counted by a TCP relay in front of it: request
  and response bodies with their HTTP headers);
- the driver's peak RSS so far (``ru_maxrss``) and the largest peak RSS of any Ray worker process (``VmHWM``, read from
  ``/proc`` every 0.5 s).

Writes ``benchmarks/results/data_plane.json`` and ``data_plane.md``. Numbers are for the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from benchmarks.common import write_results
from features import storage

END = dt.date(2026, 11, 22)
DEMO_MODEL = dict(d_model=32, d_seq=16, n_heads=2, n_layers=2, ffn_mult=2, head_hidden=(64,), longer_queries=32)
STAGES = ("ingest", "features", "train")


def read_counts(path: str) -> dict[str, int]:
    time.sleep(0.5)  # the relay writes its counters every 0.2 s
    with open(path) as f:
        return json.load(f)


def serve_s3(port: int, counts_path: str) -> None:
    """moto's S3 server behind a TCP relay on ``port`` that counts the bytes each way (into ``counts_path``)."""
    import socket
    import socketserver

    from moto.server import ThreadedMotoServer

    from jobs.common import free_port

    inner = free_port()
    ThreadedMotoServer(ip_address="127.0.0.1", port=inner, verbose=False).start()
    counts = {"up": 0, "down": 0}

    def pipe(src: socket.socket, dst: socket.socket, key: str) -> None:
        try:
            while data := src.recv(1 << 16):
                counts[key] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    class Relay(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            upstream = socket.create_connection(("127.0.0.1", inner))
            back = threading.Thread(target=pipe, args=(upstream, self.request, "down"), daemon=True)
            back.start()
            pipe(self.request, upstream, "up")
            back.join()
            upstream.close()

    def dump() -> None:
        while True:
            with open(f"{counts_path}.tmp", "w") as f:
                json.dump(counts, f)
            os.replace(f"{counts_path}.tmp", counts_path)
            time.sleep(0.2)

    threading.Thread(target=dump, daemon=True).start()
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", port), Relay) as server:
        server.daemon_threads = True
        server.serve_forever()


class WorkerPeak(threading.Thread):
    """The largest VmHWM (peak RSS) of any Ray worker process (``ray::...``), read every ``every`` seconds."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.peak_mb, self.stop = every, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if not f.read(5).startswith(b"ray::"):
                            continue
                    with open(f"/proc/{pid}/status") as f:
                        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
                    self.peak_mb = max(self.peak_mb, hwm / 1024)
                except (OSError, StopIteration):
                    continue


def data_bytes(data_dir: str) -> int:
    return sum(i.size for i in storage.listing(data_dir, recursive=True) if i.type == storage.pafs.FileType.File)


def run_one(scale: float, days: int, data_dir: str, counts_path: str | None) -> dict:
    """One (scale, backend): synthesize, then time the three stages. Runs in its own process."""
    from features.build import FeatureConfig
    from features.synth import SynthConfig, generate
    from jobs.build_features import build_features
    from jobs.common import init_ray
    from jobs.ingest import ingest
    from jobs.train import train
    from jobs.train_config import TrainConfig

    init_ray(num_cpus=4)
    peak = WorkerPeak()
    peak.start()
    t0 = time.perf_counter()
    synth = generate(SynthConfig.demo(days, scale), data_dir, END)
    out: dict = {
        "synth_s": round(time.perf_counter() - t0, 2),
        "impressions": synth["rows"]["impressions"],
        "events": synth["rows"]["search_events"] + synth["rows"]["feed_events"],
    }
    fs = None

    def stage(name: str, fn):
        before, io = data_bytes(data_dir), read_counts(counts_path) if counts_path else None
        t = time.perf_counter()
        result = fn()
        row = {
            "seconds": round(time.perf_counter() - t, 2),
            "written_mb": round((data_bytes(data_dir) - before) / 1e6, 2),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_rss_mb": round(peak.peak_mb, 1),
        }
        if counts_path:
            after = read_counts(counts_path)
            row["s3_received_mb"] = round((after["up"] - io["up"]) / 1e6, 2)
            row["s3_sent_mb"] = round((after["down"] - io["down"]) / 1e6, 2)
        out[name] = row
        return result

    stage("ingest", lambda: ingest(data_dir, END, days))
    fs = stage("features", lambda: build_features(data_dir, END, days, FeatureConfig(long_len=128, n_shards=4)))
    tc = TrainConfig(epochs=1, model=DEMO_MODEL, workers=2, cpus_per_worker=1, batch_size=256)
    res = stage("train", lambda: train(fs, tc, storage.join(data_dir, "train"), f"bench-{uuid.uuid4().hex[:6]}"))
    out |= {"samples": fs.samples, "eval_auc": res.metrics.get("eval_auc")}
    peak.stop.set()
    return out


def start_s3(counts_path: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """``serve_s3`` in its own process on a free port; the environment that points the SDKs at it."""
    import socket

    from jobs.common import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.data_plane", "--serve-s3", str(port), counts_path]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if os.path.exists(counts_path):
                return proc, env
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the S3 server did not start")


def measure(scale: float, backend: str, days: int) -> dict:
    """Run ``run_one`` in a fresh process (a fresh driver, a fresh Ray) against a fresh local folder or S3 server."""
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
        counts = f"{tmp}/s3-bytes.json"
        server, env = (None, {}) if backend == "local" else start_s3(counts)
        try:
            if server is not None:
                import boto3

                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                os.environ.update(env)
                boto3.client("s3").create_bucket(Bucket=bucket)
                data_dir = f"s3://{bucket}/data"
            else:
                data_dir = f"{tmp}/data"
            result = f"{tmp}/result.json"
            cmd = [sys.executable, "-m", "benchmarks.data_plane", "--one", str(scale), data_dir, result, str(days)]
            cmd += [counts] if server is not None else []
            subprocess.run(cmd, env=os.environ | env, check=True, timeout=7200)
            with open(result) as f:
                return {"scale": scale, "backend": backend, "days": days} | json.load(f)
        finally:
            if server is not None:
                server.kill()
                server.wait()


def table(rows: list[dict]) -> str:
    lines = [
        "| scale | storage | impressions | stage | s | written MB | S3 in / out MB | driver peak RSS MB | "
        "worker peak RSS MB |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for s in STAGES:
            st = r[s]
            net = f"{st['s3_received_mb']:.1f} / {st['s3_sent_mb']:.1f}" if "s3_received_mb" in st else "-"
            lines.append(
                f"| {r['scale']:g}x | {r['backend']} | {r['impressions']:,} | {s} | {st['seconds']:.1f} | "
                f"{st['written_mb']:.1f} | {net} | {st['driver_peak_rss_mb']:.0f} | {st['worker_peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve-s3":  # the S3 server process of start_s3()
        return serve_s3(int(argv[1]), argv[2])
    if argv and argv[0] == "--one":  # the child process of measure()
        scale, data_dir, result, days, *counts = argv[1:]
        out = run_one(float(scale), int(days), data_dir, counts[0] if counts else None)
        with open(result, "w") as f:
            json.dump(out, f)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", default="1,4,16", help="per-day traffic multipliers of the demo (default 1,4,16)")
    p.add_argument("--backends", default="local,s3", help="local and/or s3 (default both)")
    p.add_argument("--days", type=int, default=14, help="window length (default 14; the last day is held out)")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    a = p.parse_args(argv)
    rows = []
    for scale in (float(s) for s in a.scales.split(",")):
        for backend in a.backends.split(","):
            print(f"data_plane: {scale:g}x on {backend} ...", flush=True)
            rows.append(measure(scale, backend, a.days))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "date": dt.date.today().isoformat()}
    md = (
        f"# Data plane: ingest + features + 1 epoch, local folder vs S3 server ({a.days}-day window)\n\n"
        f"{meta['machine']}, {meta['cpus']} CPUs, {meta['date']}; `python -m benchmarks.data_plane`. Peaks are "
        "running peaks (a stage's column includes the stages before it).\n\n" + table(rows)
    )
    write_results(a.out, "data_plane", {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
    main()
