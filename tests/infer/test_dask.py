"""The ensemble-inference flow on a real Dask cluster (``distributed.LocalCluster``, two worker
processes, each one device): the same shard files as the thread pool, byte for byte, and a worker
killed mid-run costs nothing but a re-run of its shard."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ensemble_work_dir, random_teachers

# found, not imported: importing Prefect here would fix its settings before the other tests' servers exist
if importlib.util.find_spec("prefect_dask") is None:
    pytest.skip("the [dask] extra is not installed (pip install -e '.[dask]')", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]

RUN = """
import json, sys
from flows.stages import ensemble_inference
for wd, infer in json.loads(sys.argv[1]):
    print(json.dumps(ensemble_inference(work_dir=wd, infer=infer)), flush=True)
"""


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two small random teachers and 8 unlabeled images."""
    from i3cl_core.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("dask")
    data = generate_dataset(root / "unlabeled", 8, seed=5, size=(256, 256), progress=False, cjk=False)
    return random_teachers(root), data


def make_work_dir(path: Path, teachers) -> str:
    ckpts, data = teachers
    return str(ensemble_work_dir(path, ckpts, data["img_root"]))


def run_flows(server, runs: list, **popen) -> subprocess.Popen:
    env = {**server.env, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", RUN, json.dumps(runs)],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **popen,
    )


def predictions(wd: str) -> dict[str, bytes]:
    root = Path(wd) / "predictions"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*.json"))
        if p.name not in ("members.json",)
    }


INFER = {"shard_size": 1, "precision": "fp32", "batch_size": 2, "loader_workers": 0}


def _dask_worker_pids(root_pid: int) -> list[int]:
    """Processes under ``root_pid`` started by multiprocessing's spawn (the Dask worker processes)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            pid = int(p.name)
            ancestors, cur = set(), pid
            for _ in range(8):
                cur = int((Path("/proc") / str(cur) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                ancestors.add(cur)
                if cur <= 1:
                    break
        except (OSError, ValueError, IndexError):
            continue
        if root_pid in ancestors and b"spawn_main" in cmd:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def pool_reference(server, teachers, tmp_path_factory) -> dict[str, bytes]:
    """The thread pool's prediction files (one CPU worker): what every Dask run must reproduce."""
    pool = make_work_dir(tmp_path_factory.mktemp("pool") / "wd", teachers)
    proc = run_flows(server, [[pool, {**INFER, "devices": ["cpu"]}]])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert (
        "ensemble inference: 1 worker(s) on cpu" in out + err
    )  # the thread pool's line; Dask runs have none
    return predictions(pool)


@pytest.mark.slow
def test_local_dask_cluster_writes_the_thread_pools_shard_files(server, teachers, pool_reference, tmp_path):
    dask = make_work_dir(tmp_path / "dask", teachers)
    proc = run_flows(server, [[dask, {**INFER, "dask_workers": 2}]])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    a, b = pool_reference, predictions(dask)
    assert len([k for k in a if "shard_" in k]) == 16  # 2 teachers x 8 shards
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    assert sum(len(json.loads(v)) for k, v in a.items() if "shard_" in k) > 0
    assert "ensemble inference: 1 worker(s) on cpu" not in out + err


@pytest.mark.slow
def test_a_killed_dask_worker_costs_only_its_shard(server, teachers, pool_reference, tmp_path):
    wd = make_work_dir(tmp_path / "killed", teachers)
    proc = run_flows(server, [[wd, {**INFER, "dask_workers": 2}]])
    shards = Path(wd) / "predictions"
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        done = len(list(shards.rglob("shard_*.json"))) if shards.exists() else 0
        workers = _dask_worker_pids(proc.pid)
        if done >= 2 and len(workers) == 2:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert killed is not None, "no shard finished on a two-worker cluster in time"
    done_at_kill = len(list(shards.rglob("shard_*.json")))
    assert done_at_kill < 16, "the run had finished before the worker was killed"
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert not Path(f"/proc/{killed}").exists() or "Z" in Path(f"/proc/{killed}/stat").read_text().split()[2]
    assert predictions(wd) == pool_reference  # every shard there, each byte for byte as without the kill


CHECK = """
from distributed import LocalCluster
from i3cl_core.infer.dask_cluster import check_dask_cluster
with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
    for resource in ("GPU", None):
        try:
            check_dask_cluster(cluster.scheduler_address, resource)
            print("accepted", resource)
        except ValueError as e:
            print("refused", resource, e)
"""


def test_a_scheduler_whose_workers_lack_the_resource_is_refused_with_what_to_start():
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert any(ln.startswith("refused GPU") and "--resources GPU=1" in ln for ln in lines), res.stdout
    assert "accepted None" in lines  # without a resource request any worker will do
