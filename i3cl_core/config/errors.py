"""Config errors: :class:`ConfigError`, and pydantic validation errors rewritten to name the key, where its
value came from (file or ``--set``), and what is allowed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the sub-model at ``loc`` (for unknown-key messages)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if (
            not (isinstance(current, type) and issubclass(current, BaseModel))
            or part not in current.model_fields
        ):
            return None
        annotation = current.model_fields[part].annotation
        current = _unwrap_model(annotation)
        if current is None:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _field_description(model: type[BaseModel], loc: tuple) -> str | None:
    current: Any = model
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if (
            not (isinstance(current, type) and issubclass(current, BaseModel))
            or part not in current.model_fields
        ):
            return None
        info = current.model_fields[part]
        current = _unwrap_model(info.annotation)
    if info is None:
        return None
    bounds = []
    for meta in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sym} {getattr(meta, attr)}")
    parts = []
    if bounds:
        parts.append("allowed: " + " and ".join(bounds))
    if info.description:
        parts.append(info.description)
    return "; ".join(parts) or None


def _origin_of(loc: tuple, origins: dict[str, str]) -> str:
    keys = [str(p) for p in loc if not isinstance(p, int)]
    for n in range(len(keys), 0, -1):
        dotted = ".".join(keys[:n])
        if dotted in origins:
            return origins[dotted]
    return "defaults"


def format_validation_error(err: ValidationError, origins: dict[str, str], model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        where = _origin_of(loc, origins)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{key}: unknown key (from {where}){hint}")
            continue
        msg = e["msg"]
        got = e.get("input")
        desc = _field_description(model, loc)
        text = f"{key}: {msg} (got {got!r}, from {where})"
        if desc:
            text += f"; {desc}"
        lines.append(text)
    return "invalid config:\n  " + "\n  ".join(lines)
