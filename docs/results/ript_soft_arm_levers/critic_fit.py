"""How well can a critic predict a window's episode outcome from what the policy sees (minus the
images)? 240 rollouts of the BC start (60 training task seeds x 4, guidance 2), cross-fitted by
task seed over 2 folds as lib/rl/critic.py does; explained variance on the unseen fold, mean of
3-5 draws of 20, 40 or 60 seeds. Run from the repository root:

    .venv/bin/python docs/results/ript_soft_arm_levers/critic_fit.py

The MLP is the first critic tried (64-64 tanh, AdamW lr 3e-3, wd 1e-3, full batch); "tip" keeps
the tip node's offset to the ball, its planar distance and the steps elapsed (a soft-arm-specific
choice the shipped critic does not make)."""

import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, ".")
sys.path.insert(0, "scripts")
from ript_soft_arm import TRAIN_SEED_START, load_rl_policy  # noqa: E402

from lib.envs.soft_arm.sim import SoftArmVectorRollout  # noqa: E402
from lib.policies.policy_fn import make_policy_fn  # noqa: E402
from lib.rl.critic import explained_variance, fit_critic, window_features  # noqa: E402

torch.manual_seed(0)
policy, pre, post, _ = load_rl_policy("outputs/ript_soft_arm/bc_few20/checkpoints/last/pretrained_model", 2.0, "cpu")
with SoftArmVectorRollout(16, 8, 40, 224) as envs:
    requests = [{"seed": TRAIN_SEED_START + 1000 + g} for g in range(60) for _ in range(4)]
    episodes = envs.run(requests, make_policy_fn(policy, pre, post))
data = [(i // 4, window_features(e.windows), float(e.success)) for i, e in enumerate(episodes)]
print(f"{len(episodes)} episodes, success {np.mean([e.success for e in episodes]):.1%}")


def mlp(steps):
    def fit(x, y):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(x.shape[1], 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
        for _ in range(steps):
            loss = nn.functional.mse_loss(net((x - mean) / std).squeeze(-1), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return lambda z: net((z - mean) / std).squeeze(-1).detach()

    return fit


def ridge(penalty):
    return lambda x, y: fit_critic(x, y, penalty)


def tip(features):
    graph = features[:, :190].reshape(-1, 10, 19)  # window_features sorts the keys: graph, state, steps
    offset = graph[:, -1, 14:17]
    return np.concatenate([offset, np.linalg.norm(offset[:, :2], axis=1, keepdims=True), features[:, -1:]], 1)


def cross_fit(fit, featurize, groups, draw):
    chosen = set(np.random.default_rng(draw).choice(60, groups, replace=False).tolist())
    pairs = []
    for fold in (0, 1):

        def stack(which, fold=fold):
            rows = [d for d in data if d[0] in chosen and (d[0] % 2 == fold) == which]
            x = torch.tensor(np.concatenate([featurize(d[1]) for d in rows]), dtype=torch.float32)
            return x, torch.tensor([d[2] for d in rows for _ in range(len(d[1]))])

        (x, y), (x_test, y_test) = stack(False), stack(True)
        pairs.append((fit(x, y)(x_test), y_test))
    return explained_variance(pairs)


print(
    "| inputs | task seeds | "
    + " | ".join(["MLP 300 steps", "MLP 30 steps", "ridge 30", "ridge 300", "ridge 1000", "ridge 3000"])
    + " |"
)
print("|---|---|---|---|---|---|---|---|")
for name, featurize in (("all non-image", lambda f: f), ("tip only", tip)):
    for groups in (20, 40, 60):
        fits = (mlp(300), mlp(30), ridge(30.0), ridge(300.0), ridge(1000.0), ridge(3000.0))
        cells = [np.mean([cross_fit(f, featurize, groups, draw) for draw in range(3)]) for f in fits]
        print(f"| {name} | {groups} | " + " | ".join(f"{c:+.2f}" for c in cells) + " |")
