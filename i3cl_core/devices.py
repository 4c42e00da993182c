"""Which device a model runs on: the one rule for training, inference and the ensemble's workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto", field: str = "device", local_rank: int | None = None) -> torch.device:
    """``name`` as a device this machine has: ``auto`` is the first visible GPU, else the CPU; ``cpu``;
    ``cuda`` (the first GPU) or ``cuda:N``. Under torchrun (``local_rank`` given) a CUDA device is the
    process's own GPU, ``cuda:LOCAL_RANK``. A name that is not a device, or a GPU this machine does not
    have, is a ``ValueError`` naming ``field``."""
    import torch  # deferred: the flows and CLI import this module without loading torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{field}: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"{field}: {name!r}: only cpu and cuda devices are supported")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = local_rank if local_rank is not None else (device.index or 0)
    if index >= visible:
        raise ValueError(f"{field}: {name!r} requested but this machine has {visible} visible CUDA device(s)")
    return torch.device("cuda", index)


def resolve_devices(
    spec: str | list[str] | tuple[str, ...] = "auto", field: str = "infer.devices"
) -> list[str]:
    """The devices of a list of workers: ``auto`` is every visible GPU (``cuda:0`` .. ``cuda:N-1``), else one
    CPU worker; a list is checked entry by entry with :func:`resolve_device` (an entry may repeat: two
    workers on one device)."""
    import torch  # deferred: the flows and CLI import this module without loading torch

    if spec == "auto" or spec == ["auto"]:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(visible)] or ["cpu"]
    if isinstance(spec, str):
        spec = [spec]
    if not spec:
        raise ValueError(f"{field}: give 'auto' or at least one device")
    return [str(resolve_device(name, field)) for name in spec]
