"""Prefect orchestration: a real local server, the served deployments, caching across runs,
cancellation without orphans, parameter validation; plus the stage helpers without a server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import descendants, ensemble_work_dir, random_teachers

from i3cl_core.pipeline.errors import PipelineError, require
from i3cl_core.pipeline.stages import PIPELINE_VERSION, check_work_dir
from i3cl_core.pipeline.workdir import current_model_dir
from i3cl_core.utils import fingerprint

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ no server
def test_work_dir_version_and_missing_outputs(tmp_path):
    wd = check_work_dir(tmp_path / "run")
    assert json.loads((wd / "pipeline.json").read_text())["pipeline_version"] == PIPELINE_VERSION
    (wd / "pipeline.json").write_text(json.dumps({"pipeline_version": 0}))
    with pytest.raises(PipelineError, match="made by pipeline version 0, this is version"):
        check_work_dir(wd)
    with pytest.raises(PipelineError, match="not a pipeline work_dir"):
        check_work_dir(tmp_path / "other", create=False)
    with pytest.raises(PipelineError, match="the fuse-pseudo-labels stage has not produced it yet"):
        require(tmp_path / "pseudo.json", "fuse-pseudo-labels", "run it first")


def test_fingerprint_follows_content(tmp_path):
    a = tmp_path / "a.json"
    a.write_text("1")
    f1 = fingerprint(a)
    a.write_text("1")  # rewritten, same content
    assert fingerprint(a) == f1
    a.write_text("2")
    assert fingerprint(a) != f1
    assert fingerprint(tmp_path / "missing") != fingerprint(a)


def test_a_planted_result_record_is_refused_before_any_task_reads_it(tmp_path):
    """A copied or shared work dir whose .prefect-results holds a record naming pickle, a foreign decoder
    or a class to import: refused (file named) when a flow opens the work dir; the payload never runs."""
    import base64
    import pickle

    wd = check_work_dir(tmp_path / "run")
    records = wd / ".prefect-results"
    records.mkdir()
    good = {
        "metadata": {
            "storage_key": "k",
            "expiration": None,
            "serializer": {
                "type": "json",
                "jsonlib": "json",
                "object_encoder": "prefect.serializers.prefect_json_object_encoder",
                "object_decoder": "prefect.serializers.prefect_json_object_decoder",
                "dumps_kwargs": {},
                "loads_kwargs": {},
            },
            "prefect_version": "3.9.1",
            "storage_block_id": None,
        },
        "result": json.dumps({"shard": 0, "detections": 3}),
    }
    (records / "aaa").write_text(json.dumps(good))
    check_work_dir(wd)  # our own kind of record passes

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    planted = json.loads(json.dumps(good))
    planted["metadata"]["serializer"] = {
        "type": "pickle",
        "picklelib": "cloudpickle",
        "picklelib_version": None,
    }
    planted["result"] = base64.b64encode(pickle.dumps(Payload())).decode()
    foreign_decoder = json.loads(json.dumps(good))
    foreign_decoder["metadata"]["serializer"]["object_decoder"] = "subprocess.Popen"
    a_class = json.loads(json.dumps(good))
    a_class["result"] = json.dumps({"__class__": "subprocess.Popen", "data": ["touch", str(marker)]})
    for name, rec, why in (
        ("bbb", planted, "serializer is 'pickle'"),
        ("ccc", foreign_decoder, "subprocess.Popen"),
        ("ddd", a_class, "names a Python class"),
        ("eee", "not json", "not a JSON result record"),
    ):
        (records / name).write_text(rec if isinstance(rec, str) else json.dumps(rec))
        with pytest.raises(
            PipelineError, match=f"{name}: a task-result record this pipeline did not write: .*{why}"
        ):
            check_work_dir(wd, create=False)
        (records / name).unlink()
    assert not marker.exists()
    check_work_dir(wd)


# ------------------------------------------------------------------------------------ real server
TINY = [
    "train.epochs=1",
    "train.iters_per_epoch=null",
    "train.batch_size=2",
    "train.warmup_iters=2",
    "train.log_interval=1",
    "data.num_workers=0",
    "model.test_short_side=128",
    "model.test_long_side=160",
    "data.augment.scales=[[112, 160]]",
]


def tiny_params(
    work_dir: Path, demo_dir: Path, keep_thr: float = 0.3, teachers=("teacher_a", "teacher_c")
) -> dict:
    return {
        "work_dir": str(work_dir),
        "data": {
            "demo_dir": str(demo_dir),
            "demo_size": 128,
            "demo_train": 6,
            "demo_unlabeled": 4,
            "demo_test": 3,
            "demo_val": 3,
        },
        "train": {
            "teachers": [{"name": t, "config": f"configs/demo/{t}.yaml"} for t in teachers],
            "student": {"name": "student", "config": "configs/demo/student.yaml"},
            "overrides": TINY,
        },
        "infer": {"shard_size": 2, "devices": ["cpu", "cpu"]},
        "fuse": {"keep_thr": keep_thr, "auto_keep_thr": False},
    }


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """The session's server with the project's deployments served (``python -m flows.serve``)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.serve"],
        env=server.env,
        cwd=REPO,
        start_new_session=True,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        from flows.demo import wait_for_deployments

        wait_for_deployments(
            server.env, ["ssl-pipeline/default", "train-teachers/default", "fuse-pseudo-labels/default"]
        )
        yield server
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=60)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """(work dir, demo dir) shared by the two pipeline tests: the rounds test continues the first test's
    work dir (its round 1 comes back Cached), which saves CI the teachers and round 1 a second time. Run
    alone, the rounds test computes round 1 itself."""
    root = tmp_path_factory.mktemp("pipeline")
    return root / "run", root / "demo"


def prefect_cli(server, *args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        env=server.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def deployment_run(server, name: str, params, watch: bool = True):
    """``prefect deployment run NAME --params P [--watch]`` in this process (a ``prefect`` process per call
    costs 2-3 s of start-up): the CLI's exit status and the lines of its output the tests read (the run's
    UUID, its final state). The user's command itself runs in the first pipeline test and for the
    refused parameters."""
    from types import SimpleNamespace

    from prefect.deployments import run_deployment

    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        assert os.environ.get(k) == server.env[k], "monkeypatch the server's settings first"
    run = run_deployment(
        name,
        parameters=json.loads(params) if isinstance(params, str) else params,
        timeout=None if watch else 0,
        poll_interval=1,
    )
    state = run.state
    ok = state is not None and (state.is_completed() if watch else True)
    return SimpleNamespace(
        returncode=0 if ok else 1,
        stdout=f"UUID: {run.id}\n{state.name if state else ''}",
        stderr=(state.message or "") if state else "",
    )


def run_id_from(output: str) -> str:
    import re

    m = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert m, output
    return m.group(1)


def task_states(
    server, root_id: str, min_tasks: int = 0, prefix: str = "", timeout: float = 30.0
) -> dict[str, str]:
    """Task run name -> state name over the whole run tree under ``root_id``. The server records task runs
    from their events, a moment after the flow run ends: with ``min_tasks``, read again (up to ``timeout``
    seconds) until at least that many whose names start with ``prefix`` are there."""
    deadline = time.time() + timeout
    while True:
        states = _task_states(root_id)
        if sum(k.startswith(prefix) for k in states) >= min_tasks or time.time() > deadline:
            return states
        time.sleep(0.5)


def _task_states(root_id: str) -> dict[str, str]:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        ids, frontier = [root_id], [root_id]
        while frontier:
            kids = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [str(k.id) for k in kids]
            ids += frontier
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids))
        )
        return {r.name: r.state.name for r in runs}


@pytest.mark.slow
def test_pipeline_deployment_runs_then_refuses_bad_params_and_reuses_caches(
    served, pipeline_dirs, monkeypatch
):
    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(k, served.env[k])
    wd, demo = pipeline_dirs
    params = tiny_params(wd, demo)
    res = prefect_cli(
        served,
        "deployment",
        "run",
        "ssl-pipeline/default",
        "--params",
        json.dumps(params),
        "--watch",
        "--watch-interval",
        "1",
    )
    assert res.returncode == 0 and "Completed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    first = task_states(served, run_id_from(res.stdout))
    assert first["train-teacher_a"] == "Completed" and first["train-student"] == "Completed"
    summary = json.loads((wd / "summary.json").read_text())
    assert set(summary["scores"]) == {
        "teacher:teacher_a",
        "teacher:teacher_c",
        "student:student",
        "control:student",
    }
    assert {"hmean"} <= set(summary["pseudo_quality"]) and set(summary["best_teacher_on_unlabeled"]) == {
        "name",
        "hmean",
        "thr",
    }
    from i3cl_core.pipeline import variants

    first_variant = variants.current_variant(wd / "pseudo")
    assert variants.pseudo_file(wd / "pseudo") == wd / "pseudo" / first_variant / "train_lossweight.json"
    assert (wd / "predictions" / "teacher_a" / "coverage.json").exists()
    first_student = current_model_dir(wd / "student" / "student")
    assert first_student.parent == wd / "student" / "student"  # student/<name>/<key>/
    lineage = json.loads((first_student / "lineage.json").read_text())
    assert lineage["pseudo"]["variant"] == first_variant and lineage["pseudo"]["fuse"]["keep_thr"] == 0.3
    assert lineage["load_from"].endswith("teacher_a/checkpoints/latest.pth") and lineage["code"]["package"]
    assert summary["lineage"]["pseudo_variant"] == first_variant
    # the gate a user can read without hidden ground truth: on the validation split, at the given keep_thr
    gate = summary["validation_gate"]
    assert gate["split"] == "val" and gate["keep_thr"] == 0.3 and gate["control"]["name"] == "control:student"
    assert gate["best_teacher"]["name"] in ("teacher:teacher_a", "teacher:teacher_c")
    assert all(summary["scores"][n]["val_hmean"] is not None for n in summary["scores"])
    # the run summary: summary.md with its figures, and the same as the parent run's markdown artifact
    md = (wd / "summary.md").read_text()
    assert "| control:student |" in md and "SSL gain (student - control" in md
    assert "validation split (each model at its threshold chosen there): pseudo labels F" in md
    figs = sorted(p.name for p in (wd / "summary_figures").iterdir())
    assert "f_per_model.png" in figs and any(f.startswith("sample_") for f in figs)
    assert any(f.startswith("train_teachers_teacher_a") for f in figs)
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ssl-pipeline-summary"]))
        )
    assert arts and "F per model" in arts[-1].data and arts[-1].data.count("data:image/jpeg;base64,") >= 3
    with get_client(
        sync_client=True
    ) as client:  # the training curve (one version per epoch; TINY trains one)
        curves = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-curve-teacher-a"]))
        )
    assert curves and any("finished" in a.data for a in curves) and "data:image/jpeg" in curves[-1].data
    # no pickle crosses the work dir: every persisted task result is a JSON record with a JSON payload
    records = [f for f in (wd / ".prefect-results").rglob("*") if f.is_file()]
    assert records
    for f in records:
        rec = json.loads(f.read_bytes())
        assert rec["metadata"]["serializer"]["type"] == "json", f
        assert b"\x80\x04" not in f.read_bytes() and "cloudpickle" not in f.read_text()

    # an invalid parameter is refused before any run is created, naming the field
    bad = prefect_cli(
        served,
        "deployment",
        "run",
        "fuse-pseudo-labels/default",
        "--params",
        json.dumps({"work_dir": str(wd), "fuse": {"iou_thr": 1.7}}),
    )
    assert bad.returncode != 0 and "fuse.iou_thr" in bad.stdout + bad.stderr

    # another fusion threshold: teachers and inference come back Cached, fusion and what follows run again
    res2 = deployment_run(served, "ssl-pipeline/default", json.dumps(tiny_params(wd, demo, keep_thr=0.1)))
    assert res2.returncode == 0 and "Completed" in res2.stdout, res2.stdout[-3000:]
    second = task_states(served, run_id_from(res2.stdout))
    assert second["train-teacher_a"] == "Cached" and second["train-teacher_c"] == "Cached"
    infer = {k: v for k, v in second.items() if k.startswith("infer-")}
    assert len(infer) == 8 and set(infer.values()) == {
        "Cached"
    }  # 2 unlabeled + 2 validation shards per teacher
    assert second["fuse-r1"] == "Completed" and second["train-student"] == "Completed", second
    # the re-fusion added a variant and moved current; the first variant is still there, and the student
    # now records the second
    second_variant = variants.current_variant(wd / "pseudo")
    assert (
        second_variant != first_variant and (wd / "pseudo" / first_variant / "train_lossweight.json").exists()
    )
    second_student = current_model_dir(wd / "student" / "student")
    assert json.loads((second_student / "lineage.json").read_text())["pseudo"]["variant"] == second_variant
    # ... in a folder of its own: the first student, its lineage and its score are still there
    assert second_student != first_student and (first_student / "checkpoints" / "latest.pth").exists()
    assert json.loads((first_student / "lineage.json").read_text())["pseudo"]["variant"] == first_variant
    # a third run with the first parameters reuses the first variant: fusion Cached, no new variant
    res4 = deployment_run(
        served, "fuse-pseudo-labels/default", json.dumps({"work_dir": str(wd), "fuse": params["fuse"]})
    )
    assert res4.returncode == 0, res4.stdout[-3000:]
    assert task_states(served, run_id_from(res4.stdout))["fuse-r1"] == "Cached"
    assert variants.current_variant(wd / "pseudo") == first_variant
    assert sorted(p.name for p in (wd / "pseudo").iterdir() if p.is_dir()) == sorted(
        [first_variant, second_variant]
    )
    from i3cl_core.cli import main

    assert main(["runs", "compare", str(wd)]) == 0
    rows = variants.compare(wd)
    assert [r["variant"] for r in rows if r["current"]] == [first_variant]
    used = {r["variant"]: r["models"] for r in rows}
    assert [m for m, _ in used[second_variant]] == [str(second_student.relative_to(wd))]
    assert [m for m, _ in used[first_variant]] == [str(first_student.relative_to(wd))]
    assert all(
        f is not None for v in (first_variant, second_variant) for _, f in used[v]
    )  # each with its test F
    # gc keeps what current or a lineage needs: here both variants
    assert variants.gc(wd, keep=0, dry_run=True) == []

    # a cache hit whose output is gone is recomputed, not trusted
    (wd / "predictions" / "teacher_c" / "shard_00001.json").unlink()
    res3 = deployment_run(
        served,
        "ensemble-inference/default",
        json.dumps({k: params[k] for k in ("work_dir", "data", "infer")}),
    )
    assert res3.returncode == 0, res3.stdout[-3000:]
    third = task_states(served, run_id_from(res3.stdout))
    assert third["infer-teacher_c-1"] == "Completed" and third["infer-teacher_a-0"] == "Cached"
    assert (wd / "predictions" / "teacher_c" / "shard_00001.json").exists()


@pytest.mark.slow
def test_two_rounds_and_the_control_run(served, pipeline_dirs, monkeypatch):
    """Round 2 on the first pipeline test's work dir (same teachers, same round-1 parameters): round 1
    comes back Cached, and round 2's ensemble is round 1's student plus the teachers, its keep_thr chosen
    on the validation split. (A round-2 parameter reaches round 2's tasks only: ``later_rounds`` goes to
    round 2's stage calls alone, whose tasks are cached on their inputs as round 1's are; the first test
    shows such a change re-running fusion and what follows while inference stays Cached.)"""
    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(k, served.env[k])
    wd, demo = pipeline_dirs
    after_first_test = (wd / "summary.json").exists()
    params = tiny_params(wd, demo)
    params.update(rounds=2, later_rounds={"fuse": {"keep_thr": 0.2, "auto_keep_thr": True}})
    res = deployment_run(served, "ssl-pipeline/default", json.dumps(params))
    assert res.returncode == 0 and "Completed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    first = task_states(served, run_id_from(res.stdout), min_tasks=1, prefix="evaluate-student-r2")
    if after_first_test:  # the same round-1 parameters: adding a round re-runs none of round 1
        round1 = [
            "train-teacher_a",
            "train-teacher_c",
            "infer-teacher_a-0",
            "infer-val-teacher_a-0",
            "fuse-r1",
            "train-student",
            "train-control-student",
        ]
        assert all(first[t] == "Cached" for t in round1), first
    summary = json.loads((wd / "summary.json").read_text())
    assert set(summary["scores"]) == {
        "teacher:teacher_a",
        "teacher:teacher_c",
        "control:student",
        "student:student",
        "student-r2:student",
    }
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    # round 2's ensemble is round 1's student plus the teachers, with its own predictions and pseudo labels
    assert json.loads((wd / "rounds" / "r2" / "predictions" / "members.json").read_text()) == [
        str(wd / "rounds" / "r2" / "predictions" / n) for n in ("student-r1", "teacher_a", "teacher_c")
    ]
    from i3cl_core.pipeline import variants

    assert first["infer-r2-student-r1-0"] == "Completed" and first["train-student-r2"] == "Completed"
    assert first["fuse-r2"] == "Completed", first
    report = json.loads(
        (variants.pseudo_file(wd / "rounds" / "r2" / "pseudo").parent / "report.json").read_text()
    )
    assert report["keep_thr_selection"]["chosen_on"].endswith("val/annotations.json")

    # the control: the student's start and number of iterations, the labeled data alone
    import yaml

    student_cfg = yaml.safe_load((current_model_dir(wd / "student" / "student") / "config.yaml").read_text())
    control_cfg = yaml.safe_load((current_model_dir(wd / "control" / "student") / "config.yaml").read_text())
    labeled = str((demo / "train" / "annotations.json").resolve())
    assert [s["ann_file"] for s in control_cfg["data"]["train"]] == [labeled]
    assert [s["ann_file"] for s in student_cfg["data"]["train"]] == [
        labeled,
        str(variants.pseudo_file(wd / "pseudo")),
    ]
    assert control_cfg["train"]["load_from"] == student_cfg["train"]["load_from"]
    iters = [
        json.loads((current_model_dir(wd / r / "student") / "metrics.json").read_text())["summary"][
            "iterations"
        ]
        for r in ("student", "control")
    ]
    assert iters[0] == iters[1] > 0


@pytest.mark.slow
def test_a_killed_teacher_training_resumes_on_a_deployment_rerun(served, tmp_path, monkeypatch):
    """kill -9 of the flow-run process while a teacher trains (after its first epoch checkpoint), then the
    deployment run again: the training resumes from latest.pth and trains the remaining iterations only. That
    a resumed training ends with an uninterrupted one's weights, tensor for tensor, is tested on the same
    command in test_train.py (test_killed_run_resumes_to_identical_weights)."""
    import torch

    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(k, served.env[k])

    def params(wd):
        p = tiny_params(wd, tmp_path / "demo", teachers=("teacher_a",))
        p["train"]["overrides"] = [o for o in TINY if not o.startswith("train.epochs")] + ["train.epochs=6"]
        return json.dumps({k: p[k] for k in ("work_dir", "data", "train")})

    wd = tmp_path / "killed"
    res = deployment_run(served, "train-teachers/default", params(wd), watch=False)
    run_id = run_id_from(res.stdout)
    ckpts = wd / "teachers" / "teacher_a" / "checkpoints"
    serve_pid = int(
        next(
            p.name
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and b"flows.serve" in (p / "cmdline").read_bytes()
        )
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts / "epoch_1.pth").exists():
        time.sleep(0.05)
    for pid in descendants(serve_pid):  # the flow-run process and its torchrun and trainer
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not (wd / "teachers" / "teacher_a" / "metrics.json").exists(), (
        "the training finished before the kill"
    )
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deadline = time.time() + 120
        while time.time() < deadline and not client.read_flow_run(run_id).state.is_final():
            time.sleep(1)
        assert client.read_flow_run(run_id).state.name == "Crashed"
    res = deployment_run(served, "train-teachers/default", params(wd))
    assert res.returncode == 0 and "Completed" in res.stdout, res.stdout[-3000:]
    log = (wd / "teachers" / "teacher_a" / "train.log").read_text()
    resumed = re.search(r"resumed from \S+: epoch (\d+), iteration (\d+) of the epoch", log)
    assert resumed and 1 <= int(resumed.group(1)) < 6, log[-2000:]
    done = int(re.search(r"(\d+) iterations done", log.split("resumed from")[-1]).group(1))
    assert torch.load(ckpts / "latest.pth", weights_only=True)["global_iter"] == 18
    assert (
        len(re.findall(r"epoch \d+/6 iter \d+/3", log.split("resumed from")[-1])) == 18 - done
    )  # the rest only


def test_a_second_run_on_a_work_dir_in_use_fails_at_once_naming_the_first(served, tmp_path, monkeypatch):
    """Two runs on one work dir: while another writer holds it (here a process standing for a running
    pipeline), a deployment run on the same work dir fails before doing anything, its state message naming the
    holder; nothing is written. (A holder killed mid-run is taken over:
    test_a_killed_teacher_training_resumes_...)"""
    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(k, served.env[k])
    wd = tmp_path / "busy"
    code = (
        "import sys, time; from i3cl_core.workdir_lock import acquire; "
        "acquire(sys.argv[1], 'flow run ssl-pipeline/first-run (abc)'); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(wd)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        p = tiny_params(wd, tmp_path / "demo", teachers=("teacher_a",))
        t0 = time.time()
        res = deployment_run(
            served, "train-teachers/default", {k: p[k] for k in ("work_dir", "data", "train")}
        )
        assert res.returncode == 1 and time.time() - t0 < 60
        assert "is being written by flow run ssl-pipeline/first-run (abc)" in res.stderr, res.stderr
        assert f"pid {holder.pid}" in res.stderr
        assert sorted(x.name for x in wd.iterdir()) == [".i3cl-lock"]  # no marker, no data, no training
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_cancelled_training_leaves_no_child_processes(served, tmp_path, monkeypatch):
    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(k, served.env[k])
    wd = tmp_path / "cancel"
    params = tiny_params(wd, tmp_path / "demo", teachers=("teacher_a",))
    params["train"]["overrides"] = [o for o in TINY if not o.startswith("train.epochs")] + [
        "train.epochs=200"
    ]
    params = {k: params[k] for k in ("work_dir", "data", "train")}
    res = deployment_run(served, "train-teachers/default", json.dumps(params), watch=False)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = run_id_from(res.stdout)

    def trainers():
        found = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if "i3cl_core.cli train" in cmd and str(wd) in cmd:
                    found.append(int(p.name))
        return found

    deadline = time.time() + 240
    while not (wd / "teachers" / "teacher_a" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(1)
    assert trainers(), "the training subprocess never started"
    cancel = prefect_cli(served, "flow-run", "cancel", run_id)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    t0 = time.time()
    while trainers() and time.time() - t0 < 60:
        time.sleep(0.5)
    assert trainers() == [], "training processes survived the cancellation"
    assert time.time() - t0 < 30
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = client.read_flow_run(run_id).state
            if state.is_final():
                break
            time.sleep(1)
        assert state.name in ("Cancelled", "Cancelling")


def test_the_demo_refuses_bad_params_before_starting_a_server(tmp_path, capsys):
    from flows.demo import main

    for bad, why in (("{train: 1}", "--params: not JSON"), ("[1]", "a JSON object")):
        with pytest.raises(SystemExit) as e:
            main(["--params", bad, "--prefect-home", str(tmp_path / "home")])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # no server was started


def test_the_demo_stops_serve_only_after_the_run_processes_have_exited():
    """A finished run's process may still be exiting when the demo stops serve, and serve cancels the runs
    whose process is alive: the demo waits for serve's children first (at most its timeout)."""
    from flows.demo import child_pids, wait_for_run_processes

    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5)']).wait()\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 10
        while not child_pids(parent.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert child_pids(parent.pid), "the stand-in run process never appeared"
        t0 = time.time()
        wait_for_run_processes(parent.pid, timeout=20)
        assert child_pids(parent.pid) == [] and time.time() - t0 < 15  # returned once it exited
    finally:
        parent.kill()
        parent.wait()
    assert parent.pid not in child_pids(os.getpid())


def test_a_renamed_parameter_still_passes_the_deployments_schema():
    """Prefect validates a deployment run's parameters against the flow's schema on the server: the old
    name of infer.min_score (score_thr) must pass it, and still be read as min_score; a typo must not."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from flows.stages import ensemble_inference
    from i3cl_core.pipeline.params import InferParams

    schema = parameter_schema(ensemble_inference.fn).model_dump_for_openapi()
    for infer in ({"score_thr": 0.1}, {"min_score": 0.1}):
        validate({"infer": infer}, schema, raise_on_error=True, ignore_required=True)
        assert InferParams(**infer).min_score == 0.1
    assert "score_thr" not in InferParams(score_thr=0.1).model_dump()  # not written back under the old name
    with pytest.raises(ValidationError, match="min_scor"):
        validate({"infer": {"min_scor": 0.1}}, schema, raise_on_error=True, ignore_required=True)


def test_stage_runs_without_data_params_reuse_the_work_dirs_data(tmp_path):
    from i3cl_core.pipeline.data import resolve_data
    from i3cl_core.pipeline.params import DataParams

    explicit = DataParams(
        labeled=[{"ann_file": "/d/train.json", "img_root": "/d/train"}],
        unlabeled_images="/d/u.json",
        unlabeled_root="/d/u",
        unlabeled_gt=None,
        test={"ann_file": "/d/test.json", "img_root": "/d/test"},
    )
    wd = check_work_dir(tmp_path / "run")
    first = resolve_data(explicit, wd)
    assert first["unlabeled_images"] == "/d/u.json" and first["labeled"][0]["ann_file"] == "/d/train.json"
    assert (
        resolve_data(DataParams(), wd) == first
    )  # defaults: the data the work_dir was made with, no demo generated
    assert not (tmp_path / "data").exists()
    # one class for a data set in the config and in the flow parameters (DatasetSource): a labeled set takes
    # its training fields, which reach data.json only when set (so earlier work dirs' data.json stays the
    # same)
    raw = explicit.model_dump()  # every field, as Prefect stores a run's parameters
    raw["labeled"].append({"ann_file": "/d/p.json", "img_root": "/d/u", "augment": "strong"})
    mixed = DataParams.model_validate(raw)
    sets = resolve_data(mixed, check_work_dir(tmp_path / "run2"))["labeled"]
    assert sets == [first["labeled"][0], {"ann_file": "/d/p.json", "img_root": "/d/u", "augment": "strong"}]
    assert first["labeled"][0] == {"ann_file": "/d/train.json", "img_root": "/d/train"}
    with pytest.raises(
        ValueError, match=r"data.test: fraction: only training sets \(data.labeled\) take these"
    ):
        DataParams(test={"ann_file": "/d/test.json", "img_root": "/d/test", "fraction": 0.5})


def test_artifact_markdown_is_commonmark_with_every_picture_within_budget(tmp_path):
    """The pseudo-labels artifact rendered blank in the UI when a heading followed a picture line without a
    blank line; every block is now separated, and thumbnails keep the text under the budget."""
    from markdown_it import MarkdownIt
    from PIL import Image

    from flows.artifacts import markdown_with_images

    pics = []
    rng = __import__("numpy").random.default_rng(0)
    for k in range(6):  # noisy pictures compress badly: the budget has to shrink them
        p = tmp_path / f"p{k}.png"
        Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype="uint8")).save(p)
        pics.append(p)
    blocks = [
        ("Scores", [("scores", pics[0])]),
        ("Votes", [("votes", pics[1])]),
        ("Samples", [(f"sample {k}", p) for k, p in enumerate(pics[2:])]),
    ]
    text = markdown_with_images("Pseudo labels", blocks, "12 pseudo labels.", budget=300_000)
    assert len(text.encode()) <= 300_000
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and i > 0:
            assert lines[i - 1] == "", f"no blank line before {line!r}"
    tokens = MarkdownIt("commonmark").parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == ["Pseudo labels", "Scores", "Votes", "Samples"]
    images = [c for t in tokens if t.type == "inline" for c in (t.children or []) if c.type == "image"]
    assert len(images) == 6 and all(i.attrs["src"].startswith("data:image/jpeg;base64,") for i in images)


def _random_teachers_work_dir(wd: Path, images: int = 8) -> Path:
    """A work dir with two small random teachers over ``images`` images (no training needed)."""
    from i3cl_core.data.synth import generate_dataset

    data = generate_dataset(
        wd.parent / f"{wd.name}-images", images, seed=7, size=(256, 256), progress=False, cjk=False
    )
    (wd.parent / f"{wd.name}-teachers").mkdir()
    return ensemble_work_dir(wd, random_teachers(wd.parent / f"{wd.name}-teachers"), data["img_root"])


@pytest.mark.slow
def test_a_killed_ensemble_run_retried_from_the_api_reuses_finished_shards(served, tmp_path, monkeypatch):
    """kill -9 of the flow-run process in the middle of the ensemble stage, then the UI's Retry (the run
    set back to AwaitingRetry through the API): finished shards are kept as they are and the end result
    equals an uninterrupted run's, byte for byte."""
    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(k, served.env[k])
    infer = {"shard_size": 1, "devices": ["cpu"], "precision": "fp32", "loader_workers": 0}
    ref, wd = _random_teachers_work_dir(tmp_path / "ref"), _random_teachers_work_dir(tmp_path / "killed")
    res = deployment_run(
        served, "ensemble-inference/default", json.dumps({"work_dir": str(ref), "infer": infer})
    )
    assert res.returncode == 0 and "Completed" in res.stdout, res.stdout[-3000:]
    res = deployment_run(
        served, "ensemble-inference/default", json.dumps({"work_dir": str(wd), "infer": infer}), watch=False
    )
    run_id = run_id_from(res.stdout)
    shards = wd / "predictions"
    serve_pid = int(
        next(
            p.name
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and b"flows.serve" in (p / "cmdline").read_bytes()
        )
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(shards.rglob("shard_*.json"))) < 3:
        time.sleep(0.05)
    flow_procs = descendants(serve_pid)
    assert flow_procs, "no flow-run process under the serve process"
    for pid in flow_procs:  # the flow-run process (and anything it started)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    done = {p: p.stat().st_mtime_ns for p in shards.rglob("shard_*.json")}
    assert 3 <= len(done) < 16, len(done)
    from prefect import get_client
    from prefect.states import AwaitingRetry

    with get_client(sync_client=True) as client:
        deadline = time.time() + 120
        while time.time() < deadline and not client.read_flow_run(run_id).state.is_final():
            time.sleep(1)
        assert client.read_flow_run(run_id).state.name == "Crashed"
        client.set_flow_run_state(run_id, AwaitingRetry(), force=True)  # what the UI's Retry does
        deadline = time.time() + 300
        while time.time() < deadline:
            state = client.read_flow_run(run_id).state
            if state.is_final() and state.name != "Crashed":
                break
            time.sleep(1)
        assert state.name == "Completed", state
    for p, mtime in done.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was recomputed"
    ref_files = {
        p.relative_to(ref / "predictions"): p.read_bytes()
        for p in (ref / "predictions").rglob("*.json")
        if p.name != "members.json"
    }
    got = {p.relative_to(shards): p.read_bytes() for p in shards.rglob("*.json") if p.name != "members.json"}
    assert len([k for k in ref_files if k.name.startswith("shard_")]) == 16 and got == ref_files


@pytest.mark.slow
def test_a_prefect_server_killed_and_restarted_during_a_run_loses_none_of_the_work_dirs_outputs(
    served, tmp_path, monkeypatch
):
    """The server is killed (SIGKILL) in the middle of the ensemble stage and started again on the same
    address and database: the flow run carries on (task state is orchestrated in the flow-run process),
    ends Completed, every shard is in the work dir, and a re-run of the deployment finds them all (the
    cache records live in the work dir, not in the server's database): every shard task is Cached, no
    file rewritten. Runs last in this module: it restarts the session's server."""
    import signal

    for k in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(k, served.env[k])
    infer = {"shard_size": 1, "devices": ["cpu"], "precision": "fp32", "loader_workers": 0}
    wd = _random_teachers_work_dir(tmp_path / "restart", images=12)
    params = json.dumps({"work_dir": str(wd), "infer": infer})
    res = deployment_run(served, "ensemble-inference/default", params, watch=False)
    run_id = run_id_from(res.stdout)
    shards = wd / "predictions"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(shards.rglob("shard_*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(served.proc.pid, signal.SIGKILL)  # the server dies, as in a crash or an OOM kill
    served.proc.wait()
    before = {p: p.stat().st_mtime_ns for p in shards.rglob("shard_*.json")}
    assert len(before) < 24, "the stage finished before the server was killed"
    served.start()  # same port, same database
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deadline = time.time() + 300
        while time.time() < deadline and not client.read_flow_run(run_id).state.is_final():
            time.sleep(1)
        assert client.read_flow_run(run_id).state.name == "Completed"
    written = {p: p.stat().st_mtime_ns for p in shards.rglob("shard_*.json")}
    assert len(written) == 24 and all(written[p] == t for p, t in before.items())
    for teacher in ("teacher_0", "teacher_1"):  # each model's coverage record names all 12 images
        assert json.loads((shards / teacher / "coverage.json").read_text())["images"] == list(range(1, 13))
    res = deployment_run(served, "ensemble-inference/default", params)
    assert res.returncode == 0 and "Completed" in res.stdout, res.stdout[-3000:]
    states = task_states(served, run_id_from(res.stdout), min_tasks=24, prefix="infer-")
    infer_states = {k: v for k, v in states.items() if k.startswith("infer-")}
    assert len(infer_states) == 24 and set(infer_states.values()) == {"Cached"}, infer_states
    assert {p: p.stat().st_mtime_ns for p in shards.rglob("shard_*.json")} == written
