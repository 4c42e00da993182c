"""Typed configuration: pydantic models, YAML files with inheritance, command-line overrides.

A config file is YAML whose top-level keys are the sections of :class:`I3CLConfig`
(``data``, ``model``, ``train``, ``infer``, ``fuse``). It may name one or more
base files with ``_base_`` (paths relative to the file); keys in the file override the base
key by key (dicts merge, everything else replaces). ``--set train.lr=0.001`` style overrides
are applied last; their values are parsed as YAML (``--set model.intra_cl=false``).

Every error names the key, where the value came from (file or ``--set``) and what is allowed.
"""

from __future__ import annotations

from i3cl_core.config.errors import ConfigError, format_validation_error
from i3cl_core.config.loading import build_config, config_to_dict, load_config, parse_override, save_config
from i3cl_core.config.schema import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    DatasetSource,
    FuseConfig,
    I3CLConfig,
    InferConfig,
    InterCLConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "DatasetSource",
    "FuseConfig",
    "I3CLConfig",
    "InferConfig",
    "InterCLConfig",
    "ModelConfig",
    "TrainConfig",
    "build_config",
    "config_to_dict",
    "format_validation_error",
    "load_config",
    "parse_override",
    "save_config",
]
