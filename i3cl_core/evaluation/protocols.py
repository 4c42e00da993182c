"""The evaluation protocols by name: one list for the evaluator, the training config, the flow parameters and
the command line (``docs/evaluation.md`` defines them)."""

from __future__ import annotations

from typing import Literal, get_args

Protocol = Literal["art", "totaltext", "ctw1500", "icdar2015"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
IOU_PROTOCOLS = ("art", "ctw1500", "icdar2015")  # RRC-style IoU matching; totaltext is DetEval
