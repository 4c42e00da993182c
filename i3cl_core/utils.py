"""Small shared helpers: atomic writes, safe paths, logging."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

LOGGER_NAME = "i3cl"


def get_logger(name: str | None = None) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return logger


def _new_file_mode(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` would leave: those of the file it replaces, else
    0o666 less the umask (``mkstemp`` alone makes 0o600 files that colleagues on a shared cluster cannot read)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask's set-and-restore races with other threads' files)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o077)
        os.umask(umask)
        return umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False))


def read_json(path: str | os.PathLike) -> Any:
    """Parse a json file; a missing file raises FileNotFoundError, bad content a DatasetError that
    names the file and the position."""
    from i3cl_core.data.errors import DatasetError

    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; expected a json file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None


def safe_join(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative``, refusing paths that escape ``root`` (absolute paths, ``..``, symlinks out)."""
    root_path = Path(root).resolve()
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"empty or non-string file name {relative!r}")
    if os.path.isabs(relative):
        raise ValueError(f"file name {relative!r} is absolute; it must be relative to the image root {root_path}")
    full = (root_path / relative).resolve()
    if full != root_path and root_path not in full.parents:
        raise ValueError(f"file name {relative!r} escapes the image root {root_path}")
    return full


def cpu_workers(limit: int = 8) -> int:
    """Workers for CPU-bound pools when none are asked for: the machine's CPUs, at most ``limit``."""
    return max(1, min(os.cpu_count() or 1, limit))


def die_with_parent(sig: int | None = None) -> None:
    """Ask the kernel to send ``sig`` (default SIGKILL) to this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere). Called in DataLoader workers and in the children the
    training task starts, so that a ``kill -9`` of the parent leaves no process behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL if sig is None else sig))
    except (OSError, AttributeError):
        pass


def terminate_with_parent() -> None:
    """``preexec_fn`` for a child that runs torchrun: SIGTERM when its parent dies (torchrun then stops its
    trainers, which stop their DataLoader workers the same way)."""
    import signal

    die_with_parent(signal.SIGTERM)


def worker_init(worker_id: int) -> None:  # noqa: ARG001  (DataLoader's worker_init_fn signature)
    """DataLoader ``worker_init_fn``: the worker dies with the process that started it."""
    die_with_parent()
