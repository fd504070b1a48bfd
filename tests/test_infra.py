"""infra/: the schedules, manifests and launcher config name files, workflow arguments and images that exist; the
submit wrapper turns job outcomes into the workflow's exit codes; the MLflow server script serves runs, artifacts and
registered models (started for real)."""

from __future__ import annotations

import copy
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from jobs import submit as sd  # the scheduler's client: python jobs/submit.py -- <workflow args>

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
INSTALL_ROOT = "/opt/hyformer"  # where infra/schedule/ expects the project checkout (a placeholder)
SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "2>&1"}


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one_doc(path: Path, kind: str) -> dict:
    docs = [d for d in yaml_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def args_after_dashdash(tokens: list[str]) -> list[str]:
    """The workflow arguments of a submit_daily.py command line: after `--`, up to the first shell operator."""
    assert "--" in tokens, f"no `--` before the workflow arguments in {tokens}"
    out = []
    for t in tokens[tokens.index("--") + 1 :]:
        if t in SHELL_OPERATORS:
            break
        out.append(t)
    return out


def workflow_accepts(args: list[str]):
    """Parse with the workflow's own parser (argparse exits on unknown flags or bad values)."""
    from workflows.daily_train import parse_args

    try:
        return parse_args(args)
    except SystemExit as e:
        pytest.fail(f"workflows/daily_train.py rejects {args} (exit {e.code})")


def project_path(path: str) -> Path:
    """A path named by a schedule, with the placeholder checkout mapped onto this project."""
    assert path.startswith(INSTALL_ROOT + "/"), f"{path} is not under the checkout placeholder {INSTALL_ROOT}"
    return ROOT / path.removeprefix(INSTALL_ROOT + "/")


def cpu_quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def ray_pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])
    ]
    return [(name, g["template"]["spec"]) for name, g in groups]


def dockerfile_facts() -> dict:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    tag = re.search(r"docker build -f infra/docker/Dockerfile -t (\S+) \.", text)
    assert tag, "the Dockerfile's header must show the build command with -t <image>"
    return {
        "image": tag.group(1),
        "from": re.search(r"^FROM (\S+)", text, re.M).group(1),
        "workdir": re.search(r"^WORKDIR (\S+)", text, re.M).group(1),
        "copy_to": re.search(r"^COPY .*\. (\S+)$", text, re.M).group(1),
        "torch": re.search(r"^ARG TORCH_VERSION=(\S+)", text, re.M).group(1),
    }


# --- every file parses -------------------------------------------------------------------------------------------


def test_every_infra_yaml_parses_into_objects():
    paths = sorted(INFRA.rglob("*.yaml"))
    assert {p.relative_to(INFRA).as_posix() for p in paths} >= {
        "k8s/raycluster.yaml",
        "k8s/rayjob.yaml",
        "k8s/cronjob.yaml",
        "ray/cluster.yaml",
    }
    for p in paths:
        docs = yaml_docs(p)
        assert docs and all(isinstance(d, dict) for d in docs), p
        if p.parent.name == "k8s":
            assert all({"apiVersion", "kind", "metadata"} <= d.keys() for d in docs), p


# --- cron and systemd --------------------------------------------------------------------------------------------


def crontab_entries() -> list[tuple[list[str], str]]:
    entries = []
    for line in (INFRA / "schedule" / "crontab").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or re.match(r"^[A-Za-z_]\w*=", line):
            continue  # comments and VAR=value lines
        *fields, command = line.split(None, 5)
        entries.append((fields, command))
    return entries


def test_crontab_submits_the_workflow_once_a_day():
    entries = crontab_entries()
    assert len(entries) == 1
    (minute, hour, dom, month, dow), command = entries[0]
    assert 0 <= int(minute) <= 59 and 0 <= int(hour) <= 23 and (dom, month, dow) == ("*", "*", "*")
    tokens = shlex.split(command)
    assert tokens[:3] == ["cd", INSTALL_ROOT, "&&"]  # the script's relative path below is resolved from here
    script = next(i for i, t in enumerate(tokens) if t.endswith("jobs/submit.py"))
    assert tokens[script - 1] == f"{INSTALL_ROOT}/.venv/bin/python"
    assert (ROOT / tokens[script]).is_file()
    a = workflow_accepts(args_after_dashdash(tokens))
    assert os.path.isabs(a.data_dir)
    assert "[ $rc -eq 3 ]" in command  # "not promoted" is not reported as a failure


def systemd_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}} (systemd allows repeated keys, which configparser does not)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in (INFRA / "schedule" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_service_runs_the_wrapper_and_accepts_not_promoted():
    service = systemd_unit("hyformer-daily.service")["Service"]
    assert service["Type"] == ["oneshot"]
    assert "3" in " ".join(service["SuccessExitStatus"]).split()
    tokens = shlex.split(service["ExecStart"][0])
    assert tokens[0] == f"{INSTALL_ROOT}/.venv/bin/python"
    assert project_path(tokens[1]) == ROOT / "jobs" / "submit.py" and project_path(tokens[1]).is_file()
    assert service["WorkingDirectory"] == [INSTALL_ROOT]
    a = workflow_accepts(args_after_dashdash(tokens))
    assert os.path.isabs(a.data_dir)


def test_systemd_timer_starts_the_service_daily_and_catches_up():
    timer = systemd_unit("hyformer-daily.timer")
    assert (
        timer["Timer"]["Unit"] == ["hyformer-daily.service"]
        and (INFRA / "schedule" / "hyformer-daily.service").is_file()
    )
    assert timer["Timer"]["Persistent"] == ["true"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    (calendar,) = timer["Timer"]["OnCalendar"]
    if shutil.which("systemd-analyze"):
        out = subprocess.run(
            ["systemd-analyze", "calendar", "--iterations=2", calendar], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        elapses = re.findall(r"(?:Next elapse|Iter\. #2):\s+\w+ (\S+ \S+)", out.stdout)
        assert len(elapses) == 2
        t0, t1 = (time.strptime(e, "%Y-%m-%d %H:%M:%S") for e in elapses)
        assert time.mktime(t1) - time.mktime(t0) == 24 * 3600, out.stdout  # once a day
    else:
        assert re.fullmatch(r"\*-\*-\* \d\d:\d\d(:\d\d)?|daily", calendar)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    """systemd's own checker (unknown keys, bad values); the placeholder checkout is mapped onto this project."""
    for name in ("hyformer-daily.service", "hyformer-daily.timer"):
        text = (INFRA / "schedule" / name).read_text().replace(f"{INSTALL_ROOT}/.venv/bin/python", sys.executable)
        text = re.sub(r"^User=.*$", "", text.replace(INSTALL_ROOT, str(ROOT)), flags=re.M)
        (tmp_path / name).write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "hyformer-daily.timer"), str(tmp_path / "hyformer-daily.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "hyformer-daily" in line]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


# --- KubeRay -----------------------------------------------------------------------------------------------------


def test_rayjob_entrypoint_runs_the_workflow_from_the_image_project_dir():
    job = one_doc(INFRA / "k8s" / "rayjob.yaml", "RayJob")
    spec = job["spec"]
    tokens = shlex.split(spec["entrypoint"])
    assert tokens[:2] == ["python", "workflows/daily_train.py"] and (ROOT / tokens[1]).is_file()
    a = workflow_accepts(tokens[2:])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    docker = dockerfile_facts()
    assert runtime_env["working_dir"] == docker["workdir"] == docker["copy_to"]  # the project inside the image
    assert spec["submissionMode"] == "K8sJobMode"  # the submitter pod uploads that local working_dir
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] == 0  # a retry would train again
    # --data-dir is the shared PVC's mount path in every Ray pod (data and Ray Train storage are read on every node)
    assert os.path.isabs(a.data_dir)
    for group, pod in ray_pod_templates(spec["rayClusterSpec"]):
        pvcs = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {(m["name"], m["mountPath"]) for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert any((name, a.data_dir) in mounts for name in pvcs), f"{group}: {a.data_dir} is not a PVC mount"
    # the training the entrypoint asks for fits the GPU workers of its cluster
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert a.gpu, "the cluster has GPU workers: train on them"
    gpus = sum(
        g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in workers
        for c in g["template"]["spec"]["containers"]
    )
    assert a.workers <= gpus
    assert all(
        a.cpus_per_worker <= cpu_quantity(c["resources"]["limits"]["cpu"])
        for g in workers
        for c in g["template"]["spec"]["containers"]
    )


@pytest.mark.parametrize("manifest,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_gpu_worker_groups_request_one_gpu_per_worker(manifest, kind):
    obj = one_doc(INFRA / "k8s" / manifest, kind)
    cluster = obj["spec"] if kind == "RayCluster" else obj["spec"]["rayClusterSpec"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu_groups and all(g["replicas"] >= 1 for g in gpu_groups)
    for g in gpu_groups:
        for c in g["template"]["spec"]["containers"]:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, c["name"]
            assert c["resources"]["requests"]["nvidia.com/gpu"] == 1, c["name"]


def test_the_s3_rayjob_needs_no_shared_volume():
    """The object-storage RayJob: data under s3://, runs on a tracking server, and no pod mounts a PVC."""
    job = one_doc(INFRA / "k8s" / "rayjob-s3.yaml", "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "workflows/daily_train.py"]
    assert entry[entry.index("--data-dir") + 1].startswith("s3://")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")  # the embedded SQLite store cannot live in a bucket
    for group, pod in ray_pod_templates(job["spec"]["rayClusterSpec"]):
        assert not [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v], group


def test_manifests_run_the_image_the_dockerfile_builds():
    import ray

    docker = dockerfile_facts()
    assert docker["from"].startswith(f"rayproject/ray:{ray.__version__}-")  # the Ray the project pins
    torch_pin = re.search(r"^TORCH_VERSION=(\S+)", (INFRA / "install.sh").read_text(), re.M).group(1)
    assert docker["torch"] == torch_pin
    assert (INFRA / "docker" / "Dockerfile.dockerignore").is_file()
    clusters = [
        one_doc(INFRA / "k8s" / "raycluster.yaml", "RayCluster")["spec"],
        one_doc(INFRA / "k8s" / "rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
        one_doc(INFRA / "k8s" / "rayjob-s3.yaml", "RayJob")["spec"]["rayClusterSpec"],
    ]
    for cluster in clusters:
        assert cluster["rayVersion"] == ray.__version__
        for group, pod in ray_pod_templates(cluster):
            assert {c["image"] for c in pod["containers"]} == {docker["image"]}, group


def test_cronjob_creates_a_dated_rayjob_from_the_template(tmp_path):
    """Runs the CronJob's own script with a fake kubectl that records what it was asked to create."""
    docs = {d["kind"]: d for d in yaml_docs(INFRA / "k8s" / "cronjob.yaml")}
    cron = docs["CronJob"]["spec"]
    assert len(cron["schedule"].split()) == 5 and cron["schedule"].split()[2:] == ["*", "*", "*"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    # RBAC: the pod's service account may create RayJobs
    account = docs["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    binding = docs["RoleBinding"]
    assert {"kind": "ServiceAccount", "name": account} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]
    ]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
        for r in docs["Role"]["rules"]
    )
    # the template file is the ConfigMap mounted where the script reads it
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (mount,) = container["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "hyformer-rayjob-template"
    assert str(Path(env["RAYJOB_TEMPLATE"]).parent) == mount["mountPath"]

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "kubectl").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat > {tmp_path}/created.yaml\n')
    (fake_bin / "kubectl").chmod(0o755)
    template = tmp_path / "rayjob.yaml"
    shutil.copy(INFRA / "k8s" / "rayjob.yaml", template)
    run_env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "RAYJOB_TEMPLATE": str(template)}
    days = {time.strftime("%Y-%m-%d", time.gmtime())}
    out = subprocess.run(
        [*container["command"], *container["args"]], env=run_env, capture_output=True, text=True, timeout=30
    )
    days.add(time.strftime("%Y-%m-%d", time.gmtime()))  # the script ran on one of these UTC days
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "args").read_text().split() == ["create", "-f", "-"]
    (created,) = yaml_docs(tmp_path / "created.yaml")
    assert created["metadata"]["name"] in {f"hyformer-daily-{d}" for d in days}
    expected = one_doc(INFRA / "k8s" / "rayjob.yaml", "RayJob")
    expected["metadata"]["name"] = created["metadata"]["name"]
    assert created == expected  # only the name changed


# --- Ray cluster launcher ----------------------------------------------------------------------------------------


def test_cluster_launcher_config_is_valid_and_installs_the_project():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own schema: unknown or misspelt keys fail here
    # the project (the directory `ray up` runs in) is copied to every node and installed there
    (remote,) = [r for r, local in config["file_mounts"].items() if (ROOT / local).resolve() == ROOT]
    assert f"cd {remote} && bash infra/install.sh" in config["setup_commands"] and (INFRA / "install.sh").is_file()
    for cmd in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert f"source {remote}/.venv/bin/activate" in cmd and "RAY_AUTH_MODE=token" in cmd
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    gpu_types = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)


# --- jobs/submit.py ---------------------------------------------------------------------------------------


def test_submit_daily_help_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "submit.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "--address" in out.stdout and "75" in out.stdout


class FakeJobClient:
    """JobSubmissionClient stand-in: the job is RUNNING for two polls, then ends as told."""

    def __init__(self, status: str, driver_exit_code: int | None, log_error: BaseException | None = None):
        self.final = SimpleNamespace(
            status=status, driver_exit_code=driver_exit_code, message="Job was intentionally stopped."
        )
        self.log_error = log_error
        self.submitted: dict = {}
        self.polls = 0
        self.stopped: list[str] = []

    def submit_job(self, *, entrypoint, submission_id=None, runtime_env=None):
        self.submitted = dict(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env)
        return submission_id

    async def tail_job_logs(self, job_id):
        yield f"log of {job_id}\n"
        if self.log_error:
            raise self.log_error

    def get_job_status(self, job_id):
        self.polls += 1
        return "RUNNING" if self.polls <= 2 else self.final.status

    def get_job_info(self, job_id):
        return self.final

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        return True


@pytest.mark.parametrize(
    "status,driver_exit_code,expected",
    [
        ("SUCCEEDED", 0, 0),  # promoted, or nothing to do
        ("FAILED", 3, 3),  # trained, not promoted
        ("FAILED", 1, 1),  # a stage failed
        ("FAILED", 2, 2),  # usage error
        ("FAILED", 75, 75),  # locked
        ("FAILED", None, 1),  # runtime env failed: the driver never ran
        ("STOPPED", None, 1),
        ("SUCCEEDED", None, 0),
        ("FAILED", -9, 1),  # driver killed by a signal
    ],
)
def test_submit_returns_the_driver_exit_code(status, driver_exit_code, expected):
    client, out = FakeJobClient(status, driver_exit_code), io.StringIO()
    args = ["--data-dir", "/abs/data", "--date", "2026-11-22"]
    code = sd.submit(
        "http://head:8265",
        args,
        client=client,
        environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "HOME": "/x"},
        poll_s=0,
        out=out,
    )
    assert code == expected
    assert client.submitted["entrypoint"] == "python workflows/daily_train.py --data-dir /abs/data --date 2026-11-22"
    assert re.fullmatch(r"daily-2026-11-22-\d+", client.submitted["submission_id"])
    env = client.submitted["runtime_env"]
    assert env["working_dir"] == str(ROOT) and env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert out.getvalue().startswith("log of daily-2026-11-22-") and client.polls == 3


def test_submit_waits_without_logs_when_the_stream_drops():
    client = FakeJobClient("FAILED", 3, log_error=ConnectionError("websocket closed"))
    assert (
        sd.submit(
            "http://head:8265", ["--data-dir", "/abs/data"], client=client, environ={}, poll_s=0, out=io.StringIO()
        )
        == 3
    )
    assert "env_vars" not in client.submitted["runtime_env"] and client.submitted["submission_id"].startswith(
        "daily-latest-"
    )


def test_submit_stops_the_job_on_sigterm():
    client = FakeJobClient("RUNNING", None, log_error=sd.Interrupted(signal.SIGTERM))
    code = sd.submit(
        "http://head:8265",
        ["--data-dir", "/abs/data"],
        submission_id="daily-x",
        client=client,
        environ={},
        poll_s=0,
        out=io.StringIO(),
    )
    assert code == 128 + signal.SIGTERM and client.stopped == ["daily-x"]


@pytest.mark.parametrize(
    "args,environ",
    [
        (["--data-dir", "data"], {}),  # would land in the job's temporary working dir
        (["--data-dir=./data"], {}),
        (["--data-dir", "/abs/data"], {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}),  # relative sqlite path
    ],
)
def test_submit_rejects_paths_that_would_vanish_with_the_job(args, environ):
    client = FakeJobClient("SUCCEEDED", 0)
    assert sd.submit("http://head:8265", args, client=client, environ=environ, out=io.StringIO()) == 2
    assert client.submitted == {}


def test_submit_reports_an_unreachable_cluster_as_failure():
    class Unreachable(FakeJobClient):
        def submit_job(self, **kwargs):
            raise ConnectionError("Failed to connect to Ray at address: http://head:8265")

    assert (
        sd.submit(
            "http://head:8265",
            ["--data-dir", "/abs/data"],
            client=Unreachable("SUCCEEDED", 0),
            environ={},
            out=io.StringIO(),
        )
        == 1
    )


def test_ops_doc_lists_every_exit_code():
    doc = (ROOT / "docs" / "operations_infra.md").read_text()
    for code in sd.MEANING:
        assert re.search(rf"^\| {code} \|", doc, re.M), f"exit code {code} missing from docs/operations_infra.md"


def test_the_wrapper_explains_every_exit_code_of_the_workflow():
    from jobs.common import Exit

    assert set(sd.MEANING) == set(Exit) and [int(e) for e in Exit] == [0, 1, 2, 3, 75]


def test_the_serve_config_deploys_the_ranking_app_on_loopback():
    """infra/serve/hyformer.yaml is a valid Serve deploy config whose application builds from its arguments."""
    from ray.serve.schema import ServeDeploySchema

    from jobs.serve import ServeArgs

    config = ServeDeploySchema.model_validate(yaml.safe_load((INFRA / "serve" / "hyformer.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "jobs.serve:build_app" and app.route_prefix == "/rank"
    args = ServeArgs.parse(app.args)
    assert args.alias == "champion" and args.kv_reuse is True and args.poll_s == 10.0
    with pytest.raises(ValueError, match="unknown argument"):
        ServeArgs.parse({**app.args, "kv_reuse_typo": True})
