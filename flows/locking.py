"""The work dir's lock around a flow run: one writer per work dir (a second run refuses at once, naming the
first); the ssl-pipeline and the stage flows it calls share one lock, released by the run's state hooks."""

from __future__ import annotations

from pathlib import Path

from prefect.runtime import flow_run

from i3cl_core import workdir_lock
from i3cl_core.pipeline import stages

_LOCKED_BY: dict[str, str] = {}  # flow run id -> the work dir whose lock it took


def open_work_dir(work_dir: str, create: bool = True) -> Path:
    """:func:`stages.check_work_dir` plus the work dir's lock (one writer at a time: a second run on the same
    work dir refuses at once, naming this one), held until the flow run ends (:func:`_unlock`); the
    ssl-pipeline and the stage flows it calls share it."""
    holder = f"flow run {flow_run.flow_name}/{flow_run.name} ({flow_run.id})"
    if str(flow_run.id) in _LOCKED_BY:  # this flow run holds it already
        return stages.check_work_dir(work_dir, create=create)
    if create:
        workdir_lock.acquire(work_dir, holder)
        try:
            wd = stages.check_work_dir(work_dir, create=True)
        except BaseException:
            workdir_lock.release(work_dir)
            raise
    else:
        wd = stages.check_work_dir(work_dir, create=False)
        workdir_lock.acquire(wd, holder)
    _LOCKED_BY[str(flow_run.id)] = str(wd)
    return wd


def _unlock(flow, flow_run, state) -> None:  # noqa: ARG001  (Prefect's state-hook signature)
    wd = _LOCKED_BY.pop(str(flow_run.id), None)
    if wd is not None:
        workdir_lock.release(wd)


LOCK_HOOKS = dict(
    on_completion=[_unlock], on_failure=[_unlock], on_cancellation=[_unlock], on_crashed=[_unlock]
)
# what every pipeline flow is decorated with: the lock's hooks, printed lines in the run's logs, its result
# kept as JSON
FLOW_OPTIONS = dict(**LOCK_HOOKS, log_prints=True, persist_result=True, result_serializer="json")
