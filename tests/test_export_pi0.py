"""`scripts/export_pi0.py`: a plain LeRobot pi0 checkpoint from a `pi0_cfg` checkpoint at guidance
weight 1 and from a graph checkpoint trained without its graph; exact (same actions on the same
noise through LeRobot's own `PI0Policy.from_pretrained`), and refused where no exact export exists."""

import dataclasses
import json

import pytest
import torch
from helpers import CHUNK, cfg_config, exit_in_process, make_batch, make_config
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy

from lib.policies.flag_pi0 import PI0CFGPolicy, PI0GraphCFGConfig, PI0GraphCFGPolicy
from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphPolicy
from lib.policies.loading import make_pi0_policy
from lib.policies.sizes import model_size_context


def export(monkeypatch, capsys, checkpoint, output_dir) -> tuple[int, str]:
    """Run the script as `python scripts/export_pi0.py ...` does, in this process."""
    args = ["--checkpoint", str(checkpoint), "--output_dir", str(output_dir)]
    return exit_in_process(monkeypatch, capsys, "scripts/export_pi0.py", *args)


def with_random_flag(policy):
    torch.nn.init.normal_(policy.model.condition_embedding.weight, std=0.5)  # a flag that changes the actions
    return policy


def graph_free_config(**overrides):
    config = make_config(use_graph=False, **overrides)
    config.input_features = {key: f for key, f in config.input_features.items() if key != GRAPH_KEY}
    return config


EXACT = {
    "pi0_cfg at w=1": lambda: with_random_flag(make_pi0_policy("tiny", cfg_config(guidance_weight=1.0), PI0CFGPolicy)),
    "pi0_graph without graph": lambda: make_pi0_policy("tiny", graph_free_config(), PI0GraphPolicy),
    "pi0_graph_cfg without graph, w=1": lambda: with_random_flag(
        make_pi0_policy("tiny", PI0GraphCFGConfig.from_config(graph_free_config()), PI0GraphCFGPolicy)
    ),
}


@pytest.mark.parametrize("kind", EXACT)
def test_export_is_exact_through_lerobots_own_loader(kind, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    source = EXACT[kind]()
    source.save_pretrained(tmp_path / "source")
    code, error = export(monkeypatch, capsys, tmp_path / "source", tmp_path / "plain")
    assert code == 0, error

    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    pi0_fields = {f.name for f in dataclasses.fields(PI0Config)}
    assert saved["type"] == "pi0" and set(saved) - {"type"} <= pi0_fields
    assert type(PreTrainedConfig.from_pretrained(tmp_path / "plain")) is PI0Config  # what LeRobot reads at full size
    with model_size_context("tiny"):  # LeRobot has no tiny Gemma: the size is the only thing supplied
        plain = PI0Policy.from_pretrained(tmp_path / "plain")

    batch = make_batch()
    del batch[GRAPH_KEY], batch["action"]
    noise = torch.randn(2, CHUNK, 32, generator=torch.Generator().manual_seed(1))
    expected = source.predict_action_chunk(batch, noise=noise)
    torch.testing.assert_close(plain.predict_action_chunk(batch, noise=noise), expected, rtol=1e-5, atol=1e-5)


def test_no_exact_export_is_refused(tmp_path, monkeypatch, capsys):
    make_pi0_policy("tiny", make_config(), PI0GraphPolicy).save_pretrained(tmp_path / "graph")
    code, error = export(monkeypatch, capsys, tmp_path / "graph", tmp_path / "out")
    assert code == 2 and "uses its graph (use_graph: true)" in error and "Traceback" not in error

    make_pi0_policy("tiny", cfg_config(guidance_weight=2.0), PI0CFGPolicy).save_pretrained(tmp_path / "cfg_w2")
    code, error = export(monkeypatch, capsys, tmp_path / "cfg_w2", tmp_path / "out")
    assert code == 2 and "samples with guidance weight 2.0" in error
    assert not (tmp_path / "out").exists()
