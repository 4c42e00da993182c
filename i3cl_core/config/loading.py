"""YAML config files with ``_base_`` inheritance, ``--set key=value`` overrides, saving a resolved config."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from i3cl_core.config.errors import ConfigError, format_validation_error
from i3cl_core.config.schema import I3CLConfig
from i3cl_core.utils import atomic_write_text

BASE_KEY = "_base_"


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origins: dict[str, str], origin_of, prefix: str = "") -> None:
    """Merge ``src`` into ``dst`` in place (dicts recursively); ``origins[dotted key]`` records where
    each leaf came from, as ``origin_of(dotted key)`` says."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origins, origin_of, dotted + ".")
            continue
        dst[key] = copy.deepcopy(value)
        for k in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
            del origins[k]
        origins[dotted] = origin_of(dotted)


def _load_tree(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """The merged key tree of one config file and its bases, and the file each leaf came from."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: {BASE_KEY} inheritance cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names")
    tree: dict = {}
    origins: dict[str, str] = {}
    for base in bases:
        base_path = Path(base) if os.path.isabs(base) else path.parent / base
        if not base_path.exists():
            raise ConfigError(f"{path}: {BASE_KEY} names {base!r}, which does not exist ({base_path})")
        base_tree, base_origins = _load_tree(base_path, (*chain, path))
        _merge(tree, base_tree, origins, lambda k, bo=base_origins, bp=str(base_path): bo.get(k, bp))
    _merge(tree, data, origins, lambda k: str(path))
    return tree, origins


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'train.lr=0.001'`` -> (['train', 'lr'], 0.001). The value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.001")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def _apply_override(tree: dict, parts: list[str], value: Any, item: str, origins: dict[str, str]) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    prefix = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    _merge(node, {parts[-1]: value}, origins, lambda k: f"--set {item}", prefix)


def build_config(tree: dict, origins: dict[str, str] | None = None) -> I3CLConfig:
    try:
        return I3CLConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origins or {}, I3CLConfig)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> I3CLConfig:
    """Load a YAML config (following ``_base_``), apply ``--set`` overrides, validate."""
    tree, origins = _load_tree(Path(path)) if path is not None else ({}, {})
    for item in overrides or []:
        parts, value = parse_override(item)
        _apply_override(tree, parts, value, item, origins)
    return build_config(tree, origins)


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
