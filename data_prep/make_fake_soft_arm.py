"""Generate a small raw soft-arm dataset (kinematic, no physics) for `make debug` and the tests.

A planar arm of 10 constant-curvature segments; each of the 10 actuator channels drives one
segment's curvature through a first-order lag. A red (or blue) ball is placed where a random
curvature profile puts the tip, and a scripted expert commands that profile, so the ball in the
image and the arm's current shape in the graph together determine the actions. Node features
(19 per segment): position (3, m), velocity (3, m/s), tangent (3), normal (3), curvature (1, 1/m),
actuation (1), ball position relative to the node (3, m), node index as sin/cos (2).

The physical simulator of the soft arm (MuJoCo) is a later issue; this only feeds the pipeline.

    python data_prep/make_fake_soft_arm.py --output_dir artifacts/soft_arm_raw_debug --episodes 12
"""

import argparse
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from lib.data.soft_arm import RawEpisode, save_raw_episode
from lib.envs.soft_arm.features import ACTION_DIM, NODE_FEATURES, NUM_NODES
from lib.run.keys import stable_key

SEGMENT_LENGTH = 0.05  # m
RESPONSE = 0.25  # fraction of the commanded curvature change reached per step
INSTRUCTIONS = {"red": ("touch the red ball", "reach the red ball"), "blue": ("touch the blue target",)}
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def forward_kinematics(curvature: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Node (segment end) positions (N, 3) and heading angles (N,) of the planar arm."""
    heading = np.cumsum(curvature * SEGMENT_LENGTH) + np.pi / 2  # base points up
    steps = SEGMENT_LENGTH * np.stack([np.cos(heading), np.sin(heading), np.zeros_like(heading)], axis=-1)
    return np.cumsum(steps, axis=0), heading


def node_features(curvature, previous_positions, actuation, ball, fps) -> np.ndarray:
    positions, heading = forward_kinematics(curvature)
    velocity = (positions - previous_positions) * fps
    tangent = np.stack([np.cos(heading), np.sin(heading), np.zeros(NUM_NODES)], axis=-1)
    normal = np.stack([-np.sin(heading), np.cos(heading), np.zeros(NUM_NODES)], axis=-1)
    index_angle = np.arange(NUM_NODES) / NUM_NODES * np.pi
    features = np.concatenate(
        [
            positions,
            velocity,
            tangent,
            normal,
            curvature[:, None],
            actuation[:, None],
            ball[None] - positions,
            np.sin(index_angle)[:, None],
            np.cos(index_angle)[:, None],
        ],
        axis=-1,
    )
    assert features.shape == (NUM_NODES, NODE_FEATURES)
    return features.astype(np.float32)


def render(curvature: np.ndarray, ball: np.ndarray, color: str, size: int) -> np.ndarray:
    image = np.full((size, size, 3), 235, dtype=np.uint8)
    scale = size / (2.4 * NUM_NODES * SEGMENT_LENGTH)

    def pixel(point):
        return int(size / 2 + point[0] * scale), int(size * 0.95 - point[1] * scale)

    positions, _ = forward_kinematics(curvature)
    points = [pixel(np.zeros(3))] + [pixel(p) for p in positions]
    cv2.polylines(image, [np.array(points, dtype=np.int32)], False, (40, 40, 40), max(1, size // 40))
    cv2.circle(image, pixel(ball), max(2, size // 20), COLORS[color], -1)
    return image


def make_episode(seed: int, length: int, fps: int, image_size: int) -> RawEpisode:
    rng = np.random.default_rng(seed)
    goal_curvature = np.cumsum(rng.normal(0.0, 1.2, NUM_NODES)) * 0.6
    ball = forward_kinematics(goal_curvature)[0][-1]
    color = str(rng.choice(list(INSTRUCTIONS)))
    instruction = str(rng.choice(INSTRUCTIONS[color]))
    curvature = rng.normal(0.0, 0.5, NUM_NODES)
    positions = forward_kinematics(curvature)[0]
    images, actions, graph = [], [], []
    for _ in range(length):
        action = goal_curvature + rng.normal(0.0, 0.05, NUM_NODES)
        images.append(render(curvature, ball, color, image_size))
        graph.append(node_features(curvature, positions, action, ball, fps))
        actions.append(action)
        positions = forward_kinematics(curvature)[0]
        curvature = curvature + RESPONSE * (action - curvature)
    actions = np.asarray(actions, dtype=np.float32)
    assert actions.shape[1] == ACTION_DIM
    state = np.concatenate([np.zeros((1, ACTION_DIM)), actions[:-1]]).astype(np.float32)
    return RawEpisode(
        path=Path(),
        images=np.stack(images),
        actions=actions,
        graph=np.stack(graph),
        state=state,
        instruction=instruction,
        fps=fps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--length", type=int, default=40, help="steps per episode")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in tqdm(range(args.episodes), desc="episodes"):
        path = args.output_dir / f"episode_{index:06d}.npz"
        if path.exists():  # existing episodes are kept: the generator resumes
            continue
        save_raw_episode(
            path, make_episode(stable_key("fake episode", args.seed, index), args.length, args.fps, args.image_size)
        )
        written += 1
    print(f"{written} episodes written, {args.episodes - written} kept, in {args.output_dir}")


if __name__ == "__main__":
    main()
