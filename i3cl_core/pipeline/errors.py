"""The pipeline's error: a work dir or stage input that cannot be used."""

from __future__ import annotations

from pathlib import Path


class PipelineError(RuntimeError):
    """A work_dir or stage input that cannot be used; the message says what is missing and where."""


def require(path: Path, stage: str, hint: str) -> Path:
    """``path``, which stage ``stage`` writes; a :class:`PipelineError` with ``hint`` when it is missing."""
    if not Path(path).exists():
        raise PipelineError(f"missing {path}: the {stage} stage has not produced it yet; {hint}")
    return Path(path)
