"""Count the operations that make the host wait for the device.

On a GPU, a training step runs ahead of Python only as long as nothing asks for a value: ``.item()``,
``bool(t)`` (an ``if`` on a tensor), ``float(t)``, ``.tolist()``, ``.cpu()``/``.numpy()``, and the operations
whose output size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
NMS) each stop the host until the GPU has caught up. The same calls are visible on a CPU, so
:class:`HostSyncCounter` counts them there, with the line of this project's code that made each one::

    with HostSyncCounter() as syncs:
        trainer.step(images, targets, epoch=0, it=0)
    print(syncs.table())

It uses PyTorch's Python dispatch and function modes (the operators as dispatched, plus the tensor methods
that leave the device without an operator). It slows what it watches: for tests and benchmarks only.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE = Path(__file__).resolve().parents[1]

# operators whose result the host must read (scalars) or whose output size depends on the values
SYNC_OPS = {
    "aten._local_scalar_dense.default": "scalar read (.item(), bool(), float(), int())",
    "aten.nonzero.default": "nonzero / torch.where(cond)",
    "aten.masked_select.default": "masked_select",
    "aten._unique2.default": "unique",
    "aten.unique_dim.default": "unique",
    "aten.unique_consecutive.default": "unique",
    "aten.repeat_interleave.Tensor": "repeat_interleave without output_size",
    "torchvision.nms.default": "nms",
}
# tensor methods that copy to the host without dispatching an operator when the tensor is already there
SYNC_METHODS = {"tolist": ".tolist()", "cpu": ".cpu()", "numpy": ".numpy()"}


def _caller() -> str:
    """``file:line`` of the innermost frame in this package, else of the innermost frame outside PyTorch."""
    here, torch_dir = Path(__file__).resolve(), Path(torch.__file__).resolve().parent
    f, first = sys._getframe(1), None
    while f is not None:
        path = Path(f.f_code.co_filename)
        if path != here and not path.is_relative_to(torch_dir):
            if path.is_relative_to(PACKAGE):
                return f"{path.relative_to(PACKAGE.parent)}:{f.f_lineno}"
            first = first or f"{path.name}:{f.f_lineno}"
        f = f.f_back
    return first or "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        kind = SYNC_OPS.get(name)
        if name == "aten.repeat_interleave.Tensor" and (kwargs or {}).get("output_size") is not None:
            kind = None  # the output's size is given: nothing to read back
        if kind is None and name == "aten.index.Tensor":  # x[mask]: the mask's number of True values
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                kind = "boolean-mask indexing"
        if kind is not None:
            self.counter.record(kind)
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = SYNC_METHODS.get(getattr(func, "__name__", ""))
        if kind is not None:
            self.counter.record(kind)
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """Context manager: ``calls`` is a Counter of ``(kind, "file:line")``; :attr:`total`, :meth:`table`."""

    def __init__(self):
        self.calls: Counter = Counter()
        self._modes: list = []

    def record(self, kind: str) -> None:
        self.calls[(kind, _caller())] += 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def where(self, path_part: str) -> int:
        """How many were made by lines whose file path contains ``path_part``."""
        return sum(n for (_, loc), n in self.calls.items() if path_part in loc)

    def table(self) -> str:
        rows = sorted(self.calls.items(), key=lambda kv: (-kv[1], kv[0][1]))
        lines = [f"{self.total} host synchronisations"] + [
            f"  {n:4d}  {loc}  {kind}" for (kind, loc), n in rows
        ]
        return "\n".join(lines)

    def __enter__(self) -> HostSyncCounter:
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []
