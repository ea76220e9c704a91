"""Typed configs: job and policy schemas, loaded from YAML with `--set` overrides."""

from shadow.config.job import JobConfig, PrecisionMode, load_job
from shadow.config.loader import ConfigError, ConfigProblem, flatten, load_config, to_dict, to_yaml

__all__ = ["ConfigError", "ConfigProblem", "JobConfig", "PrecisionMode", "flatten", "load_config", "load_job", "to_dict",
           "to_yaml"]
