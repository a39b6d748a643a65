"""Typed configuration: one dataclass per section of a recipe, YAML in and out, validated before any work.

The YAML recipes in `configs/` mirror these dataclasses key for key, so a typo is an error, not a silently
ignored setting. `load_config` applies dotted `--set section.key=value` overrides on top of the file.

Layout: `model.py`, `data.py` and `train.py` hold the sections (`decode` beside `model`), `checks.py` the error
type, limits and shared checks, `mapping.py` the strict mapping-to-dataclass conversion, `recipe.py` the whole
`Config` with its loading and saving, and `yaml_io.py` the strict YAML reader.
"""

from captioner.config.checks import MAX_BEAM_SIZE, MAX_DECODE_LENGTH, MAX_LENGTH_PENALTY, MAX_WIDTH, ConfigError
from captioner.config.data import DataConfig, DatasetConfig
from captioner.config.mapping import dataclass_from_dict
from captioner.config.model import DecodeConfig, ModelConfig
from captioner.config.recipe import Config, config_from_dict, config_to_dict, config_yaml, load_config, save_config
from captioner.config.train import TrainConfig

__all__ = ["MAX_BEAM_SIZE", "MAX_DECODE_LENGTH", "MAX_LENGTH_PENALTY", "MAX_WIDTH", "Config", "ConfigError",
           "DataConfig", "DatasetConfig", "DecodeConfig", "ModelConfig", "TrainConfig", "config_from_dict",
           "config_to_dict", "config_yaml", "dataclass_from_dict", "load_config", "save_config"]
