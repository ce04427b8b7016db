"""LeRobot's own tools open this project's checkpoints: the policy plugin
`plugins/lerobot_policy_pi0_graph` (installed by `make install`) is found by LeRobot's plugin
discovery, and LeRobot's factory then loads `pi0_graph` and `pi0_cfg` checkpoints."""

import json
import os

import pytest
import torch
from helpers import CHUNK, PYTHON, cfg_config, fake_hub_tokenizer, make_batch, make_config, run
from lerobot.configs import NormalizationMode
from safetensors.torch import load_file, save_file

from lib.policies.flag_pi0 import PI0CFGPolicy
from lib.policies.graph_pi0 import GRAPH_KEY, PI0GraphPolicy
from lib.policies.loading import make_pi0_policy

# A process as LeRobot's scripts run it: no import of this repository's `lib` by hand; LeRobot's
# discovery imports the installed plugin, its registry gives the config type and its factory the class.
LEROBOT_SIDE = """
import sys
from safetensors.torch import load_file, save_file
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import get_policy_class
from lerobot.utils.import_utils import register_third_party_plugins

assert "lib" not in sys.modules
register_third_party_plugins()
for checkpoint, inputs_file, actions_file in zip(*[iter(sys.argv[1:])] * 3):
    config = PreTrainedConfig.from_pretrained(checkpoint)
    policy = get_policy_class(config.type).from_pretrained(checkpoint, config=config)
    inputs = load_file(inputs_file)
    noise = inputs.pop("noise")
    actions = policy.predict_action_chunk(inputs, noise=noise)
    save_file({"actions": actions.contiguous()}, actions_file)
    print(config.type, type(policy).__module__, type(policy).__name__)
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A graph checkpoint and a CFG checkpoint whose flag embedding is not zero (so guidance acts)."""
    root = tmp_path_factory.mktemp("plugin_checkpoints")
    torch.manual_seed(0)
    make_pi0_policy("tiny", make_config(), PI0GraphPolicy).save_pretrained(root / "pi0_graph")
    cfg = make_pi0_policy("tiny", cfg_config(), PI0CFGPolicy)
    torch.nn.init.normal_(cfg.model.condition_embedding.weight, std=0.5)
    cfg.save_pretrained(root / "pi0_cfg")
    return root


def test_lerobot_discovery_and_factory_load_both_checkpoint_kinds(checkpoints, tmp_path):
    ours = {"pi0_graph": PI0GraphPolicy, "pi0_cfg": PI0CFGPolicy}
    arguments, expected = [], {}
    for kind, policy_cls in ours.items():
        inputs = make_batch()
        inputs.pop("action")
        if kind == "pi0_cfg":
            inputs.pop(GRAPH_KEY)
        noise = torch.randn(inputs["observation.state"].shape[0], CHUNK, 32, generator=torch.Generator().manual_seed(5))
        save_file({**inputs, "noise": noise}, tmp_path / f"{kind}_inputs.safetensors")
        expected[kind] = policy_cls.from_pretrained(checkpoints / kind).predict_action_chunk(inputs, noise=noise)
        arguments += [str(checkpoints / kind), str(tmp_path / f"{kind}_inputs.safetensors"), str(tmp_path / kind)]

    result = run([PYTHON, "-c", LEROBOT_SIDE, *arguments])
    assert "pi0_graph lib.policies.graph_pi0 PI0GraphPolicy" in result.stdout
    assert "pi0_cfg lib.policies.flag_pi0 PI0CFGPolicy" in result.stdout
    for kind in ours:
        torch.testing.assert_close(load_file(tmp_path / kind)["actions"], expected[kind], rtol=1e-6, atol=1e-6)


# A run whose tokenizer comes from a hub id (here from a hand-built Hugging Face cache holding the
# project's tiny tokenizer): our processors are saved with the checkpoint; LeRobot's own factory
# rebuilds them from it with no tokenizer handed in, and processes a batch exactly as ours do.
HUB_TOKENIZER_RUN = """
import sys
import torch
from lerobot.configs import NormalizationMode
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from safetensors.torch import load_file
from lib.policies.flag_pi0 import PI0CFGConfig
from lib.policies.processors import load_pi0_processors, load_tokenizer, make_pi0_processors

checkpoint, inputs_file = sys.argv[1:]
tokenizer = load_tokenizer("someone/tiny-tokenizer")
config = PreTrainedConfig.from_pretrained(checkpoint)
ours, ours_post = make_pi0_processors(config, tokenizer)
ours.save_pretrained(checkpoint)
ours_post.save_pretrained(checkpoint)
theirs, _ = make_pre_post_processors(PreTrainedConfig.from_pretrained(checkpoint), pretrained_path=checkpoint)
reloaded, _ = load_pi0_processors(checkpoint, tokenizer)
inputs = {**load_file(inputs_file), "task": ["pick up the red ball", "touch the blue ball"]}
expected = ours(dict(inputs))
for pipeline in (theirs, reloaded):
    batch = pipeline(dict(inputs))
    for key in ("observation.language.tokens", "observation.language.attention_mask", "observation.state"):
        assert torch.equal(batch[key], expected[key]), key
print("tokenizer_name", [s.tokenizer_name for s in theirs.steps if hasattr(s, "tokenizer_name")])
"""


def test_lerobots_processor_factory_rebuilds_a_hub_tokenizer(tokenizer_dir, tmp_path):
    fake_hub_tokenizer(tokenizer_dir, tmp_path / "hub")

    config = cfg_config()
    config.normalization_mapping = {kind: NormalizationMode.IDENTITY for kind in ("VISUAL", "STATE", "ACTION")}
    config.save_pretrained(tmp_path / "checkpoint")
    inputs = make_batch()
    for key in (GRAPH_KEY, "action", "observation.language.tokens", "observation.language.attention_mask"):
        inputs.pop(key)
    save_file(inputs, tmp_path / "inputs.safetensors")
    result = run(
        [PYTHON, "-c", HUB_TOKENIZER_RUN, str(tmp_path / "checkpoint"), str(tmp_path / "inputs.safetensors")],
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert "tokenizer_name ['someone/tiny-tokenizer']" in result.stdout
    saved = json.loads((tmp_path / "checkpoint" / "policy_preprocessor.json").read_text())
    step = next(s for s in saved["steps"] if s["registry_name"] == "tokenizer_processor")
    assert step["config"]["tokenizer_name"] == "someone/tiny-tokenizer"
