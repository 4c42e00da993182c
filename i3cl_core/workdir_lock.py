"""One writer per work dir: an advisory lock that every stage writing into a work dir takes first.

The lock is ``fcntl.flock`` on ``<work dir>/.i3cl-lock``, whose content names the holder (what it is, pid,
host, since when). A second writer refuses at once with a :class:`WorkDirLocked` error that names the holder.
The kernel drops the lock when its process dies (``kill -9`` included), so a dead holder never blocks: the
next writer takes the lock over and logs a note naming the holder it replaces.

Within one process the lock is re-entrant: the ssl-pipeline flow and the stage flows it calls share it,
counted, and the last :func:`release` unlocks. ``flock`` is per open file, so the lock holds across processes
on one machine and, on Linux NFS clients, across machines.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from i3cl_core.utils import get_logger, writing

log = get_logger("lock")

LOCK_NAME = ".i3cl-lock"
_held: dict[str, list] = {}  # resolved path -> [open file, count]
_guard = threading.Lock()


class WorkDirLocked(RuntimeError):
    """Another live process writes into this work dir."""


def _describe(info: dict) -> str:
    return (
        f"{info.get('holder', 'an unknown writer')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"since {info.get('since', '?')})"
    )


def acquire(work_dir: str | os.PathLike, holder: str) -> Path:
    """Take the lock of ``work_dir`` (created if missing) for ``holder`` (e.g. "flow run ssl-pipeline/abc",
    "i3cl train configs/x.yaml"); raises :class:`WorkDirLocked` naming the live holder. Returns the lock
    file."""
    import fcntl  # deferred: POSIX-only; the CLI imports this module on every platform

    wd = Path(work_dir).resolve()
    key = str(wd)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return wd / LOCK_NAME
        created = not wd.exists()
        wd.mkdir(parents=True, exist_ok=True)
        path = wd / LOCK_NAME
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                info = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                info = {}
            f.close()
            raise WorkDirLocked(
                f"{wd} is being written by {_describe(info)}; wait for it to finish, stop it, or use "
                f"another work dir"
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            try:
                old = json.loads(previous)
            except json.JSONDecodeError:
                old = {}
            log.warning(
                "%s: taking over the lock of %s, which is no longer running (it ended without releasing "
                "it: killed or crashed)",
                wd,
                _describe(old),
            )
        record = json.dumps(
            {
                "holder": holder,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
        try:
            with writing(path, len(record)):  # a full disk: an error naming the file, not a traceback
                f.seek(0)
                f.truncate()
                f.write(record)
                f.flush()
        except BaseException:
            f.close()  # and with it the lock
            raise
        _held[key] = [f, 1, created]
        return path


def release(work_dir: str | os.PathLike) -> None:
    """Give back one hold of this process on ``work_dir``'s lock; the last one empties the lock file (a clean
    end: the next writer takes it without a note) and unlocks; a folder that the lock created and nothing else
    wrote into is removed again. No-op when this process does not hold it."""
    import fcntl  # deferred: POSIX-only; the CLI imports this module on every platform

    key = str(Path(work_dir).resolve())
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        f, created = entry[0], entry[2]
        del _held[key]
        try:
            f.seek(0)
            f.truncate()
            f.flush()
            wd = Path(key)
            if created and [x.name for x in wd.iterdir()] == [
                LOCK_NAME
            ]:  # a command refused before any work:
                try:  # leave no folder behind (unless another writer came in meanwhile)
                    (wd / LOCK_NAME).unlink()
                    wd.rmdir()
                except OSError:
                    pass
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()


def holds(work_dir: str | os.PathLike) -> bool:
    return str(Path(work_dir).resolve()) in _held


class locked:
    """``with locked(work_dir, holder):`` :func:`acquire` then :func:`release`."""

    def __init__(self, work_dir, holder: str):
        self.work_dir, self.holder = work_dir, holder

    def __enter__(self) -> Path:
        return acquire(self.work_dir, self.holder)

    def __exit__(self, *exc) -> None:
        release(self.work_dir)
