"""YAML configs on OmegaConf structured schemas: `--config file.yaml key=value ...`.

The schema (a dataclass) gives the defaults and the types; the YAML file and the CLI dotlist
override it. An unknown key or a value of the wrong type is a `ConfigError` that names the key,
the file and what was expected.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lib.run.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that does not fit its schema; the message names the key and the source."""


def _describe(error: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(error, "full_key", None) or "?"
    if isinstance(error, ConfigKeyError):
        return ConfigError(f"{source}: unknown config key '{key}'")
    if isinstance(error, ValidationError):
        message = str(error).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {message}")
    return ConfigError(f"{source}: {str(error).splitlines()[0]} (key '{key}')")


def load_config[T](schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults of `schema`, then the YAML file at `path`, then `overrides` (["a.b=1", ...])."""
    config = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_config = OmegaConf.load(path)
        except Exception as error:  # yaml.YAMLError and friends: say which file
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        try:
            config = OmegaConf.merge(config, file_config)
        except OmegaConfBaseException as error:
            raise _describe(error, str(path)) from error
        except (TypeError, ValueError) as error:  # OmegaConf's own, e.g. a mapping where a list belongs
            raise ConfigError(f"{path}: does not fit the config's structure ({error})") from error
    for override in overrides or []:
        if "=" not in override:
            raise ConfigError(f"command line: override '{override}' must look like key=value")
        try:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as error:
            raise _describe(error, "command line") from error
        except (TypeError, ValueError) as error:  # OmegaConf's own, e.g. a mapping where a list belongs
            key = override.split("=", 1)[0]
            raise ConfigError(f"command line: bad value for '{key}': {error}") from error
    OmegaConf.set_readonly(config, True)
    return config


def add_run_arguments(parser: argparse.ArgumentParser, default_config: Path | None, example: str) -> None:
    """The command line every training script shares: `--config FILE` (old spelling `--config_path`),
    `--output_dir DIR` (the same as the override `output_dir=DIR`), `--resume CHECKPOINT`,
    `--overwrite`, `--dry_run`, then `key=value` overrides."""
    parser.add_argument(
        "--config", "--config_path", dest="config", type=Path, default=default_config, help="YAML config"
    )
    parser.add_argument("--output_dir", help="where the run writes (overrides the config's output_dir)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="'latest' (newest of output_dir) or a checkpoint dir")
    parser.add_argument("--overwrite", action="store_true", help="replace the run that output_dir already holds")
    parser.add_argument("--dry_run", action="store_true", help="build everything, run one step, save nothing, exit")
    parser.add_argument("overrides", nargs="*", help=f"config overrides, e.g. {example}")


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of `add_run_arguments`' command line, `--output_dir` last (it wins)."""
    return [*args.overrides, *([f"output_dir={args.output_dir}"] if args.output_dir else [])]


def check(condition: bool, key: str, expected: str, value: Any) -> None:
    """Raise a `ConfigError` naming `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}")


def to_flat_dict(config: DictConfig) -> dict[str, Any]:
    """{"optim.lr": 1e-4, ...} for trackers' hyper-parameter tables."""
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, int | float | str | bool) or node is None else str(node)

    visit(OmegaConf.to_container(config, resolve=True), "")
    return flat
