"""The flow_noise objective (lib/rl/objectives.py): exact log-probabilities of Flow-Noise sampling, and
real RL updates from real soft-arm rollouts through the engine (lib/rl/ript.py), in this process."""

import copy

import pytest
import torch
from accelerate import Accelerator
from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
from omegaconf import OmegaConf

from lib.envs.soft_arm.features import ACTION_DIM, GRAPH_KEY, IMAGE_KEY, NODE_FEATURES, NUM_NODES, STATE_KEY
from lib.envs.soft_arm.sim import SoftArmSim, SoftArmVectorRollout
from lib.policies.flag_pi0 import PI0GraphCFGConfig, PI0GraphCFGPolicy
from lib.policies.loading import make_pi0_policy
from lib.policies.policy_fn import make_policy_fn, observations_to_batch
from lib.policies.processors import load_tokenizer, make_pi0_processors
from lib.rl.objectives import exploration_noise
from lib.rl.ript import rollout_groups, run_update
from lib.run.schemas import RLConfig

IMAGE, CHUNK, STD = 64, 8, 0.1


@pytest.fixture(scope="module")
def policy_and_processors(tokenizer_dir):
    config = PI0GraphCFGConfig(
        model_size="tiny",
        chunk_size=CHUNK,
        n_action_steps=CHUNK,
        num_inference_steps=4,
        device="cpu",
        input_features={
            IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, IMAGE, IMAGE)),
            STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(ACTION_DIM,)),
            GRAPH_KEY: PolicyFeature(type=FeatureType.STATE, shape=(NUM_NODES, NODE_FEATURES)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        normalization_mapping={key: NormalizationMode.IDENTITY for key in ("VISUAL", "STATE", "ACTION")},
    )
    torch.manual_seed(0)
    policy = make_pi0_policy("tiny", config, PI0GraphCFGPolicy)
    preprocessor, postprocessor = make_pi0_processors(policy.config, load_tokenizer(tokenizer_dir))
    return policy, preprocessor, postprocessor


def test_log_probability_of_a_sampled_chain_matches_a_direct_computation(policy_and_processors):
    """Sampling records each step's Gaussian N(x_k + dt v, std^2) directly; `chain_log_probs`
    recomputes it (with gradient) through LeRobot's training forward: they must agree."""
    policy, preprocessor, _ = policy_and_processors
    sim = SoftArmSim(IMAGE)
    observations = [{**sim.reset(seed), "task": sim.task.instruction} for seed in (1, 2)]
    sim.close()
    batch = preprocessor(observations_to_batch(observations))
    noise = torch.randn(2, CHUNK, 32, generator=torch.Generator().manual_seed(0))
    policy.flow_noise_std = STD
    actions, chain, step_log_probs = policy.sample_with_flow_noise(batch, noise)
    policy.flow_noise_std = 0.0
    assert chain.shape == (2, 5, CHUNK, 32) and step_log_probs.shape == (2, 4, CHUNK, 32)
    assert torch.equal(chain[:, 0], noise) and torch.equal(actions, chain[:, -1, :, :ACTION_DIM])
    recomputed = policy.chain_log_probs(batch, chain, STD)
    torch.testing.assert_close(recomputed, step_log_probs, rtol=1e-4, atol=1e-3)
    # The steps are noisy: the chain is not the deterministic sampler's.
    deterministic = policy.predict_action_chunk(batch, noise=noise)
    assert not torch.allclose(deterministic, actions, atol=1e-3)


def soft_arm_windows(policy, preprocessor, postprocessor, objective: str):
    """Real windows: 2 tasks x K=2 episodes of the tiny policy on the soft arm."""
    rl = OmegaConf.structured(RLConfig(objective=objective, flow_noise_std=STD, update_epochs=1, minibatch_size=4))
    sink = []
    policy_fn = make_policy_fn(policy, preprocessor, postprocessor)
    envs = SoftArmVectorRollout(num_envs=2, replan_steps=4, max_steps=8, image_size=IMAGE)
    with envs, exploration_noise(policy, rl):
        rollout_groups(envs, policy_fn, [{"seed": 5}, {"seed": 6}], 2, sink)
    return rl, [window for episode in sink for window in episode.windows]


@pytest.mark.parametrize("objective", ["flow_noise", "cfg_rl"])
def test_a_real_update_from_soft_arm_rollouts(policy_and_processors, objective):
    policy, preprocessor, postprocessor = policy_and_processors
    rl, windows = soft_arm_windows(policy, preprocessor, postprocessor, objective)
    assert 4 <= len(windows) <= 4 * 2  # 4 episodes of at most 8 steps, a policy call every 4
    if objective == "flow_noise":
        assert all(w.extras["flow_chain"].shape == (5, CHUNK, 32) for w in windows)
    else:
        assert all(not w.extras for w in windows)

    def updated(advantages):
        trained = copy.deepcopy(policy)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3, weight_decay=0.0)
        losses = run_update(
            Accelerator(cpu=True), trained, optimizer, preprocessor, windows, advantages, rl, 1.0, seed=0, iteration=1
        )
        return trained.state_dict(), losses

    before = policy.state_dict()
    after, losses = updated([1.0 if i % 2 else -1.0 for i in range(len(windows))])
    assert len(losses) == -(-len(windows) // 4) and all(torch.isfinite(loss) for loss in losses)
    assert not torch.equal(after["model.action_out_proj.weight"], before["model.action_out_proj.weight"])
    if objective == "flow_noise":
        # Zero advantages: zero loss and gradient; AdamW without weight decay moves nothing.
        unchanged, losses = updated([0.0] * len(windows))
        assert all(loss == 0 for loss in losses)
        assert all(torch.equal(before[key], value) for key, value in unchanged.items())
