"""Untrusted inputs (issue #18, security): a mapping cannot make the import read files, fetch URLs or write outside
the data directory, and a planted checkpoint cannot run code. Each case failed before its fix."""

from __future__ import annotations

import http.server
import threading
import uuid

import pytest

from features.mapping import MappingError, parse_mapping


def queries_mapping(columns: dict | None = None, where: str | None = None) -> dict:
    """A one-table mapping over inline rows (no file to read): the SQL under test is the only thing that could read."""
    table = {"rows": [{"q": 1, "c": 2}], "columns": {"query_id": "q", "category_id": "c", **(columns or {})}}
    if where is not None:
        table["where"] = where
    return {"tables": {"queries": table}}


@pytest.fixture
def secret_file(tmp_path):
    secret = f"TOPSECRET-{uuid.uuid4().hex}"
    path = tmp_path / "secret.csv"
    path.write_text(f"{secret}\n{secret}\n")
    return str(path), secret


@pytest.fixture
def http_server():
    """A local HTTP server that records every request it receives."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            seen.append(f"GET {self.path}")
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"a,b\n1,2\n")

        def do_HEAD(self):  # noqa: N802
            seen.append(f"HEAD {self.path}")
            self.send_response(200)
            self.send_header("Content-Length", "8")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


READERS = [
    "1 IN (SELECT nope FROM read_csv('{src}'))",
    "(SELECT count(*) FROM read_csv('{src}')) > 0",
    "CASE WHEN q > 0 THEN (SELECT max(a) FROM read_parquet('{src}')) ELSE 0 END",
    "q IN (SELECT * FROM read_csv('{src}'))",
    "read_csv('{src}')",
    "q + 1; SELECT * FROM read_csv('{src}')",
    "EXISTS (SELECT 1 FROM read_csv('{src}'))",
]


@pytest.mark.parametrize("template", READERS)
@pytest.mark.parametrize("place", ["column", "where"])
def test_mapping_sql_cannot_read_a_file(template, place, secret_file):
    path, secret = secret_file
    sql = template.format(src=path)
    raw = queries_mapping({"n_terms": {"sql": sql}}) if place == "column" else queries_mapping(where=sql)
    with pytest.raises(MappingError, match="scalar expression|cannot parse") as e:
        parse_mapping(raw, tables=("queries",))
    assert secret not in str(e.value)


@pytest.mark.parametrize("template", READERS)
def test_mapping_sql_cannot_fetch_a_url(template, http_server):
    url, seen = http_server
    with pytest.raises(MappingError):
        parse_mapping(queries_mapping({"n_terms": {"sql": template.format(src=f"{url}/x.csv")}}), tables=("queries",))
    assert seen == []  # not even a HEAD


@pytest.mark.parametrize(
    ("sql", "found"),
    [
        ("other.q + 1", "another table"),
        ("unknown_fn(q)", "function UNKNOWN_FN()"),
        ("q IN (SELECT 1)", "IN over a query"),
        ("", "non-empty"),
    ],
)
def test_mapping_sql_names_what_is_not_allowed(sql, found):
    with pytest.raises(MappingError, match="queries.n_terms") as e:
        parse_mapping(queries_mapping({"n_terms": {"sql": sql}}), tables=("queries",))
    assert found in str(e.value)


@pytest.mark.parametrize(
    "sql",
    [
        "CAST(q >= 1 AS INTEGER)",
        "CASE WHEN q IS NULL THEN 0 WHEN q < 18 THEN 1 ELSE 7 END",
        "COALESCE(q, 0) + ABS(c) * 2 - c % 3",
        "CASE WHEN lower(CAST(q AS VARCHAR)) LIKE '1%' AND c IN (1, 2) THEN 1 ELSE 0 END",
        '"q" + 1 -- a comment',
    ],
)
def test_scalar_mapping_sql_still_works(sql):
    spec = parse_mapping(queries_mapping({"n_terms": {"sql": sql}}), tables=("queries",))["queries"]
    assert "--" not in spec.columns["n_terms"].sql  # Polars parses the text written back from the checked tree
    assert spec.columns["n_terms"].roots()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "", "x.parquet", "/abs", "ok name"])
def test_id_map_names_are_plain_identifiers(name, tmp_path):
    raw = {"tables": {"users": {"rows": [{"u": "a"}], "columns": {"user_id": {"col": "u", "ids": name}}}}}
    with pytest.raises(MappingError, match="plain identifier"):
        parse_mapping(raw, tables=("users",))
    raw = {
        "tables": {
            "impressions": {
                "rows": [{"u": 1}],
                "requests": {"by": ["user_id"], "per": "day", "ids": name},
                "columns": {"user_id": "u"},
            }
        }
    }
    with pytest.raises(MappingError, match="plain identifier"):
        parse_mapping(raw, tables=("impressions",))


class Payload:
    """What a planted pickle runs on load: here, it creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("grad_sync", ["ddp", "async"])
def test_a_planted_training_checkpoint_cannot_run_code(grad_sync, tmp_path):
    """jobs.train restores train_state.pt with weights_only=True: a genuine state loads (both sync modes), a planted
    pickle is refused before it runs."""
    import torch
    from ray.train import Checkpoint

    from hyformer import HyFormerConfig, build_model
    from hyformer.loop import Position
    from hyformer.training import Learner, OptimConfig
    from jobs.train import restore_checkpoint, save_checkpoint

    def fresh():
        model = build_model(HyFormerConfig.tiny())
        return model, Learner(model, OptimConfig(grad_sync=grad_sync), torch.device("cpu"), total_steps=10)

    model, learner = fresh()
    genuine, planted = tmp_path / "genuine", tmp_path / "planted"
    for d in (genuine, planted):
        save_checkpoint(str(d), model, learner, Position(epoch=1, batch=2, step=3), [{"epoch": 0}])
    pos, history = restore_checkpoint(Checkpoint.from_directory(str(genuine)), *fresh())
    assert (pos.epoch, pos.batch, pos.step) == (1, 2, 3) and history == [{"epoch": 0}]
    marker = tmp_path / "ran"
    torch.save({"learner": Payload(str(marker)), "position": {}}, planted / "train_state.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        restore_checkpoint(Checkpoint.from_directory(str(planted)), *fresh())
    assert not marker.exists()


# --- credentials and file modes ---------------------------------------------------------------------------------

PASSWORD = "S3cr3tPw"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"postgresql://mlflow:{PASSWORD}@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        (f"https://{PASSWORD}@mlflow.example.com", "https://***@mlflow.example.com"),
        (f"https://h/api?token={PASSWORD}&x=1", "https://h/api?token=***&x=1"),
        (f"mysql://u:{PASSWORD}@h/db?password={PASSWORD}", "mysql://u:***@h/db?password=***"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////abs/data/mlflow/mlflow.db", "sqlite:////abs/data/mlflow/mlflow.db"),
    ],
)
def test_uris_are_redacted_where_they_are_printed(uri, shown):
    from jobs.common import has_secret, redact

    assert redact(uri) == shown and PASSWORD not in redact(uri)
    assert has_secret(uri) == (uri != shown)


def test_a_submitted_job_is_not_given_the_tracking_password():
    """A Ray job's env is stored with the job and shown by the dashboard: a tracking URI with a password is refused
    (the cluster gets its credentials itself), and the refusal does not print it."""
    from jobs.submit import UsageError, check_workflow_args

    env = {"MLFLOW_TRACKING_URI": f"postgresql://mlflow:{PASSWORD}@db:5432/mlflow"}
    with pytest.raises(UsageError, match="carries a secret") as e:
        check_workflow_args(["--data-dir", "/abs/data"], env)
    assert PASSWORD not in str(e.value)
    check_workflow_args(["--data-dir", "/abs/data"], {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})  # accepted


def test_the_mlflow_server_takes_its_backend_uri_by_environment(mlflow_server):
    """infra/mlflow_server.sh: the backend URI (which may hold a database password) is on no process's command line
    (`ps` shows those to every user), and the server uses it (its store is there)."""
    import os

    url, server_dir, _ = mlflow_server
    db = server_dir / "mlflow.db"
    assert db.exists()
    mlflow_processes = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(server_dir) in cmdline or "mlflow" in cmdline and url.rsplit(":", 1)[1] in cmdline:
            mlflow_processes += 1
            assert "mlflow.db" not in cmdline and "--backend-store-uri" not in cmdline, cmdline
    assert mlflow_processes  # the server's processes were looked at


def test_what_the_pipeline_writes_is_not_readable_by_others(ingested):
    """Logs, clean and quarantined rows (raw data), manifests: owner and group only (umask 007 in every process that
    runs a job's code)."""
    import os
    import stat

    data_dir, _ = ingested
    seen = 0
    for root, dirs, files in os.walk(data_dir):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o007 == 0, f"{path}: {oct(os.stat(path).st_mode)}"
            seen += 1
    assert seen > 20 and any("quarantine" in r for r, _, _ in os.walk(data_dir))
