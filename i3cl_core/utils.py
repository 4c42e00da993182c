"""Small shared helpers: atomic writes, safe paths, logging."""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from i3cl_core.data.errors import DatasetError

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
    """The permissions a plain ``open(path, "w")`` would leave: those of the file it replaces, else 0o666 less
    the umask (``mkstemp`` alone makes 0o600 files that colleagues on a shared cluster cannot read)."""
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


class WriteError(OSError, DatasetError):
    """A file that could not be written (disk full, quota, permissions, ...). The message names the file,
    how much was being written and why (``cannot write /x/results.json (12.3 MB): No space left on device``);
    ``errno``, ``strerror`` and ``filename`` are those of the failure. An :class:`OSError`, so that
    ``except OSError`` still catches it; also a :class:`DatasetError`, the type the ``i3cl`` command line
    reports as a one-line error (exit status 2) instead of a traceback."""

    def __init__(
        self,
        message: str,
        errno: int | None = None,
        strerror: str | None = None,
        filename: str | None = None,
        size: int | None = None,
    ):
        super().__init__(message)
        self.errno, self.strerror, self.filename, self.size = errno, strerror, filename, size

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(
        self,
    ):  # keep the message and the errno across pickling (DataLoader workers, Dask, Prefect)
        return type(self), (str(self), self.errno, self.strerror, self.filename, self.size)


def format_size(n: int | float | None) -> str:
    """``512 B``, ``12.3 kB``, ``12.3 MB``, ``1.2 GB`` (powers of 1000); ``size unknown`` for None."""
    if n is None:
        return "size unknown"
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if n < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def write_error(path: str | os.PathLike, size: int | None, exc: OSError, doing: str = "write") -> WriteError:
    """The :class:`WriteError` for ``exc`` raised while writing ``size`` bytes to ``path``; a full disk or
    quota also gives the space left on the file system."""
    if isinstance(exc, WriteError):
        return exc
    path = Path(path)
    why = exc.strerror or str(exc) or type(exc).__name__
    other = exc.filename if isinstance(exc.filename, str) and exc.filename not in (str(path),) else None
    if other and not os.path.basename(other).startswith(f".{path.name}."):  # not our own temporary file
        why = f"{why} ({other})"
    if exc.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
        try:
            why = f"{why}; {format_size(shutil.disk_usage(_existing_parent(path)).free)} free there"
        except OSError:
            pass
    size_text = f" ({format_size(size)})" if size is not None else ""
    return WriteError(f"cannot {doing} {path}{size_text}: {why}", exc.errno, exc.strerror, str(path), size)


def _existing_parent(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


@contextlib.contextmanager
def writing(path: str | os.PathLike, size: int | None = None, doing: str = "write"):
    """Turn an :class:`OSError` raised inside the block into a :class:`WriteError` naming ``path`` (and
    ``size`` when known): for writers that are not the helpers below (matplotlib, torch, ...)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, size, e, doing) from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one. A failure
    (a full disk, say) leaves the old file as it was, no temporary file, and raises a :class:`WriteError`
    that names the file and the size."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = _new_file_mode(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, mode)
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError):
            raise write_error(path, len(data), e) from e
        raise
    return path


def append_text(path: str | os.PathLike, text: str) -> Path:
    """Append ``text`` to ``path`` (created when missing). A failure leaves the file as it was (what was
    written of ``text`` is cut off again) and raises a :class:`WriteError` naming the file and the size."""
    path = Path(path)
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(path, len(data), e) from e
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise write_error(path, len(data), e) from e
    finally:
        os.close(fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False))


def read_json(path: str | os.PathLike) -> Any:
    """Parse a json file; a missing file raises FileNotFoundError, bad content a DatasetError that
    names the file and the position."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; expected a json file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return parse_json(path.read_bytes(), path)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None


def parse_json(data: str | bytes, path: str | os.PathLike) -> Any:
    """``json.loads(data)``; malformed json raises a DatasetError naming ``path`` and the position."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def safe_join(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative``, refusing paths that escape ``root`` (absolute paths, ``..``, symlinks out)."""
    root_path = Path(root).resolve()
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"empty or non-string file name {relative!r}")
    if os.path.isabs(relative):
        raise ValueError(
            f"file name {relative!r} is absolute; it must be relative to the image root {root_path}"
        )
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
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL if sig is None else sig))
    except (OSError, AttributeError):
        pass


def terminate_with_parent() -> None:
    """``preexec_fn`` for a child that runs torchrun: SIGTERM when its parent dies (torchrun then stops its
    trainers, which stop their DataLoader workers the same way)."""
    die_with_parent(signal.SIGTERM)


def worker_init(worker_id: int) -> None:  # noqa: ARG001  (DataLoader's worker_init_fn signature)
    """DataLoader ``worker_init_fn``: the worker dies with the process that started it."""
    die_with_parent()


def fingerprint(*paths) -> str:
    """SHA-1 over the contents of files (folders: all their files, sorted); missing paths count as
    absent. Used in cache keys so that a changed input file invalidates what was computed from it."""
    h = hashlib.sha1()
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.name).encode())
            if not f.exists():
                h.update(b"<absent>")
                continue
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
