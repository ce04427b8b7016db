"""Config loading: defaults, YAML, CLI overrides, and errors that name the key."""

from dataclasses import dataclass, field

import pytest
from helpers import exit_in_process

from lib.run.config import ConfigError, load_config
from lib.run.schemas import SoftArmTrainConfig, validate_soft_arm_train_config


@dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10


@dataclass
class Schema:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  steps: 20\n")
    config = load_config(Schema, path, ["inner.lr=0.5"])
    assert (config.name, config.inner.steps, config.inner.lr) == ("run", 20, 0.5)


def test_unknown_key_in_file_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  stepz: 20\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'inner.stepz'"):
        load_config(Schema, path)


def test_unknown_key_and_bad_type_on_command_line():
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'inner.learning_rate'"):
        load_config(Schema, None, ["inner.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"bad value for 'inner.steps'"):
        load_config(Schema, None, ["inner.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Schema, None, ["inner.steps"])


def test_missing_file():
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(Schema, "nowhere.yaml")


def test_train_script_rejects_unknown_key_and_bad_value(monkeypatch, capsys):
    config = ["--config", "configs/debug_config.yaml"]
    code, error = exit_in_process(monkeypatch, capsys, "scripts/train_soft_arm.py", *config, "train.stepz=5")
    assert code == 2 and "unknown config key 'train.stepz'" in error
    code, error = exit_in_process(monkeypatch, capsys, "scripts/train_soft_arm.py", *config, "data.batch_size=0")
    assert code == 2 and "'data.batch_size' must be > 0" in error


@pytest.mark.parametrize("name", ["debug_config.yaml", "soft_arm_config.yaml", "soft_arm_sim.yaml"])
def test_shipped_configs_load(name):
    validate_soft_arm_train_config(load_config(SoftArmTrainConfig, f"configs/{name}"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lora_rank=-1"], "'model.lora_rank' must be >= 0"),
        (["model.lora_rank=8", "model.train_expert_only=true"], "LoRA freezes every pretrained weight"),
        (["model.lora_rank=8", "model.pretrained=tiny"], "adapters fine-tune pretrained weights"),
        (["model.compile_mode=fast"], "'model.compile_mode' must be one of"),
    ],
)
def test_model_mode_combinations_are_checked(overrides, message):
    config = load_config(SoftArmTrainConfig, "configs/soft_arm_sim.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        validate_soft_arm_train_config(config)
