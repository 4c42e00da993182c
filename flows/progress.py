"""What ``make demo`` shows while the pipeline runs: each training's epoch, iteration, loss, speed and
ETA, and the ensemble's shards done, read from the work dir (the trainings' ``train.log`` and the
shard files), next to the stages' states from the Prefect API.

On a terminal they are rich progress bars, redrawn in place; in a log (stdout not a TTY) one plain line
per activity every ``plain_every`` seconds, so that CI logs and ``tee`` stay readable.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from i3cl_core.pipeline.workdir import COVERAGE, PLAN, WorkDir, model_runs

TRAIN_LINE = re.compile(r"epoch (\d+)/(\d+) iter (\d+)/(\d+) loss ([0-9.naninf]+).*?([0-9.]+) img/s")


@dataclass
class Activity:
    key: str  # "train teacher:teacher_a", "train student-r2:student", "ensemble teacher_a"
    done: float  # units done
    total: float
    detail: str  # "epoch 3/10 iter 12/25 loss 1.41 2.0 img/s"
    finished: bool = False


def _last_match(path: Path, pattern: re.Pattern, tail_bytes: int = 4096):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - tail_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def scan(work_dir: Path) -> list[Activity]:
    """Every training and every ensemble model of the work dir that has started, with its progress."""
    layout = WorkDir(Path(work_dir))
    out = []
    runs = []
    for role, folder in layout.model_folders():  # named role:name, as in the run's scores
        runs += [(f"{role}:{name}", p) for name, p in model_runs(folder, running=True)]
    for name, run in runs:
        m = _last_match(run / "train.log", TRAIN_LINE)
        if m is None:
            continue
        e, ne, i, ni = (int(m.group(k)) for k in range(1, 5))
        out.append(
            Activity(
                f"train {name}",
                (e - 1) * ni + i,
                ne * ni,
                f"epoch {e}/{ne} iter {i}/{ni} loss {m.group(5)} {m.group(6)} img/s",
                finished=(run / "metrics.json").exists(),
            )
        )
    for label, model in layout.ensemble_folders():
        done = len(list(model.glob("shard_*.json")))
        total = _planned_shards(model.parent / PLAN) or max(done, 1)
        finished = (model / COVERAGE).exists()
        out.append(Activity(f"ensemble {label}", done, total, f"{done}/{total} shards", finished=finished))
    return out


def _planned_shards(plan: Path) -> int | None:
    try:
        return int(json.loads(plan.read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ProgressView:
    """Rich bars on a terminal, plain lines otherwise."""

    def __init__(self, stream=None, plain_every: float = 30.0, force_plain: bool = False):
        self.stream = stream or sys.stdout
        self.tty = (not force_plain) and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.plain_every = plain_every
        self.started: dict[str, tuple[float, float]] = {}  # key -> (time, done) when first seen
        self.last_plain = 0.0
        self.reported_done: set[str] = set()
        self._progress = None
        self._tasks: dict[str, int] = {}
        if self.tty:
            # deferred: rich loads only for the live view
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description:<34}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[detail]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.start()

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def eta(self, a: Activity, now: float) -> str:
        t0, d0 = self.started.setdefault(a.key, (now, a.done))
        if a.finished or a.done <= d0 or now <= t0:
            return "done" if a.finished else "ETA ?"
        rate = (a.done - d0) / (now - t0)
        return f"ETA {max(0.0, (a.total - a.done) / rate):.0f} s"

    def update(self, activities: list[Activity]) -> None:
        now = time.time()
        for a in activities:
            self.started.setdefault(a.key, (now, a.done))  # the reference point of the plain ETA
            if self._progress is not None:
                if a.key not in self._tasks:
                    self._tasks[a.key] = self._progress.add_task(a.key, total=a.total, detail="")
                self._progress.update(self._tasks[a.key], completed=a.done, total=a.total, detail=a.detail)
        if self._progress is None and (now - self.last_plain >= self.plain_every):
            self.last_plain = now
            for a in activities:
                if a.finished and a.key in self.reported_done:
                    continue
                if a.finished:
                    self.reported_done.add(a.key)
                pct = 100.0 * a.done / max(a.total, 1)
                print(f"  {a.key}: {pct:5.1f}%  {a.detail}  {self.eta(a, now)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
