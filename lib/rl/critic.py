"""A learned progress baseline for RIPT: one advantage per window of a rollout, so the windows of a
group whose K rollouts all failed are still ranked (`rl.advantage=critic`).

A linear critic V(o) regresses the episode's reward (`reward_of`: 1 for a success) from a window's
observation, fitted on the iteration's rollouts (every group rolled out, dropped ones included).
A window's advantage is its change of value, A_t = V(o_{t+1}) - V(o_t), the last window's
R - V(o_T): a window that brought the arm closer to where successes start gains, even in a failed
episode. The critic sees what the policy sees at that step, minus the images: every other
`observation.*` array (the soft arm's cable commands and graph, which holds the ball's offset from
each node; LIBERO's proprioception) and the steps elapsed; never privileged simulator state.

Cross-fitted: the groups are split in two folds, and each fold's windows are valued by a critic
fitted on the other fold only. A critic that saw a window's own episode would have memorised its
outcome (V(o_t) = R for every window: A = 0 everywhere).

Labels follow RECAP's rule: the top `positive_quantile` of the iteration's window advantages are
the positives. The advantages handed to the objectives are shifted by that threshold, so A > 0
exactly for the positive windows (cfg_rl's optimal flag, advantage_filtered's filter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lib.envs.vector_rollout import IMAGE_PREFIX, Window


def window_features(windows: Sequence[Window]) -> np.ndarray:
    """(windows, features) critic inputs of an episode's windows: the non-image observation arrays,
    flattened, and the control steps elapsed before each window."""
    rows, elapsed = [], 0
    for window in windows:
        arrays = [
            np.asarray(value, dtype=np.float32).ravel()
            for key, value in sorted(window.observation.items())
            if key.startswith("observation.") and not key.startswith(IMAGE_PREFIX)
        ]
        rows.append(np.concatenate([*arrays, np.array([elapsed], dtype=np.float32)]))
        elapsed += window.executed
    return np.stack(rows)


@dataclass
class ProgressCritic:
    """V(o) = w . standardise(o) + b: ridge regression on standardised features (their mean and
    std in the fit's data). Linear and strongly regularised on purpose: an iteration holds a few
    hundred windows of a few hundred features, where an MLP fits the folds it saw and predicts the
    other worse than a constant (measured: docs/ript.md "Past the plateau")."""

    mean: Tensor
    std: Tensor
    weights: Tensor  # (features + 1,): the last is the bias

    def __call__(self, features: Tensor) -> Tensor:
        standardised = (features - self.mean) / self.std
        return standardised @ self.weights[:-1] + self.weights[-1]


def fit_critic(features: Tensor, targets: Tensor, ridge: float) -> ProgressCritic:
    """The closed-form ridge fit of (features, targets); the bias is not penalised."""
    features, targets = features.double(), targets.double()
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(mean)
    design = torch.cat([(features - mean) / std, torch.ones(len(features), 1, dtype=torch.float64)], 1)
    penalty = ridge * torch.eye(design.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0.0
    weights = torch.linalg.solve(design.T @ design + penalty, design.T @ targets)
    return ProgressCritic(mean.float(), std.float(), weights.float())


def _episodes_and_rewards(group: tuple[dict[str, Any], Tensor]) -> list[tuple[Any, float]]:
    state, rewards = group
    return list(zip(state["episodes"], rewards.tolist(), strict=True))


def critic_window_advantages(
    kept: list[tuple[dict[str, Any], Tensor]],
    rolled: list[tuple[dict[str, Any], Tensor]],
    positive_quantile: float,
    ridge: float,
) -> tuple[list[Window], list[float], dict[str, float]]:
    """Every window of the `kept` groups with its cross-fitted critic advantage, shifted so that the
    top `positive_quantile` are > 0 (module docstring); and the fit's figures: the explained
    variance of each window's episode reward on the fold the critic did not see. `rolled` is every
    group of the iteration (`kept` among them); the critics are fitted on its episodes."""
    folds: list[list[tuple[Any, float]]] = [[], []]
    fold_of: dict[int, int] = {}
    for index, group in enumerate(rolled):
        fold_of[id(group[0])] = index % 2
        folds[index % 2].extend(_episodes_and_rewards(group))
    # Each episode's inputs once: a fold's are fitted on by one critic and scored by the other.
    features_of = {id(e): torch.from_numpy(window_features(e.windows)) for fold in folds for e, _ in fold}

    def stacked(episodes: list[tuple[Any, float]]) -> tuple[Tensor, Tensor]:
        features = torch.cat([features_of[id(e)] for e, _ in episodes])
        return features, torch.tensor([r for e, r in episodes for _ in e.windows], dtype=torch.float32)

    critics: list[ProgressCritic | None] = []
    held_out: list[tuple[Tensor, Tensor]] = []
    for fold in (0, 1):
        train = folds[1 - fold]
        if not train:  # one group only: nothing to value it with
            critics.append(None)
            continue
        critics.append(fit_critic(*stacked(train), ridge))
        if folds[fold]:
            scored, targets = stacked(folds[fold])
            held_out.append((critics[-1](scored), targets))
    windows: list[Window] = []
    advantages: list[float] = []
    for group in kept:
        critic = critics[fold_of[id(group[0])]]
        for episode, reward in _episodes_and_rewards(group):
            values = torch.zeros(len(episode.windows)) if critic is None else critic(features_of[id(episode)])
            following = torch.cat([values[1:], torch.tensor([reward])])
            windows.extend(episode.windows)
            advantages.extend((following - values).tolist())
    if advantages:
        threshold = float(np.quantile(advantages, 1.0 - positive_quantile))
        advantages = [a - threshold for a in advantages]
    figures = {"critic_explained_variance": explained_variance(held_out) if held_out else None}
    return windows, advantages, figures


def explained_variance(pairs: list[tuple[Tensor, Tensor]]) -> float:
    """1 - Var(target - prediction) / Var(target) over (prediction, target) pairs."""
    predictions = torch.cat([p for p, _ in pairs])
    targets = torch.cat([t for _, t in pairs]).float()
    variance = targets.var(unbiased=False)
    if variance <= 0:
        return 0.0
    return float(1.0 - (targets - predictions).var(unbiased=False) / variance)
