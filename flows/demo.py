"""The main job (``make demo``): the whole semi-supervised pipeline on the built-in synthetic data,
through Prefect.

1. starts a local Prefect server (SQLite under ``.prefect/``, 127.0.0.1 only),
2. serves the deployments (``ssl-pipeline/default`` and one per stage) in a background process,
3. runs ``ssl-pipeline/default`` on the synthetic demo data and follows its stages,
4. prints the final table (each teacher's, the control's and the student's F on the test split, the
   pseudo labels' precision/recall against the hidden ground truth next to the best teacher's F on
   the same unlabeled split) and where to look in the UI,
5. stops serve and the server (``--keep-server`` leaves both up to browse the UI; Ctrl-C ends them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.progress import ProgressView, scan
from flows.server import LocalServer, free_port
from i3cl_core.pipeline.results import gate_text
from i3cl_core.pipeline.workdir import WorkDir

REPO = Path(__file__).resolve().parents[1]


def wait_for_deployments(env: dict, names: list[str], timeout: float = 120) -> None:
    os.environ.update(
        {k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    )
    # deferred: Prefect reads its settings at import; they are set in os.environ first
    from prefect import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            try:
                for n in names:
                    client.read_deployment_by_name(n)
                return
            except Exception:
                time.sleep(1)
    raise RuntimeError(f"deployments {names} were not registered within {timeout:.0f} s")


def follow(run_id, work_dir: str | None = None, poll: float = 2.0, plain_every: float = 30.0):
    """Print each stage as it changes state and, from the work dir, each training's and each ensemble
    model's progress (flows/progress.py); return the final flow run."""
    # deferred: Prefect reads its settings at import; they are set in os.environ first
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    view = ProgressView(plain_every=plain_every)
    seen: dict = {}
    names: dict = {}
    t0 = time.time()
    try:
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run_id)
                children = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])
                    )
                )
                for child in children:
                    state = child.state.name if child.state else "?"
                    if seen.get(child.id) != state:
                        seen[child.id] = state
                        if child.flow_id not in names:
                            names[child.flow_id] = client.read_flow(child.flow_id).name
                        flow_name = names[
                            child.flow_id
                        ]  # our run names carry the round: ensemble-inference-r2
                        label = child.name if child.name.startswith(flow_name) else flow_name
                        view.message(f"[{time.time() - t0:6.0f} s] {label}: {state}")
                if work_dir:
                    view.update(scan(Path(work_dir)))
                if run.state and run.state.is_final():
                    return run
                time.sleep(poll)
    finally:
        view.close()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc (empty where there is none)."""
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def wait_for_run_processes(serve_pid: int, timeout: float = 60.0) -> None:
    """Wait until serve's flow-run processes have exited. A run is Completed before its process has finished
    exiting (hooks, result records), and stopping serve cancels every run whose process is still alive: the
    UI would show the finished run as Cancelled."""
    deadline = time.time() + timeout
    while child_pids(serve_pid) and time.time() < deadline:
        time.sleep(0.5)


def print_table(summary: dict, ui: str) -> None:
    scores = summary["scores"]
    print("\n" + "=" * 78)
    print(f"{'model':<26} {'P':>8} {'R':>8} {'F':>8}   thr  (test split, ArT protocol)")
    print("-" * 78)
    for name, s in scores.items():
        print(
            f"{name:<26} {s['precision']:>8.4f} {s['recall']:>8.4f} {s['hmean']:>8.4f}  {s['score_thr']:.2f}"
        )
    where = {s.get("threshold_chosen_on") for s in scores.values()}
    if where == {"val"}:
        print("(each model at its best-F threshold on the labeled validation split)")
    q = summary.get("pseudo_quality")
    best = summary.get("best_teacher_on_unlabeled")
    if q:
        print("-" * 78)
        print(
            f"{'pseudo labels vs GT':<26} {q['precision']:>8.4f} {q['recall']:>8.4f} {q['hmean']:>8.4f}   "
            f"({summary['pseudo_labels']} labels on the unlabeled split, keep_thr {summary.get('keep_thr')})"
        )
    if best:
        print(
            f"{'best teacher on unlabeled':<26} {'':>8} {'':>8} {best['hmean']:>8.4f}   "
            f"({best['name']} at its best threshold {best['thr']:.2f})"
        )
    print("-" * 78)
    student = next((s["hmean"] for n, s in scores.items() if n.startswith("student:")), None)
    control = next((s["hmean"] for n, s in scores.items() if n.startswith("control:")), None)
    if student is not None and control is not None:
        d = student - control
        print(
            f"student F {student:.4f} vs control F {control:.4f} "
            "(same start, same iterations, labeled data only): "
            f"{'+' if d >= 0 else ''}{100 * d:.1f} F points from the pseudo labels"
        )
    if q and best:
        d = q["hmean"] - best["hmean"]
        print(
            f"pseudo labels F {q['hmean']:.4f} vs the best teacher's {best['hmean']:.4f} "
            "on the unlabeled split: "
            f"{'+' if d >= 0 else ''}{100 * d:.1f} F points from the ensemble"
        )
    gate_line = gate_text(summary.get("validation_gate"))
    if gate_line:
        print(gate_line)
    print("=" * 78)
    print(
        f"Prefect UI: {ui}  (flow run graph, task logs, artifacts: progress, tables, pseudo-label pictures)"
    )
    print(
        f"Outputs: {summary['work_dir']} (summary.md with its figures, teachers/, predictions/, "
        "pseudo/<variant>/report.md, student/, control/, eval/)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/demo")
    ap.add_argument("--data-dir", default="data/demo")
    ap.add_argument("--prefect-home", default=".prefect")
    ap.add_argument("--port", type=int, default=4200)
    ap.add_argument(
        "--params",
        default="{}",
        help='extra ssl-pipeline parameters as JSON, e.g. \'{"fuse": {"keep_thr": 0.6}}\'',
    )
    ap.add_argument(
        "--keep-server", action="store_true", help="leave the server and serve running afterwards"
    )
    args = ap.parse_args(argv)
    try:  # refused before any server starts
        extra = json.loads(args.params)
    except json.JSONDecodeError as e:
        ap.error(f"--params: not JSON ({e}): {args.params!r}; give an object such as '{{\"fuse\": {{...}}}}'")
    if not isinstance(extra, dict):
        ap.error(f"--params: a JSON object of ssl-pipeline parameters is needed, got {args.params!r}")

    os.chdir(REPO)
    server = LocalServer(args.prefect_home, port=free_port(args.port))
    print(f"starting a local Prefect server on {server.url} (SQLite in {server.home}) ...", flush=True)
    server.start()
    serve, run_ended = None, False
    try:
        serve_log = open(server.home / "serve.log", "ab")
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve"],
            env=server.env,
            stdout=serve_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )
        wait_for_deployments(server.env, ["ssl-pipeline/default", "fuse-pseudo-labels/default"])
        print(
            "deployments registered (ssl-pipeline/default and one per stage); "
            "running ssl-pipeline/default ...",
            flush=True,
        )
        # deferred: Prefect reads its settings at import (set above)
        from prefect.deployments import run_deployment

        params = {
            "work_dir": str(Path(args.work_dir).resolve()),
            "data": {"demo_dir": str(Path(args.data_dir).resolve())},
        }
        for k, v in extra.items():
            params[k] = (
                {**params.get(k, {}), **v} if isinstance(v, dict) and isinstance(params.get(k), dict) else v
            )
        run = run_deployment("ssl-pipeline/default", parameters=params, timeout=0)
        ui = f"{server.url}/runs/flow-run/{run.id}"
        print(f"flow run {run.name}: {ui}", flush=True)
        run = follow(run.id, params["work_dir"])
        run_ended = True  # a final state; its process may still be exiting
        if not run.state.is_completed():
            print(
                f"ssl-pipeline ended {run.state.name}: {run.state.message}; "
                f"see {ui} and {server.home}/serve.log"
            )
            return 1
        summary = json.loads((WorkDir(Path(args.work_dir)).summary_json).read_text())
        print_table(summary, ui)
        if args.keep_server:
            print("server and serve keep running; press Ctrl-C to stop them")
            signal.pause()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if serve is not None and serve.poll() is None:
            if run_ended:  # not on Ctrl-C: then the run is meant to stop
                wait_for_run_processes(serve.pid)
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
