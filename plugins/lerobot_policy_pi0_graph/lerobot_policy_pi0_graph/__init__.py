"""LeRobot policy plugin for this repository's pi0 variants.

Importing it registers the config types `pi0_graph` (graph tokens), `pi0_cfg` (the CFG-RL optimality
flag) and `pi0_graph_cfg` (both) with LeRobot's `PreTrainedConfig` registry. LeRobot's factory
(`get_policy_class`, `make_policy`) then finds each `<X>Policy` beside its `<X>Config`, so
`lerobot-eval --policy.path=CHECKPOINT` and `PreTrainedConfig.from_pretrained` open the checkpoints
this project writes. LeRobot's scripts import the plugin themselves (`register_third_party_plugins`);
a Python session calls that function, or imports this package, before loading.
"""

from lib.policies.flag_pi0 import PI0CFGConfig, PI0CFGPolicy, PI0GraphCFGConfig, PI0GraphCFGPolicy
from lib.policies.graph_pi0 import PI0GraphConfig, PI0GraphPolicy

__all__ = [
    "PI0CFGConfig",
    "PI0CFGPolicy",
    "PI0GraphCFGConfig",
    "PI0GraphCFGPolicy",
    "PI0GraphConfig",
    "PI0GraphPolicy",
]
