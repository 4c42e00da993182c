"""``Instances``: the per-instance fields of one image, kept together from the dataset to the losses.

A field is anything of the instance count's length: a numpy array, a torch tensor or a list (polygons).
Indexing an ``Instances`` (boolean mask, index array or tensor, slice, int) indexes every field the same
way, so no field can be left behind when an augmentation drops instances or when the heads sample
anchors and RoIs. One name per field from the json to the loss:

================  ==============================================================================
field             meaning
================  ==============================================================================
``polygons``      per instance a list of (K, 2) float32 parts, in the pixel-area coordinates of
                  :mod:`i3cl_core.data.polygons` (pixel (x, y) covers [x, x+1) x [y, y+1))
``iscrowd``       do-not-care region (bool); only in a :class:`~i3cl_core.data.transforms.Sample`
``lossweight``    the instance's loss weight (float, 1.0 for human labels; pseudo labels carry the
                  weight that fusion gave them, the json key of the same name)
``ann_id``        the annotation id in the json
``boxes``         (N, 4) x1, y1, x2, y2, recomputed from the polygons when a sample becomes tensors
``labels``        class index (1 = text; 0 is background)
================  ==============================================================================

The detector's heads build ``Instances`` of their own over sampled anchors and RoIs (``labels``,
``gt_boxes`` / ``regression_targets``, ``lossweight`` copied from the matched ground truth).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class Instances:
    """Fields of equal length, indexed together (in the spirit of detectron2's ``Instances``)."""

    __slots__ = ("_fields",)

    def __init__(self, **fields: Any):
        object.__setattr__(self, "_fields", {})
        for name, value in fields.items():
            self.set(name, value)

    # ------------------------------------------------------------------ fields
    def set(self, name: str, value: Any) -> None:
        n = len(value)
        if self._fields and n != len(self):
            raise ValueError(f"Instances: field {name!r} has {n} entries, the others {len(self)}")
        self._fields[name] = value

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy/pickle protocol lookups on an instance not yet initialised
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(
                f"Instances has no field {name!r} (fields: {', '.join(self._fields) or 'none'})"
            ) from None

    # DataLoader workers send samples to the main process by pickling them
    def __getstate__(self) -> dict:
        return self._fields

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "_fields", dict(state))

    def has(self, name: str) -> bool:
        return name in self._fields

    def fields(self) -> dict[str, Any]:
        return dict(self._fields)

    def __len__(self) -> int:
        for value in self._fields.values():
            return len(value)
        return 0

    def __iter__(self) -> Iterator:
        raise TypeError("Instances is not iterable: index it, or read a field")

    def __repr__(self) -> str:
        return f"Instances(num={len(self)}, fields=[{', '.join(self._fields)}])"

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, item) -> Instances:
        """The instances selected by ``item`` (bool mask, integer indices, slice or int), every field
        alike."""
        if isinstance(item, int):
            item = slice(item, item + 1 if item != -1 else None)
        elif getattr(item, "dtype", None) is not None and str(item.dtype) == "torch.bool":
            item = item.nonzero().squeeze(1)  # one read of the mask's size, not one per field
        out = Instances()
        rows = None  # list positions, computed once for the list fields
        for name, value in self._fields.items():
            if isinstance(value, list):
                if rows is None:
                    rows = _positions(item, len(self))
                out._fields[name] = [value[i] for i in rows]
            else:
                out._fields[name] = value[_for_array(item, value)]
        return out

    def to(self, device) -> Instances:
        """The same instances with every tensor field moved to ``device`` (other fields shared)."""
        out = Instances()
        for name, value in self._fields.items():
            out._fields[name] = (
                value.to(device) if hasattr(value, "to") and not isinstance(value, list) else value
            )
        return out

    @staticmethod
    def cat(parts: list[Instances]) -> Instances:
        """Concatenate instances with the same fields (tensors with torch.cat, arrays with numpy, lists
        joined)."""
        if not parts:
            return Instances()
        names = list(parts[0]._fields)
        for p in parts[1:]:
            if list(p._fields) != names:
                raise ValueError(f"Instances.cat: fields differ ({names} vs {list(p._fields)})")
        out = Instances()
        for name in names:
            values = [p._fields[name] for p in parts]
            first = values[0]
            if isinstance(first, list):
                out._fields[name] = [x for v in values for x in v]
            elif hasattr(first, "new_empty"):  # torch tensor
                import torch  # deferred: numpy-only users of Instances never load torch

                out._fields[name] = torch.cat(values)
            else:
                out._fields[name] = np.concatenate(values)
        return out


def _positions(item, n: int) -> list[int]:
    """List positions selected by a mask, index array/tensor or slice."""
    if isinstance(item, slice):
        return list(range(n))[item]
    if hasattr(item, "tolist"):
        item = item.tolist()
    item = list(item)
    if len(item) == n and all(isinstance(x, bool) for x in item):
        return [i for i, k in enumerate(item) if k]
    return [int(i) for i in item]


def _for_array(item, value):
    """``item`` in the form that ``value``'s type indexes with (a numpy mask for a numpy array, a tensor for a
    tensor)."""
    if isinstance(item, slice):
        return item
    is_tensor = hasattr(value, "new_empty")
    if is_tensor and not hasattr(item, "new_empty"):
        import torch  # deferred: numpy-only users of Instances never load torch

        return torch.as_tensor(item, device=value.device)
    if not is_tensor and hasattr(item, "new_empty"):
        return item.cpu().numpy()
    if is_tensor and item.device != value.device:
        return item.to(value.device)
    return item
