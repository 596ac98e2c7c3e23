"""One typed, validated config tree (pydantic models, sections.py), loaded from configs/*.yaml
plus dotted command-line overrides (`algo.beta=0.01`, loading.py). Unknown keys and bad values
are errors that name the dotted key, the value, where it came from (file:line or command line)
and what is allowed (errors.py). Defaults follow the DeepSeek-R1 recipe (arXiv:2501.12948).

`grpo-ray config schema` prints the tree's JSON Schema; `grpo-ray config show` the resolved
config with each value's source.
"""
from .errors import ConfigError, Sources
from .loading import field_type, json_schema, load_config, parse_override, resolve, show
from .sections import (AlgoConfig, CodeRewardConfig, Config, DataConfig, EvalConfig, LearnerConfig,
                       MathRewardConfig, ModelConfig, ResourcesConfig, RewardConfig, RolloutConfig, RunConfig,
                       TrainConfig, VerifierPoolConfig, WarmStartConfig, overlong_buffer)
from .resources import cpu_list, cpu_threads, shard_cpus

__all__ = ["AlgoConfig", "CodeRewardConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LearnerConfig",
           "MathRewardConfig", "ModelConfig", "ResourcesConfig", "RewardConfig", "RolloutConfig", "RunConfig",
           "Sources", "TrainConfig", "VerifierPoolConfig", "WarmStartConfig", "cpu_list", "cpu_threads", "shard_cpus",
           "field_type", "json_schema", "load_config", "overlong_buffer", "parse_override", "resolve", "show"]
