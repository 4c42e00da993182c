"""The team set-up of the README, tested: a Prefect server on a real PostgreSQL (Debian's postgresql, a
throw-away cluster started here on 127.0.0.1 on a free port) and one stage flow run against it. Skipped, with
the reason, where no PostgreSQL server can be started."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    return found


@pytest.fixture
def postgres():
    """``postgresql+asyncpg://...`` of a fresh database on a throw-away cluster (127.0.0.1, a free port)."""
    from flows.server import free_port

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (Debian's postgresql; `make test` installs it as root)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="i3cl-pg-", dir="/tmp"))
    if as_user:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, port = root / "data", free_port(0)
    log = root / "server.log"
    try:
        init = subprocess.run(
            [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
        start = subprocess.run(
            [
                *as_user,
                pg_ctl,
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {port} -h 127.0.0.1 -k {root}",
                "start",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if start.returncode != 0:
            pytest.skip(
                f"the PostgreSQL server did not start: {start.stderr.strip()[-300:]} "
                f"{log.read_text()[-300:] if log.exists() else ''}"
            )
        created = subprocess.run(
            [
                *as_user,
                _pg_bin("createdb") or "createdb",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "prefect",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", port, as_user
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_a_stage_flow_runs_against_a_prefect_server_on_postgresql(postgres, tmp_path, monkeypatch):
    from flows.server import LocalServer

    url, port, as_user = postgres
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", url)
    with LocalServer(tmp_path / "prefect-home", timeout=240) as server:
        for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
            monkeypatch.setenv(k, server.env[k])
        code = f"""
import json, sys
from flows.stages import train_teachers
from i3cl_core.pipeline.params import DataParams, TrainParams
sys.path[:0] = [{str(REPO / "tests" / "flows")!r}, {str(REPO / "tests")!r}]
from test_flows import tiny_params
p = tiny_params({str(tmp_path / "run")!r}, {str(tmp_path / "demo")!r}, teachers=("teacher_c",))
out = train_teachers(p["work_dir"], DataParams(**p["data"]), TrainParams(**p["train"]))
from prefect import get_client
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs()
    print("RUNS", json.dumps([[client.read_flow(r.flow_id).name, r.state.type.value] for r in runs]))
print("RESULT", json.dumps(out))
"""
        res = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=server.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert (
            "RESULT" in res.stdout
            and (tmp_path / "run" / "teachers" / "teacher_c" / "checkpoints" / "latest.pth").exists()
        )
        runs = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RUNS "))[5:])
        assert ["train-teachers", "COMPLETED"] in runs, runs
    # the runs were stored in PostgreSQL, not in a SQLite file
    psql = _pg_bin("psql") or "psql"
    q = subprocess.run(
        [
            *as_user,
            psql,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            "prefect",
            "-tAc",
            "select count(*) from flow_run where state_type = 'COMPLETED'",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert q.returncode == 0 and int(q.stdout.strip()) >= 1, q.stderr
    assert not list((tmp_path / "prefect-home").glob("*.db"))
